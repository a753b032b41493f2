//! The Kafka source and sink against librdkafka's mock cluster (real Kafka protocol over
//! loopback sockets, inside the test process): results equal the file runs', metadata
//! columns, dead letters naming partition and offset, resuming from checkpointed offsets,
//! and an idle partition that must not stall windows.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Message as _};
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

/// A broker to test against: librdkafka's mock cluster, or a real one (`_mock: None`).
pub(crate) struct Cluster {
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pub(crate) brokers: String,
}

impl Cluster {
    pub(crate) fn new(topics: &[(&str, i32)]) -> Self {
        let mock = MockCluster::new(1).unwrap();
        for (t, n) in topics {
            mock.create_topic(t, *n, 1).unwrap();
        }
        let brokers = mock.bootstrap_servers();
        Self { mock: Some(mock), brokers }
    }

    /// Produces `lines`, keyed by device id (so a device stays on one partition, as a real
    /// producer keyed by device would place it), or to `partition` when given.
    pub(crate) fn produce(&self, topic: &str, lines: &[String], partition: Option<i32>) {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        for l in lines {
            let key = serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["device_id"].as_str().map(str::to_string))
                .unwrap_or_default();
            let mut rec = BaseRecord::<str, str>::to(topic).payload(l).key(&key);
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            p.send(rec).map_err(|(e, _)| e).unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }

    /// A `read_committed` consumer of `topic` from its start, in its own group.
    fn reader(&self, group: String, topic: &str) -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        c
    }

    /// Everything `topic` holds (read_committed): waits for the first record, then until a
    /// second passes without one.
    fn consume_all(&self, topic: &str) -> Vec<String> {
        let c = self.reader(format!("all-{}-{topic}", std::process::id()), topic);
        let mut out = Vec::new();
        let mut quiet = Instant::now();
        // Joining the group takes a while; after the first record, a second of quiet ends it.
        while quiet.elapsed() < Duration::from_secs(if out.is_empty() { 15 } else { 1 }) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                quiet = Instant::now();
            }
        }
        out
    }

    /// Reads `n` records of `topic` (read_committed), failing after 20 s.
    fn consume(&self, topic: &str, n: usize) -> Vec<(Option<String>, String)> {
        let c = self.reader(format!("reader-{}", std::process::id()), topic);
        let mut out = Vec::new();
        let t = Instant::now();
        while out.len() < n {
            assert!(t.elapsed() < Duration::from_secs(20), "read {} of {n} records from {topic}", out.len());
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                out.push((key, String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()));
            }
        }
        // Nothing more than expected.
        let extra = c.poll(Duration::from_millis(500));
        assert!(extra.is_none(), "more records than the {n} expected in {topic}");
        out
    }
}

/// `weir_core::keys::kafka_partition` agrees with librdkafka's `murmur2_random` (the Java
/// client's partitioner) for keys of every tail length, so Weir can know without a broker
/// which partition holds a key.
#[test]
fn kafka_partition_matches_the_murmur2_partitioner() {
    let topic = "placement";
    let k = Cluster::new(&[(topic, 7)]);
    let keys: Vec<String> =
        (0..300).map(|i| "dev-0123456789".chars().take(i % 15).collect::<String>() + &i.to_string()).collect();
    let lines: Vec<String> = keys.iter().map(|d| format!("{{\"device_id\":\"{d}\"}}")).collect();
    k.produce(topic, &lines, None);
    let c = k.reader(format!("placement-{}", std::process::id()), topic);
    let mut seen = 0;
    let t = Instant::now();
    while seen < keys.len() {
        assert!(t.elapsed() < Duration::from_secs(20), "read {seen} of {} records", keys.len());
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else { continue };
        let key = m.key().unwrap();
        let ours = weir_core::keys::kafka_partition(key, 7);
        assert_eq!(ours as i32, m.partition(), "key {:?}", String::from_utf8_lossy(key));
        seen += 1;
    }
}

pub(crate) fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

fn kafka_source(brokers: &str, topic: &str) -> KafkaSourceSettings {
    KafkaSourceSettings {
        brokers: brokers.into(),
        topics: vec![topic.into()],
        group_id: None,
        start: "earliest".into(),
        format: FormatSpec::Json,
        avro: None,
        protobuf: None,
        json_schema: None,
        stop_at_end: true,
        on_missing_position: Default::default(),
        metadata: KafkaMetadataSettings::default(),
        properties: Default::default(),
    }
}

/// An example pipeline with its file source swapped for Kafka.
fn from_kafka(example_name: &str, brokers: &str, topic: &str, out: &Path, dead: &Path) -> PipelineConfig {
    let mut cfg = example(example_name, &[("INPUT", Path::new("/unused")), ("OUTPUT", out), ("DEAD_LETTERS", dead)])
        .config()
        .clone();
    cfg.source_mut().connector = SourceConnector::Kafka(kafka_source(brokers, topic));
    cfg
}

/// Checkpoints in `dir/ck` every `interval`, keeping two.
fn checkpoints_in(dir: &Path, interval: Duration) -> Option<CheckpointConfig> {
    Some(CheckpointConfig {
        dir: dir.join("ck").display().to_string(),
        options: Default::default(),
        interval,
        keep: 2,
        member: None,
    })
}

/// The job of `cfg`, planned for `workers`, not started: for tests that run jobs side by side.
fn job(cfg: PipelineConfig, workers: usize) -> Job {
    let spec = Pipeline::from_config(cfg)
        .build()
        .unwrap()
        .plan(&RunOptions { workers: Some(workers), ..Default::default() })
        .unwrap();
    Job::new(spec).unwrap()
}

fn run(cfg: &PipelineConfig, workers: usize) -> RunSummary {
    rt().block_on(
        Pipeline::from_config(cfg.clone())
            .build()
            .unwrap()
            .run(&RunOptions { workers: Some(workers), ..Default::default() }),
    )
    .unwrap()
}

#[test]
fn w1_from_kafka_equals_the_file_run_at_1_and_2_workers() {
    let k = Cluster::new(&[("sensors", 4)]);
    k.produce("sensors", &lines(&data("sensors-3k.jsonl")), None);
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
        let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "sensors", &out, &dead);
        // A fresh group each time: offsets must come from `start`, not an earlier run.
        cfg.kafka_source().group_id = Some(format!("w1-{workers}"));
        let s = run(&cfg, workers);
        assert_eq!(s.steps[0].1.rows_in, 3000);
        assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), read_jsonl(&out), &format!("{workers} workers"));
    }
}

/// Each worker reads and decodes the partitions it owns (not worker 0 all of them): both
/// workers' source steps count records, together every one, and the output is the file run's.
#[test]
fn every_worker_decodes_its_share_of_the_partitions() {
    let k = Cluster::new(&[("sensors", 4)]);
    k.produce("sensors", &lines(&data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "sensors", &out, &dead);
    cfg.kafka_source().group_id = Some("w2-every-worker".into());
    let job = job(cfg, 2);
    let reg = job.registry();
    rt().block_on(job.run()).unwrap();
    assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), read_jsonl(&out), "2 workers");
    let source = weir_core::ids::StepId::new("events");
    let read: Vec<u64> =
        (0..2).map(|w| reg.step(&source, w).rows_in.load(std::sync::atomic::Ordering::Relaxed)).collect();
    assert!(read.iter().all(|&n| n > 0), "records read per worker: {read:?}");
    assert_eq!(read.iter().sum::<u64>(), 3000, "records read per worker: {read:?}");
}

#[test]
fn kafka_to_kafka_with_keys_and_metadata_columns() {
    let k = Cluster::new(&[("in", 3), ("out", 2)]);
    k.produce("in", &lines(&data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "in", &out, &dead);
    let src = cfg.kafka_source();
    src.metadata = KafkaMetadataSettings {
        key: Some("k".into()),
        partition: Some("p".into()),
        offset: Some("o".into()),
        timestamp: Some("bt".into()),
        received: Some("rx".into()),
        ..Default::default()
    };
    // Metadata columns are ordinary columns to the steps after the source.
    let StepConfig::Select(sel) = &mut cfg.steps[1] else { panic!("w2 selects") };
    sel.columns.extend([
        "k = device_id AS key_matches".to_string(),
        "p".into(),
        "o".into(),
        "bt > 0 AS stamped".into(),
        "rx".into(),
    ]);
    let mut sink = sink_settings(&k.brokers);
    sink.key = Some("device_id".into());
    sink.headers = [("source-partition".to_string(), "p".to_string())].into_iter().collect();
    cfg.sink = SinkConfig::new("to-kafka", SinkConnector::Kafka(sink));
    // The time each row spent inside the job, from its `received` stamp to the sink.
    cfg.sink.latency_column = Some("rx".into());
    let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let before = now_us();
    let s = run(&cfg, 2);
    let after = now_us();
    let (_, _, max_us) = s.latency_us.expect("the sink measured from `rx`");
    assert!(max_us as i64 <= after - before, "{max_us} µs inside a run of {} µs", after - before);
    let expected = read_jsonl(&data("w2-expected.jsonl"));
    assert_eq!(s.sink_rows as usize, expected.len());
    let got = k.consume("out", expected.len());
    let rows: Vec<serde_json::Value> = got.iter().map(|(_, v)| serde_json::from_str(v).unwrap()).collect();
    for ((key, _), r) in got.iter().zip(&rows) {
        assert_eq!(key.as_deref(), r["device_id"].as_str(), "the record key is the device id");
        assert_eq!((r["key_matches"].as_bool(), r["stamped"].as_bool()), (Some(true), Some(true)), "{r}");
        assert!((0..3).contains(&r["p"].as_i64().unwrap()) && r["o"].as_i64().unwrap() >= 0, "{r}");
        assert!((before..=after).contains(&r["rx"].as_i64().unwrap()), "taken from the consumer during the run: {r}");
    }
    let plain: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            for c in ["key_matches", "p", "o", "stamped", "rx"] {
                o.remove(c);
            }
            r
        })
        .collect();
    assert_same_rows(expected, plain, "kafka to kafka");
}

#[test]
fn bad_records_are_dead_lettered_with_partition_and_offset() {
    let k = Cluster::new(&[("mixed", 1)]);
    let mut input = lines(&data("sensors-3k.jsonl"))[..100].to_vec();
    input.insert(10, "{\"device_id\": \"d1\", \"ts\": \"not a time\"".into());
    input.insert(50, "\u{1}\u{2} garbage".into());
    k.produce("mixed", &input, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let s = run(&from_kafka("w2-filter-project.yaml", &k.brokers, "mixed", &out, &dead), 1);
    let src = s.steps[0].1;
    assert_eq!((src.rows_in, src.dead_lettered), (102, 2));
    assert!(src.balanced(), "{src:?}");
    let letters = read_jsonl(&dead);
    let where_ = |l: &serde_json::Value| {
        (l["origin"].as_str().unwrap().to_string(), l["position"].as_str().unwrap().to_string())
    };
    assert_eq!(where_(&letters[0]), ("kafka mixed[0]".into(), "offset 10".into()), "{letters:?}");
    assert_eq!(where_(&letters[1]), ("kafka mixed[0]".into(), "offset 50".into()), "{letters:?}");
}

/// A run with checkpoints reads half the topic; more records arrive; the next run resumes at
/// the checkpointed offsets, so the exactly-once file output holds each result once.
#[test]
fn a_restart_resumes_at_the_checkpointed_offsets() {
    let k = Cluster::new(&[("w2", 2)]);
    let all = lines(&data("sensors-3k.jsonl"));
    k.produce("w2", &all[..1500], None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "w2", &out, &dead);
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(20));
    let first = run(&cfg, 2);
    assert_eq!(first.steps[0].1.rows_in, 1500);
    k.produce("w2", &all[1500..], None);
    // Another group: positions come from the checkpoint, never from the group's offsets.
    // (It also spares the mock broker's wait for the first member's rebalance timeout.)
    cfg.kafka_source().group_id = Some("second".into());
    let second = run(&cfg, 1);
    assert_eq!(second.steps[0].1.rows_in, 1500, "the second run reads only the new records");
    let mut parts: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).collect();
    parts.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"));
    let rows: Vec<serde_json::Value> = parts.iter().flat_map(|p| read_jsonl(p)).collect();
    assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), rows, "two runs over a growing topic");
}

/// Starts a job that does not end by itself and waits (at most 20 s) until its sink has rows,
/// i.e. a window closed while it runs.
fn run_until_a_window_closes(
    cfg: &PipelineConfig,
    workers: Option<usize>,
    what: &str,
) -> (
    tokio::runtime::Runtime,
    tokio::task::JoinHandle<weir_core::Result<RunSummary>>,
    std::sync::Arc<weir_core::metrics::Registry>,
    weir_core::runtime::ShutdownHandle,
) {
    let plan = Pipeline::from_config(cfg.clone()).build().unwrap().plan(&RunOptions { workers, ..Default::default() });
    let job = Job::new(plan.unwrap()).unwrap();
    let (reg, stop) = (job.registry(), job.shutdown_handle());
    let rt = rt();
    let handle = rt.spawn(job.run());
    let t = Instant::now();
    while reg.sink_rows.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "no window closed {what}:\n{}", reg.render_prometheus("x"));
        std::thread::sleep(Duration::from_millis(50));
    }
    (rt, handle, reg, stop)
}

/// One partition gets data, the other none: with an idle timeout, windows still close while
/// the job runs (without it, the silent partition would hold the watermark back forever).
#[test]
fn an_idle_partition_does_not_stall_windows() {
    let k = Cluster::new(&[("quiet", 2)]);
    k.produce("quiet", &lines(&data("sensors-3k.jsonl")), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "quiet", &out, &dead);
    cfg.kafka_source().stop_at_end = false;
    cfg.kafka_source().properties.insert("statistics.interval.ms".into(), "200".into());
    cfg.source_mut().watermark.idle_timeout = Some(Duration::from_millis(300));
    let (rt, handle, reg, stop) = run_until_a_window_closes(&cfg, None, "while partition 1 stayed silent");
    let t = Instant::now();
    // The consumer's lag per partition reaches the metrics (from librdkafka's statistics).
    let lag = |p: &str| reg.connectors.get("weir_kafka_consumer_lag", &[("topic", "quiet"), ("partition", p)]);
    while lag("0") != Some(0.0) || lag("1") != Some(0.0) {
        assert!(t.elapsed() < Duration::from_secs(20), "lag not reported: {:?} {:?}", lag("0"), lag("1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reg.connectors.get("weir_kafka_rebalances_total", &[("event", "assigned")]), Some(1.0));
    let text = reg.render_prometheus("j");
    assert!(text.contains("weir_kafka_consumer_lag{job=\"j\",topic=\"quiet\",partition=\"0\"} 0"), "{text}");
    stop.stop();
    rt.block_on(handle).unwrap().unwrap();
    assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), read_jsonl(&out), "after the stop");
}

/// With checkpoints, two workers and a topic of one partition, one worker's source has nothing
/// to read. Meanwhile it must count as idle, not hold back every window after the exchange
/// until the job ends.
#[test]
fn windows_close_while_running_with_checkpoints_at_2_workers() {
    let k = Cluster::new(&[("ck2", 1)]);
    k.produce("ck2", &lines(&data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "ck2", &out, &dead);
    cfg.kafka_source().stop_at_end = false;
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(200));
    let (rt, handle, _reg, stop) = run_until_a_window_closes(&cfg, Some(2), "while running");
    stop.stop();
    rt.block_on(handle).unwrap().unwrap();
}

#[test]
fn kafka_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("o"), dir.path().join("d"));
    let mut cfg = from_kafka("w2-filter-project.yaml", "127.0.0.1:1", "t", &out, &dead);
    cfg.kafka_source().start = "yesterday".into();
    let err = Pipeline::from_config(cfg.clone()).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("yesterday") && err.contains("RFC 3339"), "{err}");
    cfg.kafka_source().start = "latest".into();
    cfg.source_mut().schema = None;
    let err = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("declared `schema`"), "{err}");
    // A repartition goes through Kafka, once per pipeline, and the event time must reach it.
    let plan = |cfg: &PipelineConfig| {
        Pipeline::from_config(cfg.clone()).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string()
    };
    let yaml = "name: r\nsource:\n  id: in\n  file: { path: x.jsonl, format: json }\n  schema: { fields: [ { name: k, type: string }, { name: ts, type: int64 } ] }\n  event_time: { column: ts, format: ms }\nsteps:\n  - key_by: { id: by-k, keys: [k], repartition: {} }\nsink:\n  id: out\n  stdout: {}\n";
    let mut r: PipelineConfig = weir::yaml::parse("r.yaml", yaml).unwrap();
    assert!(plan(&r).contains("needs a Kafka source"), "{}", plan(&r));
    r.source_mut().connector = SourceConnector::Kafka(kafka_source("127.0.0.1:1", "t"));
    r.steps.insert(
        0,
        StepConfig::Select(serde_json::from_value(serde_json::json!({"id": "drop-ts", "columns": ["k"]})).unwrap()),
    );
    assert!(plan(&r).contains("event-time column `ts` must reach the key_by"), "{}", plan(&r));
    r.steps.remove(0);
    r.steps.push(r.steps[0].clone());
    if let StepConfig::KeyBy(k) = &mut r.steps[1] {
        k.id = "again".into();
    }
    assert!(plan(&r).contains("only one `key_by` of a pipeline can `repartition`"), "{}", plan(&r));
    // Secrets never show in Debug output (which is what logs would print).
    let mut s = kafka_source("b:1", "t");
    s.properties.insert("sasl.password".into(), "hunter2".into());
    assert!(!format!("{s:?}").contains("hunter2"));
}

/// A Kafka sink to topic `out`: at least once, no key, no properties.
fn sink_settings(brokers: &str) -> KafkaSinkSettings {
    KafkaSinkSettings {
        brokers: brokers.into(),
        topic: "out".into(),
        format: FormatSpec::Json,
        key: None,
        partition: None,
        headers: Default::default(),
        avro: None,
        protobuf: None,
        mode: "at_least_once".into(),
        transactional_id: None,
        commit_topic: None,
        transaction_timeout: None,
        checkpoint_header: None,
        properties: Default::default(),
    }
}

/// An at-least-once Kafka sink to topic `out`, with one librdkafka property.
fn at_least_once_sink(brokers: &str, key: Option<&str>, property: (&str, &str)) -> SinkConfig {
    let mut k = sink_settings(brokers);
    k.key = key.map(str::to_string);
    k.properties.insert(property.0.to_string(), property.1.to_string());
    SinkConfig::new("to-kafka", SinkConnector::Kafka(k))
}

/// An exactly-once Kafka sink to topic `out`, keyed by device.
fn exactly_once_sink(brokers: &str, id: &str) -> SinkConfig {
    let mut k = sink_settings(brokers);
    k.key = Some("device_id".into());
    k.mode = "exactly_once".into();
    k.transactional_id = Some(id.into());
    SinkConfig::new("to-kafka", SinkConnector::Kafka(k))
}

/// A row the Kafka sink refuses for a reason of its own (too large for `message.max.bytes`,
/// a partition value that is not a number) goes to the dead-letter output, kind `sink`, with
/// the reason; the rest of its batch is written and the job goes on.
#[test]
fn rows_the_kafka_sink_refuses_are_dead_lettered_alone() {
    let k = Cluster::new(&[("out", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let (input, dead) = (dir.path().join("in.jsonl"), dir.path().join("dead.jsonl"));
    let rows: Vec<String> = (0..50)
        .map(|i| {
            let blob = if i == 7 { "x".repeat(5000) } else { "small".into() };
            let part = if i == 13 { "north" } else { "0" };
            format!("{{\"id\":{i},\"part\":\"{part}\",\"blob\":\"{blob}\"}}")
        })
        .collect();
    std::fs::write(&input, rows.join("\n")).unwrap();
    let yaml = format!(
        "name: refuse\nsource:\n  id: in\n  file: {{ path: \"{}\" }}\nsink:\n  id: to-kafka\n  kafka: {{ brokers: \"{}\", topic: out, partition: part, properties: {{ message.max.bytes: \"1000\" }} }}\ndead_letters: {{ path: \"{}\" }}\n",
        input.display(),
        k.brokers,
        dead.display()
    );
    let cfg = weir::yaml::parse("refuse.yaml", &yaml).unwrap();
    let s = run(&cfg, 1);
    assert_eq!(s.sink_rows, 48);
    let sink = s.steps.iter().find(|(id, _)| id.as_str() == "to-kafka").unwrap().1;
    assert_eq!((sink.rows_in, sink.rows_out, sink.dead_lettered), (50, 48, 2));
    assert!(sink.balanced());
    let id = |l: &serde_json::Value| {
        serde_json::from_str::<serde_json::Value>(l["payload"].as_str().unwrap()).unwrap()["id"].clone()
    };
    let mut letters = read_jsonl(&dead);
    letters.sort_by_key(|l| id(l).as_i64());
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l["kind"] == "sink" && l["step"] == "to-kafka"), "{letters:?}");
    assert_eq!(id(&letters[0]), 7);
    assert!(letters[0]["reason"].as_str().unwrap().to_lowercase().contains("too large"), "{}", letters[0]);
    assert_eq!(id(&letters[1]), 13);
    assert!(letters[1]["reason"].as_str().unwrap().contains("`north` is not a partition number"), "{}", letters[1]);
    let got = k.consume_all("out");
    assert_eq!(got.len(), 48);
    assert!(!got.iter().any(|r| r.contains("\"id\":7,") || r.contains("\"id\":13,")));
}

/// W1 to Kafka in transactions, one per checkpoint, at 2 workers: a `read_committed` reader
/// sees every result once, and the commit topic records the checkpoints committed.
#[test]
fn exactly_once_output_is_committed_per_checkpoint() {
    // The mock cluster does not serve CreateTopics, so the commit topic is made here.
    let k = Cluster::new(&[("sensors", 3), ("out", 2), ("w1-eo.commits", 1)]);
    k.produce("sensors", &lines(&data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "sensors", &out, &dead);
    cfg.sink = exactly_once_sink(&k.brokers, "w1-eo");
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(50));
    let s = run(&cfg, 2);
    let expected = read_jsonl(&data("w1-expected.jsonl"));
    assert_eq!(s.sink_rows as usize, expected.len());
    let got = k.consume("out", expected.len());
    let rows: Vec<serde_json::Value> = got.iter().map(|(_, v)| serde_json::from_str(v).unwrap()).collect();
    assert_same_rows(expected, rows, "exactly-once kafka sink");
    let commits = k.consume_all("w1-eo.commits");
    assert!(!commits.is_empty(), "the commit topic records the committed checkpoints");
    assert!(commits.iter().all(|c| c.contains("\"checkpoint\":")), "{commits:?}");
}

/// Exactly once from Kafka to Kafka on one cluster: the source's positions go into each
/// checkpoint's transaction (`send_offsets_to_transaction`), not into a hint after it. The mock
/// cluster answers TxnOffsetCommit without storing the offsets (`rdkafka_mock_handlers.c`), so
/// what is checked is that every committed transaction carried the positions, and that no
/// hint went to the group meanwhile.
#[test]
fn exactly_once_commits_the_source_positions_in_its_transactions() {
    let k = Cluster::new(&[("in", 3), ("out", 2), ("txn-offsets.commits", 1)]);
    k.produce("in", &lines(&data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "in", &out, &dead);
    cfg.kafka_source().group_id = Some("txn-offsets".into());
    cfg.sink = exactly_once_sink(&k.brokers, "txn-offsets");
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(30));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let s = rt().block_on(job.run()).unwrap();
    assert_eq!(s.steps[0].1.rows_in, 3000);
    let get = |name: &str, labels: &[(&str, &str)]| reg.connectors.get(name, labels).unwrap_or(0.0);
    let committed = get("weir_kafka_transactions_total", &[("topic", "out"), ("result", "committed")]);
    let with_offsets = get("weir_kafka_transaction_offset_commits_total", &[("topic", "out")]);
    assert!(committed >= 1.0 && with_offsets == committed, "{}", reg.render_prometheus("j"));
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &k.brokers).set("group.id", "txn-offsets").create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("in", p);
    }
    let hinted = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    assert!(
        hinted.elements().iter().all(|e| !matches!(e.offset(), rdkafka::Offset::Offset(_))),
        "no progress hint outside the transactions: {hinted:?}"
    );
}

#[test]
fn exactly_once_needs_checkpoints_and_a_long_enough_transaction_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("o"), dir.path().join("d"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", "127.0.0.1:1", "t", &out, &dead);
    cfg.sink = exactly_once_sink("127.0.0.1:1", "x");
    let plan = |cfg: &PipelineConfig| {
        Pipeline::from_config(cfg.clone()).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string()
    };
    let err = plan(&cfg);
    assert!(err.contains("exactly_once") && err.contains("checkpoints"), "{err}");
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_secs(60));
    cfg.kafka_sink().transaction_timeout = Some(Duration::from_secs(90));
    let err = plan(&cfg);
    assert!(err.contains("transaction_timeout") && err.contains("3m"), "{err}");
}

/// The Tansu broker the test command starts (`WEIR_TEST_KAFKA` to use another), a new topic
/// `<prefix>-<pid>` of `partitions` on it, and a runtime for the test.
fn tansu_topic(prefix: &str, partitions: i32) -> (String, String, tokio::runtime::Runtime) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let brokers = std::env::var("WEIR_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    assert!(
        std::net::TcpStream::connect(&brokers).is_ok(),
        "no Kafka broker at {brokers}; `source scripts/services.sh` starts one"
    );
    let topic = format!("{prefix}-{}", std::process::id());
    let rt = rt();
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let created = rt
        .block_on(
            admin.create_topics(&[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new()),
        )
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    (brokers, topic, rt)
}

/// Makes the pipeline's Kafka source one member of the group `<topic>-group`, reading on
/// until stopped, quick to notice members that come and go.
fn join_group(cfg: &mut PipelineConfig, topic: &str) {
    let src = cfg.kafka_source();
    src.stop_at_end = false;
    src.group_id = Some(format!("{topic}-group"));
    src.properties.insert("session.timeout.ms".into(), "6000".into());
    src.properties.insert("heartbeat.interval.ms".into(), "500".into());
}

/// Waits until every member was assigned partitions and, with a second member, until the
/// first gave some up to it: the rebalance really happened.
fn wait_for_rebalance(members: &[&std::sync::Arc<weir_core::metrics::Registry>]) {
    let events = |r: &std::sync::Arc<weir_core::metrics::Registry>, e: &str| {
        r.connectors.get("weir_kafka_rebalances_total", &[("event", e)]).unwrap_or(0.0)
    };
    poll(|| members.iter().all(|r| events(r, "assigned") >= 1.0).then_some(()));
    if members.len() == 2 {
        // Incremental: the first gives some up, and is given nothing back.
        poll(|| (events(members[0], "revoked") >= 1.0).then_some(()));
    }
}

/// Against a real Kafka-protocol broker (Tansu, started by `scripts/services.sh`): two jobs in
/// one consumer group split the topic's partitions between them, and together they read every
/// record (at least once: there are no checkpoints here).
#[test]
fn two_jobs_in_one_group_split_the_partitions_on_a_real_broker() {
    let (brokers, topic, rt) = tansu_topic("split", 4);
    let k = Cluster { mock: None, brokers: brokers.clone() };

    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    for name in ["a", "b"] {
        let (out, dead) = (dir.path().join(format!("{name}.jsonl")), dir.path().join(format!("{name}-dead.jsonl")));
        let mut cfg = from_kafka("w2-filter-project.yaml", &brokers, &topic, &out, &dead);
        join_group(&mut cfg, &topic);
        let job = job(cfg, 1);
        let (reg, stop) = (job.registry(), job.shutdown_handle());
        jobs.push((rt.spawn(job.run()), reg, stop, out));
        // The first member holds the partitions before the second joins, so a rebalance
        // really happens; after it, both hold some.
        wait_for_rebalance(&jobs.iter().map(|j| &j.1).collect::<Vec<_>>());
    }
    k.produce(&topic, &lines(&data("sensors-3k.jsonl")), None);
    let expected = read_jsonl(&data("w2-expected.jsonl"));
    let sink_rows =
        |r: &std::sync::Arc<weir_core::metrics::Registry>| r.sink_rows.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    while jobs.iter().map(|(_, r, _, _)| sink_rows(r)).sum::<u64>() < expected.len() as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the two members wrote {:?} rows of {}",
            jobs.iter().map(|(_, r, _, _)| sink_rows(r)).collect::<Vec<_>>(),
            expected.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rows = Vec::new();
    for (handle, reg, stop, out) in jobs {
        stop.stop();
        rt.block_on(handle).unwrap().unwrap();
        assert!(sink_rows(&reg) > 0, "each member must have been given partitions");
        rows.extend(read_jsonl(&out));
    }
    assert_same_rows(expected, rows, "two members of one group");
}

/// The committed rows of a file sink writing part files into `dir`.
fn part_rows(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut parts: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    parts.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"));
    parts.iter().flat_map(|p| read_jsonl(p)).collect()
}

/// One record per partition of a `partitions`-partition topic, an hour after sensors-3k: once
/// they are read, every real window closes by the watermark while the members run.
fn flush_records(partitions: i32) -> Vec<String> {
    let mut flush = Vec::new();
    let mut covered = std::collections::HashSet::new();
    for i in 0.. {
        let key = format!("flush-{i}");
        if covered.insert(weir_core::keys::kafka_partition(key.as_bytes(), partitions as u32)) {
            flush.push(format!(
                "{{\"device_id\":\"{key}\",\"ts\":1700003600000,\"readings\":{{\"temp\":1.0,\"humidity\":1.0,\"pressure\":1.0,\"vibration\":0.0}}}}"
            ));
        }
        if covered.len() == partitions as usize {
            break;
        }
    }
    flush
}

/// Polls `done` every 100 ms until it holds; fails naming `what` after `secs`.
fn wait_until(what: &str, secs: u64, done: &dyn Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what} took over {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running member: its job, registry, stop handle and output folder.
type Member = (
    tokio::task::JoinHandle<weir_core::Result<RunSummary>>,
    std::sync::Arc<weir_core::metrics::Registry>,
    weir_core::runtime::ShutdownHandle,
    std::path::PathBuf,
);

/// Starts a W1 member of the group on `topic`, two workers, checkpointing every `interval` as
/// member `name` into `dir`/ck, writing part files into `dir`/out-`name`.
fn start_member(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    dir: &Path,
    name: &str,
    interval: Duration,
) -> Member {
    let (out, dead) = (dir.join(format!("out-{name}")), dir.join(format!("{name}-dead.jsonl")));
    let mut cfg = from_kafka("w1-sensor-window.yaml", brokers, topic, &out, &dead);
    join_group(&mut cfg, topic);
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.join("ck").display().to_string(),
        options: Default::default(),
        interval,
        keep: 2,
        member: Some(name.into()),
    });
    let job = job(cfg, 2);
    let (reg, stop) = (job.registry(), job.shutdown_handle());
    (rt.spawn(job.run()), reg, stop, out)
}

/// Keyed state follows its partitions between two members of a group on a real broker
/// (Tansu): `a` reads the first half alone; `b` joins, takes half the partitions over with
/// their open windows from `a`'s checkpoint, and `a` goes on with the rest. Together they
/// write W1's output exactly: a window open at the move is completed by its new owner with
/// the counts it had (started afresh it would come out short).
#[test]
fn keyed_state_moves_with_its_partitions_on_a_real_broker() {
    logs();
    let (brokers, topic, rt) = tansu_topic("handoff", 4);
    let k = Cluster { mock: None, brokers: brokers.clone() };
    let all = lines(&data("sensors-3k.jsonl"));
    let flush = flush_records(4);
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| start_member(&rt, &brokers, &topic, dir.path(), name, Duration::from_millis(100));
    let wait = wait_until;
    let read = |r: &std::sync::Arc<weir_core::metrics::Registry>| r.steps()[0].1.rows_in;

    let a = start("a");
    k.produce(&topic, &all[..1500], None);
    wait("a reading the first half", 60, &|| read(&a.1) >= 1500);
    // A few checkpoints after it: `a`'s newest holds the first half's open windows.
    let done = |r: &std::sync::Arc<weir_core::metrics::Registry>| {
        r.checkpoints.completed.load(std::sync::atomic::Ordering::Relaxed)
    };
    let after = done(&a.1);
    wait("two checkpoints of a", 60, &|| done(&a.1) >= after + 2);
    let b = start("b");
    let taken = |r: &std::sync::Arc<weir_core::metrics::Registry>| {
        r.connectors.get("weir_partitions_taken_over_total", &[]).unwrap_or(0.0)
    };
    wait("b taking partitions over from a", 60, &|| taken(&b.1) > 0.0);
    k.produce(&topic, &all[1500..], None);
    k.produce(&topic, &flush, None);
    let expected = read_jsonl(&data("w1-expected.jsonl"));
    let real = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter().filter(|r| !r["device_id"].as_str().unwrap_or_default().starts_with("flush-")).collect()
    };
    wait("the committed output", 60, &|| real([part_rows(&a.3), part_rows(&b.3)].concat()).len() >= expected.len());
    // `a` learns of the rebalance at its consumer's next poll: it starts again from its
    // checkpoint with the partitions it keeps.
    let restarts = || a.1.connectors.get("weir_job_restarts_total", &[("reason", "rebalance")]).unwrap_or(0.0);
    wait("a starting again after b joined", 60, &|| restarts() >= 1.0);
    // Not ready while it rebalanced; ready again once it runs with its new partitions.
    wait("a ready again", 60, &|| a.1.readiness().is_ok());
    assert!(b.1.readiness().is_ok(), "{:?}", b.1.readiness());
    a.2.stop();
    b.2.stop();
    let mut outs = Vec::new();
    for (handle, _, _, out) in [a, b] {
        rt.block_on(handle).unwrap().unwrap();
        outs.push(out);
    }
    let rows = real(outs.iter().flat_map(|o| part_rows(o)).collect());
    assert_same_rows(expected, rows, "W1 over two members, half the partitions moved mid-window");
}

/// Rebalances move only what moves: `a` reads a third of the records alone; `b` joins and
/// takes half the partitions; `c` joins and takes a share of both; `a` leaves and the others
/// take its partitions. Each change ends the runs of the members it touches at a checkpoint,
/// so the partitions they keep go on from where they were and the ones that move start where
/// their last owner stopped: together the members read every record exactly once (no
/// re-read, counted), and W1's output is exact. Periodic checkpoints are an hour apart, so a
/// run that started over from an older checkpoint would read again everything since the
/// start.
///
/// On librdkafka's mock cluster, not Tansu: Tansu 0.6's group coordinator answers a
/// member's JoinGroup at once, without waiting for the others to join again, so the leader
/// assigns with their previous metadata (the partitions they owned before), and the
/// incremental protocol's promise (a partition is assigned only once its owner gave it up)
/// does not hold there (docs/deployment.md).
#[test]
fn only_what_moves_stops_and_nothing_is_read_again() {
    logs();
    let partitions = 6;
    let topic = "coop";
    let k = Cluster::new(&[(topic, partitions)]);
    let (brokers, rt) = (k.brokers.clone(), rt());
    let all = lines(&data("sensors-3k.jsonl"));
    let flush = flush_records(partitions);
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| start_member(&rt, &brokers, topic, dir.path(), name, Duration::from_secs(3600));
    type Reg = std::sync::Arc<weir_core::metrics::Registry>;
    let wait = |what: &str, done: &dyn Fn() -> bool| wait_until(what, 90, done);
    let read = |r: &Reg| r.steps()[0].1.rows_in;
    let taken = |r: &Reg| r.connectors.get("weir_partitions_taken_over_total", &[]).unwrap_or(0.0);
    let ready = |r: &Reg| r.readiness().is_ok();
    let third = all.len() / 3;

    let a = start("a");
    wait("a's first assignment", &|| ready(&a.1));
    k.produce(topic, &all[..third], None);
    wait("a reading the first third", &|| read(&a.1) >= third as u64);
    let b = start("b");
    wait("b taking partitions over from a", &|| taken(&b.1) > 0.0 && ready(&a.1) && ready(&b.1));
    k.produce(topic, &all[third..2 * third], None);
    wait("a and b reading the second third", &|| read(&a.1) + read(&b.1) >= 2 * third as u64);
    let c = start("c");
    wait("c taking partitions over", &|| taken(&c.1) > 0.0 && [&a.1, &b.1, &c.1].iter().all(|r| ready(r)));
    let before = taken(&b.1) + taken(&c.1);
    a.2.stop();
    let (a_handle, a_reg, _, a_out) = a;
    rt.block_on(a_handle).unwrap().unwrap();
    wait("b and c taking a's partitions over", &|| taken(&b.1) + taken(&c.1) > before && ready(&b.1) && ready(&c.1));
    k.produce(topic, &all[2 * third..], None);
    k.produce(topic, &flush, None);
    let expected = read_jsonl(&data("w1-expected.jsonl"));
    let real = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter().filter(|r| !r["device_id"].as_str().unwrap_or_default().starts_with("flush-")).collect()
    };
    // Output is committed at checkpoints (the members' final ones, at their stop, here):
    // wait until every window is written.
    let written = |r: &Reg| r.sink_rows.load(std::sync::atomic::Ordering::Relaxed);
    wait("every window written", &|| written(&a_reg) + written(&b.1) + written(&c.1) >= expected.len() as u64);
    b.2.stop();
    c.2.stop();
    let mut outs = vec![a_out];
    let mut regs = vec![a_reg];
    for (handle, reg, _, out) in [b, c] {
        rt.block_on(handle).unwrap().unwrap();
        outs.push(out);
        regs.push(reg);
    }
    // Every record was read once, by one member: none was read again after a move.
    let reread: f64 = regs
        .iter()
        .flat_map(|r| {
            (0..partitions).map(|p| {
                r.connectors
                    .get("weir_kafka_records_reread_total", &[("topic", topic), ("partition", &p.to_string())])
                    .unwrap_or(0.0)
            })
        })
        .sum();
    assert_eq!(reread, 0.0, "records read again");
    let reads: Vec<u64> = regs.iter().map(read).collect();
    assert_eq!(reads.iter().sum::<u64>(), (all.len() + flush.len()) as u64, "records read by a, b and c: {reads:?}");
    // Each change moved partitions (a gave some to b, a and b to c, a's went to b and c),
    // and each member's run started again at a checkpoint for it.
    let restarts = |r: &Reg| r.connectors.get("weir_job_restarts_total", &[("reason", "rebalance")]).unwrap_or(0.0);
    assert!(regs.iter().all(|r| restarts(r) >= 1.0), "{:?}", regs.iter().map(restarts).collect::<Vec<_>>());
    let rows = real(outs.iter().flat_map(|o| part_rows(o)).collect());
    assert_same_rows(expected, rows, "W1 over three members joining and leaving");
}

/// A topic not partitioned by the key (records spread round-robin): `key_by` with
/// `repartition` re-keys through a topic Weir creates, and W1 comes out as from the file.
#[test]
fn a_repartition_topic_rekeys_a_topic_not_partitioned_by_the_key() {
    logs();
    let (brokers, topic, _rt) = tansu_topic("spread", 4);
    let p: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for (i, l) in lines(&data("sensors-3k.jsonl")).iter().enumerate() {
        p.send(BaseRecord::<str, str>::to(&topic).payload(l).partition((i % 4) as i32)).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("w1.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &brokers, &topic, &out, &dead);
    cfg.kafka_source().group_id = Some(format!("{topic}-group"));
    // The writing half reads four partitions side by side, so rows meet in the topic out of
    // event-time order by up to a batch or so.
    cfg.source_mut().watermark.max_out_of_orderness = Duration::from_secs(3600);
    let by = format!("{topic}.by-device");
    for s in &mut cfg.steps {
        if let StepConfig::KeyBy(k) = s {
            k.repartition =
                Some(RepartitionConfig { topic: Some(by.clone()), partitions: Some(3), ..Default::default() });
        }
    }
    let summary = run(&cfg, 2);
    assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), read_jsonl(&out), "W1 through a repartition topic");
    // Both halves take checkpoints, each in its own store, as one member of a group.
    let mut again = cfg.clone();
    again.kafka_source().group_id = Some(format!("{topic}-again"));
    for s in &mut again.steps {
        if let StepConfig::KeyBy(k) = s {
            k.repartition.as_mut().unwrap().topic = Some(format!("{by}.again"));
        }
    }
    let parts = dir.path().join("parts");
    if let SinkConnector::File(f) = &mut again.sink.connector {
        f.path = parts.display().to_string();
    }
    again.checkpoints = Some(CheckpointConfig {
        dir: dir.path().join("ck").display().to_string(),
        options: Default::default(),
        interval: Duration::from_millis(100),
        keep: 2,
        member: Some("a".into()),
    });
    run(&again, 2);
    assert_same_rows(
        read_jsonl(&data("w1-expected.jsonl")),
        part_rows(&parts),
        "W1 through a repartition topic, checkpointed",
    );
    for half in ["w1-sensor-window", "w1-sensor-window.by-device"] {
        assert!(dir.path().join("ck").join(half).join("a").join("MEMBER").exists(), "{half} has its own store");
    }
    assert_eq!(summary.source_records, 3000, "input counted once, not again when read back from the topic");
    let step = |id: &str| summary.steps.iter().find(|(s, _)| s.as_str() == id).map(|(_, m)| *m).unwrap();
    assert_eq!(step("by-device.out").rows_out, 3000);
    assert_eq!(step("by-device.in").rows_in, 3000);
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let md = c.fetch_metadata(Some(&by), Duration::from_secs(10)).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 3, "Weir created the topic with the partitions asked for");
    // Each device's rows are in one partition of it.
    let keyed = k_reader(&brokers, &by);
    let mut home = std::collections::HashMap::new();
    for (key, partition) in keyed {
        assert_eq!(*home.entry(key.clone()).or_insert(partition), partition, "device {key} is in two partitions");
    }
}

/// (record key, partition) of every record of `topic`.
fn k_reader(brokers: &str, topic: &str) -> Vec<(String, i32)> {
    let c = Cluster { mock: None, brokers: brokers.into() }.reader(format!("keys-{}", std::process::id()), topic);
    let mut out = Vec::new();
    let mut quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(if out.is_empty() { 15 } else { 2 }) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push((String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(), m.partition()));
            quiet = Instant::now();
        }
    }
    out
}

/// The record partitions of a topic spread round-robin, not by key.
fn produce_spread(brokers: &str, topic: &str, partitions: usize) {
    let p: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (i, l) in lines(&data("sensors-3k.jsonl")).iter().enumerate() {
        p.send(BaseRecord::<str, str>::to(topic).payload(l).partition((i % partitions) as i32))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

/// `repartition` with `mode: exactly_once`: the writing half writes the topic in a
/// transaction per checkpoint (on the mock cluster, which serves transactions; the topics
/// exist beforehand, as it does not create topics), and W1 comes out whole.
#[test]
fn an_exactly_once_repartition_writes_its_topic_in_transactions() {
    let k = Cluster::new(&[("ev", 4), ("ev.by-device", 3), ("w1-sensor-window.by-device.commits", 1)]);
    produce_spread(&k.brokers, "ev", 4);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("parts"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "ev", &out, &dead);
    cfg.source_mut().watermark.max_out_of_orderness = Duration::from_secs(3600);
    for s in &mut cfg.steps {
        if let StepConfig::KeyBy(key) = s {
            key.repartition = Some(RepartitionConfig {
                topic: Some("ev.by-device".into()),
                partitions: None,
                mode: "exactly_once".into(),
            });
        }
    }
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(100));
    let summary = run(&cfg, 2);
    assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), part_rows(&out), "W1 through an exactly-once topic");
    assert_eq!(summary.source_records, 3000);
    let commits = k.consume_all("w1-sensor-window.by-device.commits");
    assert!(!commits.is_empty(), "the writing half committed its checkpoints' transactions");
}

/// Errors the clients retry by themselves (a leader that moved, a request that timed out,
/// too few replicas) and partition leaders moving during the run: nothing is lost, and the
/// idempotent producer writes nothing twice.
#[test]
fn request_errors_and_moving_leaders_lose_and_repeat_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr as E};
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("moving", 2, 3).unwrap();
    mock.create_topic("out", 2, 3).unwrap();
    let k = Cluster { brokers: mock.bootstrap_servers(), mock: Some(mock) };
    k.produce("moving", &lines(&data("sensors-3k.jsonl")), None);
    let mock = k.mock.as_ref().unwrap();
    let transient = [
        E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
    ];
    mock.request_errors(RDKafkaApiKey::Fetch, &transient[..2]);
    mock.request_errors(RDKafkaApiKey::Produce, &transient);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "moving", &out, &dead);
    cfg.sink = at_least_once_sink(&k.brokers, Some("device_id"), ("linger.ms", "5"));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let rt = rt();
    let handle = rt.spawn(job.run());
    for (i, broker) in [2, 3, 1].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(300));
        mock.partition_leader("moving", (i % 2) as i32, Some(broker)).unwrap();
        mock.partition_leader("out", ((i + 1) % 2) as i32, Some(broker)).unwrap();
    }
    let summary = rt.block_on(handle).unwrap().unwrap();
    assert_eq!(summary.source_records, 3000);
    let expected = read_jsonl(&data("w1-expected.jsonl"));
    // Written (the sink drains every delivery report before the run ends), before asking whether
    // a reader finds them all (one CI run read 300 of 303: this tells the sink's side from the
    // reader's if it happens again).
    assert_eq!(summary.sink_rows as usize, expected.len(), "rows the sink wrote");
    let got: Vec<serde_json::Value> =
        k.consume("out", expected.len()).into_iter().map(|(_, v)| serde_json::from_str(&v).unwrap()).collect();
    assert_same_rows(expected, got, "through request errors and leader changes");
}

/// A start time that cannot be looked up (the broker keeps refusing the offsets-for-times
/// request) fails the run with an error naming the partitions, instead of silently starting
/// them at their end.
#[test]
fn a_start_time_that_cannot_be_looked_up_fails_the_run() {
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr as E;
    let k = Cluster::new(&[("timed", 2)]);
    k.produce("timed", &lines(&data("sensors-3k.jsonl"))[..100], None);
    k.mock
        .as_ref()
        .unwrap()
        .request_errors(RDKafkaApiKey::ListOffsets, &[E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64]);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "timed", &out, &dead);
    cfg.kafka_source().start = "2026-01-01T00:00:00Z".into();
    // One runtime thread: the lookups (and the pauses between tries) happen in the consumer's
    // rebalance callback, which must not hold that thread; a ticker on it measures the gaps.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let gaps = std::sync::Arc::new(std::sync::Mutex::new((Instant::now(), Duration::ZERO)));
    let g = gaps.clone();
    let ticker = rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut g = g.lock().unwrap();
            g.1 = g.1.max(g.0.elapsed());
            g.0 = Instant::now();
        }
    });
    let err = rt
        .block_on(async {
            let built = Pipeline::from_config(cfg).build().unwrap();
            tokio::time::timeout(
                Duration::from_secs(60),
                built.run(&RunOptions { workers: Some(1), ..Default::default() }),
            )
            .await
        })
        .expect("the run ends")
        .unwrap_err()
        .to_string();
    ticker.abort();
    assert!(err.contains("looking up the start offsets failed 3 times"), "{err}");
    assert!(err.contains("timed/0") && err.contains("timed/1"), "{err}");
    let longest = gaps.lock().unwrap().1;
    assert!(longest < Duration::from_millis(400), "the runtime's thread was held for {longest:?}");
}

/// Dead letters can go to a Kafka topic instead of a file: the same entries, one record each.
#[test]
fn dead_letters_can_go_to_a_kafka_topic() {
    let k = Cluster::new(&[("in", 1), ("dlq", 1)]);
    let mut input = lines(&data("sensors-3k.jsonl"))[..50].to_vec();
    input.insert(5, "{\"device_id\": \"d1\", \"ts\": 1".into());
    input.insert(20, "{\"device_id\": \"d2\", \"ts\": 2085000000000, \"readings\": {\"temp\": 1.0}}".into());
    k.produce("in", &input, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "in", &out, &dead);
    cfg.dead_letters.kafka =
        Some(KafkaTopicSettings { brokers: k.brokers.clone(), topic: "dlq".into(), properties: Default::default() });
    let s = run(&cfg, 1);
    assert_eq!(s.steps[0].1.dead_lettered, 2);
    assert!(!dead.exists(), "nothing goes to the file");
    let got = k.consume("dlq", 2);
    let entries: Vec<serde_json::Value> = got.iter().map(|(_, v)| serde_json::from_str(v).unwrap()).collect();
    let kinds: Vec<&str> = entries.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["decode", "clock"], "{entries:?}");
    assert_eq!(entries[0]["position"], "offset 5");
    assert_eq!(entries[1]["payload"].as_str().unwrap(), input[20]);
    assert!(got.iter().all(|(key, _)| key.as_deref() == Some("events")), "keyed by the failing step");
}

/// The broker goes down before the job starts and comes back later: the job waits (librdkafka
/// retries with backoff, the outage is logged), loses nothing and then finishes normally.
#[test]
fn a_broker_that_is_down_for_a_while_loses_nothing() {
    let k = Cluster::new(&[("flaky", 2)]);
    k.produce("flaky", &lines(&data("sensors-3k.jsonl")), None);
    let mock = k.mock.as_ref().unwrap();
    mock.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let cfg = from_kafka("w1-sensor-window.yaml", &k.brokers, "flaky", &out, &dead);
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    std::thread::sleep(Duration::from_secs(3));
    assert!(!handle.is_finished(), "the job must wait for the broker, not fail or end");
    assert_eq!(reg.source_records.load(std::sync::atomic::Ordering::Relaxed), 0);
    mock.broker_up(1).unwrap();
    rt.block_on(handle).unwrap().unwrap();
    assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), read_jsonl(&out), "after the outage");
}

/// Deliveries that fail (the broker is down longer than `message.timeout.ms`) are sent again
/// until the broker takes them: the sink keeps records in flight across batches, so a failure
/// can surface after its batch was written, and it must still lose nothing.
#[test]
fn failed_deliveries_are_sent_again() {
    let k = Cluster::new(&[("out", 2)]);
    let mock = k.mock.as_ref().unwrap();
    mock.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = example(
        "w2-filter-project.yaml",
        &[("INPUT", &data("sensors-3k.jsonl")), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)],
    )
    .config()
    .clone();
    cfg.sink = at_least_once_sink(&k.brokers, Some("device_id"), ("message.timeout.ms", "300"));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    // Ten times the delivery timeout: every record has failed at least once by now.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!handle.is_finished(), "the job must wait for the broker, not end or fail");
    mock.broker_up(1).unwrap();
    rt.block_on(handle).unwrap().unwrap();
    let expected = read_jsonl(&data("w2-expected.jsonl"));
    // A record that failed was not written, so each arrives once, and counts once as produced.
    let produced = reg.connectors.get("weir_kafka_produced_records_total", &[("topic", "out")]);
    assert_eq!(produced, Some(expected.len() as f64), "{}", reg.render_prometheus("j"));
    let got: Vec<serde_json::Value> = k.consume_all("out").iter().map(|v| serde_json::from_str(v).unwrap()).collect();
    assert_same_rows(expected, got, "after failed deliveries");
}

/// Backpressure reaches the brokers, not memory: when the job stalls (its sink's broker is
/// down and the producer's queue is full), the source stops taking records and the consumer
/// stops fetching once `queued.max.messages.kbytes` is read ahead, though the topic holds far
/// more. Set low here (the mock cluster's fetches stop by themselves at about 3.4 MB, below
/// Weir's default of 16 MiB), so a setting that did not reach librdkafka would show. When the
/// sink's broker returns, everything arrives.
#[test]
fn a_stalled_job_stops_fetching() {
    const COPIES: usize = 60; // 23 MB of records
                              // Spread over partitions: the mock cluster keeps only about 5 MB per partition.
    let k = Cluster::new(&[("big", 12)]);
    let one = lines(&data("sensors-3k.jsonl"));
    let many: Vec<String> = (0..COPIES).flat_map(|_| one.iter().cloned()).collect();
    let bytes: usize = many.iter().map(String::len).sum();
    k.produce("big", &many, None);
    let sink_side = Cluster::new(&[("out", 1)]);
    let down = sink_side.mock.as_ref().unwrap();
    down.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("unused.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "big", &out, &dead);
    let src = cfg.kafka_source();
    src.group_id = Some("stall".into());
    src.properties = [("statistics.interval.ms", "200"), ("queued.max.messages.kbytes", "512")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cfg.sink = at_least_once_sink(&sink_side.brokers, None, ("queue.buffering.max.messages", "500"));
    let job = Job::new(Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap()).unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    // Long enough for the group join, the stall, and the fetcher to fill up to its bound.
    std::thread::sleep(Duration::from_secs(12));
    assert!(!handle.is_finished(), "the job cannot finish while its sink's broker is down");
    let taken = reg.source_records.load(std::sync::atomic::Ordering::Relaxed) as usize;
    // The bound, plus one fetch response (`max.partition.fetch.bytes`, 1 MiB) in flight.
    let bound = (512.0 + 1024.0) * 1024.0;
    let left = (bytes * (many.len() - taken) / many.len()) as f64;
    assert!(left > bound, "the job took {taken} records: too few are left to show the bound");
    down.broker_up(1).unwrap();
    rt.block_on(handle).unwrap().unwrap();
    // The statistics taken during the stall reach the source when it polls again.
    let peak = reg
        .connectors
        .get("weir_kafka_fetch_queue_peak_bytes", &[("group", "stall")])
        .unwrap_or_else(|| panic!("no peak published: {}", reg.render_prometheus("j")));
    assert!(peak > 0.0 && peak <= bound, "{peak} bytes read ahead of {left} left; bound {bound}");
    let got = sink_side.consume_all("out");
    assert_eq!(got.len(), COPIES * read_jsonl(&data("w2-expected.jsonl")).len(), "every row, once");
}

#[test]
fn alert_events_can_go_to_a_kafka_topic() {
    let k = Cluster::new(&[("alerts", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.jsonl");
    let routes = format!(
        r#"        - name: topic
          match: {{ event: [fired] }}
          kafka: {{ brokers: "{}", topic: alerts }}"#,
        k.brokers
    );
    let built = crate::alerting::pipeline(&routes, &out, 5_000);
    rt().block_on(built.run(&RunOptions { workers: Some(2), fresh: true })).unwrap();
    let fired: Vec<serde_json::Value> = read_jsonl(&out).into_iter().filter(|r| r["event"] == "fired").collect();
    assert!(!fired.is_empty());
    let got = k.consume("alerts", fired.len());
    let mut want: Vec<String> = fired.iter().map(|r| r["alert_id"].as_str().unwrap().to_string()).collect();
    let mut keys: Vec<String> = got.iter().map(|(key, _)| key.clone().unwrap()).collect();
    want.sort();
    keys.sort();
    assert_eq!(keys, want, "one record per fired alert, keyed by alert id");
    for (key, v) in &got {
        let v: serde_json::Value = serde_json::from_str(v).unwrap();
        assert_eq!(v["alert_id"].as_str(), key.as_deref());
        assert_eq!(v["event"], "fired");
    }
}

/// The pipeline of the StatefulSet example in `docs/deployment.md` stays a valid pipeline.
#[test]
fn the_deployment_guide_pipeline_builds() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/deployment.md")).unwrap();
    let marker = "  pipeline.yaml: |\n";
    let start = doc.find(marker).expect("the ConfigMap's pipeline") + marker.len();
    let end = start + doc[start..].find("---\n").expect("the end of the ConfigMap");
    let text: Vec<&str> = doc[start..end].lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect();
    let vars = |k: &str| match k {
        "BROKERS" => Some("127.0.0.1:9092".to_string()),
        "HOSTNAME" => Some("weir-0".to_string()),
        _ => None,
    };
    let mut cfg = weir::yaml::parse_with("deployment.md", &text.join("\n"), vars).unwrap();
    let sink = cfg.kafka_sink().clone();
    assert_eq!(sink.transactional_id.as_deref(), Some("weir-w1-weir-0"));
    assert_eq!(cfg.kafka_source().properties["group.instance.id"], "weir-0");
    Pipeline::from_config(cfg).build().unwrap();
}

/// A checkpointed position the broker no longer has (here: the mock cluster dropped the
/// partition's oldest records while the job was down) is said loudly: an error-level log,
/// `weir_kafka_records_skipped_total` with how many, and with `on_missing_position: fail` the
/// run fails instead of going on from the earliest record kept.
#[test]
fn a_position_the_broker_no_longer_has_is_counted_or_fails_the_run() {
    let k = Cluster::new(&[("old", 1)]);
    k.produce("old", &lines(&data("sensors-3k.jsonl")), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "old", &out, &dead);
    cfg.checkpoints = checkpoints_in(dir.path(), Duration::from_millis(100));
    cfg.kafka_source().stop_at_end = false;
    // First run: reads the 3,000 records, checkpoints, stops.
    let first = job(cfg.clone(), 1);
    let (reg, stop) = (first.registry(), first.shutdown_handle());
    let rt = rt();
    let running = rt.spawn(first.run());
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) == 3000).then_some(()));
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    // While it is down, far more data comes than the mock broker keeps: the oldest goes.
    let filler: Vec<String> = (0..50_000)
        .map(|i| format!("{{\"device_id\":\"fill-{}\",\"ts\":{},\"readings\":{{\"temp\":1.0,\"humidity\":1.0,\"pressure\":1.0,\"vibration\":0.0}},\"pad\":\"{}\"}}", i % 50, 1_700_000_100_000i64 + i, "x".repeat(150)))
        .collect();
    k.produce("old", &filler, Some(0));
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &k.brokers).create().unwrap();
    let (low, _) = probe.fetch_watermarks("old", 0, Duration::from_secs(10)).unwrap();
    assert!(
        low > 3000,
        "the mock cluster kept every record (low watermark {low}); the test needs it to drop the oldest"
    );
    let saved = dir.path().join("ck-copy");
    copy_dir(&dir.path().join("ck"), &saved);

    // Fail: the run stops and says where and how much.
    // Each run in a group of its own: positions come from the checkpoint, and no run waits
    // for the one before to leave its group.
    let mut failing = cfg.clone();
    failing.kafka_source().on_missing_position = MissingPositionConfig::Fail;
    failing.kafka_source().group_id = Some("failing".into());
    let err = rt.block_on(job(failing, 1).run()).unwrap_err().to_string();
    assert!(err.contains("old/0: the checkpointed position 3000 is no longer on the broker"), "{err}");
    assert!(err.contains(&format!("{} records were skipped", low - 3000)), "{err}");

    // Earliest (the default): goes on from the earliest record kept, and counts what is gone.
    copy_dir(&saved, &dir.path().join("ck"));
    cfg.kafka_source().stop_at_end = true;
    cfg.kafka_source().group_id = Some("earliest".into());
    let second = job(cfg, 1);
    let reg = second.registry();
    rt.block_on(second.run()).unwrap();
    let skipped = reg.connectors.get("weir_kafka_records_skipped_total", &[("topic", "old"), ("partition", "0")]);
    assert_eq!(skipped, Some((low - 3000) as f64));
    let high = 3000 + filler.len() as u64;
    assert_eq!(reg.source_records.load(std::sync::atomic::Ordering::Relaxed), high - low as u64);
}

/// Copies a directory tree (a checkpoint store) over another.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A table's changes on a keyed topic: each change a record keyed by its key, its value the
/// row without `_op`, and a delete a tombstone (no value), which is what ends a key in a
/// compacted topic.
#[test]
fn a_tables_deletes_are_tombstones_on_a_keyed_topic() {
    let k = Cluster::new(&[("out", 2)]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let text = format!(
        "name: t\nsource: {{ id: in, batch_size: 10, file: {{ path: \"{}\", format: json }}, schema: {{ fields: [ {{ name: device_id, type: string }}, {{ name: ts, type: int64 }} ] }}, event_time: {{ column: ts }} }}\nsteps:\n  - table: {{ id: devices, key: device_id, aggregates: {{ n: count() }}, state_ttl: 1s }}\nsinks:\n  - {{ id: log, input: devices, file: {{ path: \"{}\", format: json }} }}\n  - {{ id: topic, input: devices, kafka: {{ brokers: \"{}\", topic: out, key: device_id }} }}\n",
        data("sensors-3k.jsonl").display(),
        log.display(),
        k.brokers
    );
    let cfg = weir::yaml::parse_with("t.yaml", &text, |_| None).unwrap();
    run(&cfg, 2);
    let changes = read_jsonl(&log);
    let deletes = changes.iter().filter(|c| c["_op"] == "delete").count();
    assert!(deletes > 0);
    let records = k.consume("out", changes.len());
    let tombstones: Vec<_> = records.iter().filter(|(_, v)| v.is_empty()).collect();
    assert_eq!(tombstones.len(), deletes);
    for (key, value) in &records {
        let key = key.as_deref().expect("every record has its key");
        if !value.is_empty() {
            let v: serde_json::Value = serde_json::from_str(value).unwrap();
            assert_eq!(v["device_id"], key);
            assert!(v.get("_op").is_none(), "{value}");
        }
    }
}

/// In a group of two processes on a real broker (Tansu), each answers `GET /tables/...` for
/// the keys of the partitions it holds, and for the others names the member that holds them
/// and the key's partition.
#[test]
fn a_table_query_names_the_member_that_holds_a_key_on_a_real_broker() {
    let (brokers, topic, rt) = tansu_topic("tables", 4);
    let k = Cluster { mock: None, brokers: brokers.clone() };
    let dir = tempfile::tempdir().unwrap();
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let (out, dead) = (dir.path().join(format!("out-{name}")), dir.path().join(format!("{name}-dead.jsonl")));
        let mut cfg = from_kafka("w2-filter-project.yaml", &brokers, &topic, &out, &dead);
        join_group(&mut cfg, &topic);
        cfg.steps = vec![StepConfig::Table(TableConfig {
            id: "devices".into(),
            input: None,
            key: vec!["device_id".into()],
            aggregates: [("n".to_string(), "count()".to_string())].into_iter().collect(),
            latest: false,
            state_ttl: None,
        })];
        cfg.checkpoints = Some(CheckpointConfig {
            dir: dir.path().join("ck").display().to_string(),
            options: Default::default(),
            interval: Duration::from_millis(100),
            keep: 2,
            member: Some(name.into()),
        });
        let built = Pipeline::from_config(cfg).build().unwrap();
        let job = Job::new(built.plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap()).unwrap();
        let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", built.http_state(&job))).unwrap();
        let (reg, stop) = (job.registry(), job.shutdown_handle());
        members.push((rt.spawn(job.run()), reg, stop, server));
        wait_for_rebalance(&members.iter().map(|m| &m.1).collect::<Vec<_>>());
    }
    k.produce(&topic, &lines(&data("sensors-3k.jsonl")), None);
    let read = |r: &std::sync::Arc<weir_core::metrics::Registry>| {
        r.steps().iter().filter(|(id, _)| id.as_str() == "devices").map(|(_, m)| m.rows_in).sum::<u64>()
    };
    poll(|| (members.iter().map(|(_, r, _, _)| read(r)).sum::<u64>() >= 3000).then_some(()));
    let (a, b) = (members[0].3.addr(), members[1].3.addr());
    let devices: std::collections::BTreeSet<String> =
        read_jsonl(&data("sensors-3k.jsonl")).iter().map(|v| v["device_id"].as_str().unwrap().to_string()).collect();
    let mut held = [0, 0];
    for d in &devices {
        let partition = weir_core::keys::kafka_partition(d.as_bytes(), 4);
        let (status, body) = http_get(a, &format!("/tables/devices/{d}"));
        if status == 200 {
            held[0] += 1;
            continue;
        }
        assert_eq!(status, 404, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["held_by"]["member"], "b", "{d}: {body}");
        assert_eq!(v["held_by"]["partition"], partition as i64, "{d}: {body}");
        let (status, body) = http_get(b, &format!("/tables/devices/{d}"));
        assert_eq!(status, 200, "{d} is b's: {body}");
        held[1] += 1;
    }
    assert!(held[0] > 0 && held[1] > 0, "both members hold keys: {held:?}");
    // The console lists the members and who holds which partition.
    let (status, body) = http_get(a, "/api/console");
    assert_eq!(status, 200, "{body}");
    let console: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut listed: Vec<(String, Vec<i64>)> = console["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let parts = m["partitions"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
            (m["member"].as_str().unwrap().to_string(), parts)
        })
        .collect();
    listed.sort();
    assert_eq!(listed.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["a", "b"], "{body}");
    let mut all: Vec<i64> = listed.iter().flat_map(|m| m.1.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3], "{body}");
    for (handle, _, stop, _) in members {
        stop.stop();
        rt.block_on(handle).unwrap().unwrap();
    }
}

/// Records come a fetch at a time. A partial batch waits for more only when the next fetch is
/// expected within `max_linger`: bursts 3 s apart with `max_linger: 1s` are written as they
/// come. (The linger used to learn the gap between records, small within one fetch, and held
/// each burst for the whole second.) Timed by the rows' own `received` stamps.
#[test]
fn a_partial_batch_does_not_wait_for_a_fetch_not_expected_within_max_linger() {
    let k = Cluster::new(&[("bursts", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let mut cfg = from_kafka("w2-filter-project.yaml", &k.brokers, "bursts", &out, &dead);
    cfg.kafka_source().stop_at_end = false;
    cfg.kafka_source().metadata.received = Some("rx".into());
    cfg.source_mut().max_linger = Duration::from_secs(1);
    cfg.steps = vec![StepConfig::Select(
        serde_json::from_value(serde_json::json!({"id": "cols", "columns": ["device_id", "rx"]})).unwrap(),
    )];
    cfg.sink.latency_column = Some("rx".into());
    let job = job(cfg, 1);
    let (reg, stop) = (job.registry(), job.shutdown_handle());
    let rt = rt();
    let handle = rt.spawn(job.run());
    let all = lines(&data("sensors-3k.jsonl"));
    let mut last = Instant::now();
    for burst in 0..3 {
        // Input pacing: each burst is one fetch, 3 s after the one before.
        std::thread::sleep(Duration::from_secs(3).saturating_sub(last.elapsed()));
        last = Instant::now();
        k.produce("bursts", &all[burst * 20..(burst + 1) * 20], Some(0));
        let written = 20 * (burst as u64 + 1);
        poll(|| (reg.sink_rows.load(std::sync::atomic::Ordering::Relaxed) >= written).then_some(()));
    }
    let held_us = reg.latency.max_us();
    stop.stop();
    let s = rt.block_on(handle).unwrap().unwrap();
    assert_eq!(s.sink_rows, 60);
    assert!(held_us < 500_000, "a burst was held {held_us} µs inside the job (max_linger 1 s)");
}
