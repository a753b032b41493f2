//! The metrics endpoint: `/metrics` (Prometheus text), `/healthz` and `/readyz`.
//!
//! A deliberately small HTTP/1.1 responder on tokio: GET only, one response per connection.
//! It serves a scrape every few seconds, not traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_core::metrics::Registry;
use weir_core::{CoreError, Result};

/// A running metrics server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves `registry` under the job name `job`.
    ///
    /// # Errors
    /// If the address cannot be bound.
    pub async fn start(addr: &str, job: String, registry: Arc<Registry>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| CoreError::io(format!("cannot listen on `{addr}` for metrics"), e))?;
        let addr = listener.local_addr().map_err(|e| CoreError::io("metrics listener address", e))?;
        tracing::info!(%addr, "Serving metrics.");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let registry = registry.clone();
                let job = job.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let Ok(n) = sock.read(&mut buf).await else {
                        return;
                    };
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let path = req.split_whitespace().nth(1).unwrap_or("/");
                    let (status, ctype, body) = match (req.starts_with("GET "), path) {
                        (true, "/metrics") => ("200 OK", "text/plain; version=0.0.4", registry.render_prometheus(&job)),
                        (true, "/healthz" | "/readyz") => ("200 OK", "text/plain", "ok\n".to_string()),
                        (true, _) => {
                            ("404 Not Found", "text/plain", "not found; try /metrics, /healthz, /readyz\n".to_string())
                        }
                        (false, _) => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
