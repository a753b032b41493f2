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

/// The rows of committed transactions of every member (transactional ids `<prefix>-<member>`),
/// minus the `flush-` devices' rows.
fn committed(brokers: &str, prefix: &str, members: &[&str]) -> (Rows, usize) {
    let mut commits = std::collections::HashSet::new();
    for m in members {
        for (_, v) in records(brokers, &format!("{prefix}-{m}.commits"), 1, "") {
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
    produce_lines(brokers, topic, &std::fs::read_to_string(input).unwrap(), per_s);
}

fn produce_lines(brokers: &str, topic: &str, lines: &str, per_s: u64) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
    let p: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let started = Instant::now();
    for (i, line) in lines.lines().enumerate() {
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

/// Waits until members `a` and `b` both hold partitions and `a` has committed output (a
/// record in `commits`); returns when the wait began.
fn shared(dir: &Path, brokers: &str, commits: &str, a: &mut Child, b: &mut Child) -> Instant {
    let started = Instant::now();
    loop {
        let (la, lb) = (log(dir, "a"), log(dir, "b"));
        let holds = |l: &str| l.lines().any(|x| x.contains("Partitions assigned;") && !x.contains("partitions=[]"));
        if holds(&la) && holds(&lb) && !records(brokers, commits, 1, "").is_empty() {
            return started;
        }
        assert!(a.try_wait().unwrap().is_none(), "a ended early: {la}");
        assert!(b.try_wait().unwrap().is_none(), "b ended early: {lb}");
        assert!(started.elapsed() < Duration::from_secs(90), "the members never shared the partitions:\n{la}\n{lb}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until survivor `b` has taken partitions over from `a` and the committed output
/// (transactional ids `<prefix>-<member>`) holds as many rows as `want`; then stops `b`,
/// which must exit cleanly, and returns its log.
fn survivor_done(dir: &Path, brokers: &str, prefix: &str, want: &Rows, seed: u64, b: &mut Child) -> String {
    let expected: usize = want.values().map(Vec::len).sum();
    let waited = Instant::now();
    loop {
        let got = committed(brokers, prefix, &["a", "b"]).0;
        let n: usize = got.values().map(Vec::len).sum();
        if n >= expected && log(dir, "b").contains(" from a at ") {
            break;
        }
        assert!(b.try_wait().unwrap().is_none(), "b ended: {}", log(dir, "b"));
        if waited.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "the committed output stalled at {n} of {expected} rows, or b never took a's partitions over (seed {seed}):\n{}",
                log(dir, "b")
            );
            let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).take(20).collect();
            panic!("missing (of {} kinds): {missing:?}", want.len());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let term = Command::new("kill").args(["-TERM", &b.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = b.wait().unwrap();
    let lb = log(dir, "b");
    assert!(status.success(), "b failed after SIGTERM: {lb}");
    lb
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
    let started = shared(dir.path(), &brokers, "w1-a.commits", &mut a, &mut b);
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
    let lb = survivor_done(dir.path(), &brokers, "w1", &want, seed, &mut b);
    assert!(lb.contains(" from a at "), "b never took a partition over from a: {lb}");
    let (got, aborted) = committed(&brokers, "w1", &["a", "b"]);
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

/// W5's interval join over two topics, as member `${MEMBER}` of one group (the first source
/// joins it, the second reads the same partitions of its own topic); or, with `files`, the
/// reference over the two files.
fn w5(dir: &Path, brokers: &str, files: Option<(&Path, &Path)>) -> std::path::PathBuf {
    let source = |topic: &str| {
        match files {
        Some((a, b)) => format!("file: {{ path: \"{}\", format: json }}", if topic == "a" { a } else { b }.display()),
        None => format!(
            "kafka:\n      brokers: \"{brokers}\"\n      topics: [{topic}]\n      group_id: w5-shared\n      start: earliest\n      format: json\n      properties: {{ session.timeout.ms: \"6000\", heartbeat.interval.ms: \"500\" }}"
        ),
    }
    };
    let sink = match files {
        Some(_) => "file: { path: \"${OUTPUT}\", format: json }".to_string(),
        None => format!("kafka: {{ brokers: \"{brokers}\", topic: out, key: device_id, mode: exactly_once, transactional_id: \"w5-${{MEMBER}}\", checkpoint_header: weir-txn }}"),
    };
    let checkpoints = match files {
        Some(_) => String::new(),
        None => {
            format!("checkpoints:\n  dir: {}\n  member: ${{MEMBER}}\n  interval: 200ms\n", dir.join("ck").display())
        }
    };
    let text = format!(
        r#"name: w5-shared
sources:
  - id: a
    {}
    schema: &sensor
      fields:
        - {{ name: device_id, type: string }}
        - {{ name: ts, type: int64 }}
        - name: readings
          type: struct
          fields:
            - {{ name: temp, type: float64 }}
    event_time: {{ column: ts, format: ms }}
    watermark: {{ max_out_of_orderness: 2s }}
  - id: b
    {}
    schema: *sensor
    event_time: {{ column: ts, format: ms }}
    watermark: {{ max_out_of_orderness: 2s }}
steps:
  - interval_join: {{ id: pairs, left: a, right: b, on: device_id, between: [-5ms, 5ms] }}
  - select:
      id: columns
      columns:
        - a.device_id AS device_id
        - a.ts AS a_ts
        - b.ts AS b_ts
        - a.readings.temp AS a_temp
        - b.readings.temp AS b_temp
sink:
  id: out
  {sink}
dead_letters:
  path: ${{DEAD_LETTERS}}
{checkpoints}"#,
        source("a"),
        source("b"),
    );
    let p = dir.join(if files.is_some() { "reference.yaml" } else { "w5.yaml" });
    std::fs::write(&p, text).unwrap();
    p
}

/// Two feeds of the same 20 devices, `b`'s readings 1 ms after `a`'s: each reading of `a`
/// meets one of `b` within 5 ms.
fn feeds(events: u64) -> (String, String) {
    let line = |i: u64, shift: u64, temp: u64| {
        format!(
            "{{\"device_id\":\"dev-{:02}\",\"ts\":{},\"readings\":{{\"temp\":{temp}.5}}}}\n",
            i % 20,
            1_796_000_000_000 + i * 2 + shift
        )
    };
    let a = (0..events).map(|i| line(i, 0, 20 + i % 7)).collect();
    let b = (0..events).map(|i| line(i, 1, 40 + i % 5)).collect();
    (a, b)
}

#[test]
fn a_join_of_two_topics_moves_each_partition_of_both_with_its_state() {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let (a_text, b_text) = feeds(20_000);
    let (a_file, b_file) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&a_file, &a_text).unwrap();
    std::fs::write(&b_file, &b_text).unwrap();

    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("a", 4, 1).unwrap();
    mock.create_topic("b", 4, 1).unwrap();
    mock.create_topic("out", 3, 1).unwrap();
    for m in ["a", "b"] {
        mock.create_topic(&format!("w5-{m}.commits"), 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    let p = w5(dir.path(), &brokers, None);
    let mut one = spawn(&p, dir.path(), "a");
    let mut two = spawn(&p, dir.path(), "b");
    // Both feeds arrive over about eight seconds, side by side.
    let producers: Vec<_> = [("a", a_text), ("b", b_text)]
        .into_iter()
        .map(|(topic, text)| {
            let brokers = brokers.clone();
            std::thread::spawn(move || produce_lines(&brokers, topic, &text, 2_500))
        })
        .collect();
    let started = shared(dir.path(), &brokers, "w5-a.commits", &mut one, &mut two);
    std::thread::sleep(Duration::from_millis(rng.below(2000)));
    let mid_stream = producers.iter().any(|p| !p.is_finished());
    one.kill().unwrap();
    one.wait().unwrap();
    eprintln!("killed a after {:?} (input still arriving: {mid_stream}):\n{}", started.elapsed(), log(dir.path(), "a"));
    for p in producers {
        p.join().unwrap();
    }

    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", w5(dir.path(), &brokers, Some((&a_file, &b_file))).to_str().unwrap(), "--workers", "2", "--quiet"],
        &[("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());
    let expected: usize = want.values().map(Vec::len).sum();
    assert_eq!(expected, 20_000, "one pair per reading of `a`");

    let lb = survivor_done(dir.path(), &brokers, "w5", &want, seed, &mut two);
    // Each partition taken over names its position in both topics.
    let took = lb.lines().find(|l| l.contains(" from a at ")).unwrap_or_default().to_string();
    assert!(names_two_positions(&took), "a partition taken over should name its positions in both topics: {took}");
    let (got, aborted) = committed(&brokers, "w5", &["a", "b"]);
    eprintln!("{aborted} records of transactions that never committed left out");
    assert_same(&want, &got, &format!("W5 over two topics and two members, one killed (seed {seed})"));
}

/// Whether a "taken over" log line names a partition's positions as `<a>/<b>`.
fn names_two_positions(line: &str) -> bool {
    line.split(" from a at ").skip(1).any(|rest| {
        let at: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '/' || *c == '-').collect();
        at.split('/').count() == 2
    })
}

#[test]
fn topics_partitioned_differently_cannot_share_their_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("a", 4, 1).unwrap();
    mock.create_topic("b", 3, 1).unwrap();
    mock.create_topic("out", 3, 1).unwrap();
    mock.create_topic("w5-a.commits", 1, 1).unwrap();
    let p = w5(dir.path(), &mock.bootstrap_servers(), None);
    let o = weir(
        &["run", p.to_str().unwrap(), "--workers", "1", "--quiet"],
        &[("MEMBER", Path::new("a")), ("DEAD_LETTERS", &dir.path().join("dead.jsonl"))],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("topics `a` (4 partitions) and `b` (3 partitions)") && err.contains("partitioned alike"),
        "{err}"
    );
}
