//! The metrics endpoint over real HTTP on loopback.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_core::metrics::{Registry, StepMetrics};
use weir_core::StepId;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_prometheus_text_and_health() {
    let reg = Arc::new(Registry::default());
    let m = reg.step(&StepId::new("hot"), 0);
    StepMetrics::add(&m.rows_in, 10);
    StepMetrics::add(&m.filtered, 7);
    reg.step(&StepId::new("hot"), 1).rows_in.fetch_add(5, std::sync::atomic::Ordering::Relaxed);
    let server =
        weir::http::MetricsServer::start("127.0.0.1:0", weir::http::HttpState::metrics_only("job1".into(), reg))
            .await
            .unwrap();
    let body = get(server.addr(), "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("weir_step_rows_in_total{job=\"job1\",step=\"hot\"} 15"), "summed over workers: {body}");
    assert!(body.contains("weir_step_rows_filtered_total{job=\"job1\",step=\"hot\"} 7"));
    assert!(body.contains("# TYPE weir_step_rows_in_total counter"));
    assert!(get(server.addr(), "/healthz").await.ends_with("ok\n"));
    assert!(get(server.addr(), "/nope").await.starts_with("HTTP/1.1 404"));
}
