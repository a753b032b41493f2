//! One module per connector: each owns its YAML settings (serde, unknown keys rejected,
//! secrets kept out of `Debug`) and how they become a running source or sink. The planner
//! only dispatches on [`SourceConnector`] and [`SinkConnector`], which the two lists at the
//! bottom of this file declare; adding a connector is a module and one line there.
//!
//! In a pipeline file a source or sink names its connector by a key next to its common
//! settings: `source: {id: events, mqtt: {...}, schema: ..., event_time: ...}`.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, SinkFactory, SourceFactory, StepId};

use crate::config::{CheckpointConfig, EventTimeConfig, RetryConfig, SinkConfig, SourceConfig, WatermarkConfig};

pub mod code;
pub mod fan_out;
pub mod file;
pub mod generator;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "amqp")]
pub mod rabbitmq;
pub mod redis;
pub mod redis_streams;
pub mod stdio;
pub mod websocket;

/// The live feed sinks' hubs, by sink id: the API port's `GET /ws/<id>` finds them here.
pub type FeedHubs = std::sync::Mutex<std::collections::BTreeMap<String, Arc<weir_connectors::live_feed::FeedHub>>>;

/// The HTTP ingest sources' hubs, by source id: the API port's `POST /ingest/<id>` finds them here.
pub type IngestHubs =
    std::sync::Mutex<std::collections::BTreeMap<String, Arc<weir_connectors::http_ingest::IngestHub>>>;

/// What a source connector is built with: the source's common settings and what the rest of
/// the pipeline asks of it.
pub(crate) struct SourceCx<'a> {
    /// The source's settings (schema, event time, batch size...).
    pub(crate) src: &'a SourceConfig,
    pub(crate) step: StepId,
    pub(crate) pipeline: &'a str,
    pub(crate) event_time: Option<EventTimeSpec>,
    /// Only checking the pipeline (`weir validate`): do not look for inputs that may be absent.
    pub(crate) checking: bool,
    /// A later step needs each key's rows in input order (no splitting of files).
    pub(crate) keep_order: bool,
    pub(crate) checkpoints: Option<&'a CheckpointConfig>,
    pub(crate) code: Option<Arc<dyn SourceFactory>>,
    /// The half of a repartitioned pipeline that reads the topic ends when this is set.
    pub(crate) until: Option<Arc<AtomicBool>>,
    /// The API's bearer token, which HTTP ingest takes unless it has its own.
    pub(crate) api_token: Option<String>,
    /// Where HTTP ingest sources put their hubs for the API port.
    pub(crate) ingest: &'a IngestHubs,
    /// Kafka in and exactly once out on one cluster: positions go into the output's
    /// transactions.
    #[cfg(feature = "kafka")]
    pub(crate) transactional_offsets: Option<Arc<weir_connectors::kafka::TransactionalOffsets>>,
}

impl SourceCx<'_> {
    /// A configuration error in this source.
    pub(crate) fn error(&self, msg: impl Into<String>) -> CoreError {
        CoreError::Config(msg.into()).in_step(&self.step)
    }

    /// The declared schema of the payloads, which a connector reading a server needs (it
    /// cannot read ahead to infer one).
    pub(crate) fn payload_schema(&self, connector: &str) -> Result<SchemaRef> {
        self.src.schema.as_ref().map(weir_formats::SchemaSpec::to_arrow).ok_or_else(|| {
            self.error(format!("source `{}`: {connector} needs a declared `schema` for its payloads", self.src.id))
        })
    }

    /// Refuses a declared schema where the connector brings its own.
    pub(crate) fn no_schema(&self, why: &str) -> Result<()> {
        match self.src.schema {
            Some(_) => Err(self.error(format!("source `{}`: {why}; remove `schema`", self.src.id))),
            None => Ok(()),
        }
    }
}

/// What a sink connector is built with.
pub(crate) struct SinkCx<'a> {
    pub(crate) sink: &'a SinkConfig,
    pub(crate) step: StepId,
    pub(crate) pipeline: &'a str,
    /// The rows that reach the sink.
    pub(crate) schema: SchemaRef,
    pub(crate) checkpoints: Option<&'a CheckpointConfig>,
    pub(crate) code: Option<Arc<dyn SinkFactory>>,
    /// Where live feed sinks put their hubs for the API port.
    pub(crate) feeds: &'a FeedHubs,
    #[cfg(feature = "kafka")]
    pub(crate) source_offsets: Option<Arc<weir_connectors::kafka::TransactionalOffsets>>,
    /// The writing half of a repartitioned pipeline creates its topic.
    #[cfg(feature = "kafka")]
    pub(crate) create_topic: Option<weir_connectors::kafka::KafkaTopicSpec>,
}

impl SinkCx<'_> {
    /// A configuration error in this sink.
    pub(crate) fn error(&self, msg: impl Into<String>) -> CoreError {
        CoreError::Config(msg.into()).in_step(&self.step)
    }
}

/// A source connector's settings.
pub(crate) trait SourceSettings {
    /// The running source and the schema of its rows.
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)>;

    /// The schema of the rows, given the declared payload schema: the payload's columns and
    /// any server metadata columns the settings ask for. Used to check the steps at `build()`.
    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        Ok(payload)
    }
}

/// A sink connector's settings.
pub(crate) trait SinkSettings {
    /// The running sink.
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>>;
}

/// Declares the connectors of one side: the enum, its YAML keys, and dispatch.
macro_rules! connectors {
    (
        $(#[$enum_meta:meta])*
        $side:literal, $enum:ident, $trait:ident {
            $( $(#[$meta:meta])* $variant:ident($ty:ty) = $key:literal $(, feature = $feat:literal)? ; )*
        }
    ) => {
        $(#[$enum_meta])*
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::large_enum_variant)]
        pub enum $enum {
            $( $(#[$meta])* $(#[cfg(feature = $feat)])? $variant($ty), )*
        }

        impl $enum {
            /// The YAML keys of the connectors this build has.
            pub const NAMES: &'static [&'static str] = &[$( $(#[cfg(feature = $feat)])? $key, )*];
            /// Every connector's key, with those a cargo feature left out of this build.
            const ALL_NAMES: &'static [&'static str] = &[$( $key, )*];

            /// The YAML key naming this connector.
            pub fn name(&self) -> &'static str {
                match self { $( $(#[cfg(feature = $feat)])? Self::$variant(_) => $key, )* }
            }

            fn settings(&self) -> &dyn $trait {
                match self { $( $(#[cfg(feature = $feat)])? Self::$variant(s) => s, )* }
            }

            /// Reads the settings under `key`; `None` when `key` is no connector of this side.
            fn read<'de, A: MapAccess<'de>>(key: &str, map: &mut A) -> std::result::Result<Option<Self>, A::Error> {
                #[allow(unreachable_patterns)]
                Ok(Some(match key {
                    $( $(#[cfg(feature = $feat)])? $key => Self::$variant(map.next_value()?), )*
                    // A connector left out of this build is named as such, not as a typo.
                    $( $key => return Err(de::Error::custom(format!(
                        "{} connector `{}` is not in this build of Weir (cargo feature `{}`)", $side, $key, concat!("" $(, $feat)?)
                    ))), )*
                    _ => return Ok(None),
                }))
            }

            fn write<M: SerializeMap>(&self, map: &mut M) -> std::result::Result<(), M::Error> {
                match self { $( $(#[cfg(feature = $feat)])? Self::$variant(s) => map.serialize_entry($key, s), )* }
            }
        }
    };
}

connectors! {
    /// The source connectors: which one a source reads, with its settings.
    "source", SourceConnector, SourceSettings {
        /// Files: one, a glob, or a growing file.
        File(file::FileSourceSettings) = "file";
        /// Standard input.
        Stdin(stdio::StdinSettings) = "stdin";
        /// Synthetic sensor events.
        Generator(generator::GeneratorSettings) = "generator";
        /// Kafka topics through a consumer group.
        Kafka(kafka::KafkaSourceSettings) = "kafka", feature = "kafka";
        /// MQTT topic filters.
        Mqtt(mqtt::MqttSourceSettings) = "mqtt", feature = "mqtt";
        /// NATS: a JetStream durable consumer, or core NATS subjects.
        Nats(nats::NatsSourceSettings) = "nats", feature = "nats";
        /// A RabbitMQ queue.
        RabbitMq(rabbitmq::RabbitMqSourceSettings) = "rabbitmq", feature = "amqp";
        /// Redis Streams, through a consumer group or from stored ids.
        RedisStreams(redis_streams::RedisStreamsSettings) = "redis_streams";
        /// Records posted to the API port (`POST /ingest/<source id>`).
        Http(http::HttpIngestSettings) = "http";
        /// A source written in code ([`crate::Pipeline::source_code`]).
        Code(code::CodeSettings) = "code";
    }
}

connectors! {
    /// The sink connectors: where a sink writes, with its settings.
    "sink", SinkConnector, SinkSettings {
        /// A file (exactly once under checkpoints).
        File(file::FileSinkSettings) = "file";
        /// Standard output.
        Stdout(stdio::StdoutSettings) = "stdout";
        /// A Kafka topic.
        Kafka(kafka::KafkaSinkSettings) = "kafka", feature = "kafka";
        /// A PostgreSQL table: appended or upserted, exactly once under checkpoints.
        Postgres(postgres::PostgresSinkSettings) = "postgres", feature = "postgres";
        /// Redis: hashes of the latest row per key, stream entries or pub/sub messages.
        Redis(redis::RedisSinkSettings) = "redis";
        /// An HTTP endpoint: rows POSTed as JSON, batched.
        Http(http::HttpSinkSettings) = "http";
        /// MQTT: a message per row on a topic from its columns.
        Mqtt(mqtt::MqttSinkSettings) = "mqtt", feature = "mqtt";
        /// NATS: a message per row, core or JetStream (acknowledged).
        Nats(nats::NatsSinkSettings) = "nats", feature = "nats";
        /// RabbitMQ: a confirmed, persistent message per row to an exchange.
        RabbitMq(rabbitmq::RabbitMqSinkSettings) = "rabbitmq", feature = "amqp";
        /// WebSocket clients of the API port (`GET /ws/<sink id>`): a live feed.
        WebSocket(websocket::WebSocketSettings) = "websocket";
        /// Several sinks, each getting every row (`sinks: [...]` is the short form).
        FanOut(fan_out::FanOutSettings) = "fan_out";
        /// A sink written in code ([`crate::Pipeline::sink_code`]).
        Code(code::CodeSettings) = "code";
    }
}

impl SourceConnector {
    pub(crate) fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        self.settings().build(cx)
    }

    pub(crate) fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        self.settings().row_schema(payload)
    }
}

impl SinkConnector {
    pub(crate) fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        self.settings().build(cx)
    }
}

/// The keys a source takes besides its connector's.
const SOURCE_KEYS: &[&str] = &["id", "schema", "event_time", "watermark", "batch_size", "max_linger"];
/// The keys a sink takes besides its connector's.
const SINK_KEYS: &[&str] = &["id", "latency_column", "retry", "input"];

/// The error for a key that is neither a common setting nor a connector.
fn unknown_key<E: de::Error>(side: &str, key: &str, common: &[&str], connectors: &[&str]) -> E {
    let list = |keys: &[&str]| keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    E::custom(format!(
        "unknown {side} key `{key}`: expected one of {}, or a connector: {}",
        list(common),
        list(connectors)
    ))
}

/// Reads a source or sink key, refusing one that is neither a common setting nor a
/// connector, or a second connector, while the key is being read: the error then carries the
/// key's line.
struct KeySeed<'a> {
    side: &'static str,
    common: &'static [&'static str],
    connectors: &'static [&'static str],
    /// Every connector's key, those left out of this build too (they are named as such).
    all: &'static [&'static str],
    /// The connector already named, if any.
    named: Option<&'a str>,
}

impl<'de> de::DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} key", self.side)
    }
    fn visit_str<E: de::Error>(self, key: &str) -> std::result::Result<String, E> {
        if self.common.contains(&key) {
            return Ok(key.to_string());
        }
        if !self.all.contains(&key) {
            return Err(unknown_key(self.side, key, self.common, self.connectors));
        }
        if let Some(first) = self.named {
            let side = self.side;
            return Err(E::custom(format!(
                "this {side} names two connectors, `{first}` and `{key}`; a {side} has exactly one"
            )));
        }
        Ok(key.to_string())
    }
}

fn set_once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    slot: &mut Option<T>,
    key: &'static str,
    map: &mut A,
) -> std::result::Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(key));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SourceConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a source: `id`, one connector and its settings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<SourceConfig, A::Error> {
                let mut id: Option<String> = None;
                let mut connector = None;
                let mut schema: Option<weir_formats::SchemaSpec> = None;
                let mut event_time: Option<EventTimeConfig> = None;
                let mut watermark: Option<WatermarkConfig> = None;
                let mut batch_size: Option<usize> = None;
                let mut max_linger: Option<humantime_serde::Serde<std::time::Duration>> = None;
                while let Some(key) = map.next_key_seed(KeySeed {
                    side: "source",
                    common: SOURCE_KEYS,
                    connectors: SourceConnector::NAMES,
                    all: SourceConnector::ALL_NAMES,
                    named: connector.as_ref().map(|(k, _): &(String, _)| k.as_str()),
                })? {
                    match key.as_str() {
                        "id" => set_once(&mut id, "id", &mut map)?,
                        "schema" => set_once(&mut schema, "schema", &mut map)?,
                        "event_time" => set_once(&mut event_time, "event_time", &mut map)?,
                        "watermark" => set_once(&mut watermark, "watermark", &mut map)?,
                        "batch_size" => set_once(&mut batch_size, "batch_size", &mut map)?,
                        "max_linger" => set_once(&mut max_linger, "max_linger", &mut map)?,
                        k => match SourceConnector::read(k, &mut map)? {
                            Some(c) => connector = Some((k.to_string(), c)),
                            None => return Err(unknown_key("source", k, SOURCE_KEYS, SourceConnector::NAMES)),
                        },
                    }
                }
                let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
                let Some((_, connector)) = connector else {
                    return Err(de::Error::custom(format!(
                        "source `{id}` names no connector: add one of {}",
                        SourceConnector::NAMES.join(", ")
                    )));
                };
                let mut s = SourceConfig::new(id, connector);
                s.schema = schema;
                s.event_time = event_time;
                s.watermark = watermark.unwrap_or_default();
                if let Some(b) = batch_size {
                    s.batch_size = b;
                }
                if let Some(l) = max_linger {
                    s.max_linger = l.into_inner();
                }
                Ok(s)
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for SourceConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        self.connector.write(&mut m)?;
        if let Some(schema) = &self.schema {
            m.serialize_entry("schema", schema)?;
        }
        if let Some(e) = &self.event_time {
            m.serialize_entry("event_time", e)?;
        }
        m.serialize_entry("watermark", &self.watermark)?;
        m.serialize_entry("batch_size", &self.batch_size)?;
        m.serialize_entry("max_linger", &humantime_serde::Serde::from(self.max_linger))?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for SinkConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SinkConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sink (`id`, one connector and its settings), or a list of sinks")
            }
            /// `sinks: [...]`: each sink gets every row.
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<SinkConfig, A::Error> {
                let mut sinks = Vec::new();
                while let Some(s) = seq.next_element::<SinkConfig>()? {
                    sinks.push(s);
                }
                Ok(SinkConfig::new("sinks", SinkConnector::FanOut(fan_out::FanOutSettings(sinks))))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<SinkConfig, A::Error> {
                let mut id: Option<String> = None;
                let mut connector = None;
                let mut latency_column: Option<String> = None;
                let mut retry: Option<RetryConfig> = None;
                let mut input: Option<String> = None;
                while let Some(key) = map.next_key_seed(KeySeed {
                    side: "sink",
                    common: SINK_KEYS,
                    connectors: SinkConnector::NAMES,
                    all: SinkConnector::ALL_NAMES,
                    named: connector.as_ref().map(|(k, _): &(String, _)| k.as_str()),
                })? {
                    match key.as_str() {
                        "id" => set_once(&mut id, "id", &mut map)?,
                        "latency_column" => set_once(&mut latency_column, "latency_column", &mut map)?,
                        "retry" => set_once(&mut retry, "retry", &mut map)?,
                        "input" => set_once(&mut input, "input", &mut map)?,
                        k => match SinkConnector::read(k, &mut map)? {
                            Some(c) => connector = Some((k.to_string(), c)),
                            None => return Err(unknown_key("sink", k, SINK_KEYS, SinkConnector::NAMES)),
                        },
                    }
                }
                let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
                let Some((_, connector)) = connector else {
                    return Err(de::Error::custom(format!(
                        "sink `{id}` names no connector: add one of {}",
                        SinkConnector::NAMES.join(", ")
                    )));
                };
                let mut s = SinkConfig::new(id, connector);
                s.latency_column = latency_column;
                s.retry = retry.unwrap_or_default();
                s.input = input;
                Ok(s)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for SinkConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        self.connector.write(&mut m)?;
        if let Some(c) = &self.latency_column {
            m.serialize_entry("latency_column", c)?;
        }
        m.serialize_entry("retry", &self.retry)?;
        if let Some(i) = &self.input {
            m.serialize_entry("input", i)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::PipelineConfig;

    fn parse(text: &str) -> Result<PipelineConfig, String> {
        crate::yaml::parse("p.yaml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_source_names_exactly_one_known_connector() {
        let none = parse("name: p\nsource:\n  id: s\n  batch_size: 5\nsink: {id: o, stdout: {}}\n").unwrap_err();
        assert!(none.contains("source `s` names no connector: add one of file, stdin, generator"), "{none}");
        let two =
            parse("name: p\nsource:\n  id: s\n  stdin: {}\n  generator: {}\nsink: {id: o, stdout: {}}\n").unwrap_err();
        assert!(two.contains("two connectors, `stdin` and `generator`"), "{two}");
        let typo = parse("name: p\nsource:\n  id: s\n  generater: {}\nsink: {id: o, stdout: {}}\n").unwrap_err();
        assert!(typo.contains("unknown source key `generater`"), "{typo}");
        assert!(typo.contains("or a connector: `file`, `stdin`, `generator`"), "{typo}");
        assert!(typo.starts_with("p.yaml:4:"), "the line of the key: {typo}");
        let bad =
            parse("name: p\nsource:\n  id: s\n  generator: {devices: many}\nsink: {id: o, stdout: {}}\n").unwrap_err();
        assert!(bad.starts_with("p.yaml:4:"), "{bad}");
        let sink = parse("name: p\nsource: {id: s, generator: {}}\nsink:\n  id: o\n  stdot: {}\n").unwrap_err();
        assert!(sink.contains("unknown sink key `stdot`") && sink.contains("`stdout`"), "{sink}");
    }

    #[test]
    fn a_key_repeated_is_refused() {
        let twice =
            parse("name: p\nsource: {id: s, generator: {}, batch_size: 1, batch_size: 2}\nsink: {id: o, stdout: {}}\n")
                .unwrap_err();
        assert!(twice.contains("duplicate") && twice.contains("batch_size"), "{twice}");
    }
}
