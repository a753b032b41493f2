//! Kafka -> W1 -> Kafka exactly once, through librdkafka's mock cluster (which, unlike Tansu,
//! serves the transactional producer): the process is killed with SIGKILL at random moments
//! and restarted until the input is consumed, and the committed output must equal an
//! uninterrupted run's, row for row.
//!
//! The mock cluster speaks the transaction protocol (fencing, commit, abort) but keeps
//! aborted records readable: it writes no transaction markers and reports no aborted
//! transactions to `read_committed` fetches (librdkafka's `rdkafka_mock_handlers.c`). So the
//! reader here does what a broker would: the sink names each record's transaction in a
//! header (`checkpoint_header`), and only records of transactions whose commit record is in
//! the commit topic count. What this checks is Weir's side: which transactions it commits,
//! what it replays after a crash, and that no checkpoint's rows count twice or not at all.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use super::crash::{assert_same, rows, seed, Rng};
use super::{stderr, weir};

const W1: &str = "examples/w1-sensor-window.yaml";

/// W1 with a Kafka source and an exactly-once Kafka sink. The group is new in every run:
/// positions come from the checkpoint, and a killed member would otherwise hold its
/// partitions until its session times out.
fn pipeline(dir: &Path, brokers: &str) -> std::path::PathBuf {
    let ck = dir.join("ck");
    w1_kafka(
        dir,
        brokers,
        "group_id: \"${GROUP}\"\n    stop_at_end: true",
        "w1-test",
        &format!("dir: {}\n  interval: 100ms", ck.display()),
    )
}

/// W1 reading topic `events` (with `source` settings added under `kafka:`) and writing topic
/// `out` exactly once with `transactional_id` (naming each record's transaction in header
/// `weir-txn`), with the `checkpoints` settings given; written to `dir/pipeline.yaml`.
pub(crate) fn w1_kafka(
    dir: &Path,
    brokers: &str,
    source: &str,
    transactional_id: &str,
    checkpoints: &str,
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(super::repo().join(W1)).unwrap();
    let source = format!(
        "  kafka:\n    brokers: \"{brokers}\"\n    topics: [events]\n    {source}\n    start: earliest\n    format: json\n"
    );
    let text = text.replace("  file:\n    path: ${INPUT}\n    format: json\n", &source);
    let text = text.replace(
        "  file: { path: \"${OUTPUT}\", format: json }",
        &format!("  kafka: {{ brokers: \"{brokers}\", topic: out, key: device_id, mode: exactly_once, transactional_id: \"{transactional_id}\", checkpoint_header: weir-txn }}"),
    );
    assert!(text.contains("mode: exactly_once") && text.contains("topics: [events]"), "{text}");
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, format!("{text}\ncheckpoints:\n  {checkpoints}\n")).unwrap();
    p
}

pub(crate) fn produce(brokers: &str, topic: &str, input: &Path) {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for line in std::fs::read_to_string(input).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = v["device_id"].as_str().unwrap_or_default().to_string();
        loop {
            match p.send(BaseRecord::<str, str>::to(topic).payload(line).key(&key)) {
                Ok(()) => break,
                Err((_, _)) => p.poll(Duration::from_millis(10)),
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Every record of the `partitions` of `topic`, with the value of header `header`: read from
/// the start until the position reaches the end of each.
pub(crate) fn records(brokers: &str, topic: &str, partitions: i32, header: &str) -> Vec<(Option<String>, String)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", std::process::id()))
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in 0..partitions {
        ends.push(c.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1);
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pos = c.position().unwrap();
        let done = (0..partitions).all(|p| {
            let at = pos.find_partition(topic, p).and_then(|e| e.offset().to_raw()).unwrap_or(0);
            at >= ends[p as usize]
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "reading {topic} took over 60 s");
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let h = m.headers().and_then(|hs| {
                hs.iter()
                    .find(|x| x.key == header)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            out.push((h, String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()));
        }
    }
    out
}

/// The output of committed transactions, as JSON Lines (see the module comment), and how
/// many records belong to transactions that never committed.
fn committed(brokers: &str) -> (String, usize) {
    let commits: std::collections::HashSet<String> = records(brokers, "w1-test.commits", 1, "")
        .into_iter()
        .map(|(_, v)| {
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            format!("{}:{}", v["run"].as_str().unwrap(), v["checkpoint"])
        })
        .collect();
    let (mut out, mut aborted) = (String::new(), 0);
    for (txn, row) in records(brokers, "out", 3, "weir-txn") {
        let txn = txn.expect("every record names its transaction");
        if commits.contains(&txn) {
            out.push_str(&row);
            out.push('\n');
        } else {
            aborted += 1;
        }
    }
    (out, aborted)
}

/// Events in event-time order, 20 devices, 2 ms apart: W1's windows close all through the
/// run, so output is produced (and killed) in many transactions, not only at the end.
pub(crate) fn input(path: &Path, events: u64) {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..events {
        let t = 1_796_000_000_000 + i * 2;
        writeln!(
            f,
            "{{\"device_id\":\"dev-{:02}\",\"ts\":{t},\"readings\":{{\"temp\":{}.5,\"vibration\":0.0{}}}}}",
            i % 20,
            20 + i % 7,
            1 + i % 9
        )
        .unwrap();
    }
}

fn spawn(pipeline: &Path, dir: &Path, workers: usize, run: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", pipeline.to_str().unwrap(), "--workers", &workers.to_string(), "--no-progress"])
        .env("GROUP", format!("w1-run-{run}"))
        .env("DEAD_LETTERS", dir.join("dead.jsonl"))
        .env("WEIR_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("run-{run}.log"))).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn kafka_w1_kafka_survives_kill_9_exactly_once() {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    self::input(&input, 200_000);
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("events", 3, 1).unwrap();
    mock.create_topic("out", 3, 1).unwrap();
    // The mock cluster does not serve CreateTopics.
    mock.create_topic("w1-test.commits", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    produce(&brokers, "events", &input);
    // The reference reads what the topic holds, in event-time order: the mock cluster can
    // leave offset gaps under a fast producer (its high watermarks count 200,000 records, a
    // plain consumer reads fewer), and what matters is that Weir, killed or not, gives the
    // same output as one uninterrupted pass over the same events.
    let mut held: Vec<(i64, String)> = records(&brokers, "events", 3, "")
        .into_iter()
        .map(|(_, v)| (serde_json::from_str::<serde_json::Value>(&v).unwrap()["ts"].as_i64().unwrap(), v))
        .collect();
    assert!(held.len() > 100_000, "the input topic holds {} events", held.len());
    held.sort();
    let readable = dir.path().join("readable.jsonl");
    std::fs::write(&readable, held.iter().map(|(_, v)| format!("{v}\n")).collect::<String>()).unwrap();
    // The reference: W1 on the file, uninterrupted.
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", W1, "--workers", "2", "--quiet"],
        &[("INPUT", &readable), ("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());

    let p = pipeline(dir.path(), &brokers);

    let kills: u32 = std::env::var("KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(4);
    let (mut killed, mut runs) = (0u32, 0usize);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(300), "no progress after {runs} runs (seed {seed})");
        let workers = 1 + runs % 2;
        runs += 1;
        let mut child = spawn(&p, dir.path(), workers, runs);
        if killed < kills {
            // The kill comes at a random moment once the run reads (joining the mock's group
            // takes seconds), so it lands in the middle of reading and writing.
            let log = dir.path().join(format!("run-{runs}.log"));
            let waited = Instant::now();
            while !std::fs::read_to_string(&log).unwrap_or_default().contains("partitions assigned")
                && child.try_wait().unwrap().is_none()
            {
                assert!(waited.elapsed() < Duration::from_secs(60), "run {runs} was never assigned partitions");
                std::thread::sleep(Duration::from_millis(20));
            }
            // Within 0.4 s: a debug build at 1 worker reads what the topic holds in about 0.6 s
            // (since every worker reads its own partitions), and the first run must be killed.
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                continue;
            }
        }
        let status = child.wait().unwrap();
        let log = |r: usize| std::fs::read_to_string(dir.path().join(format!("run-{r}.log"))).unwrap_or_default();
        assert!(status.success(), "run {runs} failed (seed {seed}): {}", log(runs));
        break;
    }
    // A fast machine may consume the input before every kill: one mid-run kill is the least.
    assert!(killed >= 1.min(kills), "the input was consumed before any kill; make it larger (seed {seed})");
    let (committed, aborted) = committed(&brokers);
    eprintln!("{killed} kills in {runs} runs; {aborted} records of transactions that never committed left out");
    let got = rows(&committed);
    assert_same(&want, &got, &format!("kafka W1 after {killed} kills in {runs} runs (seed {seed})"));
}
