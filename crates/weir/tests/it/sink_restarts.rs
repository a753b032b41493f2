//! Every server sink through a restart of its server mid-run: rows keep coming from a Redis
//! stream on the machine's server, the sink's own server (a process of the test's) stops and
//! starts again once the sink has written, and everything fed before and after is found there
//! afterwards (at least once; exactly once where the sink drops repeats).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::{Mosquitto, NatsServer, RabbitMqServer, RedisServer};
use weir_core::metrics::Registry;
use weir_core::runtime::Job;

use crate::bus_sinks::read_back;
use crate::common::*;

/// Rows fed before the restart, and after it.
const BEFORE: u64 = 20_000;
const AFTER: u64 = 5_000;

fn machine_redis() -> String {
    std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Appends events `from..from + n` to stream `key` of the machine's Redis.
fn feed(key: &str, dir: &Path, from: u64, n: u64) {
    let f = dir.join("feed.jsonl");
    events(&f, from, n);
    let mut c = redis::Client::open(machine_redis()).unwrap().get_connection().unwrap();
    let text = std::fs::read_to_string(&f).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for chunk in lines.chunks(1000) {
        let mut p = redis::pipe();
        for l in chunk {
            p.cmd("XADD").arg(key).arg("*").arg("data").arg(*l).ignore();
        }
        p.query::<()>(&mut c).unwrap();
    }
}

/// Runs events through `sink`: feeds [`BEFORE`] rows, waits until the sink's `metric` (with
/// `labels`) counts some written, calls `restart` (which feeds [`AFTER`] more with the
/// function it is given, before or after its server is back), and waits for the end of the run.
fn through_a_restart(
    dir: &Path,
    sink: SinkConnector,
    metric: &str,
    labels: &[(&str, &str)],
    restart: impl FnOnce(&Registry, &dyn Fn()),
) -> RunSummary {
    let (job, key) = redis_fed_job(dir, sink);
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    feed(&key, dir, 0, BEFORE);
    poll(|| (reg.connectors.get(metric, labels).unwrap_or(0.0) > 0.0).then_some(()));
    restart(&reg, &|| feed(&key, dir, BEFORE, AFTER));
    let summary = rt.block_on(handle).unwrap().unwrap();
    let mut c = redis::Client::open(machine_redis()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
    summary
}

/// A job reading a new stream of the machine's Redis (its key returned; the source ends 2 s
/// after the stream stops growing) into `sink`.
fn redis_fed_job(dir: &Path, sink: SinkConnector) -> (Job, String) {
    logs();
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let key = format!("weir-test-sink-restart-{}-{n}", std::process::id());
    let mut src = RedisStreamsSettings::new(machine_redis(), vec![key.clone()]);
    src.group = Some("g".into());
    src.consumer = Some("t".into());
    src.end_when_idle = Some(Duration::from_secs(2));
    let mut cfg = seq_pipeline("redis", SourceConnector::RedisStreams(src), false, &dir.join("unused"), None);
    cfg.sink = SinkConfig::new("rows", sink);
    let plan = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions { workers: Some(2), ..Default::default() });
    (Job::new(plan.unwrap()).unwrap(), key)
}

fn settings<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn redis_sink_through_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::start(dir.path());
    let sink = settings(&format!("url: {}\ncommand: xadd\nkey: out\nfield: data", server.url()));
    let url = server.url();
    through_a_restart(
        dir.path(),
        SinkConnector::Redis(sink),
        "weir_redis_sink_rows_total",
        &[("key", "out")],
        |_, more| {
            server.restart();
            more();
        },
    );
    let source = format!("    url: {url}\n    streams: [out]\n    start: earliest\n    end_when_idle: 1s");
    let rows = read_back(dir.path(), "redis_streams", &source, &dir.path().join("back.jsonl"));
    assert_every_seq(&rows, 0..(BEFORE + AFTER) as i64, "read back");
}

#[test]
fn nats_jetstream_sink_through_a_server_restart_drops_its_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    server.create_stream("OUT", &["out.>"]);
    let sink =
        settings(&format!("url: {}\nsubject: \"out.{{seq}}\"\njetstream: true\nmsg_id: \"m-{{seq}}\"", server.url()));
    let url = server.url();
    through_a_restart(
        dir.path(),
        SinkConnector::Nats(sink),
        "weir_nats_sink_messages_total",
        &[("subject", "out.{seq}")],
        |_, more| {
            server.restart();
            more();
        },
    );
    let source = format!(
        "    url: {url}\n    subjects: [\"out.>\"]\n    stream: OUT\n    consumer: check\n    end_when_idle: 1s"
    );
    let rows = read_back(dir.path(), "nats", &source, &dir.path().join("back.jsonl"));
    assert_seqs(&rows, 0..(BEFORE + AFTER) as i64, "read back (message ids: each once)");
}

#[test]
fn rabbitmq_sink_through_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RabbitMqServer::start(dir.path());
    server.declare_queue("out");
    let sink = settings(&format!("url: {}\nexchange: \"\"\nrouting_key: out", server.url()));
    let url = server.url();
    through_a_restart(
        dir.path(),
        SinkConnector::RabbitMq(sink),
        "weir_rabbitmq_sink_messages_total",
        &[("exchange", "")],
        |_, more| {
            server.restart();
            more();
        },
    );
    let source = format!("    url: {url}\n    queue: out\n    end_when_idle: 1s");
    let rows = read_back(dir.path(), "rabbitmq", &source, &dir.path().join("back.jsonl"));
    assert_every_seq(&rows, 0..(BEFORE + AFTER) as i64, "read back");
}

#[test]
fn mqtt_sink_through_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    broker.open_session("reader-0", "out/#");
    let sink = settings(&format!("url: {}\ntopic: \"out/{{seq}}\"", broker.url()));
    let url = broker.url();
    through_a_restart(
        dir.path(),
        SinkConnector::Mqtt(sink),
        "weir_mqtt_sink_messages_total",
        &[("topic", "out/{seq}")],
        |_, more| {
            broker.restart();
            more();
        },
    );
    let source = format!("    url: {url}\n    topics: [\"out/#\"]\n    client_id: reader\n    end_when_idle: 1s");
    let rows = read_back(dir.path(), "mqtt", &source, &dir.path().join("back.jsonl"));
    assert_every_seq(&rows, 0..(BEFORE + AFTER) as i64, "read back");
}

/// An HTTP endpoint that can go away (its port closed: connections refused) and come back on
/// the same port, and can hold its answers back (a slow endpoint); it keeps the `seq`s of the
/// rows it took.
/// Whether answers are held back, and since when the first held request has waited.
type Gate = (Mutex<(bool, Option<std::time::Instant>)>, std::sync::Condvar);

struct Endpoint {
    addr: SocketAddr,
    away: Arc<AtomicBool>,
    back: std::sync::mpsc::Sender<()>,
    /// Closed: requests wait for their answer; and since when the first one has waited.
    gate: Arc<Gate>,
    seqs: Arc<Mutex<Vec<i64>>>,
}

impl Endpoint {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (away, seqs) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let gate: Arc<Gate> = Arc::new((Mutex::new((false, None)), std::sync::Condvar::new()));
        let (back, back_rx) = std::sync::mpsc::channel::<()>();
        let (a, s, g) = (away.clone(), seqs.clone(), gate.clone());
        std::thread::spawn(move || {
            let mut listener = Some(listener);
            loop {
                let l = listener.take().unwrap_or_else(|| TcpListener::bind(addr).unwrap());
                for conn in l.incoming() {
                    if a.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (lock, cv) = &*g;
                    let mut held = lock.lock().unwrap();
                    if held.0 {
                        held.1.get_or_insert_with(std::time::Instant::now);
                    }
                    drop(cv.wait_while(held, |h| h.0).unwrap());
                    serve(conn, &s);
                }
                // Away: the port is closed until the test says it is back.
                drop(l);
                if back_rx.recv().is_err() {
                    return;
                }
            }
        });
        Self { addr, away, back, gate, seqs }
    }

    /// Closes the port (the thread wakes on a connection of ours and lets go of it).
    fn go_away(&self) {
        self.away.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }

    fn come_back(&self) {
        self.away.store(false, Ordering::SeqCst);
        self.back.send(()).unwrap();
    }

    /// Holds answers back (`true`) or lets them go.
    fn hold(&self, closed: bool) {
        let (lock, cv) = &*self.gate;
        lock.lock().unwrap().0 = closed;
        cv.notify_all();
    }

    /// How long the first held request has waited so far.
    fn held_for(&self) -> Duration {
        self.gate.0.lock().unwrap().1.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Answers one request with 200, keeping the `seq`s of its JSON array body.
fn serve(conn: std::net::TcpStream, seqs: &Mutex<Vec<i64>>) {
    let Some((_, body)) = read_request(&conn) else { return };
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    seqs.lock().unwrap().extend(rows.iter().map(|v| v["seq"].as_i64().unwrap()));
    let mut conn = conn;
    let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
}

#[test]
fn http_sink_through_an_endpoint_that_goes_away_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start();
    let url = format!("http://{}/in", endpoint.addr);
    let sink = settings(&format!("url: {url}\nmax_rows: 500"));
    through_a_restart(
        dir.path(),
        SinkConnector::Http(sink),
        "weir_http_sink_rows_total",
        &[("url", &url)],
        |reg, more| {
            endpoint.go_away();
            more();
            // Back once the sink has found the port closed (and is backing off).
            poll(|| (reg.sink_retries.load(Ordering::Relaxed) > 0).then_some(()));
            endpoint.come_back();
        },
    );
    let rows: Vec<serde_json::Value> =
        endpoint.seqs.lock().unwrap().iter().map(|s| serde_json::json!({ "seq": s })).collect();
    assert_every_seq(&rows, 0..(BEFORE + AFTER) as i64, "taken by the endpoint");
}

/// A source whose rows wait on a slow sink is not idle. Regression: the Redis Streams, NATS,
/// RabbitMQ and MQTT sources counted `end_when_idle` from their last record, so after a sink
/// stall longer than it they ended at once, with entries still unread.
#[test]
fn a_source_held_up_by_a_slow_sink_does_not_take_that_for_idle() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start();
    endpoint.hold(true);
    let url = format!("http://{}/in", endpoint.addr);
    let (job, key) = redis_fed_job(dir.path(), SinkConnector::Http(settings(&format!("url: {url}\nmax_rows: 500"))));
    feed(&key, dir.path(), 0, BEFORE + AFTER);
    let rt = rt();
    let handle = rt.spawn(job.run());
    // The first request waits 3 s for its answer, longer than `end_when_idle` (2 s).
    poll(|| (endpoint.held_for() > Duration::from_secs(3)).then_some(()));
    endpoint.hold(false);
    rt.block_on(handle).unwrap().unwrap();
    let rows: Vec<serde_json::Value> =
        endpoint.seqs.lock().unwrap().iter().map(|s| serde_json::json!({ "seq": s })).collect();
    assert_every_seq(&rows, 0..(BEFORE + AFTER) as i64, "taken by the endpoint");
}
