//! The MQTT source against a Mosquitto of the test's own (`weir_connectors::testing`), so the
//! broker can be restarted mid-run.

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::Mosquitto;
use weir_core::runtime::Job;

use crate::common::*;

/// An MQTT source reading `topics` from `broker`, into `out` (a JSON Lines file, or a folder
/// of committed parts with `checkpoints`).
fn pipeline(
    broker: &Mosquitto,
    client: &str,
    topics: &[&str],
    out: &Path,
    checkpoints: Option<&Path>,
) -> PipelineConfig {
    let mut m = MqttSourceSettings::new(broker.url(), topics.iter().map(|t| t.to_string()).collect());
    m.client_id = Some(client.into());
    m.end_when_idle = Some(Duration::from_secs(2));
    m.topic_column = Some("topic".into());
    m.topic_fields = Some("sensors/{site}/{device_id}/telemetry".into());
    seq_pipeline("mqtt", SourceConnector::Mqtt(m), true, out, checkpoints.map(|ck| (ck, "100ms")))
}

#[test]
fn messages_become_rows_with_topic_columns_and_a_bad_one_is_dead_lettered_with_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    // The session exists before anything is published, as for a Weir that ran before.
    broker.open_session("mqtt-rows-0", "sensors/+/+/telemetry");
    let a = dir.path().join("a.jsonl");
    events(&a, 0, 3000);
    broker.publish_lines("sensors/berlin/d-1/telemetry", &a);
    let b = dir.path().join("b.jsonl");
    std::fs::write(&b, "{\"seq\": 3000, \"ts\": 1796000003000, \"temp\": \"hot\"}\n").unwrap();
    broker.publish_lines("sensors/paris/d-2/telemetry", &b);
    events(&b, 3001, 999);
    broker.publish_lines("sensors/paris/d-2/telemetry", &b);

    let out = dir.path().join("out.jsonl");
    let cfg = pipeline(&broker, "mqtt-rows", &["sensors/+/+/telemetry"], &out, None);
    let summary = rt().block_on(Pipeline::from_config(cfg).build().unwrap().run(&RunOptions::default())).unwrap();
    assert_eq!(summary.source_records, 4000);
    let rows = read_jsonl(&out);
    assert_seqs(&rows, (0..4000).filter(|s| *s != 3000), "rows");
    let berlin = rows.iter().find(|r| r["seq"] == 5).unwrap();
    assert_eq!(berlin["site"], "berlin");
    assert_eq!(berlin["device_id"], "d-1");
    assert_eq!(berlin["topic"], "sensors/berlin/d-1/telemetry");
    let paris = rows.iter().find(|r| r["seq"] == 3500).unwrap();
    assert_eq!((paris["site"].as_str(), paris["device_id"].as_str()), (Some("paris"), Some("d-2")));
    let dead = read_jsonl(&out.with_extension("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "schema");
    assert_eq!(dead[0]["origin"], format!("mqtt {}", broker.url()));
    let pos = dead[0]["position"].as_str().unwrap();
    assert!(pos.starts_with("topic sensors/paris/d-2/telemetry, packet "), "{pos}");
    assert!(dead[0]["payload"].as_str().unwrap().contains("\"hot\""), "{dead:?}");
}

/// Checkpoints every 100 ms, acknowledgements after them; the broker is restarted while Weir
/// reads, so the messages it had sent and not had acknowledged come again, and messages are
/// published while it is down. Every message is in the committed output exactly once.
#[test]
fn a_broker_restarted_mid_run_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    broker.open_session("mqtt-restart-0", "sensors/#");
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 20_000);
    broker.publish_lines("sensors/a/b/telemetry", &input);
    let out = dir.path().join("out");
    let cfg = pipeline(&broker, "mqtt-restart", &["sensors/#"], &out, Some(&dir.path().join("ck")));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    let read = || reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
    poll(|| (read() > 2000).then_some(()));
    broker.stop();
    let more = dir.path().join("more.jsonl");
    events(&more, 20_000, 5000);
    // Published into the restarted broker's queue for the session, before Weir is back.
    broker.restart();
    broker.publish_lines("sensors/a/b/telemetry", &more);
    let summary = rt.block_on(handle).unwrap().unwrap();
    let reconnects = reg.connectors.get("weir_mqtt_reconnects_total", &[("server", &broker.url())]).unwrap_or(0.0);
    assert!(reconnects >= 1.0, "the lost connection was counted: {reconnects}");
    assert!(summary.source_records >= 25_000, "{}", summary.source_records);
    assert_seqs(&committed_rows(&out), 0..25_000, "after the broker's restart");
}

/// The broker away for longer than `end_when_idle`: the source waits for it instead of
/// ending (only quiet while connected counts), and reads what is published once it is back.
/// Regression: the outage counted as quiet and the source ended during it.
#[test]
fn a_broker_away_longer_than_end_when_idle_does_not_end_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    broker.open_session("mqtt-away-0", "sensors/#");
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 500);
    broker.publish_lines("sensors/a/b/telemetry", &input);
    let out = dir.path().join("out.jsonl");
    let cfg = pipeline(&broker, "mqtt-away", &["sensors/#"], &out, None);
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) >= 500).then_some(()));
    broker.stop();
    // Away for twice `end_when_idle` (2 s), the source retrying all the while.
    let url = broker.url();
    let failures = || reg.connectors.get("weir_mqtt_reconnects_total", &[("server", &url)]).unwrap_or(0.0);
    assert_runs_through_outage(
        &handle,
        Duration::from_secs(4),
        2.0,
        failures,
        "the source ended while the broker was away",
    );
    broker.restart();
    let more = dir.path().join("more.jsonl");
    events(&more, 500, 500);
    broker.publish_lines("sensors/a/b/telemetry", &more);
    rt.block_on(handle).unwrap().unwrap();
    assert_every_seq(&read_jsonl(&out), 0..1000, "after the outage");
}

/// Nothing listens at first: the source retries with backoff and counts it, and reads once
/// the broker is there.
#[test]
fn a_broker_that_is_not_there_yet_is_retried_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    broker.stop();
    let out = dir.path().join("out.jsonl");
    let cfg = pipeline(&broker, "mqtt-late", &["sensors/#"], &out, None);
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    let url = broker.url();
    poll(|| {
        (reg.connectors.get("weir_mqtt_reconnects_total", &[("server", &url)]).unwrap_or(0.0) >= 2.0).then_some(())
    });
    broker.restart();
    // The broker has no session for the client, so Weir subscribes itself once connected;
    // until it has, what is published goes nowhere. Publish until something arrives, then once
    // more in full.
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 100);
    poll(|| {
        broker.publish_lines("sensors/x/y/telemetry", &input);
        (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(())
    });
    let before = reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
    broker.publish_lines("sensors/x/y/telemetry", &input);
    let summary = rt.block_on(handle).unwrap().unwrap();
    assert!(summary.source_records >= before + 100, "{} after {before}", summary.source_records);
}

/// MQTT 5 user properties become a JSON column; a message without any gives null.
#[test]
fn user_properties_become_a_column() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    broker.open_session("mqtt-props-0", "sensors/#");
    let publish = |payload: &str, props: &[(&str, &str)]| {
        let mut c = std::process::Command::new("mosquitto_pub");
        c.args([
            "-p",
            &broker.port.to_string(),
            "-t",
            "sensors/a/b/telemetry",
            "-q",
            "1",
            "-V",
            "mqttv5",
            "-m",
            payload,
        ]);
        for (k, v) in props {
            c.args(["-D", "publish", "user-property", k, v]);
        }
        assert!(c.status().unwrap().success());
    };
    publish(r#"{"seq": 1, "ts": 1796000000001, "temp": 1.5}"#, &[("firmware", "2.1"), ("site", "lab")]);
    publish(r#"{"seq": 2, "ts": 1796000000002, "temp": 2.5}"#, &[]);
    let out = dir.path().join("out.jsonl");
    let mut cfg = pipeline(&broker, "mqtt-props", &["sensors/#"], &out, None);
    let SourceConnector::Mqtt(m) = &mut cfg.source_mut().connector else { unreachable!() };
    m.properties_column = Some("props".into());
    rt().block_on(Pipeline::from_config(cfg).build().unwrap().run(&RunOptions::default())).unwrap();
    let rows = read_jsonl(&out);
    let one = rows.iter().find(|r| r["seq"] == 1).unwrap();
    let props: serde_json::Value = serde_json::from_str(one["props"].as_str().unwrap()).unwrap();
    assert_eq!(props, serde_json::json!({"firmware": "2.1", "site": "lab"}));
    assert!(rows.iter().find(|r| r["seq"] == 2).unwrap()["props"].is_null());
}

/// A broker that wants a password: the right one reads, a wrong one fails the run with the
/// broker's reason instead of retrying forever.
#[test]
fn credentials_are_sent_and_a_refusal_fails_the_run_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_with_user(dir.path(), "weir", "s3cret");
    let out = dir.path().join("out.jsonl");
    let run = |password: &str| {
        let mut cfg = pipeline(&broker, "mqtt-auth", &["sensors/#"], &out, None);
        let SourceConnector::Mqtt(m) = &mut cfg.source_mut().connector else { unreachable!() };
        m.username = Some("weir".into());
        m.password = Some(password.into());
        m.end_when_idle = Some(Duration::from_millis(500));
        rt().block_on(Pipeline::from_config(cfg).build().unwrap().run(&RunOptions::default()))
    };
    let err = run("wrong").unwrap_err().to_string();
    assert!(err.contains("refused the connection") && err.contains("NotAuthorized"), "{err}");
    assert!(!err.contains("wrong"), "the password is not in the error: {err}");
    run("s3cret").unwrap();
}

#[test]
fn settings_are_checked_before_connecting() {
    let plan = |yaml: &str| source_settings_error(&format!("mqtt: {yaml}"), "");
    assert!(plan("{ url: \"http://x\", topics: [a] }").contains("scheme `http` is not mqtt://"));
    assert!(plan("{ url: \"mqtt://x\", topics: [\"a/#/b\"] }").contains("`#` must be last"));
    assert!(plan("{ url: \"mqtt://x\", topics: [a], qos: 2 }").contains("QoS 0 or 1"));
    assert!(plan("{ url: \"mqtt://x\", topics: [a], protocol: 4 }").contains("expected 5 or 3.1.1"));
    assert!(plan("{ url: \"mqtt://x\", topics: [a], topic_fields: \"a/{a}\" }").contains("column `a`"));
    assert!(plan("{ url: \"mqtt://x\", topics: [a], password: p, passwd: q }").contains("unknown field `passwd`"));
    assert!(plan("{ url: \"mqtt://x\", topics: [a], protocol: 3.1.1, properties_column: p }")
        .contains("user properties are MQTT 5"));
}
