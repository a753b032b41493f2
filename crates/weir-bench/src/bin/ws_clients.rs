//! WebSocket clients of a live feed (`GET /ws/<sink id>`), for the fan-out benchmark
//! (`scripts/bench-live-feed.sh`): `CLIENTS` connections, all on one thread (so the clients
//! take one core at most, leaving the other to Weir, and none waits for the scheduler behind
//! 99 other threads), read rows for `SECONDS` after all are connected, and the delivery latency
//! of every row (`now - created_us`, the generator's creation stamp) is summed up over all.
//!
//! Usage: ws_clients URL CLIENTS SECONDS

#![allow(clippy::print_stdout)]

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `created_us` of a row's JSON text, found without parsing the rest.
fn created_us(text: &str) -> Option<i64> {
    let at = text.find("\"created_us\":")? + "\"created_us\":".len();
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What one client saw while measuring.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<i64>,
    closed: Option<String>,
}

async fn client(
    mut ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    measuring: Rc<AtomicBool>,
    done: Rc<AtomicBool>,
) -> Seen {
    let mut seen = Seen { latencies_us: Vec::with_capacity(1 << 18), closed: None };
    while !done.load(Ordering::Relaxed) {
        let next = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
        match next {
            Err(_) => {}
            Ok(Some(Ok(Message::Text(t)))) => {
                if measuring.load(Ordering::Relaxed) {
                    if let Some(c) = created_us(t.as_str()) {
                        seen.latencies_us.push(now_us() - c);
                    }
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                seen.closed = Some(frame.map_or_else(|| "closed".to_string(), |f| f.reason.to_string()));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                seen.closed = Some(e.to_string());
                break;
            }
            Ok(None) => {
                seen.closed = Some("the connection ended".into());
                break;
            }
        }
    }
    seen
}

fn quantile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, clients, seconds] = args.as_slice() else {
        eprintln!("usage: ws_clients URL CLIENTS SECONDS");
        std::process::exit(2);
    };
    let clients: usize = clients.parse().expect("CLIENTS is a number");
    let seconds: f64 = seconds.parse().expect("SECONDS is a number");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (measuring, done) = (Rc::new(AtomicBool::new(false)), Rc::new(AtomicBool::new(false)));
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connecting to the feed");
            tasks.push(tokio::task::spawn_local(client(ws, measuring.clone(), done.clone())));
        }
        // A second to settle (connections made, queues empty), then measure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        measuring.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        measuring.store(false, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut closed = Vec::new();
        for t in tasks {
            let seen = t.await.expect("a client task failed");
            all.extend(seen.latencies_us);
            closed.extend(seen.closed);
        }
        all.sort_unstable();
        println!(
            "clients {clients}  rows delivered {}  ({:.0} rows/s over all clients, {:.0} per client)  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  closed {}",
            all.len(),
            all.len() as f64 / elapsed,
            all.len() as f64 / elapsed / clients as f64,
            quantile(&all, 0.5),
            quantile(&all, 0.99),
            quantile(&all, 0.999),
            quantile(&all, 1.0),
            closed.len()
        );
        for c in closed.iter().take(3) {
            println!("  closed: {c}");
        }
    });
}
