//! NATS: a JetStream durable consumer acknowledged after the checkpoint, or core NATS subjects
//! at most once (see [`weir_connectors::nats`] for the guarantees).

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::nats::{JetStreamConfig, NatsDeliver, NatsSourceConfig, NatsSourceFactory};
use weir_connectors::topic::{MetaColumns, TopicPattern, NATS};
use weir_core::{Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::default_format;

/// NATS source settings. A user and password go in the URL (`nats://u:${PW}@host:4222`), a
/// token in `token`; neither is logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceSettings {
    /// `nats://[user:password@]host:port` or `tls://host:port`.
    pub url: String,
    /// Subjects, with wildcards `*` (one token) and `>` (the rest).
    pub subjects: Vec<String>,
    /// A JetStream stream to read through a durable consumer, acknowledged after the
    /// checkpoint; absent: core NATS, at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The durable consumer's name; default `weir-<pipeline name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Make the stream (file storage, over `subjects`) when it does not exist.
    #[serde(default)]
    pub create_stream: bool,
    /// `all` (default) or `new`: where a consumer made now starts.
    #[serde(default = "default_deliver")]
    pub deliver: String,
    /// How long the server waits for an acknowledgement before it delivers again; keep it
    /// above the checkpoint interval.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged at most; at least what arrives in a
    /// checkpoint interval, or reading waits for the checkpoint.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// Core NATS: a queue group, so the workers (and processes) of the group split the
    /// messages; absent: worker 0 subscribes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// A token to authenticate with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Payload format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// A column for each message's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_column: Option<String>,
    /// Columns from subject tokens: `sensors.{site}.{device_id}` gives `site` and `device_id`
    /// (text; null for a subject of another shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_fields: Option<String>,
    /// A column holding each message's headers as a JSON object text (null without headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_column: Option<String>,
    /// A column for each message's stream sequence (JetStream; `uint64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_column: Option<String>,
    /// End after this long without a message (backfills, tests); absent: run until stopped.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub end_when_idle: Option<Duration>,
}

impl std::fmt::Debug for NatsSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSourceSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("subjects", &self.subjects)
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("queue", &self.queue)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn default_deliver() -> String {
    "all".into()
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_max_ack_pending() -> i64 {
    1_000_000
}

impl NatsSourceSettings {
    /// Settings for a server and subjects (core NATS), with defaults otherwise.
    pub fn new(url: impl Into<String>, subjects: Vec<String>) -> Self {
        Self {
            url: url.into(),
            subjects,
            stream: None,
            consumer: None,
            create_stream: false,
            deliver: default_deliver(),
            ack_wait: default_ack_wait(),
            max_ack_pending: default_max_ack_pending(),
            queue: None,
            token: None,
            format: default_format(),
            subject_column: None,
            subject_fields: None,
            headers_column: None,
            sequence_column: None,
            end_when_idle: None,
        }
    }

    fn config(&self, payload: SchemaRef, cx: Option<&SourceCx<'_>>) -> Result<NatsSourceConfig> {
        let deliver = match self.deliver.as_str() {
            "all" => NatsDeliver::All,
            "new" => NatsDeliver::New,
            other => return Err(weir_core::CoreError::Config(format!("nats `deliver: {other}`: expected all or new"))),
        };
        let jetstream = self.stream.as_ref().map(|stream| JetStreamConfig {
            stream: stream.clone(),
            consumer: self.consumer.clone().unwrap_or_else(|| format!("weir-{}", cx.map_or("", |c| c.pipeline))),
            create_stream: self.create_stream,
            deliver,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
        });
        weir_core::ensure_config!(
            self.stream.is_some() || (self.consumer.is_none() && !self.create_stream),
            "nats: `consumer` and `create_stream` are for JetStream; name its `stream`"
        );
        Ok(NatsSourceConfig {
            url: self.url.clone(),
            subjects: self.subjects.clone(),
            jetstream,
            queue: self.queue.clone(),
            token: self.token.clone(),
            format: self.format,
            payload_schema: payload,
            meta: MetaColumns {
                topic: self.subject_column.clone(),
                fields: self.subject_fields.as_deref().map(|p| TopicPattern::parse(p, &NATS)).transpose()?,
                headers: self.headers_column.clone(),
            },
            sequence_column: self.sequence_column.clone(),
            event_time: cx.and_then(|c| c.event_time.clone()),
            batch_size: cx.map_or(8192, |c| c.src.batch_size),
            max_linger: cx.map_or(Duration::from_millis(1), |c| c.src.max_linger),
            end_when_idle: self.end_when_idle,
            ack_on_checkpoint: cx.is_some_and(|c| c.checkpoints.is_some()),
        })
    }
}

impl SourceSettings for NatsSourceSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let payload = cx.payload_schema("nats")?;
        let fac = NatsSourceFactory::new(self.config(payload, Some(cx)).map_err(|e| e.in_step(&cx.step))?)
            .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }

    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        Ok(NatsSourceFactory::new(self.config(payload, None)?)?.schema())
    }
}

/// NATS sink settings: a message per row.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkSettings {
    /// `nats://[user:password@]host:port` or `tls://host:port`.
    pub url: String,
    /// Each row's subject, from its columns: `alerts.{site}.{device_id}`.
    pub subject: String,
    /// Publish to JetStream and wait for each message's acknowledgement (the stream storing
    /// the subject must exist); default core NATS.
    #[serde(default)]
    pub jetstream: bool,
    /// JetStream: a `Nats-Msg-Id` from the row's columns (`{device_id}-{window_start}`); the
    /// stream drops a repeat within its duplicate window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// Payload format: `json` (default) or `msgpack`.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// A token, when the server asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for NatsSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSinkSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("msg_id", &self.msg_id)
            .field("format", &self.format)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SinkSettings for NatsSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let cfg = weir_connectors::nats_sink::NatsSinkConfig {
            url: self.url.clone(),
            token: self.token.clone(),
            subject: self.subject.clone(),
            jetstream: self.jetstream,
            msg_id: self.msg_id.clone(),
            format: self.format,
            schema: cx.schema.clone(),
        };
        Ok(Arc::new(weir_connectors::nats_sink::NatsSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
