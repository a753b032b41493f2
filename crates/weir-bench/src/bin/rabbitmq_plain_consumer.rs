//! The plain RabbitMQ client the source is measured against (`scripts/bench-sources.sh`): one
//! connection, a consumer with a prefetch of 10,000, each body's bytes touched, and one
//! multiple acknowledgement per 5,000 deliveries, until `N` deliveries are read.
//!
//! `rabbitmq_plain_consumer <url> <queue> <N>` prints deliveries per second.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, queue, n] = &args[..] else {
        eprintln!("usage: rabbitmq_plain_consumer <url> <queue> <N>");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(10_000, BasicQosOptions::default()).await.unwrap();
        let started = std::time::Instant::now();
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), "plain".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let (mut read, mut bytes) = (0usize, 0usize);
        while read < n {
            let d = consumer.next().await.unwrap().unwrap();
            bytes += d.data.iter().map(|b| usize::from(*b & 1)).sum::<usize>();
            read += 1;
            if read % 5000 == 0 || read == n {
                ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true }).await.unwrap();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!("{:.0} deliveries/s ({read} in {secs:.2} s, {bytes})", read as f64 / secs);
    });
}
