//! Alert routes against real receivers on loopback (an HTTP server that fails and recovers,
//! the local Redis), and the alert API over HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::read_jsonl;

/// A webhook receiver: answers 503 to the first `fail_first` requests, then 200, and keeps
/// the bodies it accepted.
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
}

impl Receiver {
    /// On a thread and runtime of its own, as a receiver elsewhere would be: the job's
    /// busy workers do not slow it down.
    async fn start(fail_first: usize) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, r) = (bodies.clone(), requests.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let (sock, _) = listener.accept().await.unwrap();
                    let (b, r) = (b.clone(), r.clone());
                    conns.spawn(async move { serve_hook(sock, b, r, fail_first).await });
                    while conns.try_join_next().is_some() {}
                }
            });
        });
        Self { addr, bodies, requests }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// Keep-alive HTTP/1.1: one request after another on a connection, as reqwest sends them.
async fn serve_hook(mut sock: TcpStream, bodies: Arc<Mutex<Vec<Value>>>, requests: Arc<AtomicUsize>, fail: usize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let status = if n < fail {
            "503 Service Unavailable"
        } else {
            bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
            "200 OK"
        };
        let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Generated sensors with injected anomalies, two threshold rules, and an alert step with
/// the given routes (YAML, indented for the `routes:` list).
pub(crate) fn pipeline(routes: &str, out: &std::path::Path, count: u64) -> BuiltPipeline {
    let rules = "        - { name: hot, severity: critical, threshold: { value: readings.temp, above: 35.0 } }
        - { name: warm, severity: warning, threshold: { value: readings.temp, above: 33.0 } }";
    pipeline_with_rules(rules, routes, out, count)
}

fn pipeline_with_rules(rules: &str, routes: &str, out: &std::path::Path, count: u64) -> BuiltPipeline {
    let yaml = format!(
        r#"
name: alerting
source:
  id: sensors
  generator: {{ devices: 40, count: {count}, anomaly_rate: 0.01, disorder: 0, seed: 3 }}
  event_time: {{ column: ts, format: ms }}
steps:
  - key_by: {{ id: by-device, keys: [device_id] }}
  - detect:
      id: rules
      rules:
{rules}
  - alert:
      id: alerts
      routes:
{routes}
sink: {{ id: out, file: {{ path: "{}", format: json }} }}
dead_letters: {{ path: "{}" }}
"#,
        out.display(),
        out.with_extension("dl.jsonl").display()
    );
    let cfg = weir::yaml::parse("alerting.yaml", &yaml).unwrap();
    Pipeline::from_config(cfg).build().unwrap()
}

/// (alert_id, event, count) of each row, sorted: what identifies an event.
fn events(rows: &[Value]) -> Vec<(String, String, u64)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["alert_id"].as_str().unwrap().to_string(),
                r["event"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn run_with_registry(built: &BuiltPipeline) -> Arc<weir_core::metrics::Registry> {
    let job = Job::new(built.plan(&RunOptions { workers: Some(2), fresh: true }).unwrap()).unwrap();
    let reg = job.registry();
    job.run().await.unwrap();
    reg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_then_recovers_gets_every_event_and_routes_filter() {
    let hook = Receiver::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let pages = dir.path().join("pages.jsonl");
    let routes = format!(
        r#"        - name: hook
          webhook: {{ url: "http://{}/hook" }}
          retry: {{ initial_backoff: 10ms, max_backoff: 50ms }}
        - name: pager
          match: {{ severity: [critical], event: [fired] }}
          file: {{ path: "{}" }}"#,
        hook.addr,
        pages.display()
    );
    let reg = run_with_registry(&pipeline(&routes, &out, 20_000)).await;
    let rows = read_jsonl(&out);
    assert!(rows.len() > 20, "few alert events: {}", rows.len());
    assert!(rows.iter().any(|r| r["event"] == "updated"), "repeats update the alert");
    // The receiver refused the first three posts; they were retried, so it holds every event.
    assert_eq!(hook.requests.load(Ordering::SeqCst), rows.len() + 3);
    assert_eq!(events(&hook.bodies()), events(&rows));
    let first = &hook.bodies()[0];
    for col in ["alert_id", "event", "state", "key", "rule", "severity", "value", "score", "count", "at", "step"] {
        assert!(first.get(col).is_some(), "webhook body lacks `{col}`: {first}");
    }
    assert_eq!(first["step"], "alerts");
    // The pager route took only critical alerts firing.
    let fired_critical: Vec<Value> =
        rows.iter().filter(|r| r["event"] == "fired" && r["severity"] == "critical").cloned().collect();
    assert!(!fired_critical.is_empty());
    assert_eq!(events(&read_jsonl(&pages)), events(&fired_critical));
    let m = &reg.connectors;
    assert_eq!(m.get("weir_alert_notification_retries_total", &[("route", "hook")]), Some(3.0));
    let delivered = m.get("weir_alert_notifications_total", &[("route", "hook"), ("outcome", "delivered")]);
    assert_eq!(delivered, Some(rows.len() as f64));
    assert_eq!(m.get("weir_alert_notifications_total", &[("route", "hook"), ("outcome", "failed")]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_labels_rules_give_their_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let pumps = dir.path().join("pumps.jsonl");
    let rules = "        - { name: hot, severity: critical, threshold: { value: readings.temp, above: 35.0 }, labels: { team: pumps, site: north } }
        - { name: warm, threshold: { value: readings.temp, above: 33.0 }, labels: { team: hvac } }
        - { name: shaky, threshold: { value: readings.vibration, above: 0.2 } }";
    let routes = format!(
        r#"        - name: pumps
          match: {{ labels: {{ team: "pu*" }}, event: [fired] }}
          file: {{ path: "{}" }}"#,
        pumps.display()
    );
    run_with_registry(&pipeline_with_rules(rules, &routes, &out, 5_000)).await;
    let rows = read_jsonl(&out);
    let labels_of = |rule: &str| -> Vec<String> {
        let mut v: Vec<String> =
            rows.iter().filter(|r| r["rule"] == rule).map(|r| r["labels"].as_str().unwrap().to_string()).collect();
        v.dedup();
        v
    };
    assert_eq!(labels_of("hot"), [r#"{"site":"north","team":"pumps"}"#]);
    assert_eq!(labels_of("warm"), [r#"{"team":"hvac"}"#]);
    assert_eq!(labels_of("shaky"), ["{}"]);
    let want: Vec<Value> = rows.iter().filter(|r| r["rule"] == "hot" && r["event"] == "fired").cloned().collect();
    let got = read_jsonl(&pumps);
    assert!(!want.is_empty());
    assert_eq!(events(&got), events(&want));
    assert_eq!(got[0]["labels"], serde_json::json!({"team": "pumps", "site": "north"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_is_given_up_on_after_its_attempts_and_the_run_ends() {
    // A port nobody listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let routes = format!(
        r#"        - name: dead
          match: {{ event: [fired] }}
          webhook: {{ url: "http://127.0.0.1:{port}/", timeout: 1s }}
          retry: {{ max_attempts: 2, initial_backoff: 5ms, max_backoff: 10ms }}"#
    );
    let reg = tokio::time::timeout(Duration::from_secs(60), run_with_registry(&pipeline(&routes, &out, 5_000)))
        .await
        .expect("the run ends although the receiver is down");
    let fired = read_jsonl(&out).iter().filter(|r| r["event"] == "fired").count();
    assert!(fired > 0);
    let m = &reg.connectors;
    assert_eq!(
        m.get("weir_alert_notifications_total", &[("route", "dead"), ("outcome", "failed")]),
        Some(fired as f64)
    );
    assert_eq!(m.get("weir_alert_notification_retries_total", &[("route", "dead")]), Some(fired as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_style_messages_are_one_line_of_text() {
    let hook = Receiver::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let routes = format!(
        r#"        - name: chat
          match: {{ event: [fired], rule: ["h*"] }}
          webhook: {{ url: "http://{}/services/T/B/X", slack: true }}"#,
        hook.addr
    );
    run_with_registry(&pipeline(&routes, &out, 5_000)).await;
    let bodies = hook.bodies();
    let fired_hot = read_jsonl(&out).iter().filter(|r| r["event"] == "fired" && r["rule"] == "hot").count();
    assert_eq!(bodies.len(), fired_hot);
    for b in &bodies {
        let obj = b.as_object().unwrap();
        assert_eq!(obj.keys().collect::<Vec<_>>(), ["text"]);
        let text = b["text"].as_str().unwrap();
        assert!(text.starts_with("[critical] fired: hot on dev-"), "{text}");
        assert!(text.contains("1 time)"), "{text}");
    }
}

fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_published_to_redis() {
    let channel = format!("weir-test-alerts-{}", std::process::id());
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_connection().expect("redis is running (scripts/services.sh starts it)");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ch = channel.clone();
    let listener = std::thread::spawn(move || {
        let mut ps = con.as_pubsub();
        ps.subscribe(&ch).unwrap();
        ps.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        ready_tx.send(()).unwrap();
        while let Ok(msg) = ps.get_message() {
            let payload: String = msg.get_payload().unwrap();
            if payload == "end" {
                break;
            }
            tx.send(payload).unwrap();
        }
    });
    ready_rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let routes = format!(
        r#"        - name: bus
          match: {{ event: [fired, escalated] }}
          redis: {{ url: "{}", channel: "{channel}" }}"#,
        redis_url()
    );
    run_with_registry(&pipeline(&routes, &out, 5_000)).await;
    let mut pubc = client.get_connection().unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg("end").query(&mut pubc).unwrap();
    listener.join().unwrap();
    let got: Vec<Value> = rx.try_iter().map(|s| serde_json::from_str(&s).unwrap()).collect();
    let fired: Vec<Value> = read_jsonl(&out).into_iter().filter(|r| r["event"] == "fired").collect();
    assert!(!fired.is_empty());
    assert_eq!(events(&got), events(&fired));
}

async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let (status, _, body) = http_with_head(addr, method, path, token).await;
    (status, body)
}

/// The status, the header lines and the body.
async fn http_with_head(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or_default();
    (status, head, body)
}

/// A header's value, its name matched without regard to case.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
    })
}

fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A generator at a steady rate, so that alerts are live while the API is called.
fn live_pipeline(token: Option<&str>) -> BuiltPipeline {
    let api = token.map(|t| format!("api: {{ token: \"{t}\" }}")).unwrap_or_default();
    let yaml = format!(
        r#"
name: api
source:
  id: sensors
  generator: {{ devices: 10, rate: 2000, duration: 60s, anomaly_rate: 0.05, disorder: 0, seed: 5 }}
  event_time: {{ column: ts, format: ms }}
steps:
  - key_by: {{ id: by-device, keys: [device_id] }}
  - detect:
      id: rules
      rules:
        - {{ name: hot, severity: critical, threshold: {{ value: readings.temp, above: 35.0 }} }}
  - alert: {{ id: alerts, resolve_after: 1h }}
sink: {{ id: out, file: {{ path: "/dev/null", format: json }} }}
{api}
"#
    );
    Pipeline::from_config(weir::yaml::parse("api.yaml", &yaml).unwrap()).build().unwrap()
}

async fn wait_for_alerts(addr: SocketAddr, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let (status, body) = http(addr, "GET", "/alerts?state=firing", None).await;
        assert_eq!(status, 200, "{body}");
        let v: Vec<Value> = serde_json::from_str(&body).unwrap();
        if v.len() >= n {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no alerts fired within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lists_alerts_and_changes_them_only_with_the_token() {
    let built = live_pipeline(Some("s3cret"));
    let job = Job::new(built.plan(&RunOptions { workers: Some(1), fresh: true }).unwrap()).unwrap();
    let server = weir::http::MetricsServer::start("127.0.0.1:0", built.http_state(&job)).await.unwrap();
    let stop = job.shutdown_handle();
    let running = weir_core::task::SpawnedTask::spawn(job.run());
    let addr = server.addr();

    // The live stream hears the events as they happen.
    let mut sse = TcpStream::connect(addr).await.unwrap();
    sse.write_all(b"GET /alerts/stream?event=fired,acknowledged HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();

    let alerts = wait_for_alerts(addr, 2).await;
    let id = alerts[0]["id"].as_str().unwrap().to_string();
    let path = format!("/alerts/{}", encode(&id));
    assert_eq!(alerts[0]["state"], "firing");

    let (status, body) = http(addr, "POST", &format!("{path}/ack"), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(addr, "POST", &format!("{path}/ack"), Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, body) = http(addr, "POST", &format!("{path}/ack"), Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "acknowledged");
    let (status, body) = http(addr, "GET", &path, None).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["state"].clone()), (200, "acknowledged".into()));
    let (status, head, body) = http_with_head(addr, "GET", "/alerts?state=acknowledged", None).await;
    assert_eq!(status, 200);
    assert_eq!(header(&head, "x-total-count"), Some("1".into()), "{head}");
    let acked: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(acked.iter().map(|a| a["id"].clone()).collect::<Vec<_>>(), [Value::from(id.clone())]);
    // Pages: `limit` and `offset` cut the list; the header still counts every match.
    let (_, head, body) = http_with_head(addr, "GET", "/alerts?state=acknowledged&limit=1&offset=1", None).await;
    assert_eq!(body.trim(), "[]");
    assert_eq!(header(&head, "x-total-count"), Some("1".into()), "{head}");
    let (_, head, page) = http_with_head(addr, "GET", "/alerts?limit=1", None).await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&page).unwrap().len(), 1, "{page}");
    let total: usize = header(&head, "x-total-count").unwrap().parse().unwrap();
    assert!(total >= 2, "two alerts at least: {head}");
    for bad in ["limit=0", "limit=many", "offset=-1"] {
        let (status, body) = http(addr, "GET", &format!("/alerts?{bad}"), None).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains(&format!("`{}`", bad.split('=').next().unwrap())), "{bad}: {body}");
    }

    let (status, _) = http(addr, "POST", &format!("{path}/resolve"), Some("s3cret")).await;
    assert_eq!(status, 200);
    let (status, body) = http(addr, "POST", &format!("{path}/resolve"), Some("s3cret")).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = http(addr, "POST", "/alerts/no-such-alert/ack", Some("s3cret")).await;
    assert_eq!(status, 404);
    // No rule here has labels: a label filter matches nothing, its absence everything.
    let (status, body) = http(addr, "GET", "/alerts?label=team:pumps", None).await;
    assert_eq!((status, body.trim()), (200, "[]"));
    let (_, body) = http(addr, "GET", "/alerts", None).await;
    assert!(!serde_json::from_str::<Vec<Value>>(&body).unwrap().is_empty());
    let (status, body) = http(addr, "GET", "/alerts?state=sleeping", None).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown state `sleeping`"), "{body}");
    let (status, _) = http(addr, "GET", &format!("{path}/ack"), Some("s3cret")).await;
    assert_eq!(status, 405);

    // The stream carried fired events and the acknowledgement, and nothing else.
    let mut seen = String::new();
    let mut buf = [0u8; 8192];
    while !seen.contains("event: acknowledged") {
        let n = tokio::time::timeout(Duration::from_secs(10), sse.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"), "{seen}");
    assert!(seen.to_ascii_lowercase().contains("content-type: text/event-stream\r\n"), "{seen}");
    assert!(seen.contains("event: fired\ndata: {"), "{seen}");
    assert!(!seen.contains("event: updated"), "filtered out: {seen}");
    assert!(seen.contains(&format!("\"alert_id\":\"{id}\"")), "{seen}");

    stop.stop();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_api_is_read_only() {
    let built = live_pipeline(None);
    let job = Job::new(built.plan(&RunOptions { workers: Some(1), fresh: true }).unwrap()).unwrap();
    let mut state = built.http_state(&job);
    state.token = None; // whatever WEIR_API_TOKEN the environment has
    let server = weir::http::MetricsServer::start("127.0.0.1:0", state).await.unwrap();
    let stop = job.shutdown_handle();
    let running = weir_core::task::SpawnedTask::spawn(job.run());
    let alerts = wait_for_alerts(server.addr(), 1).await;
    let path = format!("/alerts/{}/ack", encode(alerts[0]["id"].as_str().unwrap()));
    let (status, body) = http(server.addr(), "POST", &path, Some("anything")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("WEIR_API_TOKEN"), "{body}");
    let (status, body) = http(server.addr(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("weir_alert_events_total"), "{body}");
    stop.stop();
    running.await.unwrap().unwrap();
}

/// An event a route's full queue cannot take goes to the dead-letter output (kind `alert`,
/// naming the route), unless the route chose `when_full: drop`; either way it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_full_route_queue_cannot_take_are_dead_lettered_or_dropped_as_chosen() {
    // Nothing listens on port 9 of loopback: every delivery is refused and retried with a
    // long backoff, so each route's single-event queue stays full.
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("alerts.jsonl"), dir.path().join("dead.jsonl"));
    let yaml = format!(
        r#"
name: full-queues
source:
  id: sensors
  generator: {{ devices: 40, count: 20000, anomaly_rate: 0.01, disorder: 0, seed: 3 }}
  event_time: {{ column: ts, format: ms }}
steps:
  - key_by: {{ id: by-device, keys: [device_id] }}
  - detect: {{ id: rules, rules: [ {{ name: hot, threshold: {{ value: readings.temp, above: 33.0 }} }} ] }}
  - alert:
      id: alerts
      drain_timeout: 200ms
      routes:
        - {{ name: keep, webhook: {{ url: "http://127.0.0.1:9/hook" }}, queue: 1, retry: {{ initial_backoff: 10s, max_backoff: 10s }} }}
        - {{ name: lossy, webhook: {{ url: "http://127.0.0.1:9/hook" }}, queue: 1, when_full: drop, retry: {{ initial_backoff: 10s, max_backoff: 10s }} }}
sink: {{ id: out, file: {{ path: "{}", format: json }} }}
dead_letters: {{ path: "{}" }}
"#,
        out.display(),
        dead.display()
    );
    let built = Pipeline::from_config(weir::yaml::parse("full.yaml", &yaml).unwrap()).build().unwrap();
    let reg = run_with_registry(&built).await;
    let events = read_jsonl(&out).len();
    assert!(events > 20, "{events} events");
    let letters = read_jsonl(&dead);
    assert!(!letters.is_empty());
    assert!(letters.iter().all(|l| l["kind"] == "alert" && l["origin"] == "route keep"), "{letters:?}");
    assert!(letters[0]["reason"].as_str().unwrap().contains("alert route `keep`"), "{}", letters[0]);
    let event: Value = serde_json::from_str(letters[0]["payload"].as_str().unwrap()).unwrap();
    assert!(event["alert_id"].as_str().unwrap().starts_with("hot/"), "the event as the route would send it: {event}");
    let count = |route: &str, outcome: &str| {
        reg.connectors.get("weir_alert_notifications_total", &[("route", route), ("outcome", outcome)]).unwrap_or(0.0)
    };
    assert_eq!(count("keep", "dead_lettered") as usize, letters.len());
    assert_eq!(count("keep", "dropped"), 0.0);
    assert!(count("lossy", "dropped") > 0.0 && count("lossy", "dead_lettered") == 0.0);
}
