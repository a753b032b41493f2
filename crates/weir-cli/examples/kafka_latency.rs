//! End-to-end latency of Kafka -> Weir -> Kafka at a steady rate, for `scripts/bench-kafka.sh`.
//!
//! A producer writes sensor events at a steady rate, each stamped with the wall-clock time it
//! was produced (`ts`, which is also the event time). A `read_committed` consumer reads the
//! job's output and measures, per output record:
//!
//! - `passthrough` (select three columns): the time from the event's production to its result
//!   being readable;
//! - `w1` (10 s tumbling windows, 2 s out-of-orderness): the time from the moment the window
//!   could first close (its end plus the 2 s allowance, in event time, which here is wall time)
//!   to its result being readable, i.e. what the engine and the brokers add to the window;
//! - `none` runs no job: the consumer reads the input topic itself, which is what the brokers
//!   alone add (production to readable, through one topic instead of two).
//!
//! Weir's own share (pass-through only): the source adds a `received` metadata column (when
//! Weir took the record from its consumer, µs) and the sink measures from it
//! (`latency_column`), so Weir's run summary gives the time each row spent inside Weir, between
//! the two clients; the last columns of the table are its p50 / p99 / max.
//!
//! The load and the measuring are in Rust, not Python: a Python producer and consumer at 50,000
//! events/s took more than a core of the two here and starved the job they measured.
//!
//! `--brokers mock` runs librdkafka's mock cluster inside this process (the only broker here
//! that serves transactions); otherwise a real broker address (Tansu from scripts/services.sh).
//!
//! ```text
//! cargo run --release -p weir-cli --example kafka_latency -- --weir target/release/weir \
//!     --brokers mock --mode exactly_once --pipeline passthrough --rate 50000 --seconds 20
//! ```
//! Other options: `--workers N`, `--warmup S` (seconds not measured, 5), `--partitions N` (4),
//! `--checkpoint-interval D` (1s), `--max-linger D` (the source's; Weir's default when not
//! given), `--source-property K=V` and `--sink-property K=V` (librdkafka properties, repeatable).

// A command-line tool: its output is its result.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{ClientConfig, Message as _};

mod common;
use common::number;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The job's steps per pipeline.
fn steps(pipeline: &str) -> &'static str {
    match pipeline {
        "passthrough" => {
            "  - select: { id: columns, columns: [device_id, ts, \"readings.temp AS temp\", received_us] }\n"
        }
        _ => concat!(
            "  - key_by: { id: by-device, keys: [device_id] }\n",
            "  - window:\n      id: per-device-10s\n      tumbling: 10s\n",
            "      aggregates: { count: count(), avg_temp: mean(readings.temp) }\n",
            "  - select: { id: columns, columns: [device_id, window_start, count, avg_temp] }\n",
        ),
    }
}

#[derive(Debug)]
struct Args {
    weir: String,
    brokers: String,
    mode: String,
    pipeline: String,
    source_properties: Vec<String>,
    sink_properties: Vec<String>,
    max_linger: Option<String>,
    workers: usize,
    rate: u64,
    seconds: f64,
    warmup: f64,
    partitions: i32,
    checkpoint_interval: String,
}

impl Args {
    fn parse() -> Result<Self, Error> {
        let mut a = Args {
            weir: String::new(),
            brokers: "mock".into(),
            mode: "at_least_once".into(),
            pipeline: "passthrough".into(),
            source_properties: Vec::new(),
            sink_properties: Vec::new(),
            max_linger: None,
            workers: 1,
            rate: 50_000,
            seconds: 20.0,
            warmup: 5.0,
            partitions: 4,
            checkpoint_interval: "1s".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--weir" => a.weir = value,
                "--brokers" => a.brokers = value,
                "--mode" if ["at_least_once", "exactly_once"].contains(&value.as_str()) => a.mode = value,
                "--pipeline" if ["passthrough", "w1", "none"].contains(&value.as_str()) => a.pipeline = value,
                "--source-property" => a.source_properties.push(value),
                "--sink-property" => a.sink_properties.push(value),
                "--max-linger" => a.max_linger = Some(value),
                "--workers" => a.workers = value.parse()?,
                "--rate" => a.rate = value.parse()?,
                "--seconds" => a.seconds = value.parse()?,
                "--warmup" => a.warmup = value.parse()?,
                "--partitions" => a.partitions = value.parse()?,
                "--checkpoint-interval" => a.checkpoint_interval = value,
                _ => return Err(format!("unknown option or value: {flag} {value}").into()),
            }
        }
        if a.weir.is_empty() && a.pipeline != "none" {
            return Err("--weir PATH (the weir binary) is needed".into());
        }
        Ok(a)
    }

    fn exactly_once(&self) -> bool {
        self.mode == "exactly_once"
    }

    /// The job, in Weir's YAML.
    fn job(&self, brokers: &str, run: &str, work: &std::path::Path) -> String {
        let properties = |pairs: &[String]| {
            if pairs.is_empty() {
                return String::new();
            }
            let kv: Vec<String> = pairs
                .iter()
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    format!("\"{k}\": \"{v}\"")
                })
                .collect();
            format!(", properties: {{{}}}", kv.join(", "))
        };
        let passthrough = self.pipeline == "passthrough";
        let work = work.display();
        let mut y = format!("name: latency-{}\nsource:\n  id: events\n", self.pipeline);
        let _ = writeln!(
            y,
            "  kafka: {{ brokers: \"{brokers}\", topics: [{run}-in], group_id: {run}, start: latest, format: json{}{} }}",
            properties(&self.source_properties),
            if passthrough { ", metadata: { received: received_us }" } else { "" },
        );
        y.push_str(concat!(
            "  schema:\n    fields:\n",
            "      - { name: device_id, type: string }\n",
            "      - { name: ts, type: int64 }\n",
            "      - { name: readings, type: struct, fields: [ { name: temp, type: float64 } ] }\n",
            "  event_time: { column: ts, format: ms }\n",
            "  watermark: { max_out_of_orderness: 2s, idle_timeout: 5s }\n",
        ));
        if let Some(l) = &self.max_linger {
            let _ = writeln!(y, "  max_linger: {l}");
        }
        let _ = write!(y, "steps:\n{}sink:\n  id: out\n", steps(&self.pipeline));
        let _ = writeln!(
            y,
            "  kafka: {{ brokers: \"{brokers}\", topic: {run}-out, key: device_id, mode: {}, transactional_id: {run}{}{} }}",
            self.mode,
            if self.exactly_once() { ", checkpoint_header: weir-checkpoint" } else { "" },
            properties(&self.sink_properties),
        );
        if passthrough {
            y.push_str("  latency_column: received_us\n");
        }
        let _ = writeln!(y, "dead_letters: {{ path: {work}/{run}-dead.jsonl }}");
        if self.exactly_once() {
            let _ = writeln!(y, "checkpoints: {{ dir: {work}/ck-{run}, interval: {} }}", self.checkpoint_interval);
        }
        y
    }
}

/// Wall-clock time in ms (with µs), comparable with the producer's `ts`.
fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1e3
}

/// What the measuring consumer found.
#[derive(Default)]
struct Measured {
    /// Latencies, ms, of the results due after the warm-up.
    latencies: Vec<f64>,
    /// Results read, measured or not.
    read: u64,
}

/// Reads `topic` (and, exactly once, the commit topic) until `stop`, measuring each result from
/// the time it was due; results due before `measure_from` (ms, as f64 bits) are counted, not
/// measured.
fn measure(
    brokers: &str,
    run: &str,
    topic: &str,
    eo: bool,
    measure_from: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Measured, Error> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{run}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    // Exactly once, a result counts as readable when its transaction's record reaches the
    // commit topic (the same transaction): the mock cluster shows uncommitted records to
    // read_committed consumers, so their own arrival says nothing about the commit.
    let commits = format!("{run}.commits");
    let topics: Vec<&str> = if eo { vec![topic, &commits] } else { vec![topic] };
    c.subscribe(&topics)?;
    let mut m = Measured::default();
    let (mut committed, mut waiting) = (HashSet::new(), HashMap::<String, Vec<f64>>::new());
    while !stop.load(Ordering::Acquire) {
        let Some(Ok(msg)) = c.poll(Duration::from_millis(50)) else { continue };
        let now = now_ms();
        let payload = msg.payload().unwrap_or_default();
        if msg.topic() == commits {
            let entry: serde_json::Value = serde_json::from_slice(payload)?;
            let txn = format!("{}:{}", entry["run"].as_str().unwrap_or_default(), entry["checkpoint"]);
            if let Some(due) = waiting.remove(&txn) {
                m.latencies.extend(due.into_iter().map(|d| now - d));
            }
            committed.insert(txn);
            continue;
        }
        let int = |name: &[u8]| number(payload, name).and_then(|n| n.parse::<i64>().ok());
        let due = match int(b"\"window_start\":") {
            Some(start) => (start + 12_000) as f64,
            None => int(b"\"ts\":").ok_or("a result without ts or window_start")? as f64,
        };
        m.read += 1;
        if due < f64::from_bits(measure_from.load(Ordering::Acquire)) {
            continue;
        }
        if eo {
            let txn = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "weir-checkpoint").and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .ok_or("an exactly-once result without its weir-checkpoint header")?;
            if !committed.contains(&txn) {
                waiting.entry(txn).or_default().push(due);
                continue;
            }
        }
        m.latencies.push(now - due);
    }
    Ok(m)
}

/// Weir's own share, "p50 | p99 | max" from the line of its run summary that starts with
/// `what`.
fn own_share(log: &str, what: &str) -> Option<String> {
    let at = log.find(what)? + what.len();
    let line = log[at..].lines().next()?;
    let figures: Vec<&str> = line.split(", ").filter_map(|part| part.split_whitespace().nth(1)).collect();
    (figures.len() == 3).then(|| figures.join(" | "))
}

fn main() -> Result<(), Error> {
    let a = Args::parse()?;
    let work = tempfile::Builder::new().prefix("weir-latency-").tempdir()?.keep();
    let run = format!("lat{}", SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() % 1_000_000_000);
    let (in_topic, out_topic, commits) = (format!("{run}-in"), format!("{run}-out"), format!("{run}.commits"));
    let mut mock = None;
    let brokers = if a.brokers == "mock" {
        // The mock cluster does not serve CreateTopics: its topics are made here.
        let m = MockCluster::new(1)?;
        for t in [&in_topic, &out_topic, &commits] {
            m.create_topic(t, a.partitions, 1)?;
        }
        let b = m.bootstrap_servers();
        mock = Some(m);
        b
    } else {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &a.brokers).create()?;
        let topics: Vec<NewTopic> = [&in_topic, &out_topic]
            .iter()
            .map(|t| NewTopic::new(t, a.partitions, TopicReplication::Fixed(1)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        for r in rt.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
            r.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
        }
        a.brokers.clone()
    };

    let mut job = None;
    if a.pipeline != "none" {
        let path = work.join("pipeline.yaml");
        std::fs::write(&path, a.job(&brokers, &run, &work))?;
        // The run summary (with Weir's own share, for the pass-through) goes to weir.log.
        job = Some(
            std::process::Command::new(&a.weir)
                .arg("run")
                .arg(&path)
                .args(["--workers", &a.workers.to_string(), "--no-progress"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(work.join("weir.log"))?)
                .spawn()?,
        );
    }
    let read_topic = if job.is_some() { out_topic.clone() } else { in_topic.clone() };

    let stop = Arc::new(AtomicBool::new(false));
    // Set when the load starts (its f64 bits); nothing is measured before.
    let measure_from = Arc::new(AtomicU64::new(f64::INFINITY.to_bits()));
    let reader = {
        let (brokers, run, stop, eo) = (brokers.clone(), run.clone(), stop.clone(), job.is_some() && a.exactly_once());
        let from = measure_from.clone();
        std::thread::spawn(move || measure(&brokers, &run, &read_topic, eo, &from, &stop))
    };

    // librdkafka's default linger (5 ms): the mock cluster answers a fetch with one record
    // batch per partition, so batches of a few records (a 1 ms linger) left the job's
    // consumer, and the measuring one, fetching behind the load on it.
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    // The job joins its group and is assigned the partitions.
    std::thread::sleep(Duration::from_secs(2));
    let devices: Vec<String> = (0..10_000).map(|i| format!("dev-{i:05}")).collect();
    let mut rnd = 7u64;
    let start = Instant::now();
    measure_from.store((now_ms() + a.warmup * 1e3).to_bits(), Ordering::Release);
    let total = Duration::from_secs_f64(a.warmup + a.seconds);
    let mut sent = 0u64;
    let mut value = String::new();
    while start.elapsed() < total {
        let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
        let now = now_ms() as i64;
        while sent < due {
            let d = &devices[(sent % devices.len() as u64) as usize];
            // xorshift: a reading between 20 and 25 without a dependency.
            rnd ^= rnd << 13;
            rnd ^= rnd >> 7;
            rnd ^= rnd << 17;
            value.clear();
            let _ = write!(
                value,
                r#"{{"device_id":"{d}","ts":{now},"readings":{{"temp":{:.3}}}}}"#,
                20.0 + (rnd % 5000) as f64 / 1000.0
            );
            match p.send(BaseRecord::to(&in_topic).payload(&value).key(d)) {
                Ok(()) => sent += 1,
                Err((e, _)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                    p.poll(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        p.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
    }
    p.flush(Duration::from_secs(30))?;
    let produced_for = start.elapsed().as_secs_f64();
    // Results of the last events (and, for w1, the windows they close) arrive a little later.
    std::thread::sleep(Duration::from_secs(if a.pipeline == "w1" { 14 } else { 3 }));
    stop.store(true, Ordering::Release);
    let measured = reader.join().map_err(|_| "the measuring thread panicked")??;
    if let Some(mut job) = job {
        // SIGINT: the job stops as on Ctrl-C and prints its summary.
        std::process::Command::new("kill").args(["-INT", &job.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while job.try_wait()?.is_none() {
            if Instant::now() > deadline {
                job.kill()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut lat = measured.latencies;
    if lat.is_empty() {
        return Err(
            format!("no output measured ({} results read); see {}/weir.log", measured.read, work.display()).into()
        );
    }
    lat.sort_by(f64::total_cmp);
    let q = |f: f64| lat[((f * lat.len() as f64) as usize).min(lat.len() - 1)];
    let share = if a.pipeline == "passthrough" {
        let log = std::fs::read_to_string(work.join("weir.log")).unwrap_or_default();
        if let Some(entry) = own_share(&log, "latency from creation to the sink's entry (before its write): ") {
            eprintln!("in Weir up to the start of the sink's write, p50 | p99 | max ms: {entry}");
        }
        own_share(&log, "latency from creation to sink: ").unwrap_or_else(|| "? | ? | ?".into())
    } else {
        "- | - | -".into()
    };
    println!(
        "| {} | {} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {share} |",
        a.pipeline,
        a.mode,
        a.workers,
        sent as f64 / produced_for,
        lat.len(),
        q(0.5),
        q(0.99),
        lat[lat.len() - 1],
    );
    drop(mock);
    Ok(())
}
