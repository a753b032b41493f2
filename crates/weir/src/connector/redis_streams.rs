//! Redis Streams: a consumer group acknowledged after the checkpoint, or plain reads from
//! stored ids (see [`weir_connectors::redis_streams`] for the guarantees).

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::redis_streams::{RedisStart, RedisStreamsConfig, RedisStreamsFactory};
use weir_core::{Result, SourceFactory};
use weir_formats::FormatSpec;

use super::{SourceCx, SourceSettings};
use crate::config::default_format;

/// Redis Streams source settings. A password goes in the URL (`redis://:${PW}@host:6379`) and
/// is never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamsSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// Stream keys.
    pub streams: Vec<String>,
    /// Consumer group (created at `start` when missing); absent: plain `XREAD` from the ids in
    /// the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Consumer name (each worker appends `-<worker>`); default `weir-<pipeline name>`. Keep it
    /// stable: after a crash the consumer's pending entries are read again under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// `earliest` (default) or `latest`: where a new group, or a stream without a stored id,
    /// starts.
    #[serde(default = "default_start")]
    pub start: String,
    /// The field holding the payload; absent: an entry's only field, or all its fields as one
    /// JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Payload format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// A column for each entry's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_column: Option<String>,
    /// A column for each entry's stream key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_column: Option<String>,
    /// Group: claim other consumers' pending entries idle this long (a consumer that is gone).
    #[serde(default = "default_claim_after", with = "humantime_serde")]
    pub claim_after: Duration,
    /// End after this long without an entry (backfills, tests); absent: run until stopped.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub end_when_idle: Option<Duration>,
}

impl std::fmt::Debug for RedisStreamsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("streams", &self.streams)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("start", &self.start)
            .field("field", &self.field)
            .finish_non_exhaustive()
    }
}

fn default_start() -> String {
    "earliest".into()
}
fn default_claim_after() -> Duration {
    Duration::from_secs(60)
}

impl RedisStreamsSettings {
    /// Settings for a server and streams, with defaults otherwise.
    pub fn new(url: impl Into<String>, streams: Vec<String>) -> Self {
        Self {
            url: url.into(),
            streams,
            group: None,
            consumer: None,
            start: default_start(),
            field: None,
            format: default_format(),
            id_column: None,
            stream_column: None,
            claim_after: default_claim_after(),
            end_when_idle: None,
        }
    }

    fn config(&self, payload: SchemaRef, cx: Option<&SourceCx<'_>>) -> Result<RedisStreamsConfig> {
        let start = match self.start.as_str() {
            "earliest" => RedisStart::Earliest,
            "latest" => RedisStart::Latest,
            other => {
                return Err(weir_core::CoreError::Config(format!(
                    "redis_streams `start: {other}`: expected earliest or latest"
                )))
            }
        };
        Ok(RedisStreamsConfig {
            url: self.url.clone(),
            streams: self.streams.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone().unwrap_or_else(|| format!("weir-{}", cx.map_or("", |c| c.pipeline))),
            start,
            field: self.field.clone(),
            format: self.format,
            payload_schema: payload,
            id_column: self.id_column.clone(),
            stream_column: self.stream_column.clone(),
            event_time: cx.and_then(|c| c.event_time.clone()),
            batch_size: cx.map_or(8192, |c| c.src.batch_size),
            max_linger: cx.map_or(Duration::from_millis(1), |c| c.src.max_linger),
            claim_after: self.group.as_ref().map(|_| self.claim_after),
            end_when_idle: self.end_when_idle,
            ack_on_checkpoint: cx.is_some_and(|c| c.checkpoints.is_some()),
        })
    }
}

impl SourceSettings for RedisStreamsSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let payload = cx.payload_schema("redis_streams")?;
        let fac = RedisStreamsFactory::new(self.config(payload, Some(cx)).map_err(|e| e.in_step(&cx.step))?)
            .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }

    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        Ok(RedisStreamsFactory::new(self.config(payload, None)?)?.schema())
    }
}
