//! The RabbitMQ source: against the machine's broker (`scripts/services.sh`, queues of each
//! test's own) and, where the broker must restart mid-run, against a broker of the test's own
//! (`weir_connectors::testing::RabbitMqServer`).

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::{self, RabbitMqServer};
use weir_core::runtime::Job;

use crate::common::*;

/// The machine's broker.
fn broker() -> String {
    std::env::var("WEIR_TEST_RABBITMQ").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A queue name no other test run uses.
fn queue(name: &str) -> String {
    format!("weir-test-{name}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007
}

fn source(url: &str, queue: &str) -> RabbitMqSourceSettings {
    let mut r = RabbitMqSourceSettings::new(url, queue);
    r.end_when_idle = Some(Duration::from_secs(2));
    r
}

fn pipeline(r: RabbitMqSourceSettings, out: &Path, checkpoints: Option<&Path>) -> PipelineConfig {
    seq_pipeline("rabbitmq", SourceConnector::RabbitMq(r), true, out, checkpoints.map(|ck| (ck, "100ms")))
}

#[test]
fn deliveries_become_rows_with_routing_key_columns_and_a_bad_one_is_dead_lettered_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (url, q) = (broker(), queue("rows"));
    testing::bind_queue(&url, &q, "amq.topic", &format!("{q}.#"));
    let msgs = |from: i64, n: i64, key: &str| -> Vec<(String, Vec<u8>)> {
        (from..from + n)
            .map(|i| {
                (
                    format!("{q}.{key}"),
                    format!("{{\"seq\":{i},\"ts\":{},\"temp\":21.5}}", 1_796_000_000_000 + i).into_bytes(),
                )
            })
            .collect()
    };
    testing::publish_to(&url, "amq.topic", msgs(0, 3000, "berlin.d-1"));
    testing::publish_to(
        &url,
        "amq.topic",
        vec![(format!("{q}.paris.d-2"), b"{\"seq\": 3000, \"temp\": \"hot\"}".to_vec())],
    );
    testing::publish_to(&url, "amq.topic", msgs(3001, 999, "paris.d-2"));
    let out = dir.path().join("out.jsonl");
    let mut r = source(&url, &q);
    r.routing_key_column = Some("routing_key".into());
    r.routing_key_fields = Some(format!("{q}.{{site}}.{{device_id}}"));
    let summary =
        rt().block_on(Pipeline::from_config(pipeline(r, &out, None)).build().unwrap().run(&RunOptions::default()));
    assert_eq!(summary.unwrap().source_records, 4000);
    let rows = read_jsonl(&out);
    assert_seqs(&rows, (0..4000).filter(|s| *s != 3000), "rows");
    let berlin = rows.iter().find(|r| r["seq"] == 5).unwrap();
    assert_eq!((berlin["site"].as_str(), berlin["device_id"].as_str()), (Some("berlin"), Some("d-1")));
    assert_eq!(berlin["routing_key"], format!("{q}.berlin.d-1"));
    let dead = read_jsonl(&out.with_extension("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["origin"], format!("rabbitmq {q}"));
    let pos = dead[0]["position"].as_str().unwrap();
    assert!(pos.starts_with(&format!("routing key {q}.paris.d-2, delivery tag ")), "{pos}");
    assert_eq!(testing::queue_ready(&url, &q), 0, "the bad message is acknowledged too, not requeued");
}

/// Checkpoints every 100 ms, acknowledgements after them; the broker restarts while Weir
/// reads (its durable queue and persistent messages kept), more is published once it is
/// back. Every message is in the committed output exactly once, and none is left.
#[test]
fn a_broker_restarted_mid_run_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RabbitMqServer::start(dir.path());
    server.declare_queue("q");
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 20_000);
    server.publish_lines("q", &f);
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let mut r = source(&server.url(), "q");
    // The broker takes some 6 s to come back: idle while it is away is not the end.
    r.end_when_idle = Some(Duration::from_secs(10));
    r.prefetch = 2000;
    let job = Job::new(
        Pipeline::from_config(pipeline(r, &out, Some(&ck))).build().unwrap().plan(&RunOptions::default()).unwrap(),
    )
    .unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) > 2000).then_some(()));
    server.restart();
    events(&f, 20_000, 5000);
    server.publish_lines("q", &f);
    rt.block_on(handle).unwrap().unwrap();
    let lost = reg
        .connectors
        .get("weir_rabbitmq_reconnects_total", &[("server", &server.url().replace("guest:guest", "guest:***"))]);
    assert!(lost.unwrap_or(0.0) >= 1.0, "the lost connection was counted: {lost:?}");
    assert_seqs(&committed_rows(&out), 0..25_000, "after the broker's restart");
    assert_eq!(server.ready("q"), 0, "all acknowledged after the final checkpoint");
}

#[test]
fn settings_are_checked_before_connecting() {
    let plan = |yaml: &str| source_settings_error(&format!("rabbitmq: {yaml}"), "");
    assert!(plan("{ url: \"http://x\", queue: q }").contains("rabbitmq `url"));
    assert!(plan("{ url: \"amqp://x\", queue: \"\" }").contains("name the `queue`"));
    assert!(plan("{ url: \"amqp://x\", queue: q, prefetch: 0 }").contains("prefetch: 0"));
    assert!(plan("{ url: \"amqp://x\", queue: q, exchange: e }").contains("declare: true"));
    assert!(plan("{ url: \"amqp://x\", queue: q, binding_key: k }").contains("name it"));
    assert!(plan("{ url: \"amqp://x\", queue: q, routing_key_column: a }").contains("column `a`"));
    assert!(plan("{ url: \"amqp://x\", queue: q, prefetch: 70000 }").contains("prefetch"));
    assert!(plan("{ url: \"amqp://x\", queue: q, qeueu: q }").contains("unknown field `qeueu`"));
}

/// A queue that is not there fails the run with the broker's reason, at once.
#[test]
fn a_missing_queue_fails_the_run_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue("missing");
    let r = source(&broker(), &q);
    let started = std::time::Instant::now();
    let e = rt()
        .block_on(
            Pipeline::from_config(pipeline(r, &dir.path().join("o.jsonl"), None))
                .build()
                .unwrap()
                .run(&RunOptions::default()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOT_FOUND") && e.contains(&q), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
