//! The RabbitMQ sink: one persistent message per row, published to an exchange with a routing
//! key made from the row's columns, with publisher confirms: a batch counts as written once
//! the broker confirmed every message of it, so a checkpoint never covers an unconfirmed row.
//! Messages are `mandatory`: one that no queue takes comes back, and its row goes to the
//! dead-letter output instead of vanishing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use weir_core::error::RefusedRow;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

use crate::template::RowTemplate;

/// Settings of a RabbitMQ sink.
#[derive(Clone)]
pub struct RabbitMqSinkConfig {
    /// `amqp://user:password@host:5672/vhost` (`amqps://` for TLS).
    pub url: String,
    /// The exchange; `""` is the default exchange, whose routing keys are queue names.
    pub exchange: String,
    /// Each row's routing key: a template of its columns, `alerts.{site}.{severity}`.
    pub routing_key: String,
    /// A `message_id` template, for consumers that drop repeats.
    pub message_id: Option<String>,
    /// Payload format: `json` or `msgpack`.
    pub format: FormatSpec,
    /// Schema of the rows.
    pub schema: SchemaRef,
}

impl std::fmt::Debug for RabbitMqSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSinkConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Builds one connection per worker.
#[derive(Debug)]
pub struct RabbitMqSinkFactory {
    cfg: RabbitMqSinkConfig,
    key: RowTemplate,
    id: Option<RowTemplate>,
    published: Arc<AtomicU64>,
}

impl RabbitMqSinkFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// CSV, or templates naming columns the rows lack.
    pub fn new(cfg: RabbitMqSinkConfig) -> Result<Self> {
        weir_core::ensure_config!(
            !matches!(cfg.format, FormatSpec::Csv(_)),
            "rabbitmq sink: one message per row needs `json` or `msgpack`, not csv"
        );
        let key = RowTemplate::parse(&cfg.routing_key, &cfg.schema, "rabbitmq sink `routing_key`")?;
        let id = cfg
            .message_id
            .as_deref()
            .map(|t| RowTemplate::parse(t, &cfg.schema, "rabbitmq sink `message_id`"))
            .transpose()?;
        cfg.format.encoder(cfg.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Self { cfg, key, id, published: Arc::default() })
    }
}

impl SinkFactory for RabbitMqSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(RabbitMqSink {
            cfg: self.cfg.clone(),
            key: self.key.clone(),
            id: self.id.clone(),
            encoder: self.cfg.format.encoder(self.cfg.schema.clone()).map_err(crate::fmt_err)?,
            buf: Vec::new(),
            conn: None,
            published: self.published.clone(),
        }))
    }
}

struct RabbitMqSink {
    cfg: RabbitMqSinkConfig,
    key: RowTemplate,
    id: Option<RowTemplate>,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
    conn: Option<(lapin::Connection, lapin::Channel)>,
    published: Arc<AtomicU64>,
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSink").field("exchange", &self.cfg.exchange).finish_non_exhaustive()
    }
}

fn transient(url: &str, what: &str, e: &dyn std::fmt::Display) -> CoreError {
    CoreError::Other {
        message: format!("rabbitmq sink ({}): {what}: {e}", crate::redis_streams::redact_url(url)),
        blame: Blame::External,
        retry: Retry::Backoff,
    }
}

impl RabbitMqSink {
    async fn channel(&mut self) -> Result<lapin::Channel> {
        if let Some((c, ch)) = &self.conn {
            if c.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        self.conn = None;
        let url = self.cfg.url.clone();
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| transient(&url, "connecting", &e))?;
        let ch = conn.create_channel().await.map_err(|e| transient(&url, "opening a channel", &e))?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| transient(&url, "confirm mode", &e))?;
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }
}

#[async_trait::async_trait]
impl Sink for RabbitMqSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (messages, mut refused) = crate::sink::row_messages(
            self.encoder.as_mut(),
            &self.cfg.format,
            rows,
            &mut self.buf,
            &self.key,
            self.id.as_ref(),
            "rabbitmq sink",
        )?;
        let ch = self.channel().await?;
        let url = self.cfg.url.clone();
        let exchange = self.cfg.exchange.clone();
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let mut confirms = Vec::with_capacity(messages.len());
        for m in &messages {
            let mut props =
                lapin::BasicProperties::default().with_delivery_mode(2).with_content_type(match self.cfg.format {
                    FormatSpec::MsgPack => "application/msgpack".into(),
                    _ => "application/json".into(),
                });
            if let Some(id) = &m.id {
                props = props.with_message_id(id.as_str().into());
            }
            let c = ch
                .basic_publish(
                    exchange.as_str().into(),
                    m.to.as_str().into(),
                    opts,
                    &self.buf[m.span.0..m.span.1],
                    props,
                )
                .await;
            match c {
                Ok(c) => confirms.push((m.row, m.to.clone(), c)),
                Err(e) => {
                    self.conn = None;
                    return Err(transient(&url, "publishing", &e));
                }
            }
        }
        for (row, key, c) in confirms {
            match c.await {
                Ok(c) if c.is_nack() => refused
                    .push(RefusedRow { row, reason: "rabbitmq sink: the broker refused the message (nack)".into() }),
                Ok(c) => {
                    if c.take_message().is_some() {
                        refused.push(RefusedRow {
                            row,
                            reason: format!(
                                "rabbitmq sink: no queue is bound to exchange `{exchange}` for routing key `{key}`"
                            ),
                        });
                    }
                }
                Err(e) => {
                    self.conn = None;
                    return Err(transient(&url, "waiting for the broker's confirmation", &e));
                }
            }
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
        if let Some((c, _)) = self.conn.take() {
            let _ = c.close(200, "done".into()).await;
        }
        Ok(())
    }

    fn report(&self, m: &weir_core::metrics::ConnectorMetrics) {
        m.set_total(
            "weir_rabbitmq_sink_messages_total",
            "Rows published to RabbitMQ and confirmed by the broker.",
            &[("exchange", self.cfg.exchange.as_str())],
            self.published.load(Ordering::Relaxed) as f64,
        );
    }
}
