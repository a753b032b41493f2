//! The NATS source against a nats-server with JetStream of the test's own
//! (`weir_connectors::testing`), so it can be restarted mid-run.

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::NatsServer;
use weir_core::runtime::Job;

use crate::common::*;

/// A JetStream source on `stream` over `subjects` (durable consumer `t`), into `out`.
fn jetstream(server: &NatsServer, stream: &str, subjects: &[&str]) -> NatsSourceSettings {
    let mut n = NatsSourceSettings::new(server.url(), subjects.iter().map(|s| s.to_string()).collect());
    n.stream = Some(stream.into());
    n.consumer = Some("t".into());
    n.end_when_idle = Some(Duration::from_secs(2));
    n
}

fn pipeline(n: NatsSourceSettings, out: &Path, checkpoints: Option<&Path>) -> PipelineConfig {
    seq_pipeline("nats", SourceConnector::Nats(n), true, out, checkpoints.map(|ck| (ck, "100ms")))
}

#[test]
fn jetstream_messages_become_rows_with_subject_columns_and_a_bad_one_is_dead_lettered_with_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    server.create_stream("SENSORS", &["sensors.>"]);
    let a = dir.path().join("a.jsonl");
    events(&a, 0, 3000);
    server.publish_lines("sensors.berlin.d-1", &a, true);
    let b = dir.path().join("b.jsonl");
    std::fs::write(&b, "{\"seq\": 3000, \"ts\": 1796000003000, \"temp\": \"hot\"}\n").unwrap();
    server.publish_lines("sensors.paris.d-2", &b, true);
    events(&b, 3001, 999);
    server.publish_lines("sensors.paris.d-2", &b, true);

    let out = dir.path().join("out.jsonl");
    let mut n = jetstream(&server, "SENSORS", &["sensors.>"]);
    n.subject_column = Some("subject".into());
    n.subject_fields = Some("sensors.{site}.{device_id}".into());
    n.sequence_column = Some("nats_seq".into());
    let summary =
        rt().block_on(Pipeline::from_config(pipeline(n, &out, None)).build().unwrap().run(&RunOptions::default()));
    assert_eq!(summary.unwrap().source_records, 4000);
    let rows = read_jsonl(&out);
    assert_seqs(&rows, (0..4000).filter(|s| *s != 3000), "rows");
    let berlin = rows.iter().find(|r| r["seq"] == 5).unwrap();
    assert_eq!((berlin["site"].as_str(), berlin["device_id"].as_str()), (Some("berlin"), Some("d-1")));
    assert_eq!(berlin["subject"], "sensors.berlin.d-1");
    assert_eq!(berlin["nats_seq"], 6, "stream sequences start at 1");
    let dead = read_jsonl(&out.with_extension("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["origin"], "nats SENSORS");
    assert_eq!(dead[0]["position"], "subject sensors.paris.d-2, stream seq 3001");
    // Without checkpoints each batch is acknowledged once handed on.
    poll(|| (server.consumer_pending("SENSORS", "t") == (0, 0)).then_some(()));
}

/// Checkpoints every 100 ms, acknowledgements after them; the server restarts while Weir
/// reads (its streams kept), and more is published once it is back. Every message is in the
/// committed output exactly once, and none is left unacknowledged.
#[test]
fn a_server_restarted_mid_run_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    server.create_stream("S", &["s.>"]);
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 20_000);
    server.publish_lines("s.a", &f, true);
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let mut n = jetstream(&server, "S", &["s.>"]);
    n.end_when_idle = Some(Duration::from_secs(3));
    let job = Job::new(
        Pipeline::from_config(pipeline(n, &out, Some(&ck))).build().unwrap().plan(&RunOptions::default()).unwrap(),
    )
    .unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) > 2000).then_some(()));
    server.restart();
    events(&f, 20_000, 5000);
    server.publish_lines("s.b", &f, true);
    rt.block_on(handle).unwrap().unwrap();
    let lost = reg.connectors.get("weir_nats_reconnects_total", &[("server", &server.url())]).unwrap_or(0.0);
    assert!(lost >= 1.0, "the lost connection was counted: {lost}");
    assert!(
        reg.connectors.get("weir_nats_consumer_pending", &[("stream", "S"), ("consumer", "t")]).is_some(),
        "the consumer's pending count is reported"
    );
    assert_seqs(&committed_rows(&out), 0..25_000, "after the server's restart");
    // The server takes in the last acknowledgement a moment after it has it: a check at once
    // saw 17,068 delivered and not yet acknowledged once.
    poll(|| (server.consumer_pending("S", "t") == (0, 0)).then_some(()));
}

/// A run that read and never acknowledged (it stopped without a checkpoint's completion) left
/// messages pending in the durable consumer; the next run reads them at once, in order, not
/// after `ack_wait`, and the committed output has every message once.
#[test]
fn messages_left_unacknowledged_are_read_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    server.create_stream("S", &["s.>"]);
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 1000);
    server.publish_lines("s.a", &f, true);
    // What a run killed before its first checkpoint completed leaves: the consumer delivered
    // 600 messages and nobody acknowledged them.
    server.pull_without_acks("S", "t", 600);
    assert_eq!(server.consumer_pending("S", "t").0, 600);
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let mut n = jetstream(&server, "S", &["s.>"]);
    n.ack_wait = Duration::from_secs(600);
    let started = std::time::Instant::now();
    rt().block_on(Pipeline::from_config(pipeline(n, &out, Some(&ck))).build().unwrap().run(&RunOptions::default()))
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(60), "waited for ack_wait");
    assert_seqs(&committed_rows(&out), 0..1000, "after a run that left 600 unacknowledged");
    poll(|| (server.consumer_pending("S", "t") == (0, 0)).then_some(()));
}

/// Core NATS: subjects read while connected, with a queue group over both workers.
#[test]
fn core_nats_reads_subjects_while_subscribed() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let mut n = NatsSourceSettings::new(server.url(), vec!["core.>".into()]);
    n.queue = Some("q".into());
    n.end_when_idle = Some(Duration::from_secs(2));
    n.subject_column = Some("subject".into());
    let out = dir.path().join("out.jsonl");
    let cfg = pipeline(n, &out, None);
    let rt = rt();
    let run = rt.spawn(async move {
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }).await
    });
    poll(|| (server.subscriptions("core.>") >= 2).then_some(()));
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 2000);
    server.publish_lines("core.x", &f, false);
    rt.block_on(run).unwrap().unwrap();
    let rows = read_jsonl(&out);
    assert_seqs(&rows, 0..2000, "core NATS");
    assert_eq!(rows[0]["subject"], "core.x");
}

#[test]
fn settings_are_checked_before_connecting() {
    let plan = |yaml: &str| source_settings_error(&format!("nats: {yaml}"), "");
    assert!(plan("{ url: \"nats://x\", subjects: [] }").contains("at least one subject"));
    assert!(plan("{ url: \"nats://x\", subjects: [\"a.>.b\"] }").contains("nats subject `a.>.b`"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], stream: S, queue: q }").contains("`queue` is for core NATS"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], consumer: c }").contains("name its `stream`"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], stream: S, deliver: middle }").contains("expected all or new"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], sequence_column: a }").contains("column `a`"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], subject_fields: \"a.{a}\" }").contains("column `a`"));
    assert!(plan("{ url: \"nats://x\", subjects: [a], stram: S }").contains("unknown field `stram`"));
}
