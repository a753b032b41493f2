//! The live feed: a websocket sink's rows through the API port to WebSocket clients.

use std::net::SocketAddr;

use weir::http::MetricsServer;
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

fn connect(
    addr: SocketAddr,
    path: &str,
) -> Result<tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>, u16> {
    match tungstenite::connect(format!("ws://{addr}{path}")) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("connecting to {path}: {e}"),
    }
}

#[test]
fn clients_get_the_rows_they_filter_for_and_refusals_are_named() {
    let yaml = "name: feed
source:
  id: events
  generator: { devices: 20, rate: 5000, seed: 7 }
steps:
  - select: { id: cols, columns: [device_id, ts, readings] }
sink:
  id: live
  websocket: { queue: 16 }
api: { addr: \"127.0.0.1:0\", token: feed-token }
";
    let cfg = weir::yaml::parse_with("feed.yaml", yaml, |_| None).unwrap();
    let built = Pipeline::from_config(cfg).build().unwrap();
    let job = Job::new(built.plan(&RunOptions { workers: Some(2), ..Default::default() }).unwrap()).unwrap();
    let (state, stop) = (built.http_state(&job), job.shutdown_handle());
    let rt = rt();
    let server = rt.block_on(MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let addr = server.addr();
    let running = rt.spawn(job.run());
    let device = "dev-00003";
    let mut ws = connect(addr, &format!("/ws/live?device_id={device}&token=feed-token")).unwrap();
    let mut got = Vec::new();
    while got.len() < 20 {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => got.push(serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    assert!(got.iter().all(|r| r["device_id"] == device), "{:?}", &got[..2]);
    assert!(got[0]["readings"]["temp"].is_number(), "nested values as JSON: {}", got[0]);
    // Refusals, each before the upgrade.
    assert_eq!(connect(addr, "/ws/live").err(), Some(401), "no token");
    assert_eq!(connect(addr, "/ws/live?token=wrong").err(), Some(401));
    assert_eq!(connect(addr, "/ws/other?token=feed-token").err(), Some(404));
    assert_eq!(connect(addr, "/ws/live?token=feed-token&nope=1").err(), Some(400));
    let (_, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("weir_feed_clients") && l.trim_end().ends_with(" 1")),
        "one client: {metrics}"
    );
    // The end of the pipeline closes the feed with the reason, after the rows still queued.
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    let frame = loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(_) => {}
            tungstenite::Message::Close(frame) => break frame.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1000, "the pipeline ended"));
}
