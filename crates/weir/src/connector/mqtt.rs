//! MQTT 3.1.1: topic filters read with QoS 0 or 1, acknowledged after the checkpoint, in a
//! persistent session by default (see [`weir_connectors::mqtt`] for the guarantees).

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::mqtt::{MqttProtocol, MqttSourceConfig, MqttSourceFactory};
use weir_connectors::topic::{MetaColumns, TopicPattern, MQTT};
use weir_core::{Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::default_format;

/// MQTT source settings. The password may be a `${VAR}` reference and is never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceSettings {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// Topic filters: `sensors/+/telemetry`, `sensors/#`, or `$share/<group>/<filter>` to split
    /// the messages between the workers and processes of a group.
    pub topics: Vec<String>,
    /// 0 (at most once) or 1 (default: at least once, acknowledged after the checkpoint).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// The client id (each worker appends `-<worker>`); default `weir-<pipeline name>`. Keep it
    /// stable across restarts so the broker keeps the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Start without the broker's stored session; default false, so messages published while
    /// Weir is down are delivered when it is back (QoS 1).
    #[serde(default)]
    pub clean_session: bool,
    /// `5` (default) or `3.1.1`. With 3.1.1 the broker decides how many messages may wait for
    /// the checkpoint's acknowledgement (Mosquitto: 20), which bounds the rate under QoS 1.
    #[serde(default)]
    pub protocol: MqttVersion,
    /// MQTT 5: how long the broker keeps the session and queues messages while Weir is away.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// User name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Payload format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// A column to hold each message's topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_column: Option<String>,
    /// Columns from topic levels: `sensors/{site}/{device_id}/telemetry` gives `site` and
    /// `device_id` (text; null for a topic of another shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_fields: Option<String>,
    /// MQTT 5: a column holding each message's user properties as a JSON object text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties_column: Option<String>,
    /// MQTT keep-alive.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest message accepted, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// End after this long without a message (backfills, tests); absent: run until stopped.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub end_when_idle: Option<Duration>,
}

impl std::fmt::Debug for MqttSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSourceSettings")
            .field("url", &self.url)
            .field("topics", &self.topics)
            .field("qos", &self.qos)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("protocol", &self.protocol)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// The MQTT protocol version: `5` or `3.1.1` in YAML.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "VersionRepr", into = "String")]
pub enum MqttVersion {
    /// MQTT 5.
    #[default]
    V5,
    /// MQTT 3.1.1.
    V311,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VersionRepr {
    Number(f64),
    Text(String),
}

impl TryFrom<VersionRepr> for MqttVersion {
    type Error = String;
    fn try_from(r: VersionRepr) -> std::result::Result<Self, String> {
        match r {
            VersionRepr::Number(5.0) => Ok(Self::V5),
            VersionRepr::Text(t) if t == "5" || t == "5.0" => Ok(Self::V5),
            VersionRepr::Text(t) if t == "3.1.1" => Ok(Self::V311),
            VersionRepr::Number(n) => Err(format!("mqtt `protocol: {n}`: expected 5 or 3.1.1")),
            VersionRepr::Text(t) => Err(format!("mqtt `protocol: {t}`: expected 5 or 3.1.1")),
        }
    }
}

impl From<MqttVersion> for String {
    fn from(v: MqttVersion) -> String {
        match v {
            MqttVersion::V5 => "5".into(),
            MqttVersion::V311 => "3.1.1".into(),
        }
    }
}

fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_size() -> usize {
    1 << 20
}

impl MqttSourceSettings {
    /// Settings for a broker and topic filters, with defaults otherwise.
    pub fn new(url: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            url: url.into(),
            topics,
            qos: default_qos(),
            client_id: None,
            clean_session: false,
            protocol: MqttVersion::default(),
            session_expiry: default_session_expiry(),
            username: None,
            password: None,
            format: default_format(),
            topic_column: None,
            topic_fields: None,
            properties_column: None,
            keep_alive: default_keep_alive(),
            max_message_size: default_max_message_size(),
            end_when_idle: None,
        }
    }

    fn config(&self, payload: SchemaRef, cx: Option<&SourceCx<'_>>) -> Result<MqttSourceConfig> {
        Ok(MqttSourceConfig {
            url: self.url.clone(),
            topics: self.topics.clone(),
            qos: self.qos,
            client_id: self.client_id.clone().unwrap_or_else(|| format!("weir-{}", cx.map_or("", |c| c.pipeline))),
            clean_session: self.clean_session,
            protocol: match self.protocol {
                MqttVersion::V5 => MqttProtocol::V5,
                MqttVersion::V311 => MqttProtocol::V311,
            },
            session_expiry: self.session_expiry,
            username: self.username.clone(),
            password: self.password.clone(),
            format: self.format,
            payload_schema: payload,
            meta: MetaColumns {
                topic: self.topic_column.clone(),
                fields: self.topic_fields.as_deref().map(|p| TopicPattern::parse(p, &MQTT)).transpose()?,
                headers: self.properties_column.clone(),
            },
            event_time: cx.and_then(|c| c.event_time.clone()),
            batch_size: cx.map_or(8192, |c| c.src.batch_size),
            max_linger: cx.map_or(Duration::from_millis(1), |c| c.src.max_linger),
            keep_alive: self.keep_alive,
            max_packet_size: self.max_message_size,
            end_when_idle: self.end_when_idle,
            ack_on_checkpoint: cx.is_some_and(|c| c.checkpoints.is_some()),
        })
    }
}

impl SourceSettings for MqttSourceSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let payload = cx.payload_schema("mqtt")?;
        let fac = MqttSourceFactory::new(self.config(payload, Some(cx)).map_err(|e| e.in_step(&cx.step))?)
            .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }

    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        Ok(MqttSourceFactory::new(self.config(payload, None)?)?.schema())
    }
}

/// MQTT sink settings: a message per row (MQTT 3.1.1).
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkSettings {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// Each row's topic, from its columns: `alerts/{site}/{device_id}`.
    pub topic: String,
    /// 0 (fire and forget) or 1 (default: each batch waits for the broker's acknowledgements).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish retained messages: a new subscriber gets each topic's last one.
    #[serde(default)]
    pub retain: bool,
    /// The client id (each worker appends `-<worker>`); default `weir-<pipeline name>-sink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// User name, when the broker asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (use `${VAR}`); never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Payload format: `json` (default) or `msgpack`.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
}

impl std::fmt::Debug for MqttSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSinkSettings")
            .field("url", &self.url)
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("format", &self.format)
            .finish()
    }
}

impl SinkSettings for MqttSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let cfg = weir_connectors::mqtt_sink::MqttSinkConfig {
            url: self.url.clone(),
            topic: self.topic.clone(),
            qos: self.qos,
            retain: self.retain,
            client_id: self.client_id.clone().unwrap_or_else(|| format!("weir-{}-sink", cx.pipeline)),
            username: self.username.clone(),
            password: self.password.clone(),
            format: self.format,
            schema: cx.schema.clone(),
        };
        Ok(Arc::new(weir_connectors::mqtt_sink::MqttSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
