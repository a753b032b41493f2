//! The broker alone, for `scripts/bench-kafka.sh`: one librdkafka consumer (as Weir's is) reads
//! a topic from its start until it has `EVENTS` records, touching every payload and doing
//! nothing else, and prints the rate from the first record to the last. Next to it, a Weir
//! pipeline's rate on the same topic is the engine's share. (The Python consumer of
//! `bench_kafka_broker.py` is held back by Python at about 150k records/s; this is not.)
//! It counts records instead of reading to the partitions' ends because Tansu reports the ends
//! wrongly (docs/benchmarks.md).
//!
//! `cargo run --release -p weir-cli --example kafka_bare_consumer -- BROKERS TOPIC EVENTS`

// A command-line tool: its output is its result.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Message as _};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, events] = args.as_slice() else {
        return Err("usage: kafka_bare_consumer BROKERS TOPIC EVENTS".into());
    };
    let events: u64 = events.parse()?;
    let group = format!("bare-{}-{}", topic, std::process::id());
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // As Weir's source sets it: some brokers hold every empty fetch this long.
        .set("fetch.wait.max.ms", "10")
        .create()?;
    c.subscribe(&[topic])?;
    let (mut n, mut bytes, mut first) = (0u64, 0u64, None);
    let waited = Instant::now();
    while n < events {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                n += 1;
            }
            Some(Err(e)) => eprintln!("kafka_bare_consumer: {e}"),
            None if first.is_none() && waited.elapsed() > Duration::from_secs(60) => {
                return Err(format!("nothing read from {topic} in 60 s").into());
            }
            None => {}
        }
    }
    let s = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "{{\"events\": {n}, \"bytes\": {bytes}, \"consume_s\": {s:.2}, \"consume_per_s\": {:.0}}}",
        n as f64 / s.max(1e-9)
    );
    Ok(())
}
