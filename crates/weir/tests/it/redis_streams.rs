//! The Redis Streams source against a Redis server of the test's own
//! (`weir_connectors::testing`), so it can be restarted mid-run.

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::RedisServer;
use weir_core::runtime::Job;

use crate::common::*;

/// Appends the lines of `file` to `stream`, one entry each with the line in field `field`.
fn xadd_lines(url: &str, stream: &str, field: &str, file: &Path) {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for chunk in lines.chunks(1000) {
        let mut p = redis::pipe();
        for l in chunk {
            p.cmd("XADD").arg(stream).arg("*").arg(field).arg(*l).ignore();
        }
        p.query::<()>(&mut c).unwrap();
    }
}

fn source(url: &str, streams: &[&str], group: Option<&str>) -> RedisStreamsSettings {
    let mut r = RedisStreamsSettings::new(url, streams.iter().map(|s| s.to_string()).collect());
    r.group = group.map(Into::into);
    r.consumer = Some("t".into());
    r.end_when_idle = Some(Duration::from_secs(1));
    r
}

fn pipeline(r: RedisStreamsSettings, out: &Path, checkpoints: Option<&Path>) -> PipelineConfig {
    seq_pipeline("redis", SourceConnector::RedisStreams(r), true, out, checkpoints.map(|ck| (ck, "100ms")))
}

fn run(cfg: PipelineConfig) -> RunSummary {
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
    )
    .unwrap()
}

#[test]
fn a_group_reads_every_entry_with_its_id_and_dead_letters_a_bad_one_with_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let a = dir.path().join("a.jsonl");
    events(&a, 0, 3000);
    xadd_lines(&server.url(), "sensors", "data", &a);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"seq\": \"three thousand\", \"ts\": 1, \"temp\": 1.0}\n").unwrap();
    xadd_lines(&server.url(), "sensors", "data", &bad);
    events(&a, 3001, 999);
    xadd_lines(&server.url(), "sensors", "data", &a);
    // An entry without the payload field.
    let mut c = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    redis::cmd("XADD").arg("sensors").arg("*").arg("other").arg("x").exec(&mut c).unwrap();

    let out = dir.path().join("out.jsonl");
    let mut r = source(&server.url(), &["sensors"], Some("g"));
    r.field = Some("data".into());
    r.id_column = Some("entry_id".into());
    r.stream_column = Some("stream".into());
    let summary = run(pipeline(r, &out, None));
    assert_eq!(summary.source_records, 4001);
    let rows = read_jsonl(&out);
    assert_seqs(&rows, (0..4000).filter(|s| *s != 3000), "rows");
    assert!(rows.iter().all(|r| r["stream"] == "sensors" && r["entry_id"].as_str().unwrap().contains('-')));
    let dead = read_jsonl(&out.with_extension("dead.jsonl"));
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|d| d["origin"] == "redis sensors" && d["position"].as_str().unwrap().starts_with("id ")));
    assert!(dead.iter().any(|d| d["reason"].as_str().unwrap().contains("has no field `data` (it has: other)")));
    // Everything was acknowledged: nothing pending in the group.
    let pending: redis::Value = redis::cmd("XPENDING").arg("sensors").arg("g").query(&mut c).unwrap();
    let redis::Value::Array(p) = pending else { panic!("{pending:?}") };
    assert_eq!(p[0], redis::Value::Int(0), "{p:?}");
}

#[test]
fn entries_of_several_fields_are_read_as_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let mut c = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    for i in 0..10 {
        redis::cmd("XADD")
            .arg("s")
            .arg("*")
            .arg("seq")
            .arg(i)
            .arg("ts")
            .arg(1_796_000_000_000i64 + i)
            .arg("temp")
            .arg("21.5")
            .exec(&mut c)
            .unwrap();
    }
    let out = dir.path().join("out.jsonl");
    run(pipeline(source(&server.url(), &["s"], None), &out, None));
    let rows = read_jsonl(&out);
    assert_seqs(&rows, 0..10, "rows");
    assert!(rows.iter().all(|r| r["temp"] == 21.5));
}

/// Without a group the position is the last id in the checkpoint: a second run reads only
/// what was added after the first.
#[test]
fn without_a_group_a_run_resumes_after_the_last_id_of_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 2000);
    xadd_lines(&server.url(), "s1", "data", &f);
    events(&f, 2000, 1000);
    xadd_lines(&server.url(), "s2", "data", &f);
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    run(pipeline(source(&server.url(), &["s1", "s2"], None), &out, Some(&ck)));
    assert_seqs(&committed_rows(&out), 0..3000, "first run");
    events(&f, 3000, 500);
    xadd_lines(&server.url(), "s1", "data", &f);
    run(pipeline(source(&server.url(), &["s1", "s2"], None), &out, Some(&ck)));
    assert_seqs(&committed_rows(&out), 0..3500, "after the second run");
}

/// Acknowledgements after checkpoints every 100 ms; the server restarts while Weir reads (its
/// data kept), more entries are added once it is back. Every entry is in the committed output
/// exactly once, and none is left pending.
#[test]
fn a_server_restarted_mid_run_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 20_000);
    xadd_lines(&server.url(), "sensors", "data", &f);
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let mut r = source(&server.url(), &["sensors"], Some("g"));
    r.end_when_idle = Some(Duration::from_secs(2));
    let cfg = pipeline(r, &out, Some(&ck));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) > 2000).then_some(()));
    server.restart();
    events(&f, 20_000, 5000);
    xadd_lines(&server.url(), "sensors", "data", &f);
    rt.block_on(handle).unwrap().unwrap();
    // Read when the connection opened again: the group had not had everything yet.
    let lag = reg.connectors.get("weir_redis_stream_lag", &[("stream", "sensors"), ("group", "g")]);
    assert!(lag.is_some(), "the group's lag is reported");
    let reconnects = reg.connectors.get("weir_redis_reconnects_total", &[("server", &server.url())]).unwrap_or(0.0);
    assert!(reconnects >= 1.0, "the lost connection was counted: {reconnects}");
    assert_seqs(&committed_rows(&out), 0..25_000, "after the server's restart");
    let mut c = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let pending: redis::Value = redis::cmd("XPENDING").arg("sensors").arg("g").query(&mut c).unwrap();
    let redis::Value::Array(p) = pending else { panic!("{pending:?}") };
    assert_eq!(p[0], redis::Value::Int(0), "all acknowledged after the final checkpoint: {p:?}");
}

/// The server away for longer than `end_when_idle`: the source waits for it instead of ending
/// (only quiet while connected counts), and reads what is added once it is back. Regression:
/// the time the server was away counted as quiet, and the source ended during the outage.
#[test]
fn a_server_away_longer_than_end_when_idle_does_not_end_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 1000);
    xadd_lines(&server.url(), "sensors", "data", &f);
    let out = dir.path().join("out.jsonl");
    let cfg = pipeline(source(&server.url(), &["sensors"], Some("g")), &out, None);
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) >= 1000).then_some(()));
    server.stop();
    // Away for twice `end_when_idle` (1 s), the source retrying all the while.
    let url = server.url();
    let failures = || reg.connectors.get("weir_redis_reconnects_total", &[("server", &url)]).unwrap_or(0.0);
    assert_runs_through_outage(
        &handle,
        Duration::from_secs(2),
        2.0,
        failures,
        "the source ended while the server was away",
    );
    server.restart();
    events(&f, 1000, 1000);
    xadd_lines(&server.url(), "sensors", "data", &f);
    rt.block_on(handle).unwrap().unwrap();
    assert_every_seq(&read_jsonl(&out), 0..2000, "after the outage");
}

/// Another consumer of the group read entries and went away without acknowledging them: they
/// are claimed once idle for `claim_after`, and read.
#[test]
fn pending_entries_of_a_consumer_that_is_gone_are_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 500);
    xadd_lines(&server.url(), "s", "data", &f);
    let mut c = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").exec(&mut c).unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("gone")
        .arg("COUNT")
        .arg(200)
        .arg("STREAMS")
        .arg("s")
        .arg(">")
        .query(&mut c)
        .unwrap();
    let out = dir.path().join("out.jsonl");
    let mut r = source(&server.url(), &["s"], Some("g"));
    r.claim_after = Duration::from_millis(300);
    r.end_when_idle = Some(Duration::from_secs(2));
    run(pipeline(r, &out, None));
    assert_seqs(&read_jsonl(&out), 0..500, "with the claimed entries");
}

/// A run with more workers left entries pending under its consumer `t-3`; this run has two
/// workers: worker 0 takes them over at once (not after `claim_after`, when the watermark
/// would have passed them) and the consumer is removed from the group.
#[test]
fn pending_entries_of_a_worker_this_run_does_not_have_are_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 500);
    xadd_lines(&server.url(), "s", "data", &f);
    let mut c = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").exec(&mut c).unwrap();
    for (consumer, count) in [("t-3", 150), ("t-other", 50)] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("s")
            .arg(">")
            .query(&mut c)
            .unwrap();
    }
    let out = dir.path().join("out.jsonl");
    let r = source(&server.url(), &["s"], Some("g"));
    assert_eq!(r.claim_after, Duration::from_secs(60));
    run(pipeline(r, &out, None));
    // t-3 read 0..150, t-other 150..200; `t-other` is not one of this job's workers, so its
    // entries stay with it until `claim_after`.
    assert_seqs(&read_jsonl(&out), (0..150).chain(200..500), "with the entries of t-3");
    let consumers: Vec<redis::Value> = redis::cmd("XINFO").arg("CONSUMERS").arg("s").arg("g").query(&mut c).unwrap();
    let names = format!("{consumers:?}");
    assert!(!names.contains("t-3"), "t-3 is still in the group: {names}");
    assert!(names.contains("t-other"), "{names}");
}

#[test]
fn settings_are_checked_before_connecting() {
    let plan = |yaml: &str| source_settings_error(&format!("redis_streams: {yaml}"), "");
    assert!(plan("{ url: \"http://x\", streams: [a] }").contains("redis_streams `url"));
    assert!(plan("{ url: \"redis://x\", streams: [] }").contains("at least one stream"));
    assert!(plan("{ url: \"redis://x\", streams: [a], start: middle }").contains("expected earliest or latest"));
    assert!(plan("{ url: \"redis://x\", streams: [a], id_column: a }").contains("column `a`"));
    assert!(plan("{ url: \"redis://x\", streams: [a], gruop: g }").contains("unknown field `gruop`"));
}
