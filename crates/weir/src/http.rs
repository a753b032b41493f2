//! The HTTP port: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and the alert API.
//!
//! ```text
//! GET  /alerts?state=firing&key=dev-1&severity=critical   alerts, newest first (JSON array),
//!      &limit=100&offset=200                               a page of them (X-Total-Count: all)
//! GET  /alerts/{id}                                       one alert
//! GET  /alerts/stream?severity=critical&event=fired       Server-Sent Events, one per alert event
//! POST /alerts/{id}/ack                                   acknowledge   (Authorization: Bearer <token>)
//! POST /alerts/{id}/resolve                               resolve       (Authorization: Bearer <token>)
//! ```
//!
//! A deliberately small HTTP/1.1 responder on tokio: one request per connection, no request
//! bodies needed. It serves scrapes, operators and dashboards, not traffic. Mutating calls
//! need the configured bearer token; with none configured they are refused, so an API left
//! open by mistake can only be read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_connectors::alerting::{AlertMatch, LiveAlerts};
use weir_core::metrics::Registry;
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
    /// The bearer token mutating calls need; `None` refuses them.
    pub token: Option<String>,
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
    /// Metrics and health only: no alerts, no token.
    pub fn metrics_only(job: String, registry: Arc<Registry>) -> Self {
        Self { job, registry, alerts: Arc::default(), live: Arc::default(), token: None }
    }
}

/// A running HTTP server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
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
    /// Binds `addr` (a bare port binds loopback) and serves `state`.
    ///
    /// # Errors
    /// If the address cannot be bound.
    pub async fn start(addr: &str, state: HttpState) -> Result<Self> {
        let bind = bind_addr(addr);
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|e| CoreError::io(format!("cannot listen on `{bind}` for the HTTP port"), e))?;
        let addr = listener.local_addr().map_err(|e| CoreError::io("HTTP listener address", e))?;
        if !addr.ip().is_loopback() && state.token.is_none() {
            tracing::warn!(%addr, "The HTTP port is reachable from the network; alert changes stay refused without a token.");
        }
        tracing::info!(%addr, "Serving metrics and the alert API.");
        let state = Arc::new(state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, &state).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A parsed request: what the API looks at.
#[derive(Debug, PartialEq)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    bearer: Option<String>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of a repeatable parameter, also comma-separated (`?severity=a,b`).
    fn params(&self, name: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(',').map(str::to_string))
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// Percent-decoding, `+` as space in queries.
fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect();
    let bearer = lines.filter_map(|l| l.split_once(':')).find_map(|(k, v)| {
        k.trim().eq_ignore_ascii_case("authorization").then(|| {
            let v = v.trim();
            v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or("").trim().to_string()
        })
    });
    Some(Request { method, path: path.to_string(), query, bearer })
}

/// Reads the request head (and drains a small body), at most 16 KiB, within 10 s.
async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let read = async {
        loop {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(String::from_utf8_lossy(&buf[..end]).into_owned());
            }
            if buf.len() > 16 * 1024 {
                return None;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.ok().flatten()
}

/// A response: status line, content type, body.
struct Reply {
    status: &'static str,
    ctype: &'static str,
    body: String,
    /// Further header lines, each ending in CRLF.
    extra: std::borrow::Cow<'static, str>,
}

fn reply(status: &'static str, ctype: &'static str, body: String) -> Reply {
    Reply { status, ctype, body, extra: "".into() }
}

/// At most this many alerts in one `GET /alerts` reply unless `limit` says otherwise: a
/// dashboard polling a flood of alerts gets a page, not the whole book.
pub const DEFAULT_ALERT_PAGE: usize = 1000;

fn json_error(status: &'static str, message: impl std::fmt::Display) -> Reply {
    reply(status, "application/json", format!("{}\n", serde_json::json!({ "error": message.to_string() })))
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve(mut sock: TcpStream, state: &HttpState) -> std::io::Result<()> {
    let Some(head) = read_head(&mut sock).await else {
        return Ok(());
    };
    let Some(req) = parse_request(&head) else {
        return write_reply(&mut sock, json_error("400 Bad Request", "cannot parse the request line")).await;
    };
    if req.method == "GET" && req.path == "/alerts/stream" {
        return stream(sock, state, &req).await;
    }
    let r = route(state, &req);
    write_reply(&mut sock, r).await
}

async fn write_reply(sock: &mut TcpStream, r: Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        r.status,
        r.ctype,
        r.body.len(),
        r.extra
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(r.body.as_bytes()).await?;
    sock.shutdown().await
}

fn route(state: &HttpState, req: &Request) -> Reply {
    let get = req.method == "GET";
    match req.path.as_str() {
        "/metrics" if get => reply("200 OK", "text/plain; version=0.0.4", state.registry.render_prometheus(&state.job)),
        "/healthz" | "/readyz" if get => reply("200 OK", "text/plain", "ok\n".into()),
        "/alerts" if get => list(state, req),
        p if p.starts_with("/alerts/") => {
            let rest = &p["/alerts/".len()..];
            let action = ["ack", "resolve"].into_iter().find(|a| rest.ends_with(&format!("/{a}")));
            match (req.method.as_str(), action) {
                ("POST", Some(a)) => act(state, req, &decode(&rest[..rest.len() - a.len() - 1], false), a == "resolve"),
                ("GET", None) => {
                    let id = decode(rest, false);
                    match state.alerts.list(None, None, None).into_iter().find(|a| a.id == id) {
                        Some(a) => reply("200 OK", "application/json", format!("{}\n", alert_json(&a))),
                        None => json_error("404 Not Found", AlertError::NotFound(id)),
                    }
                }
                _ => Reply {
                    extra: if action.is_some() { "Allow: POST\r\n".into() } else { "Allow: GET\r\n".into() },
                    ..json_error("405 Method Not Allowed", "use POST for /ack and /resolve, GET otherwise")
                },
            }
        }
        "/metrics" | "/healthz" | "/readyz" | "/alerts" => {
            Reply { extra: "Allow: GET\r\n".into(), ..json_error("405 Method Not Allowed", "GET only") }
        }
        _ => json_error(
            "404 Not Found",
            "not found; try /metrics, /healthz, /readyz, /alerts, /alerts/stream, POST /alerts/{id}/ack or /resolve",
        ),
    }
}

/// `?label=team:pumps&label=site:north`: labels an alert must carry.
fn labels(req: &Request) -> Vec<(String, String)> {
    req.query
        .iter()
        .filter(|(k, _)| k == "label")
        .filter_map(|(_, v)| v.split_once(':').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect()
}

fn list(state: &HttpState, req: &Request) -> Reply {
    let st = match req.param("state").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match AlertState::parse(s) {
            Some(v) => Some(v),
            None => {
                return json_error(
                    "400 Bad Request",
                    format!("unknown state `{s}`; expected firing, acknowledged or resolved"),
                )
            }
        },
    };
    let nonempty = |k| req.param(k).filter(|v| !v.is_empty());
    let number = |k: &'static str, default: usize, min: usize| -> std::result::Result<usize, Reply> {
        match nonempty(k) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().ok().filter(|n| *n >= min).ok_or_else(|| {
                json_error("400 Bad Request", format!("`{k}` must be a whole number of at least {min}, not `{v}`"))
            }),
        }
    };
    let (limit, offset) = match (number("limit", DEFAULT_ALERT_PAGE, 1), number("offset", 0, 0)) {
        (Ok(l), Ok(o)) => (l, o),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let wanted = labels(req);
    let mut alerts = state.alerts.list(st, nonempty("key"), nonempty("severity"));
    alerts.retain(|a| wanted.iter().all(|(k, v)| a.labels.get(k) == Some(v)));
    let total = alerts.len();
    let body: Vec<serde_json::Value> = alerts.iter().skip(offset).take(limit).map(alert_json).collect();
    Reply {
        extra: format!("X-Total-Count: {total}\r\n").into(),
        ..reply("200 OK", "application/json", format!("{}\n", serde_json::Value::Array(body)))
    }
}

fn act(state: &HttpState, req: &Request, id: &str, resolve: bool) -> Reply {
    let Some(token) = &state.token else {
        return json_error(
            "403 Forbidden",
            "changing alerts is disabled: set `api.token` in the pipeline or WEIR_API_TOKEN in the environment",
        );
    };
    if !req.bearer.as_deref().is_some_and(|b| same_token(b, token)) {
        return Reply {
            extra: "WWW-Authenticate: Bearer\r\n".into(),
            ..json_error("401 Unauthorized", "a valid `Authorization: Bearer <token>` header is required")
        };
    }
    match state.alerts.act(id, resolve, weir_core::deadletter::now_ms()) {
        Ok(a) => reply("200 OK", "application/json", format!("{}\n", alert_json(&a))),
        Err(e @ AlertError::NotFound(_)) => json_error("404 Not Found", e),
        Err(e @ AlertError::Resolved(_)) => json_error("409 Conflict", e),
    }
}

/// Server-Sent Events: `event: <kind>` and `data: <json>` per alert event, a comment every
/// 15 s so that proxies keep the connection, and a comment when a slow reader skipped events.
async fn stream(mut sock: TcpStream, state: &HttpState, req: &Request) -> std::io::Result<()> {
    let mut events = Vec::new();
    for e in req.params("event") {
        match AlertEvent::parse(&e) {
            Some(v) => events.push(v),
            None => {
                let r = json_error("400 Bad Request", format!("unknown event `{e}`"));
                return write_reply(&mut sock, r).await;
            }
        }
    }
    let m = AlertMatch {
        severity: req.params("severity"),
        rule: req.params("rule"),
        key: req.params("key"),
        event: events,
        labels: labels(req),
    };
    let mut rx = state.live.subscribe();
    sock.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\n\r\n: connected\n\n",
    )
    .await?;
    let mut beat = tokio::time::interval(Duration::from_secs(15));
    beat.tick().await;
    loop {
        let msg = tokio::select! {
            r = rx.recv() => match r {
                Ok(n) if m.matches(&n) => {
                    format!("event: {}\ndata: {}\n\n", n.event.as_str(), n.to_json())
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => format!(": skipped {k} events\n\n"),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = beat.tick() => ": keep-alive\n\n".to_string(),
        };
        sock.write_all(msg.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_queries_and_tokens() {
        let r = parse_request(
            "GET /alerts?state=firing&key=dev%2D1&severity=a+b HTTP/1.1\r\nHost: x\r\nauthorization: Bearer s3cret",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/alerts");
        assert_eq!(r.param("key"), Some("dev-1"));
        assert_eq!(r.param("severity"), Some("a b"));
        assert_eq!(r.bearer.as_deref(), Some("s3cret"));
        let r = parse_request("POST /alerts/x/ack HTTP/1.1").unwrap();
        assert_eq!(r.bearer, None);
        assert!(parse_request("").is_none());
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(decode("high%2Fdev-1%2F17", false), "high/dev-1/17");
        assert_eq!(decode("100%", false), "100%");
        assert_eq!(decode("%zz", false), "%zz");
        assert_eq!(decode("a+b", false), "a+b");
    }

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
}
