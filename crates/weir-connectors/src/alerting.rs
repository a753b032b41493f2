//! Where alert events go besides the step's output: routes to webhooks (Slack-compatible if
//! asked), Redis pub/sub, Kafka, files and stdout, chosen by severity, rule, key and event; and
//! the live stream the HTTP port serves.
//!
//! Delivery runs on a thread of its own, off the workers: the `alert` step only queues an
//! event (a bounded queue per route; when one is full the event is counted as dropped and
//! logged, so a dead receiver never slows the pipeline). Each route delivers its events in
//! order, retrying a failed one with backoff and jitter; while it retries, later events wait.
//! Delivery is at-least-once over restarts: replay after a crash can repeat an event, which
//! receivers tell apart by `alert_id`, `event` and `count`.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use weir_core::metrics::ConnectorMetrics;
use weir_core::notify::{AlertEvent, AlertNotice, AlertNotify};
use weir_core::runtime::RetryPolicy;
use weir_core::{CoreError, Result};

/// Which events a route (or a live-stream client) takes. An empty list matches anything;
/// within a list any entry may match; all lists must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertMatch {
    /// Severities, exactly (`critical`, `warning`, ...).
    pub severity: Vec<String>,
    /// Rule names; `*` and `?` are wildcards.
    pub rule: Vec<String>,
    /// Keys (rendered as in the output, `a|b` for several key columns); wildcards allowed.
    pub key: Vec<String>,
    /// Events.
    pub event: Vec<AlertEvent>,
    /// Labels of the alert's rule: each must be present with a matching value (wildcards).
    pub labels: Vec<(String, String)>,
}

impl AlertMatch {
    /// Whether the notice passes.
    pub fn matches(&self, n: &AlertNotice) -> bool {
        let any = |pats: &[String], text: &str| pats.is_empty() || pats.iter().any(|p| wildcard(p, text));
        (self.severity.is_empty() || self.severity.contains(&n.alert.severity))
            && any(&self.rule, &n.alert.rule)
            && any(&self.key, &n.alert.key)
            && (self.event.is_empty() || self.event.contains(&n.event))
            && self.labels.iter().all(|(k, p)| n.alert.labels.get(k).is_some_and(|v| wildcard(p, v)))
    }
}

/// `*` any run of characters, `?` one character; everything else literal.
fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Where a route delivers.
#[derive(Debug, Clone)]
pub enum RouteTarget {
    /// HTTP POST of the event as JSON (or as a Slack message with `slack`).
    Webhook(WebhookTarget),
    /// `PUBLISH channel <json>` on a Redis server.
    Redis {
        /// `redis://[user:password@]host:port[/db]`.
        url: String,
        /// The channel.
        channel: String,
    },
    /// One record per event, keyed by alert id.
    #[cfg(feature = "kafka")]
    Kafka {
        /// Connection settings.
        client: crate::kafka::KafkaClientConfig,
        /// The topic.
        topic: String,
    },
    /// JSON Lines appended to a file.
    File(PathBuf),
    /// JSON Lines on standard output.
    Stdout,
}

/// A webhook.
#[derive(Clone)]
pub struct WebhookTarget {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra headers (`Authorization`, ...); values are never logged.
    pub headers: Vec<(String, String)>,
    /// Post `{"text": ...}`, a message a Slack incoming webhook (or Mattermost, Teams'
    /// Slack-compatible hooks) shows as is, instead of the event's fields.
    pub slack: bool,
    /// Per-request time limit.
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &redact_url(&self.url))
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("slack", &self.slack)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL with any password and query (Slack hook URLs carry their secret in the path, so
/// only scheme and host are kept).
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?']).next().unwrap_or("");
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            format!("{scheme}://{host}/…")
        }
        None => "…".into(),
    }
}

/// One route: a name for metrics and logs, what it takes, where it goes.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Name, unique within the step.
    pub name: String,
    /// Which events it takes.
    pub matcher: AlertMatch,
    /// Where they go.
    pub target: RouteTarget,
    /// Retries of a failed delivery; after the last attempt the event is logged and counted
    /// as failed, and the route goes on with the next.
    pub retry: RetryPolicy,
    /// Events waiting for delivery at most.
    pub queue: usize,
    /// What happens to an event when the queue is full.
    pub when_full: WhenFull,
}

/// What a route does with an event its full queue cannot take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Write it to the job's dead-letter output (kind `alert`, naming the route): nothing
    /// vanishes, and `weir dlq` shows what was not delivered.
    #[default]
    DeadLetter,
    /// Drop it, counted (`outcome="dropped"`): for routes whose events are worth nothing late.
    Drop,
}

/// Where the routes of a job send events their full queues cannot take: the job's dead-letter
/// output, set when the job is planned (after the `alert` steps are).
pub type DeadLetterSlot = Arc<Mutex<Option<Arc<dyn weir_core::DeadLetterSink>>>>;

#[derive(Debug, Default)]
struct RouteCounters {
    delivered: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    dropped: AtomicU64,
    dead_lettered: AtomicU64,
    queued: AtomicU64,
    /// Sum and count of the time from queueing to delivery, µs.
    latency_us: AtomicU64,
}

#[derive(Debug)]
struct Route {
    spec: RouteSpec,
    tx: mpsc::Sender<AlertNotice>,
    counters: Arc<RouteCounters>,
    /// The queue's other end, until the delivery thread takes it.
    rx: Mutex<Option<mpsc::Receiver<AlertNotice>>>,
}

/// A route's delivery, handed to the delivery thread.
type Delivery = (RouteSpec, Arc<RouteCounters>, mpsc::Receiver<AlertNotice>);

/// The routes of one `alert` step, with their delivery thread (started on the first event).
/// The routes can change while the job runs ([`AlertRouter::update`]).
#[derive(Debug)]
pub struct AlertRouter {
    routes: std::sync::RwLock<Vec<Route>>,
    /// Where new routes' deliveries go once the thread runs.
    started: OnceLock<mpsc::Sender<Delivery>>,
    /// How long [`AlertNotify::drain`] waits for queues to empty at the end of input.
    drain_timeout: Duration,
    /// The job's dead-letter output, for events a full queue cannot take.
    dead_letters: DeadLetterSlot,
}

/// Checks a route's settings.
fn check_route(spec: &RouteSpec) -> Result<()> {
    weir_core::ensure_config!(!spec.name.is_empty(), "alert route: a route needs a `name`");
    weir_core::ensure_config!(spec.queue > 0, "alert route `{}`: queue must be at least 1", spec.name);
    match &spec.target {
        RouteTarget::Webhook(w) => {
            let ok = reqwest::Url::parse(&w.url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            weir_core::ensure_config!(
                ok,
                "alert route `{}`: webhook url `{}` is not an http:// or https:// URL",
                spec.name,
                redact_url(&w.url)
            );
        }
        RouteTarget::Redis { url, .. } => {
            redis::Client::open(url.as_str())
                .map_err(|e| CoreError::Config(format!("alert route `{}`: bad redis url: {e}", spec.name)))?;
        }
        _ => {}
    }
    Ok(())
}

/// Checks a step's routes: each valid, no name twice.
///
/// # Errors
/// As [`AlertRouter::new`].
pub fn check_routes(routes: &[RouteSpec]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for spec in routes {
        check_route(spec)?;
        weir_core::ensure_config!(seen.insert(spec.name.clone()), "alert route `{}` is named twice", spec.name);
    }
    Ok(())
}

/// Routes waiting to be handed to the delivery thread at most.
const ROUTE_CHANGES: usize = 1024;

/// Hands a route's queue to the delivery thread.
fn hand_over(deliver: &mpsc::Sender<Delivery>, d: Delivery) {
    let name = d.0.name.clone();
    if deliver.try_send(d).is_err() {
        tracing::error!(route = %name, "The alert delivery thread is gone or swamped; this route delivers nothing.");
    }
}

fn route(spec: RouteSpec, counters: Arc<RouteCounters>) -> Route {
    let (tx, rx) = mpsc::channel(spec.queue);
    Route { spec, tx, counters, rx: Mutex::new(Some(rx)) }
}

impl AlertRouter {
    /// Routes for one step. Checks names, URLs and settings; connects nothing yet.
    ///
    /// # Errors
    /// Duplicate or empty names, a webhook URL that is not http(s), a Redis URL it cannot
    /// parse, a zero queue.
    pub fn new(routes: Vec<RouteSpec>, drain_timeout: Duration, dead_letters: DeadLetterSlot) -> Result<Self> {
        check_routes(&routes)?;
        let routes = routes.into_iter().map(|s| route(s, Arc::default())).collect();
        Ok(Self { routes: std::sync::RwLock::new(routes), started: OnceLock::new(), drain_timeout, dead_letters })
    }

    /// Replaces the routes while the job runs. The routes named in `keep` stay as they are
    /// (queue, connection, counters); the others start anew (one with a known name keeps its
    /// counters), and a route no longer listed delivers what its queue holds and stops.
    ///
    /// # Errors
    /// As [`AlertRouter::new`]; nothing changes then.
    pub fn update(&self, specs: Vec<RouteSpec>, keep: &std::collections::HashSet<String>) -> Result<()> {
        check_routes(&specs)?;
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let mut old: std::collections::HashMap<String, Route> =
            std::mem::take(&mut *routes).into_iter().map(|r| (r.spec.name.clone(), r)).collect();
        for spec in specs {
            let r = match old.remove(&spec.name) {
                Some(r) if keep.contains(&spec.name) => r,
                Some(r) => route(spec, r.counters.clone()),
                None => route(spec, Arc::default()),
            };
            if let Some(deliver) = self.started.get() {
                if let Some(rx) = r.rx.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    hand_over(deliver, (r.spec.clone(), r.counters.clone(), rx));
                }
            }
            routes.push(r);
        }
        Ok(())
    }

    fn start(&self) {
        self.started.get_or_init(|| {
            // Routes come a handful at a time (at the start, at a reload): a small queue.
            let (deliver, mut incoming) = mpsc::channel::<Delivery>(ROUTE_CHANGES);
            let spawned = std::thread::Builder::new().name("weir-alerts".into()).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot start the alert delivery runtime; routes deliver nothing.");
                        return;
                    }
                };
                rt.block_on(async move {
                    // Until the router is gone; each route's task ends when its queue closes.
                    let mut tasks = Vec::new();
                    while let Some((spec, counters, rx)) = incoming.recv().await {
                        tasks.push(weir_core::task::SpawnedTask::spawn(deliver_route(spec, counters, rx)));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start the alert delivery thread; routes deliver nothing.");
            }
            for r in self.routes.read().unwrap_or_else(PoisonError::into_inner).iter() {
                if let Some(rx) = r.rx.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    hand_over(&deliver, (r.spec.clone(), r.counters.clone(), rx));
                }
            }
            deliver
        });
    }
}

impl AlertNotify for AlertRouter {
    fn notify(&self, notice: &AlertNotice) {
        if self.started.get().is_none() {
            // The delivery thread starts with the first event a route takes.
            let wanted = self
                .routes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|r| r.spec.matcher.matches(notice));
            if !wanted {
                return;
            }
            self.start();
        }
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        for r in routes.iter() {
            if !r.spec.matcher.matches(notice) {
                continue;
            }
            r.counters.queued.fetch_add(1, Ordering::Relaxed);
            if r.tx.try_send(notice.clone()).is_err() {
                r.counters.queued.fetch_sub(1, Ordering::Relaxed);
                let sink = self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let kept = match (r.spec.when_full, sink) {
                    (WhenFull::DeadLetter, Some(sink)) => {
                        let letter = weir_core::DeadLetter {
                            payload: weir_core::Payload::Raw(notice.to_json().to_string().into_bytes()),
                            kind: weir_core::ErrorKind::Alert,
                            reason: format!(
                                "alert route `{}`: its queue of {} events is full (the receiver is down or slow)",
                                r.spec.name, r.spec.queue
                            ),
                            step: weir_core::StepId::new(&notice.step),
                            origin: format!("route {}", r.spec.name),
                            position: None,
                            time_ms: weir_core::deadletter::now_ms(),
                            attempts: 0,
                            first_failure_ms: None,
                        };
                        match sink.write(vec![letter]) {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::error!(route = %r.spec.name, error = %e, "Cannot dead-letter an alert event.");
                                false
                            }
                        }
                    }
                    _ => false,
                };
                let (counter, what) =
                    if kept { (&r.counters.dead_lettered, "dead-lettered") } else { (&r.counters.dropped, "dropped") };
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                // Once per power of two, so a dead receiver does not flood the log.
                if n.is_power_of_two() {
                    tracing::error!(route = %r.spec.name, alert = %notice.alert.id, count = n,
                        "Alert route queue is full (its receiver is down or slow); events are being {what}.");
                }
            }
        }
    }

    fn report(&self, m: &ConnectorMetrics) {
        for r in self.routes.read().unwrap_or_else(PoisonError::into_inner).iter() {
            let c = &r.counters;
            let name = r.spec.name.as_str();
            for (outcome, v) in [
                ("delivered", &c.delivered),
                ("failed", &c.failed),
                ("dropped", &c.dropped),
                ("dead_lettered", &c.dead_lettered),
            ] {
                m.set_total(
                    "weir_alert_notifications_total",
                    "Alert events a route delivered, gave up on after its retries, or dropped or dead-lettered on a full queue.",
                    &[("route", name), ("outcome", outcome)],
                    v.load(Ordering::Relaxed) as f64,
                );
            }
            m.set_total(
                "weir_alert_notification_retries_total",
                "Failed delivery attempts that were retried.",
                &[("route", name)],
                c.retries.load(Ordering::Relaxed) as f64,
            );
            m.set(
                "weir_alert_route_queued",
                "Alert events waiting for delivery.",
                &[("route", name)],
                c.queued.load(Ordering::Relaxed) as f64,
            );
            let done = c.delivered.load(Ordering::Relaxed);
            if done > 0 {
                m.set(
                    "weir_alert_notification_latency_seconds_avg",
                    "Mean time from an alert event to its delivery.",
                    &[("route", name)],
                    c.latency_us.load(Ordering::Relaxed) as f64 / done as f64 / 1e6,
                );
            }
        }
    }

    fn drain(&self) {
        if self.started.get().is_none() {
            return;
        }
        // Workers run on the job's runtime: let it move its other tasks off this thread
        // while it waits (the HTTP port, other workers' channels).
        weir_core::runtime::blocking(|| self.wait_delivered());
    }
}

impl AlertRouter {
    fn wait_delivered(&self) {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            let left: u64 = self
                .routes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|r| r.counters.queued.load(Ordering::Relaxed))
                .sum();
            if left == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    undelivered = left,
                    "Input ended but alert routes still hold undelivered events after {:?}; they are lost.",
                    self.drain_timeout
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A delivery failure: whether trying again may help, and why.
struct Failure {
    retry: bool,
    reason: String,
    /// How long the receiver asked us to wait (HTTP `Retry-After`).
    wait: Option<Duration>,
}

impl Failure {
    fn transient(reason: impl Into<String>) -> Self {
        Self { retry: true, reason: reason.into(), wait: None }
    }
}

/// A connected target.
enum Client {
    Http(reqwest::Client, WebhookTarget),
    Redis {
        client: redis::Client,
        conn: Option<redis::aio::MultiplexedConnection>,
        channel: String,
    },
    #[cfg(feature = "kafka")]
    Kafka(rdkafka::producer::FutureProducer, String),
    File(PathBuf, Option<std::fs::File>),
    Stdout,
}

impl Client {
    fn new(target: &RouteTarget) -> std::result::Result<Self, String> {
        Ok(match target {
            RouteTarget::Webhook(w) => {
                let http = reqwest::Client::builder()
                    .timeout(w.timeout)
                    .connect_timeout(w.timeout)
                    .tcp_nodelay(true)
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
                Self::Http(http, w.clone())
            }
            RouteTarget::Redis { url, channel } => Self::Redis {
                client: redis::Client::open(url.as_str()).map_err(|e| format!("bad redis url: {e}"))?,
                conn: None,
                channel: channel.clone(),
            },
            #[cfg(feature = "kafka")]
            RouteTarget::Kafka { client, topic } => {
                let ours = [("enable.idempotence", "true".to_string()), ("acks", "all".to_string())];
                let p = client
                    .client_config(&ours)
                    .create()
                    .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
                Self::Kafka(p, topic.clone())
            }
            RouteTarget::File(p) => Self::File(p.clone(), None),
            RouteTarget::Stdout => Self::Stdout,
        })
    }

    async fn send(&mut self, n: &AlertNotice) -> std::result::Result<(), Failure> {
        match self {
            Self::Http(http, w) => {
                let body = if w.slack { slack_message(n) } else { n.to_json() };
                let mut req =
                    http.post(&w.url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
                for (k, v) in &w.headers {
                    req = req.header(k, v);
                }
                let resp = req.send().await.map_err(|e| Failure::transient(describe_http_error(&e)))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // A client error other than timeout or throttling will not get better.
                let retry = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
                Err(Failure { retry, reason: format!("the receiver answered {status}"), wait })
            }
            Self::Redis { client, conn, channel } => {
                if conn.is_none() {
                    let c = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| Failure::transient(format!("cannot connect to redis: {e}")))?;
                    *conn = Some(c);
                }
                let Some(c) = conn.as_mut() else { return Err(Failure::transient("no redis connection")) };
                let payload = n.to_json().to_string();
                let r: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&*channel).arg(payload).query_async(c).await;
                r.map(|_| ()).map_err(|e| {
                    *conn = None;
                    Failure::transient(format!("redis PUBLISH failed: {e}"))
                })
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(p, topic) => {
                let payload = n.to_json().to_string();
                let rec = rdkafka::producer::FutureRecord::to(topic).key(&n.alert.id).payload(&payload);
                p.send(rec, Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| Failure::transient(format!("kafka produce failed: {e}")))
            }
            Self::File(path, file) => {
                if file.is_none() {
                    *file = Some(
                        crate::open_output(path, "alert file", true).map_err(|e| Failure::transient(e.to_string()))?,
                    );
                }
                let Some(f) = file.as_mut() else { return Err(Failure::transient("no file")) };
                let mut line = n.to_json().to_string();
                line.push('\n');
                f.write_all(line.as_bytes()).map_err(|e| {
                    *file = None;
                    Failure::transient(format!("cannot write `{}`: {e}", path.display()))
                })
            }
            Self::Stdout => {
                let mut line = n.to_json().to_string();
                line.push('\n');
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .map_err(|e| Failure::transient(format!("cannot write to stdout: {e}")))
            }
        }
    }
}

/// A reqwest error with its causes, which is where "connection refused" lives.
pub(crate) fn describe_http_error(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() { "timed out".to_string() } else { "request failed".to_string() };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A one-line summary for chat: `[critical] fired: high_temp on dev-00042 (value 97.2, score 5.1, 3 times)`.
fn slack_message(n: &AlertNotice) -> serde_json::Value {
    let a = &n.alert;
    let value = a.value.map_or_else(|| "none".to_string(), |v| format!("{v:.3}"));
    let text = format!(
        "[{}] {}: {} on {} (value {value}, score {:.2}, {} time{}){}",
        a.severity,
        n.event.as_str(),
        a.rule,
        a.key,
        a.score,
        a.count,
        if a.count == 1 { "" } else { "s" },
        if a.escalated { ", escalated" } else { "" },
    );
    serde_json::json!({ "text": text })
}

async fn deliver_route(spec: RouteSpec, counters: Arc<RouteCounters>, mut rx: mpsc::Receiver<AlertNotice>) {
    let mut client = None;
    while let Some(n) = rx.recv().await {
        let queued_at = Instant::now();
        let mut attempt = 1u32;
        loop {
            if client.is_none() {
                match Client::new(&spec.target) {
                    Ok(c) => client = Some(c),
                    Err(reason) => {
                        tracing::error!(route = %spec.name, %reason, "Alert route cannot start; its events are lost.");
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let Some(c) = client.as_mut() else { break };
            match c.send(&n).await {
                Ok(()) => {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let us = u64::try_from(queued_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                    counters.latency_us.fetch_add(us, Ordering::Relaxed);
                    if attempt > 1 {
                        tracing::info!(route = %spec.name, alert = %n.alert.id, attempt, "Alert route recovered.");
                    }
                    break;
                }
                Err(f) => {
                    let give_up = !f.retry || spec.retry.max_attempts.is_some_and(|m| attempt >= m);
                    if give_up {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(route = %spec.name, alert = %n.alert.id, event = n.event.as_str(),
                            attempts = attempt, reason = %f.reason, "Alert event could not be delivered; giving up on it.");
                        break;
                    }
                    let delay = f.wait.unwrap_or_else(|| spec.retry.delay(attempt)).min(spec.retry.max_backoff);
                    if attempt == 1 {
                        tracing::warn!(route = %spec.name, alert = %n.alert.id, reason = %f.reason,
                            "Alert delivery failed; retrying with backoff.");
                    }
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
        counters.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live stream of alert events that the HTTP port serves (`GET /alerts/stream`): every
/// event of every `alert` step, as JSON, to any number of listeners. A listener that falls
/// behind by more than the buffer skips events (and is told how many).
#[derive(Debug)]
pub struct LiveAlerts {
    tx: broadcast::Sender<Arc<AlertNotice>>,
}

impl Default for LiveAlerts {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0 }
    }
}

impl LiveAlerts {
    /// A new listener, hearing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertNotice>> {
        self.tx.subscribe()
    }
}

impl AlertNotify for LiveAlerts {
    fn notify(&self, notice: &AlertNotice) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(notice.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_route(name: &str, path: &std::path::Path) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            matcher: AlertMatch::default(),
            target: RouteTarget::File(path.to_path_buf()),
            retry: RetryPolicy::default(),
            queue: 100,
            when_full: WhenFull::Drop,
        }
    }

    fn notice(id: &str) -> AlertNotice {
        AlertNotice {
            step: "alerts".into(),
            event: AlertEvent::Fired,
            alert: weir_core::notify::Alert {
                id: id.into(),
                key: "k".into(),
                rule: "hot".into(),
                severity: "warning".into(),
                value: Some(1.0),
                score: 1.0,
                first_seen: 0,
                last_seen: 0,
                count: 1,
                state: weir_core::notify::AlertState::Firing,
                escalated: false,
                fired_at: 0,
                last_anomaly_at: 0,
                resolved_at: None,
                clear_count: 0,
                labels: Default::default(),
            },
            at: 0,
        }
    }

    fn ids(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["alert_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Routes change while events flow: a kept route goes on with its queue, a new one gets
    /// the events after the change, a removed one delivers what it had and no more; a bad
    /// route list changes nothing.
    #[test]
    fn routes_change_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let router = AlertRouter::new(vec![file_route("a", &a)], Duration::from_secs(10), Arc::default()).unwrap();
        router.notify(&notice("1"));
        let keep: std::collections::HashSet<String> = ["a".to_string()].into();
        router.update(vec![file_route("a", &a), file_route("b", &b)], &keep).unwrap();
        router.notify(&notice("2"));
        router.update(vec![file_route("b", &b)], &Default::default()).unwrap();
        router.notify(&notice("3"));
        let bad = router.update(vec![file_route("b", &b), file_route("b", &a)], &Default::default());
        assert!(bad.unwrap_err().to_string().contains("named twice"));
        router.notify(&notice("4"));
        // The removed route delivers on its own task: wait for both files.
        weir_core::testing::poll(|| (ids(&a).len() == 2 && ids(&b).len() == 3).then_some(()));
        assert_eq!(ids(&a), ["1", "2"]);
        assert_eq!(ids(&b), ["2", "3", "4"]);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("dev-*", "dev-00042"));
        assert!(wildcard("*", ""));
        assert!(wildcard("d?v-1", "dev-1"));
        assert!(wildcard("*temp*", "high_temp_x"));
        assert!(!wildcard("dev-*", "pump-1"));
        assert!(!wildcard("dev-1", "dev-12"));
        assert!(wildcard("a*b*c", "aXbYc"));
        assert!(!wildcard("a*b*c", "aXbY"));
    }

    #[test]
    fn urls_lose_their_secrets_in_logs() {
        assert_eq!(redact_url("https://hooks.slack.com/services/T0/B0/XYZ"), "https://hooks.slack.com/…");
        assert_eq!(redact_url("http://user:pw@127.0.0.1:9/h?token=1"), "http://127.0.0.1:9/…");
    }
}
