//! Redis as a sink: the latest row per key in a hash, stream entries, or pub/sub messages.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_connectors::redis_sink::{RedisSinkCommand, RedisSinkConfig, RedisSinkFactory};
use weir_core::{Result, SinkFactory};

use super::{SinkCx, SinkSettings};

/// Redis sink settings.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// `hset` (default), `xadd` or `publish`.
    #[serde(default)]
    pub command: RedisCommand,
    /// The key, stream or channel, from the row's columns: `device:{device_id}`.
    pub key: String,
    /// `hset`: the key expires this long after its last write.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// `xadd`: trim the stream to about this many entries (`MAXLEN ~`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxlen: Option<u64>,
    /// `xadd`: the whole row as JSON in this one field, instead of a field per column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The Redis command of each row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisCommand {
    /// A hash per key holding the row's latest values.
    #[default]
    Hset,
    /// A stream entry per row.
    Xadd,
    /// A message per row (the row as JSON).
    Publish,
}

impl std::fmt::Debug for RedisSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSinkSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("command", &self.command)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("maxlen", &self.maxlen)
            .field("field", &self.field)
            .finish()
    }
}

impl SinkSettings for RedisSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let only = |what: &str, set: bool, cmd: &str| {
            if set {
                Err(cx.error(format!("redis sink: `{what}` is for `command: {cmd}`")))
            } else {
                Ok(())
            }
        };
        let command = match self.command {
            RedisCommand::Hset => {
                only("maxlen", self.maxlen.is_some(), "xadd")?;
                only("field", self.field.is_some(), "xadd")?;
                RedisSinkCommand::Hset { ttl: self.ttl }
            }
            RedisCommand::Xadd => {
                only("ttl", self.ttl.is_some(), "hset")?;
                RedisSinkCommand::Xadd { maxlen: self.maxlen, json_field: self.field.clone() }
            }
            RedisCommand::Publish => {
                only("ttl", self.ttl.is_some(), "hset")?;
                only("maxlen", self.maxlen.is_some(), "xadd")?;
                only("field", self.field.is_some(), "xadd")?;
                RedisSinkCommand::Publish
            }
        };
        let cfg = RedisSinkConfig { url: self.url.clone(), key: self.key.clone(), command, schema: cx.schema.clone() };
        Ok(Arc::new(RedisSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
