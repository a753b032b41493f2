//! The NATS sink: one message per row, on a subject made from the row's columns. Core NATS
//! publishes and flushes each batch (the server takes the messages, at most once to each
//! subscriber connected then); JetStream publishes each row to the stream that holds its
//! subject and waits for every acknowledgement of the batch before the batch counts as
//! written, so a checkpoint never covers an unconfirmed row. With `msg_id`, each message
//! carries a `Nats-Msg-Id` made from the row, and the stream drops a repeat it has seen within
//! its duplicate window: a batch written again after a failure or a crash is then stored once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use async_nats::jetstream;
use bytes::Bytes;
use weir_core::error::RefusedRow;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

use crate::template::RowTemplate;

/// Settings of a NATS sink.
#[derive(Clone)]
pub struct NatsSinkConfig {
    /// `nats://host:4222` (`tls://` for TLS).
    pub url: String,
    /// A token, when the server asks for one.
    pub token: Option<String>,
    /// The subject of each row: a template of its columns, `alerts.{site}.{device_id}`.
    pub subject: String,
    /// Publish through JetStream, waiting for each message's acknowledgement.
    pub jetstream: bool,
    /// JetStream: a `Nats-Msg-Id` template, for the stream to drop repeats.
    pub msg_id: Option<String>,
    /// Payload format: `json` or `msgpack`.
    pub format: FormatSpec,
    /// Schema of the rows.
    pub schema: SchemaRef,
}

impl std::fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("msg_id", &self.msg_id)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Builds one connection per worker.
#[derive(Debug)]
pub struct NatsSinkFactory {
    cfg: NatsSinkConfig,
    subject: RowTemplate,
    msg_id: Option<RowTemplate>,
    published: Arc<AtomicU64>,
}

impl NatsSinkFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// CSV, templates naming columns the rows lack, `msg_id` without JetStream.
    pub fn new(cfg: NatsSinkConfig) -> Result<Self> {
        weir_core::ensure_config!(
            !matches!(cfg.format, FormatSpec::Csv(_)),
            "nats sink: one message per row needs `json` or `msgpack`, not csv"
        );
        let subject = RowTemplate::parse(&cfg.subject, &cfg.schema, "nats sink `subject`")?;
        let msg_id =
            cfg.msg_id.as_deref().map(|t| RowTemplate::parse(t, &cfg.schema, "nats sink `msg_id`")).transpose()?;
        weir_core::ensure_config!(msg_id.is_none() || cfg.jetstream, "nats sink: `msg_id` needs `jetstream: true`");
        cfg.format.encoder(cfg.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Self { cfg, subject, msg_id, published: Arc::default() })
    }
}

impl SinkFactory for NatsSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(NatsSink {
            cfg: self.cfg.clone(),
            subject: self.subject.clone(),
            msg_id: self.msg_id.clone(),
            encoder: self.cfg.format.encoder(self.cfg.schema.clone()).map_err(crate::fmt_err)?,
            buf: Vec::new(),
            client: None,
            published: self.published.clone(),
        }))
    }
}

struct NatsSink {
    cfg: NatsSinkConfig,
    subject: RowTemplate,
    msg_id: Option<RowTemplate>,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
    client: Option<async_nats::Client>,
    published: Arc<AtomicU64>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink").field("subject", &self.subject.as_str()).finish_non_exhaustive()
    }
}

fn transient(url: &str, what: &str, e: &dyn std::fmt::Display) -> CoreError {
    CoreError::Other {
        message: format!("nats sink ({}): {what}: {e}", crate::redis_streams::redact_url(url)),
        blame: Blame::External,
        retry: Retry::Backoff,
    }
}

impl NatsSink {
    async fn client(&mut self) -> Result<async_nats::Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let mut opts = async_nats::ConnectOptions::new().name("weir-sink").connection_timeout(Duration::from_secs(5));
        if let Some(t) = &self.cfg.token {
            opts = opts.token(t.clone());
        }
        let c = opts.connect(self.cfg.url.as_str()).await.map_err(|e| transient(&self.cfg.url, "connecting", &e))?;
        self.client = Some(c.clone());
        Ok(c)
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (messages, mut refused) = crate::sink::row_messages(
            self.encoder.as_mut(),
            &self.cfg.format,
            rows,
            &mut self.buf,
            &self.subject,
            self.msg_id.as_ref(),
            "nats sink",
        )?;
        let client = self.client().await?;
        let url = self.cfg.url.clone();
        if self.cfg.jetstream {
            let js = jetstream::new(client);
            // The client allows a few thousand acknowledgements in flight: wait in slices.
            for chunk in messages.chunks(1024) {
                let mut acks = Vec::with_capacity(chunk.len());
                for m in chunk {
                    let mut headers = async_nats::HeaderMap::new();
                    if let Some(id) = &m.id {
                        headers.insert("Nats-Msg-Id", id.as_str());
                    }
                    let payload = Bytes::copy_from_slice(&self.buf[m.span.0..m.span.1]);
                    let ack = js
                        .publish_with_headers(m.to.clone(), headers, payload)
                        .await
                        .map_err(|e| transient(&url, "publishing", &e))?;
                    acks.push((m.row, ack));
                }
                for (row, ack) in acks {
                    match ack.await {
                        Ok(_) => {}
                        // No stream takes this subject: that row, not the batch.
                        Err(e) if matches!(e.kind(), jetstream::context::PublishErrorKind::StreamNotFound) => {
                            refused.push(RefusedRow {
                                row,
                                reason: format!("nats sink: no JetStream stream stores this subject ({e})"),
                            });
                        }
                        Err(e) => return Err(transient(&url, "waiting for JetStream's acknowledgement", &e)),
                    }
                }
            }
        } else {
            for m in &messages {
                client
                    .publish(m.to.clone(), Bytes::copy_from_slice(&self.buf[m.span.0..m.span.1]))
                    .await
                    .map_err(|e| transient(&url, "publishing", &e))?;
            }
            client.flush().await.map_err(|e| transient(&url, "flushing", &e))?;
        }
        self.published.fetch_add((rows.num_rows() - refused.len()) as u64, Ordering::Relaxed);
        if refused.is_empty() {
            Ok(())
        } else {
            refused.sort_by_key(|r| r.row);
            Err(CoreError::Refused(refused))
        }
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(c) = &self.client {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.flush()).await;
        }
        Ok(())
    }

    fn report(&self, m: &weir_core::metrics::ConnectorMetrics) {
        m.set_total(
            "weir_nats_sink_messages_total",
            "Rows published to NATS (acknowledged by JetStream when it stores them).",
            &[("subject", self.subject.as_str())],
            self.published.load(Ordering::Relaxed) as f64,
        );
    }
}
