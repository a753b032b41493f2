//! The plain NATS JetStream client the source is measured against (`scripts/bench-sources.sh`):
//! one connection, a durable pull consumer with `AckAll` pulling up to 8192 messages at a
//! time, each payload's bytes touched, and one acknowledgement per 8192 messages, until `N`
//! messages are read.
//!
//! `nats_plain_consumer <url> <stream> <consumer> <N>` prints messages per second.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, stream, name, n] = &args[..] else {
        eprintln!("usage: nats_plain_consumer <url> <stream> <consumer> <N>");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
        let s = js.get_stream(stream).await.unwrap();
        let c = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: consumer::AckPolicy::All,
                max_ack_pending: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut msgs = c.stream().max_messages_per_batch(8192).messages().await.unwrap();
        let (mut read, mut bytes) = (0usize, 0usize);
        while read < n {
            let m = msgs.next().await.unwrap().unwrap();
            bytes += m.payload.iter().map(|b| usize::from(*b & 1)).sum::<usize>();
            read += 1;
            if read % 8192 == 0 || read == n {
                m.ack().await.unwrap();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!("{:.0} messages/s ({read} in {secs:.2} s, {bytes})", read as f64 / secs);
    });
}
