//! Two processes share a Kafka topic through one consumer group (`checkpoints.member`), W1
//! exactly once into Kafka through librdkafka's mock cluster; one is killed with SIGKILL in
//! the middle of the run. The survivor must take the dead member's partitions over with
//! their window state, from the dead member's last committed checkpoint, and the committed
//! output must equal one uninterrupted run's, row for row: nothing lost, nothing twice.
//!
//! As in `kafka_crash`, the reader counts only records of transactions whose commit record
//! is in a commit topic (the mock keeps aborted records readable).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

use super::crash::{assert_same, rows, seed, Rng, Rows};
use super::kafka_crash::{input, records, w1_kafka};
use super::{stderr, weir};

const W1: &str = "examples/w1-sensor-window.yaml";

/// W1 from Kafka to Kafka exactly once, as member `${MEMBER}` of group `w1-shared`.
fn pipeline(dir: &Path, brokers: &str) -> std::path::PathBuf {
    let ck = dir.join("ck");
    // A short session: the group notices the killed member after 6 s.
    w1_kafka(
        dir,
        brokers,
        "group_id: w1-shared\n    properties: { session.timeout.ms: \"6000\", heartbeat.interval.ms: \"500\" }",
        "w1-${MEMBER}",
        &format!("dir: {}\n  member: ${{MEMBER}}\n  interval: 200ms", ck.display()),
    )
}

fn spawn(pipeline: &Path, dir: &Path, member: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", pipeline.to_str().unwrap(), "--workers", "2", "--no-progress"])
        .env("MEMBER", member)
        .env("DEAD_LETTERS", dir.join(format!("dead-{member}.jsonl")))
        .env("WEIR_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{member}.log"))).unwrap())
        .spawn()
        .unwrap()
}

fn log(dir: &Path, member: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{member}.log"))).unwrap_or_default()
}

/// The rows of committed transactions of every member, minus the `flush-` devices' rows.
fn committed(brokers: &str, members: &[&str]) -> (Rows, usize) {
    let mut commits = std::collections::HashSet::new();
    for m in members {
        for (_, v) in records(brokers, &format!("w1-{m}.commits"), 1, "") {
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            commits.insert(format!("{}:{}", v["run"].as_str().unwrap(), v["checkpoint"]));
        }
    }
    let (mut out, mut aborted) = (String::new(), 0);
    for (txn, row) in records(brokers, "out", 3, "weir-txn") {
        if commits.contains(&txn.expect("every record names its transaction")) {
            if !row.contains("\"flush-") {
                out.push_str(&row);
                out.push('\n');
            }
        } else {
            aborted += 1;
        }
    }
    (rows(&out), aborted)
}

/// Produces the lines of `input` keyed by `device_id`, about `per_s` a second.
fn produce_paced(brokers: &str, topic: &str, input: &Path, per_s: u64) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
    let p: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let started = Instant::now();
    for (i, line) in std::fs::read_to_string(input).unwrap().lines().enumerate() {
        if i % 1000 == 0 {
            let due = Duration::from_millis(i as u64 * 1000 / per_s);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
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

#[test]
fn a_killed_members_partitions_move_to_the_survivor_with_their_state() {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    // Few enough for the mock cluster to keep every record: it trims a partition's oldest
    // records past about 5 MB, and partitions wait unread while the group rebalances.
    self::input(&input, 80_000);
    // One event per partition an hour after the rest: every real window closes by the
    // watermark while the job runs, so the survivor can be stopped without draining.
    let last_ts = 1_796_000_000_000i64 + 80_000 * 2;
    let mut flush = String::new();
    let mut covered = std::collections::HashSet::new();
    for i in 0.. {
        let key = format!("flush-{i}");
        if covered.insert(weir_core::keys::kafka_partition(key.as_bytes(), 4)) {
            flush.push_str(&format!(
                "{{\"device_id\":\"{key}\",\"ts\":{},\"readings\":{{\"temp\":1.0,\"vibration\":0.0}}}}\n",
                last_ts + 3_600_000
            ));
        }
        if covered.len() == 4 {
            break;
        }
    }
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str(&flush);
    std::fs::write(&input, text).unwrap();

    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("events", 4, 1).unwrap();
    mock.create_topic("out", 3, 1).unwrap();
    for m in ["a", "b"] {
        mock.create_topic(&format!("w1-{m}.commits"), 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    let p = pipeline(dir.path(), &brokers);
    let mut a = spawn(&p, dir.path(), "a");
    let mut b = spawn(&p, dir.path(), "b");
    // The input arrives over about sixteen seconds while the members run, so the kill
    // usually lands in the middle of it (the mock cluster can take eight seconds to hand `b`
    // its partitions).
    let producer = {
        let (brokers, input) = (brokers.clone(), input.clone());
        std::thread::spawn(move || produce_paced(&brokers, "events", &input, 5_000))
    };
    // Kill `a` once both hold partitions and `a` has committed output of its own.
    let started = Instant::now();
    loop {
        let (la, lb) = (log(dir.path(), "a"), log(dir.path(), "b"));
        let holds = |l: &str| l.lines().any(|x| x.contains("Partitions assigned;") && !x.contains("partitions=[]"));
        let a_committed = !records(&brokers, "w1-a.commits", 1, "").is_empty();
        if holds(&la) && holds(&lb) && a_committed {
            break;
        }
        assert!(a.try_wait().unwrap().is_none(), "a ended early: {la}");
        assert!(b.try_wait().unwrap().is_none(), "b ended early: {lb}");
        assert!(started.elapsed() < Duration::from_secs(90), "the members never shared the partitions:\n{la}\n{lb}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(rng.below(2000)));
    let mid_stream = !producer.is_finished();
    a.kill().unwrap();
    a.wait().unwrap();
    eprintln!("killed a after {:?} (input still arriving: {mid_stream}):\n{}", started.elapsed(), log(dir.path(), "a"));

    producer.join().unwrap();
    // The reference: W1 on the input produced (in event-time order), uninterrupted. Read
    // back concurrently with a fast producer, the mock cluster can hand a plain reader
    // fewer records than it holds; the members read them all, so the file is the truth.
    let readable = input.clone();
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", W1, "--workers", "2", "--quiet"],
        &[("INPUT", &readable), ("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = std::fs::read_to_string(&reference).unwrap();
    let want =
        rows(&reference.lines().filter(|l| !l.contains("\"flush-")).map(|l| format!("{l}\n")).collect::<String>());
    let expected: usize = want.values().map(Vec::len).sum();
    assert!(expected > 100, "the reference has {expected} rows");

    // The survivor takes over; wait until it has and the committed output is complete (or
    // stalls). Should `a` have committed all of its share before it died, `b` still takes
    // its partitions over, once the group sees `a` gone, from `a`'s checkpoint.
    let waited = Instant::now();
    let mut got;
    loop {
        got = committed(&brokers, &["a", "b"]).0;
        let n: usize = got.values().map(Vec::len).sum();
        if n >= expected && log(dir.path(), "b").contains(" from a at ") {
            break;
        }
        assert!(b.try_wait().unwrap().is_none(), "b ended: {}", log(dir.path(), "b"));
        if waited.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "the committed output stalled at {n} of {expected} rows, or b never took a's partitions over (seed {seed}):\n{}",
                log(dir.path(), "b")
            );
            let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).take(20).collect();
            panic!("missing (of {} kinds): {missing:?}", want.len());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Stop the survivor; it must exit cleanly.
    let term = Command::new("kill").args(["-TERM", &b.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = b.wait().unwrap();
    let lb = log(dir.path(), "b");
    assert!(status.success(), "b failed after SIGTERM: {lb}");
    assert!(lb.contains(" from a at "), "b never took a partition over from a: {lb}");
    let (got, aborted) = committed(&brokers, &["a", "b"]);
    eprintln!("{aborted} records of transactions that never committed left out");
    for l in lb.lines().filter(|l| l.contains("Partitions assigned;") || l.contains("Run stopped")) {
        eprintln!("b: {l}");
    }
    assert_same(&want, &got, &format!("W1 over two members, one killed (seed {seed})"));
    // Both members' stores show up under the shared folder.
    let ck = dir.path().join("ck");
    let o = weir(&["checkpoints", "list", ck.to_str().unwrap()], &[]);
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        listing.contains("w1-sensor-window, member a") && listing.contains("w1-sensor-window, member b"),
        "{listing}"
    );
    let o = weir(&["checkpoints", "inspect", ck.to_str().unwrap()], &[]);
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && shown.contains("member b:") && shown.contains("per-device-10s"), "{shown}");
}
