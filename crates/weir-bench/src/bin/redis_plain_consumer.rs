//! The plain Redis Streams client the source is measured against (`scripts/bench-sources.sh`):
//! one connection, `XREADGROUP` of up to 8192 entries at a time, each payload's bytes touched,
//! and an `XACK` of every batch, until `N` entries are read.
//!
//! `redis_plain_consumer <url> <stream> <group> <N>` prints entries per second.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, stream, group, n] = &args[..] else {
        eprintln!("usage: redis_plain_consumer <url> <stream> <group> <N>");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap();
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let _: redis::RedisResult<()> = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").query(&mut c);
    let started = std::time::Instant::now();
    let (mut read, mut bytes) = (0usize, 0usize);
    while read < n {
        let v: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("plain")
            .arg("COUNT")
            .arg(8192)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query(&mut c)
            .unwrap();
        let mut ids = Vec::new();
        if let redis::Value::Array(streams) = v {
            for s in streams {
                let redis::Value::Array(kv) = s else { continue };
                let Some(redis::Value::Array(entries)) = kv.into_iter().nth(1) else { continue };
                for e in entries {
                    let redis::Value::Array(parts) = e else { continue };
                    let mut parts = parts.into_iter();
                    if let Some(redis::Value::BulkString(id)) = parts.next() {
                        ids.push(id);
                    }
                    if let Some(redis::Value::Array(fields)) = parts.next() {
                        for f in fields {
                            if let redis::Value::BulkString(b) = f {
                                bytes += b.len();
                            }
                        }
                    }
                }
            }
        }
        read += ids.len();
        if !ids.is_empty() {
            let _: i64 = redis::cmd("XACK").arg(stream).arg(group).arg(&ids).query(&mut c).unwrap();
        }
    }
    let s = started.elapsed().as_secs_f64();
    println!("{read} entries ({bytes} bytes) in {s:.3} s: {:.0} entries/s", read as f64 / s);
}
