//! The broker alone doing W2's I/O, for `scripts/bench-kafka.sh`: one librdkafka consumer reads
//! a topic from its start until it has `EVENTS` records, keeps those whose `temp` is above 25
//! (found by a byte search, not a JSON parser), and one librdkafka producer, set up as Weir's
//! at-least-once producer is, writes each kept record's `device_id`, `ts` and `temp` to `OUT`,
//! keyed by the device. It prints the time from the first record read to the last one
//! acknowledged. Next to it, Weir's W2 from Kafka to Kafka pays the same broker work, so the
//! difference is the engine's.
//!
//! `cargo run --release -p weir-cli --example kafka_bare_pipe -- BROKERS TOPIC EVENTS OUT`
//! (`LINGER_MS` sets the producer's `linger.ms`, 0 as Weir's by default).

// A command-line tool: its output is its result.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{ClientConfig, Message as _};

mod common;
use common::number;

/// The text of the string after `"name":"` in `json`.
fn string<'a>(json: &'a [u8], name: &[u8]) -> Option<&'a str> {
    let at = json.windows(name.len()).position(|w| w == name)? + name.len();
    let rest = &json[at..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, events, out] = args.as_slice() else {
        return Err("usage: kafka_bare_pipe BROKERS TOPIC EVENTS OUT".into());
    };
    let events: u64 = events.parse()?;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bare-pipe-{}-{}", topic, std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    // As Weir's at-least-once producer (crates/weir-connectors/src/kafka/client.rs and sink.rs).
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", std::env::var("LINGER_MS").unwrap_or_else(|_| "0".into()))
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    c.subscribe(&[topic])?;
    let (mut n, mut kept, mut first) = (0u64, 0u64, None);
    let waited = Instant::now();
    let mut value = String::new();
    while n < events {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                n += 1;
                let json = m.payload().unwrap_or_default();
                let temp = number(json, b"\"temp\":").and_then(|t| t.parse::<f64>().ok());
                let (Some(temp), Some(device), Some(ts)) =
                    (temp, string(json, b"\"device_id\":\""), number(json, b"\"ts\":"))
                else {
                    continue;
                };
                if temp <= 25.0 {
                    continue;
                }
                value.clear();
                write!(value, "{{\"device_id\":\"{device}\",\"ts\":{ts},\"temp\":{temp}}}")?;
                let mut rec = BaseRecord::to(out.as_str()).key(device).payload(value.as_str());
                loop {
                    match p.send(rec) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            rec = r;
                            p.poll(Duration::from_millis(1));
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
                kept += 1;
                if kept % 1024 == 0 {
                    p.poll(Duration::ZERO);
                }
            }
            Some(Err(e)) => eprintln!("kafka_bare_pipe: {e}"),
            None if first.is_none() && waited.elapsed() > Duration::from_secs(60) => {
                return Err(format!("nothing read from {topic} in 60 s").into());
            }
            None => {}
        }
    }
    p.flush(Duration::from_secs(60))?;
    let s = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "{{\"events\": {n}, \"written\": {kept}, \"pipe_s\": {s:.2}, \"events_per_s\": {:.0}}}",
        n as f64 / s.max(1e-9)
    );
    Ok(())
}
