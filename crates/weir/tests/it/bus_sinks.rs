//! The NATS and RabbitMQ sinks, read back through Weir's own sources: what one pipeline
//! publishes, another reads into a file.

use std::path::Path;

use weir::prelude::*;
use weir_connectors::testing::{self, Mosquitto, NatsServer};

use crate::common::*;

/// `n` events `{seq, site, temp}`, every seventh without a site.
fn input(dir: &Path, n: i64) -> std::path::PathBuf {
    let p = dir.join("in.jsonl");
    let text: String = (0..n)
        .map(|i| match i % 7 {
            6 => format!("{{\"seq\":{i},\"temp\":{i}.5}}\n"),
            _ => format!("{{\"seq\":{i},\"site\":\"s{}\",\"temp\":{i}.5}}\n", i % 3),
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// A file of events into a sink (YAML lines under the connector key).
fn publish(dir: &Path, input: &Path, connector: &str, sink: &str) -> RunSummary {
    let yaml = format!(
        "name: bus-sink
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: site, type: string, required: false }}
      - {{ name: temp, type: float64 }}
sink:
  id: out
  {connector}:
{sink}
dead_letters: {{ path: {dead} }}
",
        input = input.display(),
        dead = dir.join("dead.jsonl").display(),
    );
    let cfg = weir::yaml::parse_with("t.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
    )
    .unwrap()
}

/// Reads back with a source (YAML lines under the connector key) into `out`.
pub(crate) fn read_back(dir: &Path, connector: &str, source: &str, out: &Path) -> Vec<serde_json::Value> {
    let yaml = format!(
        "name: read-back
source:
  id: events
  {connector}:
{source}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: site, type: string, required: false }}
      - {{ name: temp, type: float64 }}
sink:
  id: out
  file: {{ path: {out}, format: json }}
dead_letters: {{ path: {dead} }}
",
        out = out.display(),
        dead = dir.join("read-dead.jsonl").display(),
    );
    let cfg = weir::yaml::parse_with("r.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap();
    read_jsonl(out)
}

fn dead_reasons(dir: &Path) -> Vec<String> {
    read_jsonl(&dir.join("dead.jsonl")).iter().map(|d| d["reason"].as_str().unwrap().to_string()).collect()
}

#[test]
fn nats_jetstream_publishing_is_acknowledged_and_message_ids_drop_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    server.create_stream("OUT", &["out.>"]);
    let input = input(dir.path(), 1400);
    let sink = format!(
        "    url: {}\n    subject: \"out.{{site}}\"\n    jetstream: true\n    msg_id: \"m-{{seq}}\"",
        server.url()
    );
    publish(dir.path(), &input, "nats", &sink);
    // Written again (a retry, a replay after a crash): the stream keeps each message once.
    let _ = std::fs::remove_file(dir.path().join("dead.jsonl"));
    publish(dir.path(), &input, "nats", &sink);
    let reasons = dead_reasons(dir.path());
    assert_eq!(reasons.len(), 200, "the rows without a site: {:?}", &reasons[..3]);
    assert!(reasons[0].contains("`{site}` of `out.{site}` is null"), "{}", reasons[0]);
    let source = format!(
        "    url: {}\n    subjects: [\"out.>\"]\n    stream: OUT\n    consumer: check\n    end_when_idle: 1s\n    subject_column: subject",
        server.url()
    );
    let rows = read_back(dir.path(), "nats", &source, &dir.path().join("back.jsonl"));
    assert_seqs(&rows, (0..1400).filter(|i| i % 7 != 6), "read back");
    let r = rows.iter().find(|r| r["seq"] == 4).unwrap();
    assert_eq!(
        (r["subject"].as_str(), r["site"].as_str(), r["temp"].as_f64()),
        (Some("out.s1"), Some("s1"), Some(4.5))
    );
    // A subject no stream stores: those rows are refused, with the reason.
    let _ = std::fs::remove_file(dir.path().join("dead.jsonl"));
    publish(
        dir.path(),
        &input,
        "nats",
        &format!("    url: {}\n    subject: \"nowhere.{{seq}}\"\n    jetstream: true", server.url()),
    );
    let reasons = dead_reasons(dir.path());
    assert_eq!(reasons.len(), 1400);
    assert!(reasons[0].contains("no JetStream stream stores this subject"), "{}", reasons[0]);
}

#[test]
fn nats_core_publishing_reaches_a_stream_listening_on_the_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    // A stream captures core publishes on its subjects too.
    server.create_stream("CORE", &["core.>"]);
    let input = input(dir.path(), 700);
    publish(dir.path(), &input, "nats", &format!("    url: {}\n    subject: \"core.{{seq}}\"", server.url()));
    let source = format!(
        "    url: {}\n    subjects: [\"core.>\"]\n    stream: CORE\n    consumer: check\n    end_when_idle: 1s",
        server.url()
    );
    let rows = read_back(dir.path(), "nats", &source, &dir.path().join("back.jsonl"));
    assert_seqs(&rows, 0..700, "read back");
}

#[test]
fn rabbitmq_publishing_is_confirmed_routed_by_columns_and_unroutable_rows_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("WEIR_TEST_RABBITMQ").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let q = format!("weir-test-sink-{}-{n}", std::process::id());
    // Only sites s0 and s1 are bound: s2's messages have no queue.
    testing::bind_queue(&url, &q, "amq.topic", &format!("{q}.s0"));
    testing::bind_queue(&url, &q, "amq.topic", &format!("{q}.s1"));
    let input = input(dir.path(), 2100);
    let sink = format!(
        "    url: {url}\n    exchange: amq.topic\n    routing_key: \"{q}.{{site}}\"\n    message_id: \"{{seq}}\""
    );
    publish(dir.path(), &input, "rabbitmq", &sink);
    let reasons = dead_reasons(dir.path());
    let unroutable = reasons.iter().filter(|r| r.contains("no queue is bound to exchange `amq.topic`")).count();
    let nulls = reasons.iter().filter(|r| r.contains("is null")).count();
    assert_eq!((unroutable, nulls), (600, 300), "{:?}", &reasons[..2]);
    assert_eq!(testing::queue_ready(&url, &q), 1200);
    let source = format!("    url: {url}\n    queue: {q}\n    end_when_idle: 1s");
    let rows = read_back(dir.path(), "rabbitmq", &source, &dir.path().join("back.jsonl"));
    assert_seqs(&rows, (0..2100).filter(|i| i % 7 != 6 && i % 3 != 2), "read back");
}

#[test]
fn mqtt_publishing_at_qos_1_is_acknowledged_on_topics_made_from_columns() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    // The reader's session exists before anything is published, so the broker keeps it all.
    broker.open_session("reader-0", "out/#");
    let input = input(dir.path(), 1400);
    publish(dir.path(), &input, "mqtt", &format!("    url: {}\n    topic: \"out/{{site}}/{{seq}}\"", broker.url()));
    let reasons = dead_reasons(dir.path());
    assert_eq!(reasons.len(), 200, "the rows without a site: {:?}", &reasons[..2]);
    assert!(reasons[0].contains("`{site}` of `out/{site}/{seq}` is null"), "{}", reasons[0]);
    let source = format!(
        "    url: {}\n    topics: [\"out/#\"]\n    client_id: reader\n    end_when_idle: 1s\n    topic_column: topic",
        broker.url()
    );
    let rows = read_back(dir.path(), "mqtt", &source, &dir.path().join("back.jsonl"));
    assert_seqs(&rows, (0..1400).filter(|i| i % 7 != 6), "read back");
    let r = rows.iter().find(|r| r["seq"] == 4).unwrap();
    assert_eq!(r["topic"].as_str(), Some("out/s1/4"));
    // Wildcards cannot be published to.
    let cfg = weir::yaml::parse_with(
        "m.yaml",
        &format!("name: m\nsource: {{ id: s, stdin: {{}}, schema: {{ fields: [{{ name: a, type: string }}] }} }}\nsink:\n  id: o\n  mqtt: {{ url: \"{}\", topic: \"a/+/{{a}}\" }}\n", broker.url()),
        |_| None,
    )
    .unwrap();
    let e = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`+` and `#` are for subscribing"), "{e}");
}
