//! Kafka: the source reads topics through a consumer group with its positions in checkpoints
//! (and, exactly once out to the same cluster, in the output's transactions); the sink
//! produces at least once or in a transaction per checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::kafka as k;
use weir_core::{CoreError, Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::{default_format, default_kafka_mode, is_default};

/// Kafka source settings. Security (TLS, SASL PLAIN or SCRAM) and anything else librdkafka
/// knows go in `properties`; values may be `${VAR}` references and are never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceSettings {
    /// Bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// Topics; a name starting with `^` is a regular expression.
    pub topics: Vec<String>,
    /// Consumer group; default `weir-<pipeline name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Where a partition without a checkpointed position starts: `earliest`, `latest`,
    /// `committed` or an RFC 3339 time.
    #[serde(default = "default_kafka_start")]
    pub start: String,
    /// Payload format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// Avro payloads in the Confluent wire format (a zero byte, the writer schema's id, the
    /// datum), the schemas read from a schema registry; replaces `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<KafkaAvroSettings>,
    /// Protobuf payloads in the Confluent wire format (a zero byte, the schema's id, the
    /// message indexes, the message), the `.proto` schemas read from a schema registry;
    /// replaces `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protobuf: Option<KafkaProtobufSettings>,
    /// A JSON Schema (its file, or the schema itself starting with `{`) each JSON payload is
    /// checked against before it is decoded; one that does not match is dead-lettered with
    /// the rules it broke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,
    /// End once every assigned partition is read up to where it ended when assigned.
    #[serde(default)]
    pub stop_at_end: bool,
    /// A checkpointed position the broker no longer has (retention deleted its records while
    /// Weir was down): `earliest` (default) goes on from the earliest record kept, `fail`
    /// fails the run. Either way it is logged as an error and the records skipped counted.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_missing_position: MissingPositionConfig,
    /// Metadata columns to add, by the name to give them.
    #[serde(default)]
    pub metadata: KafkaMetadataSettings,
    /// librdkafka properties (ours win on a clash: offsets are never auto-committed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceSettings")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("start", &self.start)
            .field("format", &self.format)
            .field("avro", &self.avro)
            .field("protobuf", &self.protobuf)
            .field("json_schema", &self.json_schema)
            .field("stop_at_end", &self.stop_at_end)
            .field("metadata", &self.metadata)
            .field("properties", &k::redacted(&self.properties))
            .finish()
    }
}

fn default_kafka_start() -> String {
    "earliest".into()
}

/// `avro:` of a Kafka source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaAvroSettings {
    /// The registry holding the writer schemas.
    pub schema_registry: SchemaRegistrySettings,
    /// An Avro schema (JSON) the writers' data is resolved to: a field it has and a writer
    /// lacks takes its default; a field only the writer has is dropped. Without it, fields
    /// fill the columns of the same names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_schema: Option<String>,
}

/// A schema registry with Confluent's REST API.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistrySettings {
    /// Base URL, `http://127.0.0.1:8081`.
    pub url: String,
    /// Basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Basic authentication (`${VAR}`; never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// How long one request may take; default 10s.
    #[serde(default = "default_registry_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl std::fmt::Debug for SchemaRegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistrySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A JSON Schema given inline (starting with `{`) or as a file.
fn json_schema(given: &str) -> Result<Arc<weir_formats::json_schema::JsonSchema>> {
    let text = if given.trim_start().starts_with('{') {
        given.to_string()
    } else {
        std::fs::read_to_string(given)
            .map_err(|e| CoreError::io(format!("kafka: cannot read `json_schema` file `{given}`"), e))?
    };
    let schema = weir_formats::json_schema::JsonSchema::parse(&text)
        .map_err(|e| CoreError::Config(format!("kafka: `json_schema` is not a valid JSON Schema: {e}")))?;
    Ok(Arc::new(schema))
}

/// `protobuf:` of a Kafka source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaProtobufSettings {
    /// The registry holding the `.proto` schemas.
    pub schema_registry: SchemaRegistrySettings,
}

/// `avro:` or `protobuf:` of a Kafka sink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaRegistrySinkSettings {
    /// The registry the schema is registered in.
    pub schema_registry: SchemaRegistrySettings,
    /// The record's (Protobuf: message's) name in the schema made from the rows' columns;
    /// default `Row`.
    #[serde(default = "default_record_name")]
    pub record_name: String,
    /// Its namespace (Protobuf: package).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The subject; default by `subject_strategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `topic` (`<topic>-value`, default), `record` (the record's full name) or `topic_record`
    /// (`<topic>-<record full name>`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub subject_strategy: SubjectStrategyConfig,
    /// Register the schema as a new version of the subject when it is new (default), or only
    /// look its id up (`false`: the run fails if the subject lacks it).
    #[serde(default = "default_true")]
    pub register: bool,
}

/// See [`KafkaRegistrySinkSettings::subject_strategy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategyConfig {
    /// `<topic>-value`.
    #[default]
    Topic,
    /// The record's full name.
    Record,
    /// `<topic>-<record full name>`.
    TopicRecord,
}

fn default_record_name() -> String {
    "Row".into()
}

fn default_true() -> bool {
    true
}

impl KafkaRegistrySinkSettings {
    fn config(&self, protobuf: bool) -> Result<k::RegistrySinkConfig> {
        use weir_connectors::schema_registry::SubjectStrategy as S;
        Ok(k::RegistrySinkConfig {
            registry: self.schema_registry.client()?,
            protobuf,
            record_name: self.record_name.clone(),
            namespace: self.namespace.clone(),
            subject: self.subject.clone(),
            strategy: match self.subject_strategy {
                SubjectStrategyConfig::Topic => S::Topic,
                SubjectStrategyConfig::Record => S::Record,
                SubjectStrategyConfig::TopicRecord => S::TopicRecord,
            },
            register: self.register,
        })
    }
}

impl SchemaRegistrySettings {
    fn client(&self) -> Result<Arc<weir_connectors::schema_registry::SchemaRegistry>> {
        weir_connectors::schema_registry::SchemaRegistry::new(weir_connectors::schema_registry::RegistryConfig {
            url: self.url.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            timeout: self.timeout,
        })
    }
}

fn default_registry_timeout() -> Duration {
    Duration::from_secs(10)
}

impl KafkaAvroSettings {
    fn payload(&self) -> Result<k::RegistryPayload> {
        let registry = self.schema_registry.client()?;
        let reader_schema =
            match &self.reader_schema {
                None => None,
                Some(text) => Some(weir_formats::avro::Schema::parse_str(text).map_err(|e| {
                    CoreError::Config(format!("kafka: `avro.reader_schema` is not an Avro schema: {e}"))
                })?),
            };
        Ok(k::RegistryPayload { registry, format: k::RegistryFormat::Avro { reader_schema } })
    }
}

/// Kafka metadata as columns: each key set names the column.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaMetadataSettings {
    /// The record key as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The partition (int32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// The offset (int64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
    /// The broker timestamp in ms (int64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The headers as a JSON object text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<String>,
    /// When Weir took the record from its consumer, µs since the epoch (int64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
}

/// Kafka sink settings.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkSettings {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic written to.
    pub topic: String,
    /// Value format: `json` or `msgpack`.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// Column whose text is the record key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Integer column naming the partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Header name to column.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Avro in the Confluent wire format, the schema (derived from the rows) registered in a
    /// schema registry; replaces `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<KafkaRegistrySinkSettings>,
    /// Protobuf in the Confluent wire format, the `.proto` schema (derived from the rows)
    /// registered in a schema registry; replaces `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protobuf: Option<KafkaRegistrySinkSettings>,
    /// `at_least_once` (default) or `exactly_once` (a transaction per checkpoint; needs
    /// `checkpoints`).
    #[serde(default = "default_kafka_mode")]
    pub mode: String,
    /// `exactly_once`: prefix of the producers' transactional ids; default
    /// `weir-<pipeline>-<sink id>`. Keep it across restarts; give each process its own
    /// (`weir-w1-${HOSTNAME}` in a StatefulSet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
    /// `exactly_once`: the topic recording committed checkpoints; default
    /// `<transactional_id>.commits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_topic: Option<String>,
    /// `exactly_once`: the producer's `transaction.timeout.ms`; default 4 checkpoint intervals,
    /// at least 1 minute and at most 15 (the broker's default `transaction.max.timeout.ms`).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub transaction_timeout: Option<Duration>,
    /// `exactly_once`: a header to put on every record naming its transaction,
    /// `<run>:<checkpoint>`, as the commit topic's records name committed ones (audits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_header: Option<String>,
    /// librdkafka properties (ours win on a clash: the producer is idempotent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSinkSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("key", &self.key)
            .field("partition", &self.partition)
            .field("headers", &self.headers)
            .field("avro", &self.avro)
            .field("protobuf", &self.protobuf)
            .field("mode", &self.mode)
            .field("transactional_id", &self.transactional_id)
            .field("commit_topic", &self.commit_topic)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("checkpoint_header", &self.checkpoint_header)
            .field("properties", &k::redacted(&self.properties))
            .finish()
    }
}

/// See [`KafkaSourceSettings::on_missing_position`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPositionConfig {
    /// Go on from the earliest record the broker still has.
    #[default]
    Earliest,
    /// Fail the run.
    Fail,
}

impl KafkaSourceSettings {
    /// The metadata columns asked for.
    pub(crate) fn metadata_columns(&self) -> k::KafkaMetadataColumns {
        let m = &self.metadata;
        k::KafkaMetadataColumns {
            key: m.key.clone(),
            topic: m.topic.clone(),
            partition: m.partition.clone(),
            offset: m.offset.clone(),
            timestamp: m.timestamp.clone(),
            headers: m.headers.clone(),
            received: m.received.clone(),
        }
    }
}

impl SourceSettings for KafkaSourceSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let payload = cx.payload_schema("kafka")?;
        let start = start(&self.start).map_err(|e| cx.error(e))?;
        let fac = k::KafkaSourceFactory::new(k::KafkaSourceConfig {
            client: client(&self.brokers, &self.properties),
            topics: self.topics.clone(),
            group_id: self.group_id.clone().unwrap_or_else(|| format!("weir-{}", cx.pipeline)),
            start,
            format: self.format,
            registry: match (&self.avro, &self.protobuf) {
                (Some(_), Some(_)) => {
                    return Err(cx.error("kafka: `avro` and `protobuf` are two payload formats; give one"))
                }
                (Some(a), None) => Some(a.payload()?),
                (None, Some(p)) => Some(k::RegistryPayload {
                    registry: p.schema_registry.client()?,
                    format: k::RegistryFormat::Protobuf,
                }),
                (None, None) => None,
            },
            json_schema: self.json_schema.as_deref().map(json_schema).transpose()?,
            payload_schema: payload,
            metadata: self.metadata_columns(),
            event_time: cx.event_time.clone(),
            batch_size: cx.src.batch_size,
            max_linger: cx.src.max_linger,
            stop_at_end: self.stop_at_end,
            transactional_offsets: cx.transactional_offsets.clone(),
            handoff: cx.checkpoints.is_some_and(|k| k.member.is_some()),
            until: cx.until.clone(),
            on_missing_position: match self.on_missing_position {
                MissingPositionConfig::Earliest => k::MissingPosition::Earliest,
                MissingPositionConfig::Fail => k::MissingPosition::Fail,
            },
        })
        .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }

    fn row_schema(&self, payload: SchemaRef) -> Result<SchemaRef> {
        self.metadata_columns().extend(&payload)
    }
}

impl SinkSettings for KafkaSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let mode = match self.mode.as_str() {
            "at_least_once" => k::KafkaSinkMode::AtLeastOnce,
            "exactly_once" => {
                let Some(ck) = cx.checkpoints else {
                    return Err(cx.error(
                        "kafka sink `mode: exactly_once` commits a transaction per checkpoint: add a `checkpoints` section",
                    ));
                };
                let mut t = transactions(self, cx.pipeline, &cx.sink.id, ck.interval)?;
                t.handoff = ck.member.is_some();
                k::KafkaSinkMode::ExactlyOnce(t)
            }
            other => {
                return Err(cx.error(format!("kafka sink `mode: {other}`: expected `at_least_once` or `exactly_once`")))
            }
        };
        let fac = k::KafkaSinkFactory::new(k::KafkaSinkConfig {
            client: client(&self.brokers, &self.properties),
            topic: self.topic.clone(),
            format: self.format,
            schema: cx.schema.clone(),
            key: self.key.clone(),
            partition: self.partition.clone(),
            headers: self.headers.clone(),
            mode,
            source_offsets: cx.source_offsets.clone(),
            create: cx.create_topic.clone(),
            registry: match (&self.avro, &self.protobuf) {
                (Some(_), Some(_)) => {
                    return Err(cx.error("kafka sink: `avro` and `protobuf` are two payload formats; give one"))
                }
                (Some(a), None) => Some(a.config(false)?),
                (None, Some(p)) => Some(p.config(true)?),
                (None, None) => None,
            },
        })
        .map_err(|e| e.in_step(&cx.step))?;
        Ok(Arc::new(fac))
    }
}

/// Parses a Kafka `start`: `earliest`, `latest`, `committed` or an RFC 3339 time.
fn start(s: &str) -> std::result::Result<k::KafkaStart, String> {
    Ok(match s {
        "earliest" => k::KafkaStart::Earliest,
        "latest" => k::KafkaStart::Latest,
        "committed" => k::KafkaStart::Committed,
        t => k::KafkaStart::Timestamp(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| {
                    format!("kafka `start: {t}`: expected earliest, latest, committed or an RFC 3339 time such as 2026-12-01T00:00:00Z")
                })?
                .timestamp_millis(),
        ),
    })
}

/// The exactly-once settings of a Kafka sink, with the transaction timeout checked against
/// the checkpoint interval: a transaction stays open for an interval plus the checkpoint.
fn transactions(
    s: &KafkaSinkSettings,
    pipeline: &str,
    sink: &str,
    interval: Duration,
) -> Result<k::KafkaTransactionSettings> {
    let broker_max = Duration::from_secs(15 * 60);
    let timeout = s.transaction_timeout.unwrap_or_else(|| (interval * 4).clamp(Duration::from_secs(60), broker_max));
    if timeout <= interval * 2 {
        return Err(CoreError::Config(format!(
            "kafka sink `transaction_timeout: {}` is too short for a checkpoint every {}: a transaction stays open for an interval plus the checkpoint, and the broker aborts it after the timeout; use at least {}",
            humantime::format_duration(timeout),
            humantime::format_duration(interval),
            humantime::format_duration(interval * 3)
        )));
    }
    if timeout > broker_max && s.transaction_timeout.is_some() {
        tracing::warn!(
            timeout_s = timeout.as_secs(),
            "The Kafka sink's transaction_timeout is above 15 minutes, the brokers' default transaction.max.timeout.ms; the brokers refuse it unless raised there."
        );
    }
    let id = s.transactional_id.clone().unwrap_or_else(|| format!("weir-{pipeline}-{sink}"));
    Ok(k::KafkaTransactionSettings {
        commit_topic: s.commit_topic.clone().unwrap_or_else(|| format!("{id}.commits")),
        transactional_id: id,
        timeout,
        checkpoint_header: s.checkpoint_header.clone(),
        handoff: false,
    })
}

/// A Kafka client's settings.
pub(crate) fn client(brokers: &str, properties: &BTreeMap<String, String>) -> k::KafkaClientConfig {
    k::KafkaClientConfig { brokers: brokers.to_string(), properties: properties.clone() }
}
