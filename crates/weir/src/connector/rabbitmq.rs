//! RabbitMQ: a queue consumed with a prefetch limit, acknowledged after the checkpoint (see
//! [`weir_connectors::rabbitmq`] for the guarantees).

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::rabbitmq::{RabbitMqSourceConfig, RabbitMqSourceFactory};
use weir_connectors::topic::{MetaColumns, TopicPattern, AMQP};
use weir_core::{Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::default_format;

/// RabbitMQ source settings. The password goes in the URL
/// (`amqp://weir:${AMQP_PASSWORD}@host:5672/%2f`) and is never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSourceSettings {
    /// `amqp://user:password@host:5672/<vhost>` (`%2f` is the vhost `/`), or `amqps://` (TLS).
    pub url: String,
    /// The queue.
    pub queue: String,
    /// Deliveries unacknowledged at most (`basic.qos`, at most 65535); at least what arrives
    /// in a checkpoint interval, or reading waits for the checkpoint.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the queue (durable) when it does not exist.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`: bind the queue to this exchange, with `binding_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// The binding's key (topic exchanges: `sensors.#`); default `#`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_key: Option<String>,
    /// The consumer tag (the worker is appended); default `weir-<pipeline name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_tag: Option<String>,
    /// Payload format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// A column for each delivery's routing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key_column: Option<String>,
    /// Columns from routing key words: `sensors.{site}.{device_id}` gives `site` and
    /// `device_id` (text; null for a key of another shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key_fields: Option<String>,
    /// A column holding each delivery's headers as a JSON object text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_column: Option<String>,
    /// End after this long without a delivery (backfills, tests); absent: run until stopped.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub end_when_idle: Option<Duration>,
}

impl std::fmt::Debug for RabbitMqSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSourceSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

fn default_prefetch() -> u16 {
    10_000
}

impl RabbitMqSourceSettings {
    /// Settings for a broker and queue, with defaults otherwise.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queue: queue.into(),
            prefetch: default_prefetch(),
            declare: false,
            exchange: None,
            binding_key: None,
            consumer_tag: None,
            format: default_format(),
            routing_key_column: None,
            routing_key_fields: None,
            headers_column: None,
            end_when_idle: None,
        }
    }

    fn config(&self, payload: SchemaRef, cx: Option<&SourceCx<'_>>) -> Result<RabbitMqSourceConfig> {
        weir_core::ensure_config!(
            self.exchange.is_some() || self.binding_key.is_none(),
            "rabbitmq: `binding_key` binds to an `exchange`; name it"
        );
        Ok(RabbitMqSourceConfig {
            url: self.url.clone(),
            queue: self.queue.clone(),
            prefetch: self.prefetch,
            declare: self.declare,
            bind: self.exchange.clone().map(|e| (e, self.binding_key.clone().unwrap_or_else(|| "#".into()))),
            consumer_tag: self
                .consumer_tag
                .clone()
                .unwrap_or_else(|| format!("weir-{}", cx.map_or("", |c| c.pipeline))),
            format: self.format,
            payload_schema: payload,
            meta: MetaColumns {
                topic: self.routing_key_column.clone(),
                fields: self.routing_key_fields.as_deref().map(|p| TopicPattern::parse(p, &AMQP)).transpose()?,
                headers: self.headers_column.clone(),
            },
            event_time: cx.and_then(|c| c.event_time.clone()),
            batch_size: cx.map_or(8192, |c| c.src.batch_size),
            max_linger: cx.map_or(Duration::from_millis(1), |c| c.src.max_linger),
            end_when_idle: self.end_when_idle,
            ack_on_checkpoint: cx.is_some_and(|c| c.checkpoints.is_some()),
        })
    }
}

impl SourceSettings for RabbitMqSourceSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let payload = cx.payload_schema("rabbitmq")?;
        let fac = RabbitMqSourceFactory::new(self.config(payload, Some(cx)).map_err(|e| e.in_step(&cx.step))?)
            .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }

    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        Ok(RabbitMqSourceFactory::new(self.config(payload, None)?)?.schema())
    }
}

/// RabbitMQ sink settings: a persistent, confirmed message per row.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSinkSettings {
    /// `amqp://user:password@host:5672/vhost` (`amqps://` for TLS).
    pub url: String,
    /// The exchange; default `""`, the default exchange (routing keys are queue names).
    #[serde(default)]
    pub exchange: String,
    /// Each row's routing key, from its columns: `alerts.{site}.{severity}`.
    pub routing_key: String,
    /// A `message_id` from the row's columns, for consumers that drop repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Payload format: `json` (default) or `msgpack`.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
}

impl std::fmt::Debug for RabbitMqSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSinkSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id)
            .field("format", &self.format)
            .finish()
    }
}

impl SinkSettings for RabbitMqSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let cfg = weir_connectors::rabbitmq_sink::RabbitMqSinkConfig {
            url: self.url.clone(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            message_id: self.message_id.clone(),
            format: self.format,
            schema: cx.schema.clone(),
        };
        Ok(Arc::new(weir_connectors::rabbitmq_sink::RabbitMqSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
