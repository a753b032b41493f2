//! W1 from a server (MQTT, Redis Streams, NATS, RabbitMQ) into the exactly-once file sink, as the shipped
//! examples configure it, killed with SIGKILL at random moments and restarted until the
//! server has nothing left for it: the committed output must equal an uninterrupted run's over
//! the same events, row for row. Each server is one of the test's own, holding the events
//! while Weir is down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir::connectors::testing::{Mosquitto, NatsServer, RabbitMqServer, RedisServer};

use super::crash::{assert_same, committed, rows, seed, Rng};
use super::{poll, stderr, weir};

const W1: &str = "examples/w1-sensor-window.yaml";

/// `example` made to end once nothing arrives for 3 s (so the last run finishes): the line
/// `    format: json` of its source gets `end_when_idle` after it.
fn bounded(example: &str, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(super::repo().join(example)).unwrap();
    let bounded = text.replacen("    format: json\n", "    format: json\n    end_when_idle: 3s\n", 1);
    assert_ne!(bounded, text, "{example}: the source section changed shape");
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, bounded).unwrap();
    p
}

fn spawn(pipeline: &Path, dir: &Path, server: &(&str, String), workers: usize, run: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", pipeline.to_str().unwrap(), "--workers", &workers.to_string(), "--no-progress"])
        .env(server.0, &server.1)
        .env("OUTPUT", dir.join("out"))
        .env("CHECKPOINTS", dir.join("ck"))
        .env("CHECKPOINT_INTERVAL", "100ms")
        .env("DEAD_LETTERS", dir.join("dead.jsonl"))
        .env("WEIR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("run-{run}.log"))).unwrap())
        .spawn()
        .unwrap()
}

/// The harness: `fill` puts the input's events on the server (`server` is the variable and
/// value that point the example at it); the log line `connecting` says a run has started
/// reading, and the kill comes at a random moment within 0.1-0.7 s after it.
fn survives_kill_9(example: &str, server: (&str, String), connecting: &str, fill: impl FnOnce(&Path)) {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    super::kafka_crash::input(&input, 40_000);
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", W1, "--workers", "2", "--quiet"],
        &[("INPUT", &input), ("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());
    fill(&input);
    let p = bounded(example, dir.path());
    let kills: u32 = std::env::var("KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(5);
    let (mut killed, mut runs) = (0u32, 0usize);
    let started = Instant::now();
    let log = |r: usize| std::fs::read_to_string(dir.path().join(format!("run-{r}.log"))).unwrap_or_default();
    loop {
        assert!(started.elapsed() < Duration::from_secs(300), "no progress after {runs} runs (seed {seed})");
        let workers = 1 + runs % 2;
        runs += 1;
        let mut child = spawn(&p, dir.path(), &server, workers, runs);
        if killed < kills {
            poll(|| (log(runs).contains(connecting) || child.try_wait().unwrap().is_some()).then_some(()));
            // The kill moment, at random: pacing, not a wait for a condition.
            std::thread::sleep(Duration::from_millis(100 + rng.below(600)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                continue;
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "run {runs} failed (seed {seed}): {}", log(runs));
        break;
    }
    assert!(killed >= 1.min(kills), "the input was consumed before any kill; make it larger (seed {seed})");
    eprintln!("{killed} kills in {runs} runs");
    let got = rows(&committed(&dir.path().join("out")));
    assert_same(&want, &got, &format!("{example} after {killed} kills in {runs} runs (seed {seed})"));
}

/// `examples/w1-mqtt.yaml`: QoS 1, persistent session, acknowledgements after checkpoints.
#[test]
fn mqtt_w1_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    survives_kill_9("examples/w1-mqtt.yaml", ("MQTT_URL", broker.url()), "MQTT source connecting", |input| {
        // The session Weir's worker 0 resumes (client id `weir-w1-mqtt-0`), holding every event.
        broker.open_session("weir-w1-mqtt-0", "sensors");
        broker.publish_lines("sensors", input);
    });
}

/// `examples/w1-redis-streams.yaml`: a consumer group, XACK after checkpoints.
#[test]
fn redis_streams_w1_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let url = server.url();
    survives_kill_9(
        "examples/w1-redis-streams.yaml",
        ("REDIS_URL", url.clone()),
        "Redis Streams source connecting",
        |input| {
            let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
            let text = std::fs::read_to_string(input).unwrap();
            for chunk in text.lines().collect::<Vec<_>>().chunks(1000) {
                let mut p = redis::pipe();
                for l in chunk {
                    p.cmd("XADD").arg("sensors").arg("*").arg("data").arg(*l).ignore();
                }
                p.query::<()>(&mut c).unwrap();
            }
        },
    );
}

/// `examples/w1-nats.yaml`: a JetStream durable consumer, acknowledged after checkpoints; what
/// a killed run had delivered and not acknowledged is read again at once (its `ack_wait` is a
/// minute, longer than this test).
#[test]
fn nats_w1_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    survives_kill_9("examples/w1-nats.yaml", ("NATS_URL", server.url()), "NATS source connecting", |input| {
        server.create_stream("SENSORS", &["sensors.>"]);
        server.publish_lines("sensors.fleet", input, true);
    });
}

/// `examples/w1-rabbitmq.yaml`: a durable queue, acknowledged after checkpoints; redeliveries
/// the checkpoint covers are recognised by digest.
#[test]
fn rabbitmq_w1_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = RabbitMqServer::start(dir.path());
    survives_kill_9("examples/w1-rabbitmq.yaml", ("AMQP_URL", server.url()), "RabbitMQ source connecting", |input| {
        server.declare_queue("sensors");
        server.publish_lines("sensors", input);
    });
}

/// `examples/iot-mqtt.yaml` fed by `weir gen --mqtt`: telemetry on per-device topics becomes
/// alerts naming the site and device from the topic, in the committed output and the route's
/// log; a reading outside the plausible range is filtered, a malformed one dead-lettered.
#[test]
fn the_iot_example_turns_published_telemetry_into_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir(&broker_dir).unwrap();
    let broker = Mosquitto::start(&broker_dir);
    broker.open_session("weir-iot-0", "sensors/+/+/telemetry");
    let url = broker.url();
    let o = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["gen", "--mqtt", &url, "--devices", "20", "-n", "20000", "--anomaly-rate", "0.01", "--seed", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("published 20000 events"), "{}", stderr(&o));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"device_id\": \"dev-00001\", \"ts\": \"late\"}\n").unwrap();
    broker.publish_lines("sensors/site-1/dev-00001/telemetry", &bad);
    let p = bounded("examples/iot-mqtt.yaml", dir.path());
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", p.to_str().unwrap(), "--no-progress"])
        .env("MQTT_URL", &url)
        .env("OUTPUT", &out)
        .env("CHECKPOINTS", dir.path().join("ck"))
        .env("ALERT_LOG", dir.path().join("alerts-log.jsonl"))
        .env("DEAD_LETTERS", dir.path().join("dead.jsonl"))
        .env("API_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let alerts: Vec<serde_json::Value> = committed(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hot: Vec<&serde_json::Value> = alerts.iter().filter(|a| a["event"] == "fired" && a["rule"] == "hot").collect();
    assert!(!hot.is_empty(), "no hot alert among {} events", alerts.len());
    for a in &hot {
        let (site, device) = a["key"].as_str().unwrap().split_once('|').unwrap();
        let n: u64 = device.trim_start_matches("dev-").parse().unwrap();
        assert_eq!(site, format!("site-{}", n % 4), "the site comes from the topic: {a}");
    }
    let logged = std::fs::read_to_string(dir.path().join("alerts-log.jsonl")).unwrap();
    assert!(logged.lines().count() >= hot.len(), "the route logged every alert event");
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert!(dead.contains("sensors/site-1/dev-00001/telemetry"), "{dead}");
}
