//! The HTTP port: `/metrics` (Prometheus), `/healthz`, `/readyz`, the alert API and the
//! quarantine API.
//!
//! ```text
//! GET  /metrics                                           OpenMetrics text (Prometheus scrapes it)
//! GET  /healthz                                           200 while the process serves
//! GET  /readyz                                            200 once recovered, assigned and the sink answers; else 503 and why
//! GET  /alerts?state=firing&key=dev-1&severity=critical   alerts, newest first (JSON array),
//!      &limit=100&offset=200                               a page of them (X-Total-Count: all)
//! GET  /alerts/{id}                                       one alert
//! GET  /alerts/stream?severity=critical&event=fired       Server-Sent Events, one per alert event
//! POST /alerts/{id}/ack                                   acknowledge   (Authorization: Bearer <token>)
//! POST /alerts/{id}/resolve                               resolve       (Authorization: Bearer <token>)
//! GET  /quarantine                                        quarantined keys and when they come back
//! POST /quarantine/{key}/release                          release a key now (Authorization: Bearer <token>)
//! POST /ingest/{source}                                   records into an HTTP ingest source (Authorization: Bearer <token>)
//! GET  /ws/{sink}?device_id=d-1                           WebSocket: a live feed sink's rows, one JSON object per message
//! GET  /                                                 the web console (and /console.js, /console.css); off with --no-console
//! GET  /api/console                                       what the console shows, as JSON (/api/console/stream: every second, SSE)
//! GET  /dead-letters/recent?kind=schema&step=parse        the last dead letters, newest first, without payloads
//! POST /config                                            a changed pipeline (YAML body) applied live, or 409 and why (Authorization: Bearer <token>)
//! GET  /tables                                            the ids of the `table` steps running here
//! GET  /tables/{id}?prefix=dev-&limit=100                 rows whose key starts with the prefix (JSON: rows, truncated)
//! GET  /tables/{id}/{key}                                 one key's current row (404 when not held here; `held_by` in a group)
//! ```
//!
//! The server is axum on a thread of its own with a single-threaded runtime: however busy the
//! job's workers are, probes and scrapes are answered (the workers cannot starve it), and a
//! flood of connections costs the workers nothing. Mutating calls need the configured bearer
//! token; with none configured they are refused, so an API left open by mistake can only be
//! read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use weir_connectors::alerting::{AlertMatch, LiveAlerts};
use weir_core::metrics::Registry;
use weir_core::quarantine::Quarantine;
use weir_core::{CoreError, Result};
use weir_ops::alerts::{alert_json, AlertError, AlertEvent, AlertState};
use weir_ops::AlertBoard;

/// What the port serves.
#[derive(Clone)]
pub struct HttpState {
    /// Job name, the `job` label of metrics.
    pub job: String,
    /// The running job's metrics.
    pub registry: Arc<Registry>,
    /// The `alert` steps' books.
    pub alerts: Arc<AlertBoard>,
    /// Their events as they happen.
    pub live: Arc<LiveAlerts>,
    /// The job's quarantine, when it has one (`GET /quarantine`).
    pub quarantine: Option<Arc<Quarantine>>,
    /// The bearer token mutating calls need; `None` refuses them.
    pub token: Option<String>,
    /// The HTTP ingest sources, by source id (`POST /ingest/<id>`).
    pub ingest: Arc<crate::connector::IngestHubs>,
    /// The live feed sinks, by sink id (`GET /ws/<id>`).
    pub feeds: Arc<crate::connector::FeedHubs>,
    /// The running `table` steps (`GET /tables/<id>/<key>`).
    pub tables: weir_ops::Tables,
    /// In a group of processes: who holds a key this one does not.
    pub holders: Option<weir_core::runtime::KeyHolders>,
    /// Applies a changed pipeline while it runs (`POST /config`), when the runner offers it.
    pub reloader: Option<Arc<crate::live::Reloader>>,
    /// The web console's view of the job (`None`: no console, as with `--no-console`).
    pub console: Option<Arc<crate::console::ConsoleInfo>>,
    /// The last dead letters (`GET /dead-letters/recent`).
    pub recent_dead_letters: Option<Arc<weir_core::deadletter::RecentDeadLetters>>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("job", &self.job)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// Metrics and health only: no alerts, no quarantine, no token.
    pub fn metrics_only(job: String, registry: Arc<Registry>) -> Self {
        Self {
            job,
            registry,
            alerts: Arc::default(),
            live: Arc::default(),
            quarantine: None,
            token: None,
            ingest: Arc::default(),
            feeds: Arc::default(),
            tables: weir_ops::Tables::default(),
            holders: None,
            reloader: None,
            console: None,
            recent_dead_letters: None,
        }
    }
}

/// A running HTTP server on its own thread; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `9464` means `127.0.0.1:9464`: the port is loopback unless an address says otherwise.
fn bind_addr(addr: &str) -> String {
    if !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    }
}

impl MetricsServer {
    /// Binds `addr` (a bare port binds loopback) and serves `state` from a thread of its own.
    ///
    /// # Errors
    /// If the address cannot be bound or the thread cannot start.
    pub async fn start(addr: &str, state: HttpState) -> Result<Self> {
        let bind = bind_addr(addr);
        let listener = std::net::TcpListener::bind(&bind)
            .map_err(|e| CoreError::io(format!("cannot listen on `{bind}` for the HTTP port"), e))?;
        listener.set_nonblocking(true).map_err(|e| CoreError::io("HTTP listener", e))?;
        let addr = listener.local_addr().map_err(|e| CoreError::io("HTTP listener address", e))?;
        if !addr.ip().is_loopback() && state.token.is_none() {
            tracing::warn!(%addr, "The HTTP port is reachable from the network; changes through the API stay refused without a token.");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CoreError::io("cannot start the HTTP port's runtime", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sampler = state.console.clone().map(|info| (info, state.registry.clone()));
        let app = router(state);
        let thread = std::thread::Builder::new()
            .name("weir-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    // The console's charts start with the last minutes, not when a page opens.
                    let _sampling = sampler.map(|(info, registry)| {
                        weir_core::task::SpawnedTask::spawn(async move {
                            let mut every = tokio::time::interval(Duration::from_secs(1));
                            loop {
                                every.tick().await;
                                info.sample(&registry);
                            }
                        })
                    });
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "The HTTP port could not start.");
                            return;
                        }
                    };
                    // No Nagle: a feed's small writes would wait for the previous one's
                    // acknowledgement, which the client delays by up to 40 ms.
                    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY could not be set on a connection.");
                        }
                    });
                    // Dropping the runtime when this returns ends open streams too, so a
                    // server that is dropped never waits for its clients.
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                tracing::error!(error = %e, "The HTTP port stopped.");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| CoreError::io("cannot start the HTTP port's thread", e))?;
        tracing::info!(%addr, "Serving metrics, health and the alert API.");
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Shared = Arc<HttpState>;

fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/alerts", get(list))
        .route("/alerts/stream", get(stream))
        .route("/alerts/{id}", get(one))
        .route("/alerts/{id}/ack", post(|s, h, p| act(s, h, p, false)))
        .route("/alerts/{id}/resolve", post(|s, h, p| act(s, h, p, true)))
        .route("/quarantine", get(quarantined))
        .route("/quarantine/{key}/release", post(release))
        // Each source checks its own `max_body`.
        .route("/ingest/{source}", post(ingest).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/ws/{sink}", get(feed))
        .route("/config", post(reload_config))
        .route("/", get(|s: State<Shared>| async move { static_file(&s, "text/html; charset=utf-8", crate::console::INDEX_HTML) }))
        .route("/console.js", get(|s: State<Shared>| async move { static_file(&s, "text/javascript", crate::console::CONSOLE_JS) }))
        .route("/console.css", get(|s: State<Shared>| async move { static_file(&s, "text/css", crate::console::CONSOLE_CSS) }))
        .route("/api/console", get(console_snapshot))
        .route("/api/console/stream", get(console_stream))
        .route("/dead-letters/recent", get(recent_dead_letters))
        .route("/tables", get(|State(s): State<Shared>| async move { json_body(&serde_json::json!(s.tables.ids())) }))
        .route("/tables/{id}", get(table_scan))
        .route("/tables/{id}/{*key}", get(table_get))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /readyz, /alerts, /alerts/stream, /quarantine, /tables, POST /alerts/{id}/ack or /resolve",
            )
        })
        .with_state(Arc::new(state))
}

/// At most this many alerts in one `GET /alerts` reply unless `limit` says otherwise: a
/// dashboard polling a flood of alerts gets a page, not the whole book.
pub const DEFAULT_ALERT_PAGE: usize = 1000;

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, json_body(&serde_json::json!({ "error": message.to_string() }))).into_response()
}

/// A JSON body with the trailing newline that `curl` users expect.
fn json_body(v: &serde_json::Value) -> ([(header::HeaderName, HeaderValue); 1], String) {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], format!("{v}\n"))
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token of a mutating call: the refusal to send, if any.
fn refusal(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.token else {
        return Some(json_error(
            StatusCode::FORBIDDEN,
            "changes through the API are disabled: set `api.token` in the pipeline or WEIR_API_TOKEN in the environment",
        ));
    };
    token_refusal(token, headers)
}

/// The refusal of a request without `Authorization: Bearer <token>`, if any.
fn token_refusal(token: &str, headers: &HeaderMap) -> Option<Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    if bearer.is_some_and(|b| same_token(b, token)) {
        return None;
    }
    let mut r = json_error(StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer <token>` header is required");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// A table's rows as JSON objects (nested structs as objects).
fn rows_json(rows: &arrow_array::RecordBatch) -> std::result::Result<Vec<serde_json::Value>, String> {
    use weir_formats::Encoder as _;
    let mut enc = weir_formats::JsonEncoder::new(rows.schema()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    enc.encode(rows, &mut out).map_err(|e| e.to_string())?;
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| e.to_string()))
        .collect()
}

fn no_table(s: &HttpState, id: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no table `{id}` runs in this process (tables here: {})", s.tables.ids().join(", ")),
    )
}

/// `GET /tables/<id>?prefix=dev-&limit=100`: the rows of a table whose (first) key starts
/// with the prefix, up to the limit (default 1000); `truncated` says more matched.
async fn table_scan(State(s): State<Shared>, Path(id): Path<String>, Query(q): Params) -> Response {
    let prefix = param(&q, "prefix").unwrap_or("");
    let limit = match param(&q, "limit").map(str::parse::<usize>) {
        None => DEFAULT_ALERT_PAGE,
        Some(Ok(n)) => n,
        Some(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "`limit` must be a whole number"),
    };
    match s.tables.scan(&id, prefix, limit) {
        Ok(weir_ops::TableAnswer::NoTable) => no_table(&s, &id),
        Ok(weir_ops::TableAnswer::Rows(rows, truncated)) => match rows_json(&rows) {
            Ok(rows) => {
                json_body(&serde_json::json!({ "table": id, "rows": rows, "truncated": truncated })).into_response()
            }
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Err(e) => json_error(StatusCode::BAD_REQUEST, e),
    }
}

/// `GET /tables/<id>/<key>` (`<k1>/<k2>` for a key of several columns): the key's current
/// row; 404 when this process does not hold it, saying which member does when the job runs
/// in a group.
async fn table_get(State(s): State<Shared>, Path((id, key)): Path<(String, String)>) -> Response {
    let parts: Vec<&str> = key.split('/').collect();
    match s.tables.get(&id, &parts) {
        Ok(weir_ops::TableAnswer::NoTable) => no_table(&s, &id),
        Ok(weir_ops::TableAnswer::Rows(rows, _)) => match rows_json(&rows) {
            Ok(mut rows) if !rows.is_empty() => json_body(&rows.swap_remove(0)).into_response(),
            Ok(_) => {
                let mut body = serde_json::json!({ "error": format!("key `{key}` is not in table `{id}` here") });
                if let Some(h) = &s.holders {
                    let cols = s.tables.key_columns(&id, &parts).ok().flatten().unwrap_or_default();
                    if let Some(first) = cols.first() {
                        match h.holder(first).await {
                            Ok(Some((partition, member))) => {
                                body["held_by"] = serde_json::json!({ "partition": partition, "member": member });
                            }
                            Ok(None) => {}
                            Err(e) => body["held_by_error"] = serde_json::json!(e.to_string()),
                        }
                    }
                }
                (StatusCode::NOT_FOUND, json_body(&body)).into_response()
            }
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Err(e) => json_error(StatusCode::BAD_REQUEST, e),
    }
}

/// `GET /ws/<sink>`: a WebSocket of the live feed sink's rows, one JSON object per text
/// message, only rows whose columns equal the query's values (`?device_id=d-1&site=berlin`).
/// With an API token, the client gives it as a bearer header or `?token=` (browsers cannot set
/// headers on a WebSocket).
async fn feed(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(sink): Path<String>,
    Query(q): Params,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let hub = s.feeds.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&sink).cloned();
    let Some(hub) = hub else {
        return json_error(StatusCode::NOT_FOUND, format!("no websocket sink `{sink}` in this pipeline"));
    };
    if let Some(token) = &s.token {
        let given = param(&q, "token");
        if !given.is_some_and(|g| same_token(g, token)) {
            if let Some(r) = token_refusal(token, &headers) {
                return r;
            }
        }
    }
    let filters: Vec<(String, String)> = q.iter().filter(|(k, _)| k != "token").cloned().collect();
    let client = match hub.subscribe(&filters) {
        Ok(c) => c,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    ws.on_upgrade(move |socket| serve_feed(socket, client))
}

async fn serve_feed(socket: axum::extract::ws::WebSocket, mut client: weir_connectors::live_feed::FeedClient) {
    use axum::extract::ws::{CloseFrame, Message};
    use futures::{SinkExt, StreamExt};
    use weir_connectors::live_feed::FeedEnd;
    let (mut socket, mut from_client) = socket.split();
    // What the client sends is read by a task of its own, woken only when something arrives:
    // polled beside the rows, a read would be tried (and its buffer cleared) at every batch.
    // The feed ends when the client closes.
    let mut gone = weir_core::task::SpawnedTask::spawn(async move {
        while let Some(Ok(m)) = from_client.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            rows = client.next() => match rows {
                Ok(rows) if rows.is_empty() => {}
                Ok(rows) => {
                    // A batch's rows are queued as messages and flushed once: a write per
                    // batch, not per row. A connection that takes nothing for this long is
                    // dropped: its task would otherwise wait on it for ever.
                    let send = async {
                        for r in rows {
                            // The rows' JSON, shared with every client: no copy per client.
                            let Ok(text) = axum::extract::ws::Utf8Bytes::try_from(r) else { continue };
                            socket.feed(Message::Text(text)).await?;
                        }
                        socket.flush().await
                    };
                    match tokio::time::timeout(Duration::from_secs(10), send).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            client.note_dropped();
                            return;
                        }
                    }
                }
                Err(end) => {
                    let (code, reason) = match end {
                        FeedEnd::TooSlow(n) => (1008, format!("too slow: {n} batch(es) behind; connect again")),
                        FeedEnd::Closed => (1000, "the pipeline ended".to_string()),
                    };
                    let close = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() })));
                    let _ = tokio::time::timeout(Duration::from_secs(10), close).await;
                    return;
                }
            },
            _ = &mut gone => return,
        }
    }
}

/// `POST /ingest/<source>`: the body's records into that HTTP ingest source.
async fn ingest(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(source): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    use weir_connectors::http_ingest::{BodyFormat, IngestRefusal};
    let hub = s.ingest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&source).cloned();
    let Some(hub) = hub else {
        return json_error(StatusCode::NOT_FOUND, format!("no HTTP ingest source `{source}` in this pipeline"));
    };
    if let Some(r) = token_refusal(hub.token(), &headers) {
        return r;
    }
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let format = match kind.split(';').next().unwrap_or("").trim() {
        "application/json" | "application/x-ndjson" | "application/jsonl" | "application/json-lines" | "text/plain" => {
            BodyFormat::Json
        }
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => BodyFormat::MsgPack,
        other => {
            return json_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type `{other}`: send application/json (an array or JSON Lines) or application/msgpack"
                ),
            )
        }
    };
    if body.len() > hub.max_body() {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body has {} bytes; this source takes at most {} (`max_body`)", body.len(), hub.max_body()),
        );
    }
    // A caller's W3C trace context: the request's rows go on in its trace.
    let trace = weir_core::trace::enabled()
        .then(|| {
            headers.get(weir_core::trace::TRACEPARENT).and_then(|v| weir_core::trace::parse_traceparent(v.as_bytes()))
        })
        .flatten();
    match hub.submit(body.to_vec(), format, trace).await {
        Ok(a) => {
            let rejected: Vec<serde_json::Value> =
                a.rejected.iter().map(|(i, r)| serde_json::json!({ "index": i, "reason": r })).collect();
            json_body(&serde_json::json!({ "accepted": a.accepted, "rejected": rejected })).into_response()
        }
        Err(IngestRefusal::Busy) => {
            let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, "the pipeline is behind; send it again shortly");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(IngestRefusal::Closed) => {
            let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, "no pipeline is reading this source now");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        Err(IngestRefusal::BadBody(e)) => json_error(StatusCode::BAD_REQUEST, e),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(weir_core::metrics::PROMETHEUS_CONTENT_TYPE))],
        s.registry.render_prometheus(&s.job),
    )
        .into_response()
}

async fn readyz(State(s): State<Shared>) -> Response {
    match s.registry.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, json_body(&serde_json::json!({ "ready": false, "reason": why })))
            .into_response(),
    }
}

/// The query string as pairs, in order: parameters may repeat (`?label=a:b&label=c:d`).
type Params = Query<Vec<(String, String)>>;

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

/// Every value of a repeatable parameter, also comma-separated (`?severity=a,b`).
fn params(q: &[(String, String)], name: &str) -> Vec<String> {
    q.iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(',').map(str::to_string))
        .filter(|v| !v.is_empty())
        .collect()
}

/// `?label=team:pumps&label=site:north`: labels an alert must carry.
fn labels(q: &[(String, String)]) -> Vec<(String, String)> {
    q.iter()
        .filter(|(k, _)| k == "label")
        .filter_map(|(_, v)| v.split_once(':').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect()
}

async fn list(State(s): State<Shared>, Query(q): Params) -> Response {
    let st = match param(&q, "state") {
        None => None,
        Some(v) => match AlertState::parse(v) {
            Some(v) => Some(v),
            None => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown state `{v}`; expected firing, acknowledged or resolved"),
                )
            }
        },
    };
    let number = |k: &'static str, default: usize, min: usize| -> std::result::Result<usize, String> {
        match param(&q, k) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= min)
                .ok_or_else(|| format!("`{k}` must be a whole number of at least {min}, not `{v}`")),
        }
    };
    let (limit, offset) = match (number("limit", DEFAULT_ALERT_PAGE, 1), number("offset", 0, 0)) {
        (Ok(l), Ok(o)) => (l, o),
        (Err(e), _) | (_, Err(e)) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let wanted = labels(&q);
    let mut alerts = s.alerts.list(st, param(&q, "key"), param(&q, "severity"));
    alerts.retain(|a| wanted.iter().all(|(k, v)| a.labels.get(k) == Some(v)));
    let total = alerts.len();
    let body: Vec<serde_json::Value> = alerts.iter().skip(offset).take(limit).map(alert_json).collect();
    let mut r = json_body(&serde_json::Value::Array(body)).into_response();
    r.headers_mut().insert("x-total-count", HeaderValue::from(total));
    r
}

async fn one(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.alerts.list(None, None, None).into_iter().find(|a| a.id == id) {
        Some(a) => json_body(&alert_json(&a)).into_response(),
        None => json_error(StatusCode::NOT_FOUND, AlertError::NotFound(id)),
    }
}

async fn act(State(s): State<Shared>, headers: HeaderMap, Path(id): Path<String>, resolve: bool) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    match s.alerts.act(&id, resolve, weir_core::deadletter::now_ms()) {
        Ok(a) => json_body(&alert_json(&a)).into_response(),
        Err(e @ AlertError::NotFound(_)) => json_error(StatusCode::NOT_FOUND, e),
        Err(e @ AlertError::Resolved(_)) => json_error(StatusCode::CONFLICT, e),
    }
}

async fn quarantined(State(s): State<Shared>) -> Response {
    let Some(q) = &s.quarantine else {
        return json_body(&serde_json::json!([])).into_response();
    };
    let keys: Vec<serde_json::Value> = q
        .list(Instant::now(), weir_core::deadletter::now_ms())
        .into_iter()
        .map(|k| serde_json::json!({ "key": k.key, "until_ms": k.until_ms }))
        .collect();
    json_body(&serde_json::Value::Array(keys)).into_response()
}

/// A file of the console, when the console is on.
fn static_file(s: &State<Shared>, content_type: &'static str, body: &'static str) -> Response {
    if s.console.is_none() {
        return json_error(StatusCode::NOT_FOUND, "the web console is off (`--no-console`)");
    }
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response()
}

/// `GET /api/console`: what the console shows (see [`crate::console`]).
async fn console_snapshot(State(s): State<Shared>) -> Response {
    match &s.console {
        Some(info) => {
            let mut snap = crate::console::snapshot(&s, info);
            snap["members"] = group_members(&s).await;
            json_body(&snap).into_response()
        }
        None => json_error(StatusCode::NOT_FOUND, "the web console is off (`--no-console`)"),
    }
}

/// In a group of processes, each member and the partitions it holds (from their records in
/// the checkpoint store); else an empty list.
async fn group_members(s: &HttpState) -> serde_json::Value {
    let Some(h) = &s.holders else { return serde_json::json!([]) };
    match h.members().await {
        Ok(m) => serde_json::Value::Array(
            m.into_iter()
                .map(|(member, partitions)| serde_json::json!({ "member": member, "partitions": partitions }))
                .collect(),
        ),
        Err(e) => serde_json::json!([{ "error": e.to_string() }]),
    }
}

/// `GET /api/console/stream`: a snapshot every second, as Server-Sent Events (`snapshot`).
async fn console_stream(State(s): State<Shared>) -> Response {
    let Some(info) = s.console.clone() else {
        return json_error(StatusCode::NOT_FOUND, "the web console is off (`--no-console`)");
    };
    let every = tokio::time::interval(Duration::from_secs(1));
    // The members are read from the checkpoint store: every 10 s is enough.
    let members = (serde_json::json!([]), 0u32);
    let events = futures::stream::unfold((every, s, info, members), |(mut every, s, info, mut members)| async move {
        every.tick().await;
        if members.1 % 10 == 0 {
            members.0 = group_members(&s).await;
        }
        members.1 += 1;
        let mut snap = crate::console::snapshot(&s, &info);
        snap["members"] = members.0.clone();
        let data = snap.to_string();
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().event("snapshot").data(data)),
            (every, s, info, members),
        ))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive")).into_response()
}

/// `GET /dead-letters/recent?kind=schema&step=parse&limit=100`: the last dead letters
/// (at most 500 are kept), newest first, without their payloads.
async fn recent_dead_letters(State(s): State<Shared>, Query(q): Params) -> Response {
    let Some(recent) = &s.recent_dead_letters else {
        return json_body(&serde_json::json!([])).into_response();
    };
    let limit = param(&q, "limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    json_body(&crate::console::recent_dead_letters(recent, param(&q, "kind"), param(&q, "step"), limit)).into_response()
}

/// `POST /config` with the pipeline's new YAML as the body: applies what can change live
/// (see [`crate::live`]); 409 with the reason when the change needs a restart.
async fn reload_config(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let Some(reloader) = s.reloader.clone() else {
        return json_error(StatusCode::NOT_FOUND, "this runner does not change its pipeline live (`weir run` does)");
    };
    // Parsing and checking the file is quick but not async: off the server's thread.
    match tokio::task::spawn_blocking(move || reloader.apply_text(&body)).await {
        Ok(Ok(changes)) => json_body(&serde_json::json!({ "applied": changes })).into_response(),
        Ok(Err(e)) => json_error(StatusCode::CONFLICT, e),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn release(State(s): State<Shared>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    match &s.quarantine {
        Some(q) if q.release(&key, Instant::now()) => {
            json_body(&serde_json::json!({ "key": key, "released": true })).into_response()
        }
        Some(_) => json_error(StatusCode::NOT_FOUND, format!("key `{key}` is not quarantined")),
        None => json_error(StatusCode::NOT_FOUND, "the pipeline has no quarantine"),
    }
}

/// Server-Sent Events: `event: <kind>` and `data: <json>` per alert event, a comment every
/// 15 s so that proxies keep the connection, and a comment when a slow reader skipped events.
async fn stream(State(s): State<Shared>, Query(q): Params) -> Response {
    let mut events = Vec::new();
    for e in params(&q, "event") {
        match AlertEvent::parse(&e) {
            Some(v) => events.push(v),
            None => return json_error(StatusCode::BAD_REQUEST, format!("unknown event `{e}`")),
        }
    }
    let m = AlertMatch {
        severity: params(&q, "severity"),
        rule: params(&q, "rule"),
        key: params(&q, "key"),
        event: events,
        labels: labels(&q),
    };
    let rx = s.live.subscribe();
    let first =
        futures::stream::once(async { Ok::<_, std::convert::Infallible>(Event::default().comment("connected")) });
    let rest = futures::stream::unfold((rx, m), |(mut rx, m)| async move {
        loop {
            let ev = match rx.recv().await {
                Ok(n) if m.matches(&n) => Event::default().event(n.event.as_str()).data(n.to_json().to_string()),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                    Event::default().comment(format!("skipped {k} events"))
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok(ev), (rx, m)));
        }
    });
    Sse::new(futures::StreamExt::chain(first, rest))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_binds_loopback() {
        assert_eq!(bind_addr("9464"), "127.0.0.1:9464");
        assert_eq!(bind_addr("0.0.0.0:9464"), "0.0.0.0:9464");
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
    }

    #[test]
    fn repeated_and_comma_separated_parameters_are_all_kept() {
        let q = vec![
            ("severity".to_string(), "a,b".to_string()),
            ("severity".to_string(), "c".to_string()),
            ("label".to_string(), "team:pumps".to_string()),
            ("key".to_string(), String::new()),
        ];
        assert_eq!(params(&q, "severity"), ["a", "b", "c"]);
        assert_eq!(labels(&q), [("team".to_string(), "pumps".to_string())]);
        assert_eq!(param(&q, "key"), None, "an empty value is no filter");
    }
}
