//! The settings of a pipeline, as written in YAML and as taken by the builder.
//!
//! Every struct rejects unknown keys, so a typo is an error that names the key and its line.
//! Durations are humantime strings (`10s`, `250ms`, `1h 30m`). Defaults live in the
//! `default_*` functions next to each struct, once.

use std::collections::BTreeMap;
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use weir_core::time::TimeFormat;
use weir_formats::{FormatSpec, SchemaSpec};

/// A whole pipeline: the YAML file's top level.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name of the job, used in metrics and logs.
    pub name: String,
    /// Worker count; the `--workers` flag overrides it; default: the number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Where events come from: `source:` one source, or `sources:` a list of several (each
    /// with its own id, watermark and schema; steps name the one they read with `input:`).
    #[serde(alias = "source", deserialize_with = "one_source_or_many", serialize_with = "write_sources")]
    pub sources: Vec<SourceConfig>,
    /// What happens to them, in order.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Where results go: one sink, or (`sinks:`) a list of sinks that each get every row.
    #[serde(alias = "sinks")]
    pub sink: SinkConfig,
    /// Where records that cannot be processed go.
    #[serde(default)]
    pub dead_letters: DeadLetterConfig,
    /// Runtime settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Taking keys that keep failing out of the pipeline for a while.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// Opt-in load shedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_shedding: Option<LoadSheddingConfig>,
    /// Checkpoints, for recovery after a crash and exactly-once output; off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointConfig>,
    /// The HTTP port: metrics, health, and the alert API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiConfig>,
    /// Logging: the level `weir run` logs at (unless `WEIR_LOG` or `RUST_LOG` say otherwise);
    /// it can change while the pipeline runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
    /// OpenTelemetry traces exported over OTLP/HTTP; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<TracesConfig>,
}

impl PipelineConfig {
    /// The first source (the only one of most pipelines).
    pub fn source(&self) -> &SourceConfig {
        &self.sources[0]
    }

    /// The first source, to change.
    pub fn source_mut(&mut self) -> &mut SourceConfig {
        &mut self.sources[0]
    }

    /// The sinks as steps of the graph: `sink`, or a list of sinks that each write every row
    /// of the last step (one fan-out sink); a list where some sink names its `input` is a sink
    /// per entry.
    pub fn sink_nodes(&self) -> Vec<&SinkConfig> {
        match &self.sink.connector {
            SinkConnector::FanOut(f) if f.0.iter().any(|s| s.input.is_some()) => f.0.iter().collect(),
            _ => vec![&self.sink],
        }
    }
}

/// `source: {...}` or `sources: [{...}, ...]`, at least one. Read in place (not through a
/// generic value), so errors inside a source keep their line.
fn one_source_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SourceConfig>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<SourceConfig>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a source (`id`, one connector and its settings), or a list of sources")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Ok(vec![SourceConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))?])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            let v = Vec::<SourceConfig>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
            if v.is_empty() {
                return Err(serde::de::Error::custom("`sources` is empty: a pipeline needs at least one source"));
            }
            Ok(v)
        }
    }
    d.deserialize_any(V)
}

/// One source is written as `source: {...}`'s map would be, several as a list.
fn write_sources<S: serde::Serializer>(v: &[SourceConfig], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

/// The HTTP port: `/metrics`, `/healthz`, `/readyz`, and `/alerts` (list, acknowledge,
/// resolve, live stream). The command's `--metrics-addr` wins over `addr`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port`, or a bare port for loopback; default `127.0.0.1:9464`. Anything but a
    /// loopback address exposes the API to the network: set a token.
    #[serde(default = "default_api_addr")]
    pub addr: String,
    /// The bearer token that acknowledging and resolving need (`Authorization: Bearer ...`);
    /// absent, the `WEIR_API_TOKEN` environment variable; neither, those calls are refused.
    /// Use a `${VAR}` reference rather than the secret itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

fn default_api_addr() -> String {
    "127.0.0.1:9464".into()
}

/// Periodic checkpoints: state, source positions and pre-committed output, so that a run
/// killed at any moment resumes where the last checkpoint left off.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where checkpoints go: a directory, or a `s3://bucket/prefix`, `file://` or `memory://`
    /// URL. Each pipeline keeps its checkpoints under its name there.
    pub dir: String,
    /// Object-store settings for a URL `dir`, e.g. `endpoint`, `region`, `allow_http` for S3;
    /// they win over the `AWS_*` environment. Values may be `${VAR}` references; they are
    /// never logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Time between checkpoints; `0s` for only the final one.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Complete checkpoints to keep.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// This process's name among several that run the pipeline over one Kafka consumer
    /// group and share `dir`: its checkpoints go to `<dir>/<pipeline>/<member>`, and when
    /// partitions move, their keyed state moves with them through these folders. Stable
    /// across restarts of one process (a StatefulSet pod name: `${HOSTNAME}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

impl std::fmt::Debug for CheckpointConfig {
    /// Shows option names only: their values may be credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointConfig")
            .field("dir", &self.dir)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("interval", &self.interval)
            .field("keep", &self.keep)
            .finish()
    }
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_keep() -> usize {
    3
}

/// Load shedding: while the job is overloaded, sources drop the rows `drop_where` picks.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSheddingConfig {
    /// SQL predicate on source rows: the rows to drop while overloaded, e.g. `NOT critical`.
    pub drop_where: String,
    /// Overloaded when wall clock minus watermark stays above this.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<Duration>,
    /// Overloaded when the fullest channel stays fuller than this (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_fill: Option<f64>,
    /// How long the condition must hold before shedding starts.
    #[serde(default = "default_sustained", with = "humantime_serde")]
    pub sustained: Duration,
    /// Pause sources this long between batches while overloaded.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub pause: Option<Duration>,
}

fn default_sustained() -> Duration {
    Duration::from_secs(5)
}

/// Quarantine of keys that keep producing dead letters. On by default, keyed by the first
/// `key_by` (when those columns come from the source), with conservative limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// Whether quarantine is on.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Key column paths of the source; default: the keys of the first `key_by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Dead letters a key may produce within `within` before it is quarantined.
    #[serde(default = "default_max_dead_letters")]
    pub max_dead_letters: u32,
    /// Window over which dead letters are counted.
    #[serde(default = "default_within", with = "humantime_serde")]
    pub within: Duration,
    /// How long a quarantined key's rows are diverted.
    #[serde(default = "default_cool_down", with = "humantime_serde")]
    pub cool_down: Duration,
    /// JSON Lines file receiving the diverted rows.
    #[serde(default = "default_quarantine_output")]
    pub output: String,
    /// A Kafka topic instead of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTopicSettings>,
}

fn default_true() -> bool {
    true
}
fn default_max_dead_letters() -> u32 {
    100
}
fn default_within() -> Duration {
    Duration::from_secs(60)
}
fn default_cool_down() -> Duration {
    Duration::from_secs(600)
}
fn default_quarantine_output() -> String {
    "quarantine.jsonl".into()
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keys: None,
            max_dead_letters: default_max_dead_letters(),
            within: default_within(),
            cool_down: default_cool_down(),
            output: default_quarantine_output(),
            kafka: None,
        }
    }
}

/// A source step. In YAML its connector is a key beside `id` and the common settings:
/// `source: {id: events, kafka: {...}, schema: ...}` (see [`crate::connector`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Step id.
    pub id: String,
    /// Where rows come from, with the connector's settings.
    pub connector: SourceConnector,
    /// Declared schema; inferred from the first records when absent (JSON files only).
    pub schema: Option<SchemaSpec>,
    /// Event-time column; without it, rows get processing time.
    pub event_time: Option<EventTimeConfig>,
    /// Watermark settings.
    pub watermark: WatermarkConfig,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest a partial batch may wait for more rows (the linger adapts below this).
    pub max_linger: Duration,
}

fn default_batch_size() -> usize {
    8192
}
fn default_max_linger() -> Duration {
    Duration::from_millis(1)
}

pub use crate::connector::code::CodeSettings;
pub use crate::connector::file::{FileSinkSettings, FileSourceSettings};
pub use crate::connector::generator::GeneratorSettings;
pub use crate::connector::http::HttpIngestSettings;
#[cfg(feature = "kafka")]
pub use crate::connector::kafka::{
    KafkaMetadataSettings, KafkaSinkSettings, KafkaSourceSettings, MissingPositionConfig,
};
#[cfg(feature = "mqtt")]
pub use crate::connector::mqtt::MqttSourceSettings;
#[cfg(feature = "nats")]
pub use crate::connector::nats::NatsSourceSettings;
#[cfg(feature = "amqp")]
pub use crate::connector::rabbitmq::RabbitMqSourceSettings;
pub use crate::connector::redis_streams::RedisStreamsSettings;
pub use crate::connector::stdio::{StdinSettings, StdoutSettings};
pub use crate::connector::{SinkConnector, SourceConnector};

/// The format connectors read and write unless told otherwise.
pub(crate) fn default_format() -> FormatSpec {
    FormatSpec::Json
}

/// Event-time column.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Column path.
    pub column: String,
    /// `s`, `ms`, `us`, `ns` (epoch) or `rfc3339`.
    #[serde(default = "default_time_format")]
    pub format: TimeFormat,
    /// Rows whose time is more than this ahead of the wall clock are dead-lettered (kind
    /// `clock`) before they can move a watermark; `null` for no limit.
    #[serde(default = "default_future_skew", with = "humantime_serde")]
    pub max_future_skew: Option<Duration>,
    /// Rows older than this are dead-lettered (kind `clock`); no limit by default, since
    /// replaying old files is normal.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

fn default_future_skew() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}

impl EventTimeConfig {
    /// An event-time column with the default clock-sanity limits.
    pub fn new(column: impl Into<String>, format: TimeFormat) -> Self {
        Self { column: column.into(), format, max_future_skew: default_future_skew(), max_age: None }
    }

    /// What a source reads event times by.
    pub fn spec(&self) -> weir_core::time::EventTimeSpec {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        weir_core::time::EventTimeSpec {
            column: self.column.clone(),
            format: self.format,
            max_future_ms: self.max_future_skew.map(ms),
            max_age_ms: self.max_age.map(ms),
        }
    }
}

fn default_time_format() -> TimeFormat {
    TimeFormat::Millis
}

/// Watermark settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkConfig {
    /// Rows this much older than the newest seen are still on time.
    #[serde(default = "default_ooo", with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// A partition silent this long stops holding the watermark back.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

fn default_ooo() -> Duration {
    Duration::from_secs(2)
}
fn default_idle() -> Option<Duration> {
    Some(Duration::from_secs(30))
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        Self { max_out_of_orderness: default_ooo(), idle_timeout: default_idle() }
    }
}

/// One processing step. In YAML each is a one-key map: `- filter: {id: hot, where: "..."}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "StepRepr", into = "StepRepr")]
pub enum StepConfig {
    /// Keep rows matching a SQL predicate.
    Filter(FilterConfig),
    /// Choose, rename and compute columns.
    Select(SelectConfig),
    /// Partition the stream by key columns for the keyed steps after it.
    KeyBy(KeyByConfig),
    /// Aggregate in windows.
    Window(WindowConfig),
    /// Keyed EWMA z-score anomaly detector.
    EwmaZscore(EwmaConfig),
    /// Keyed detection rules (thresholds, z-scores, MAD, rate of change, silence).
    Detect(DetectConfig),
    /// The alert lifecycle over detections: deduplicate, throttle, escalate, resolve.
    Alert(AlertConfig),
    /// A step written in code (Rust or Python), registered with the pipeline under its id.
    Function(FunctionConfig),
    /// Enrich each row with the row of a table that has its key (a lookup join).
    Lookup(LookupConfig),
    /// Every row of several streams with the same columns, as one stream.
    Union(UnionConfig),
    /// Pairs of rows of two streams with the same key and times close enough.
    IntervalJoin(JoinConfig),
    /// Pairs of rows of two streams with the same key in the same window.
    WindowJoin(JoinConfig),
    /// Each row of a stream with its key's version in a changelog stream at its time.
    TemporalJoin(JoinConfig),
    /// The current value per key (running aggregates or the latest row), emitted as changes
    /// and queryable on the API port.
    Table(TableConfig),
}

/// The keys of [`StepRepr`]: every kind of step, as the error for a step without one lists
/// them. (A test checks the list against the struct.)
const STEP_KINDS: [&str; 14] = [
    "filter",
    "select",
    "key_by",
    "window",
    "ewma_zscore",
    "detect",
    "alert",
    "function",
    "lookup",
    "union",
    "interval_join",
    "window_join",
    "temporal_join",
    "table",
];

/// The YAML shape of a step: a map with exactly one known key. (serde_yaml reads enums from
/// YAML tags only, and a one-key map reads better.)
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StepRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<FilterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    select: Option<SelectConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_by: Option<KeyByConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<WindowConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ewma_zscore: Option<EwmaConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detect: Option<DetectConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alert: Option<AlertConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function: Option<FunctionConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lookup: Option<LookupConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    union: Option<UnionConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval_join: Option<JoinConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window_join: Option<JoinConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temporal_join: Option<JoinConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<TableConfig>,
}

impl TryFrom<StepRepr> for StepConfig {
    type Error = String;
    fn try_from(r: StepRepr) -> Result<Self, String> {
        let mut found = Vec::new();
        if let Some(c) = r.filter {
            found.push(StepConfig::Filter(c));
        }
        if let Some(c) = r.select {
            found.push(StepConfig::Select(c));
        }
        if let Some(c) = r.key_by {
            found.push(StepConfig::KeyBy(c));
        }
        if let Some(c) = r.window {
            found.push(StepConfig::Window(c));
        }
        if let Some(c) = r.ewma_zscore {
            found.push(StepConfig::EwmaZscore(c));
        }
        if let Some(c) = r.detect {
            found.push(StepConfig::Detect(c));
        }
        if let Some(c) = r.alert {
            found.push(StepConfig::Alert(c));
        }
        if let Some(c) = r.function {
            found.push(StepConfig::Function(c));
        }
        if let Some(c) = r.lookup {
            found.push(StepConfig::Lookup(c));
        }
        if let Some(c) = r.union {
            found.push(StepConfig::Union(c));
        }
        if let Some(c) = r.interval_join {
            found.push(StepConfig::IntervalJoin(c));
        }
        if let Some(c) = r.window_join {
            found.push(StepConfig::WindowJoin(c));
        }
        if let Some(c) = r.temporal_join {
            found.push(StepConfig::TemporalJoin(c));
        }
        if let Some(c) = r.table {
            found.push(StepConfig::Table(c));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(format!(
                "a step needs one of {}",
                STEP_KINDS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            )),
            _ => Err("a step has more than one kind; write each as its own list item".into()),
        }
    }
}

impl From<StepConfig> for StepRepr {
    fn from(s: StepConfig) -> Self {
        let mut r = StepRepr::default();
        match s {
            StepConfig::Filter(c) => r.filter = Some(c),
            StepConfig::Select(c) => r.select = Some(c),
            StepConfig::KeyBy(c) => r.key_by = Some(c),
            StepConfig::Window(c) => r.window = Some(c),
            StepConfig::EwmaZscore(c) => r.ewma_zscore = Some(c),
            StepConfig::Detect(c) => r.detect = Some(c),
            StepConfig::Alert(c) => r.alert = Some(c),
            StepConfig::Function(c) => r.function = Some(c),
            StepConfig::Lookup(c) => r.lookup = Some(c),
            StepConfig::Union(c) => r.union = Some(c),
            StepConfig::IntervalJoin(c) => r.interval_join = Some(c),
            StepConfig::WindowJoin(c) => r.window_join = Some(c),
            StepConfig::TemporalJoin(c) => r.temporal_join = Some(c),
            StepConfig::Table(c) => r.table = Some(c),
        }
        r
    }
}

impl StepConfig {
    /// The step's id.
    pub fn id(&self) -> &str {
        match self {
            Self::Filter(c) => &c.id,
            Self::Select(c) => &c.id,
            Self::KeyBy(c) => &c.id,
            Self::Window(c) => &c.id,
            Self::EwmaZscore(c) => &c.id,
            Self::Detect(c) => &c.id,
            Self::Alert(c) => &c.id,
            Self::Function(c) => &c.id,
            Self::Lookup(c) => &c.id,
            Self::Union(c) => &c.id,
            Self::IntervalJoin(c) | Self::WindowJoin(c) | Self::TemporalJoin(c) => &c.id,
            Self::Table(c) => &c.id,
        }
    }

    /// Its `input` setting (`None` for a union or a join, which name their inputs otherwise).
    pub fn input_mut(&mut self) -> Option<&mut Option<String>> {
        match self {
            Self::Filter(c) => Some(&mut c.input),
            Self::Select(c) => Some(&mut c.input),
            Self::KeyBy(c) => Some(&mut c.input),
            Self::Window(c) => Some(&mut c.input),
            Self::EwmaZscore(c) => Some(&mut c.input),
            Self::Detect(c) => Some(&mut c.input),
            Self::Alert(c) => Some(&mut c.input),
            Self::Function(c) => Some(&mut c.input),
            Self::Lookup(c) => Some(&mut c.input),
            Self::Table(c) => Some(&mut c.input),
            Self::Union(_) | Self::IntervalJoin(_) | Self::WindowJoin(_) | Self::TemporalJoin(_) => None,
        }
    }

    /// The steps or sources it reads, when it names them (`input`, a union's `inputs`, a
    /// join's `left` and `right`); empty: the step before it.
    pub fn inputs(&self) -> Vec<&str> {
        fn one(i: &Option<String>) -> Vec<&str> {
            i.as_deref().into_iter().collect()
        }
        match self {
            Self::Filter(c) => one(&c.input),
            Self::Select(c) => one(&c.input),
            Self::KeyBy(c) => one(&c.input),
            Self::Window(c) => one(&c.input),
            Self::EwmaZscore(c) => one(&c.input),
            Self::Detect(c) => one(&c.input),
            Self::Alert(c) => one(&c.input),
            Self::Function(c) => one(&c.input),
            Self::Lookup(c) => one(&c.input),
            Self::Table(c) => one(&c.input),
            Self::Union(c) => c.inputs.iter().map(String::as_str).collect(),
            Self::IntervalJoin(c) | Self::WindowJoin(c) | Self::TemporalJoin(c) => {
                vec![c.left.as_str(), c.right.as_str()]
            }
        }
    }
}

/// `union` settings: streams with the same columns (names, types and order) as one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnionConfig {
    /// Step id.
    pub id: String,
    /// The steps or sources whose rows it takes (at least two).
    pub inputs: Vec<String>,
}

/// Settings of the three joins of two streams, `interval_join`, `window_join` and
/// `temporal_join`; each takes the settings of its kind and refuses the others':
///
/// - `interval_join`: each row `l` of `left` paired with each row `r` of `right` that has the
///   same key and `l.time + between[0] <= r.time <= l.time + between[1]` (event times).
/// - `window_join`: rows of both with the same key in the same window (`tumbling`, `hopping`
///   or `session`), paired when the window closes.
/// - `temporal_join`: each row of `left` with the row of `right` (a changelog: each row a new
///   version of its key) that was its key's newest at the left row's time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// Step id.
    pub id: String,
    /// The left stream (a step or source id).
    pub left: String,
    /// The right stream.
    pub right: String,
    /// Key column paths, the same on both sides.
    #[serde(deserialize_with = "one_or_many")]
    pub on: Vec<String>,
    /// The right side's key column paths when they differ from the left's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub right_on: Option<Vec<String>>,
    /// `interval_join`: how far the right row's time may be from the left row's:
    /// `[-50ms, 50ms]` (both ends included; a leading `-` is before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub between: Option<[String; 2]>,
    /// `window_join`: tumbling windows of this size.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub tumbling: Option<Duration>,
    /// `window_join`: hopping windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hopping: Option<HoppingConfig>,
    /// `window_join`: session windows (a session is made by the rows of both sides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionConfig>,
    /// `temporal_join`: forget a key whose newest version is older than the watermark by this
    /// much (event time); later rows of it find no version. None: keys are kept for the run.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub state_ttl: Option<Duration>,
    /// `inner` (pairs only, the default), `left`, `right` or `full` (also rows without a
    /// partner, with the other side null); a temporal join is `inner` or `left`.
    #[serde(default)]
    pub kind: JoinKindConfig,
    /// Names of the output's two struct columns holding each side's row; default: the
    /// inputs' ids.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub names: Option<[String; 2]>,
}

impl JoinConfig {
    /// A join of `left` and `right` on `on`, inner, with no kind-specific settings yet.
    pub fn new(id: &str, left: &str, right: &str, on: &[&str]) -> Self {
        Self {
            id: id.into(),
            left: left.into(),
            right: right.into(),
            on: on.iter().map(|s| (*s).to_string()).collect(),
            right_on: None,
            between: None,
            tumbling: None,
            hopping: None,
            session: None,
            state_ttl: None,
            kind: JoinKindConfig::Inner,
            names: None,
        }
    }
}

/// `table` settings: per key, running aggregates over every row so far (`aggregates`) or the
/// latest row (`latest: true`, for a changelog stream). Emits one change per key a batch
/// changed, with an `_op` column (`insert`, `update`, `delete`), which upsert sinks apply;
/// `GET /tables/<id>/<key>` on the API port reads the current value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Step id, and the table's name in queries.
    pub id: String,
    /// The step or source it reads; default: the step before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Key column paths (a name or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub key: Vec<String>,
    /// Output name -> `func(column)`: count, sum, mean, min, max, first, last, stddev.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub aggregates: IndexMap<String, String>,
    /// Keep each key's latest row (by event time) instead of aggregates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
    /// Forget a key not updated for this long (event time), emitting a `delete` change.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub state_ttl: Option<Duration>,
}

/// `log` settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A log filter: `info`, `debug`, `warn,weir_core=debug`...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// `traces` settings: where spans go and how many batches are traced.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP address (`http://127.0.0.1:4318`, to which `/v1/traces` is
    /// added) or the full URL of its traces endpoint.
    pub endpoint: String,
    /// The share of batches traced, 0 to 1; default 0.01. A batch read with a trace context
    /// (a Kafka `traceparent` header) follows its parent's decision instead. Checkpoints are
    /// always traced.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the spans; default `weir`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Headers sent with each export (a hosted backend's API key: `${OTLP_TOKEN}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// How long one export may take; default 10s.
    #[serde(default = "default_traces_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long finished spans wait before they are sent in one request; default 2s.
    #[serde(default = "default_export_delay", with = "humantime_serde")]
    pub export_delay: Duration,
}

fn default_sample_ratio() -> f64 {
    0.01
}

fn default_service_name() -> String {
    "weir".into()
}

fn default_traces_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_export_delay() -> Duration {
    Duration::from_secs(2)
}

/// Which rows without a partner a join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKindConfig {
    /// Pairs only.
    #[default]
    Inner,
    /// Also left rows without a partner.
    Left,
    /// Also right rows without a partner.
    Right,
    /// Also rows of either side without a partner.
    Full,
}

/// `filter` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// SQL boolean expression, e.g. `readings.temp > 25.0`.
    #[serde(rename = "where")]
    pub predicate: String,
}

/// `select` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Items: `col`, `a.b AS c`, `expr AS name`, `*`.
    pub columns: Vec<String>,
}

/// `key_by` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyByConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Key column paths.
    pub keys: Vec<String>,
    /// Re-key through a Kafka topic: the steps before run as a job of their own that writes
    /// every row to the topic keyed by the first key, and the rest of the pipeline reads it,
    /// so each key's rows are in one partition of it (and state can follow partitions
    /// between processes). Needs a Kafka source, whose brokers hold the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repartition: Option<RepartitionConfig>,
}

/// `key_by.repartition` settings; `repartition: {}` takes every default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepartitionConfig {
    /// The topic; default `<pipeline>.<key_by id>`. Created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Its partitions when Weir creates it; default: as many as the source topic has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// `at_least_once` (default) or `exactly_once` (a transaction per checkpoint of the
    /// writing side; needs `checkpoints`).
    #[serde(default = "default_kafka_mode")]
    pub mode: String,
}

impl Default for RepartitionConfig {
    fn default() -> Self {
        Self { topic: None, partitions: None, mode: default_kafka_mode() }
    }
}

/// `window` settings: exactly one of `tumbling`, `hopping`, `session`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Tumbling window size.
    #[serde(default, with = "humantime_serde")]
    pub tumbling: Option<Duration>,
    /// Hopping window size and slide.
    #[serde(default)]
    pub hopping: Option<HoppingConfig>,
    /// Session gap.
    #[serde(default)]
    pub session: Option<SessionConfig>,
    /// `event` (default) or `processing`.
    #[serde(default)]
    pub time: TimeDomainConfig,
    /// Output name -> `func(column)`, in output order. Functions: count, sum, mean, min, max,
    /// first, last, stddev.
    pub aggregates: IndexMap<String, String>,
    /// Late rows: `drop` (default), `{side_output: path}` or `{allowed_lateness: 5s}`.
    #[serde(default)]
    pub late: LateConfig,
    /// Forget a key not seen for this long (event time), once it has no open window: memory
    /// follows the keys alive now, not every key ever seen. At least the window's size (or
    /// session gap) plus its allowed lateness. None: keys are kept for the whole run.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub state_ttl: Option<Duration>,
}

/// Hopping window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoppingConfig {
    /// Window length.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// Distance between starts.
    #[serde(with = "humantime_serde")]
    pub slide: Duration,
}

/// Session window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Inactivity gap.
    #[serde(with = "humantime_serde")]
    pub gap: Duration,
}

/// Which clock a window uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeDomainConfig {
    /// Event time.
    #[default]
    Event,
    /// Processing time.
    Processing,
}

/// Late-row policy. YAML: `drop`, `{side_output: late.jsonl}` or `{allowed_lateness: 5s}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "LateRepr", into = "LateRepr")]
pub enum LateConfig {
    /// Drop and count.
    #[default]
    Drop,
    /// Write late rows to a JSON Lines file.
    SideOutput(String),
    /// Update windows within this lateness and emit the updated result.
    AllowedLateness(Duration),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum LateRepr {
    Name(String),
    Map(LateMap),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LateMap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    side_output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    allowed_lateness: Option<Duration>,
}

impl TryFrom<LateRepr> for LateConfig {
    type Error = String;
    fn try_from(r: LateRepr) -> Result<Self, String> {
        match r {
            LateRepr::Name(n) if n == "drop" => Ok(Self::Drop),
            LateRepr::Name(n) => Err(format!(
                "unknown late policy `{n}`; use `drop`, `{{side_output: path}}` or `{{allowed_lateness: 5s}}`"
            )),
            LateRepr::Map(LateMap { side_output: Some(p), allowed_lateness: None }) => Ok(Self::SideOutput(p)),
            LateRepr::Map(LateMap { side_output: None, allowed_lateness: Some(d) }) => Ok(Self::AllowedLateness(d)),
            LateRepr::Map(_) => Err("late: give exactly one of `side_output`, `allowed_lateness`".into()),
        }
    }
}

impl From<LateConfig> for LateRepr {
    fn from(l: LateConfig) -> Self {
        match l {
            LateConfig::Drop => LateRepr::Name("drop".into()),
            LateConfig::SideOutput(p) => LateRepr::Map(LateMap { side_output: Some(p), ..Default::default() }),
            LateConfig::AllowedLateness(d) => {
                LateRepr::Map(LateMap { allowed_lateness: Some(d), ..Default::default() })
            }
        }
    }
}

/// `lookup` settings: each row gets the columns of the table row with its key.
///
/// ```yaml
/// - lookup:
///     id: device
///     key: device_id                       # the rows' key column(s)
///     table:
///       file: { path: devices.csv, format: csv, reload: 10s }
///       key: device_id                     # the table's key column(s); default the rows'
///       columns: [site, temp_limit]        # default every column but the key
///     join: inner                          # or left
///     missing: drop                        # inner: or dead_letter, or {side_output: path}
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The rows' key column paths (a name or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub key: Vec<String>,
    /// Where rows are found.
    pub table: LookupTableConfig,
    /// `inner` (default): only rows whose key the table has; `left`: every row, nulls where
    /// the key is missing.
    #[serde(default = "default_join")]
    pub join: String,
    /// What an inner join does with a row whose key the table lacks.
    #[serde(default)]
    pub missing: MissingConfig,
}

fn default_join() -> String {
    "inner".into()
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The table of a `lookup` step: where it is, its key and the columns it brings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupTableConfig {
    /// A file held in memory, read again when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<LookupFileConfig>,
    /// A PostgreSQL table, asked once per batch for the keys the cache lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<LookupPostgresConfig>,
    /// Redis hashes (`<prefix><key>`), one pipeline per batch for the keys the cache lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<LookupRedisConfig>,
    /// The cache in front of a server's table.
    #[serde(default)]
    pub cache: LookupCacheConfig,
    /// The table's key column(s), matched in order with the rows' `key`; default the same names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// The columns a found row brings; default every column but the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// The table's columns and types; default inferred from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaSpec>,
}

/// A lookup table in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupPostgresConfig {
    /// Connection URL, as the sink's (`PGPASSWORD` when it has no password).
    pub url: String,
    /// The table: `name` or `schema.name`.
    pub table: String,
    /// A CA certificate (PEM) to verify the server against, with `sslmode=require`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A lookup table of Redis hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRedisConfig {
    /// `redis://host:6379/0`.
    pub url: String,
    /// A key's hash is `<prefix><key>` (parts of a key of several columns joined by `:`).
    #[serde(default)]
    pub prefix: String,
}

/// How many keys a server table's cache holds, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupCacheConfig {
    /// Keys held at most (default 100,000).
    #[serde(default = "default_cache_size")]
    pub size: usize,
    /// How long a key's answer is kept (default 60 s).
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for LookupCacheConfig {
    fn default() -> Self {
        Self { size: default_cache_size(), ttl: default_cache_ttl() }
    }
}

fn default_cache_size() -> usize {
    100_000
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}

/// A lookup table's file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupFileConfig {
    /// Path of the file.
    pub path: String,
    /// `csv` (with a header) or `json` (JSON Lines).
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// How often to check whether the file changed (and read it again); `null` for never.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload: Option<Duration>,
}

fn default_reload() -> Option<Duration> {
    Some(Duration::from_secs(10))
}

/// What an inner lookup join does with a row whose key the table lacks. YAML: `drop`,
/// `dead_letter` or `{side_output: missing.jsonl}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "LateRepr", into = "LateRepr")]
pub enum MissingConfig {
    /// Left out, counted.
    #[default]
    Drop,
    /// To the dead-letter output, kind `lookup`.
    DeadLetter,
    /// Written to a JSON Lines file.
    SideOutput(String),
}

impl TryFrom<LateRepr> for MissingConfig {
    type Error = String;
    fn try_from(r: LateRepr) -> Result<Self, String> {
        match r {
            LateRepr::Name(n) if n == "drop" => Ok(Self::Drop),
            LateRepr::Name(n) if n == "dead_letter" => Ok(Self::DeadLetter),
            LateRepr::Map(LateMap { side_output: Some(p), allowed_lateness: None }) => Ok(Self::SideOutput(p)),
            _ => Err("missing: use `drop`, `dead_letter` or `{side_output: path}`".into()),
        }
    }
}

impl From<MissingConfig> for LateRepr {
    fn from(m: MissingConfig) -> Self {
        match m {
            MissingConfig::Drop => LateRepr::Name("drop".into()),
            MissingConfig::DeadLetter => LateRepr::Name("dead_letter".into()),
            MissingConfig::SideOutput(p) => LateRepr::Map(LateMap { side_output: Some(p), ..Default::default() }),
        }
    }
}

/// `function` settings: a step whose code is registered with the pipeline under `id`
/// ([`crate::Pipeline::function`], or `map_batches` and friends in Python). A YAML file can
/// name such a step to place it; the program that runs the file registers the code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Step id, which is also the name the code is registered under.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

/// `detect` settings: rules checked on every row of a keyed stream, giving one stream of
/// detections (see `weir_ops::DetectSpec` for its columns).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// `anomalies` (default): only rows a rule flags; `all`: every evaluation, normal ones
    /// with `anomaly: false`.
    #[serde(default)]
    pub emit: DetectEmit,
    /// The rules, each with a unique name.
    pub rules: Vec<RuleConfig>,
    /// Forget a key not seen for this long (event time); a key a `silence` rule still waits
    /// on stays until that rule fired. None: keys are kept for the whole run.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub state_ttl: Option<Duration>,
}

/// `alert` settings: how alerts built from detections live and die.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// A live alert resolves after this long without an anomaly.
    #[serde(default = "default_resolve_after", with = "humantime_serde")]
    pub resolve_after: Duration,
    /// Or after this many normal observations in a row (needs `detect` with `emit: all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_after_count: Option<u64>,
    /// A flap within this long after resolving re-opens the same alert instead of a new one.
    #[serde(default = "default_alert_cool_down", with = "humantime_serde")]
    pub cool_down: Duration,
    /// Unacknowledged this long after firing: escalate (once).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub escalate_after: Option<Duration>,
    /// The severity of an escalated alert.
    #[serde(default = "default_escalate_to")]
    pub escalate_to: String,
    /// Resolved alerts stay listed in the API this long.
    #[serde(default = "default_retain", with = "humantime_serde")]
    pub retain: Duration,
    /// Which events to emit: `fired`, `updated`, `escalated`, `acknowledged`, `resolved`;
    /// default all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Where events go besides the step's output, chosen by severity, rule, key and event.
    /// Every matching route gets the event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// At the end of input, how long to wait for routes to deliver what they hold.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// One alert route: a name, a `match`, and exactly one of `webhook`, `redis`, `kafka`,
/// `file`, `stdout`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name, for metrics and logs.
    pub name: String,
    /// Which events it takes; absent: all.
    #[serde(default, rename = "match")]
    pub matcher: RouteMatchConfig,
    /// HTTP POST of each event as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookConfig>,
    /// Redis pub/sub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisRouteConfig>,
    /// A Kafka topic, keyed by alert id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTopicSettings>,
    /// JSON Lines appended to a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<RouteFileConfig>,
    /// JSON Lines on standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<CodeSettings>,
    /// Retries of a failed delivery (absent `max_attempts`: until the receiver is back).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Events waiting for delivery at most; beyond, `when_full` decides.
    #[serde(default = "default_route_queue")]
    pub queue: usize,
    /// An event the full queue cannot take: `dead_letter` (default: to the dead-letter output,
    /// kind `alert`) or `drop` (counted).
    #[serde(default)]
    pub when_full: WhenFullConfig,
}

/// A Kafka writer's default delivery mode (sinks, repartition topics).
pub(crate) fn default_kafka_mode() -> String {
    "at_least_once".into()
}

pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What a route does with an event its full queue cannot take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFullConfig {
    /// To the dead-letter output, kind `alert`.
    #[default]
    DeadLetter,
    /// Dropped and counted.
    Drop,
}

fn default_route_queue() -> usize {
    10_000
}

/// Which alert events a route takes: each list, when given, must contain the event's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    /// Severities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub severity: Vec<String>,
    /// Rule names; `*` and `?` are wildcards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule: Vec<String>,
    /// Keys; wildcards allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<String>,
    /// Events: `fired`, `updated`, `escalated`, `acknowledged`, `resolved`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event: Vec<String>,
    /// Rule labels that must be present with these values (wildcards allowed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A webhook route.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL; may be a `${VAR}` reference (Slack URLs are secrets).
    pub url: String,
    /// Extra request headers; values may be `${VAR}` references and are never logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Post a Slack-style `{"text": ...}` message instead of the event's fields.
    #[serde(default)]
    pub slack: bool,
    /// Per-request time limit.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &"***")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("slack", &self.slack)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A Redis pub/sub route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisRouteConfig {
    /// `redis://[user:password@]host:port[/db]`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// The channel to publish to.
    pub channel: String,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}

/// A file route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFileConfig {
    /// JSON Lines file, appended to.
    pub path: String,
}

fn default_resolve_after() -> Duration {
    Duration::from_secs(60)
}
fn default_alert_cool_down() -> Duration {
    Duration::from_secs(300)
}
fn default_escalate_to() -> String {
    "critical".into()
}
fn default_retain() -> Duration {
    Duration::from_secs(3600)
}

/// Which evaluations `detect` emits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectEmit {
    /// Only anomalies (and the end of a silence).
    #[default]
    Anomalies,
    /// Every evaluation.
    All,
}

/// One detection rule: a name, a severity and exactly one of the rule kinds.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name written in each detection.
    pub name: String,
    /// Severity written in each detection; default `warning`.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Static limits with hysteresis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdRule>,
    /// Exponentially weighted z-score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewma: Option<EwmaRule>,
    /// Rolling median/MAD score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mad: Option<MadRule>,
    /// Change per second between consecutive events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_of_change: Option<RateRule>,
    /// No event from a key for a while (wall clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence: Option<SilenceRule>,
    /// An ONNX model's score (tract, in process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRule>,
    /// Labels carried to the alerts this rule raises (`team: pumps`), which routes can match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `model` rule settings: an ONNX model taking `[N, inputs]` float32 and giving one score per
/// row.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRule {
    /// The `.onnx` file (relative to the pipeline file's folder when run by `weir run`).
    pub path: String,
    /// Numeric columns, in the model's feature order.
    pub inputs: Vec<String>,
    /// Score above this is anomalous.
    #[serde(default = "default_model_threshold")]
    pub threshold: f64,
    /// Rows per inference call at most.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// A column to report as each detection's `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn default_model_threshold() -> f64 {
    0.5
}
fn default_max_batch() -> usize {
    1024
}

fn default_severity() -> String {
    "warning".into()
}

/// `threshold` rule settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// Watched numeric column path.
    pub value: String,
    /// Fires above this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Clears below this once fired from above (default: `above`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_below: Option<f64>,
    /// Fires below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// Clears above this once fired from below (default: `below`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_above: Option<f64>,
}

/// `ewma` rule settings (as the `ewma_zscore` step).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EwmaRule {
    /// Watched numeric column path.
    pub value: String,
    /// Smoothing factor.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// |z| above this is an anomaly.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Rows per key before it can fire.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
}

/// `mad` rule settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MadRule {
    /// Watched numeric column path.
    pub value: String,
    /// Values kept per key.
    #[serde(default = "default_mad_window")]
    pub window: usize,
    /// |score| above this is an anomaly (3.5 is the usual choice).
    #[serde(default = "default_mad_threshold")]
    pub threshold: f64,
    /// Values per key before it is scored.
    #[serde(default = "default_mad_warmup")]
    pub warmup: usize,
}

fn default_mad_window() -> usize {
    100
}
fn default_mad_threshold() -> f64 {
    3.5
}
fn default_mad_warmup() -> usize {
    20
}

/// `rate_of_change` rule settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// Watched numeric column path.
    pub value: String,
    /// Fires above this many units per second of event time.
    pub max_per_second: f64,
}

/// `silence` rule settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceRule {
    /// How long a key may send nothing.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// `ewma_zscore` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EwmaConfig {
    /// Step id.
    pub id: String,
    /// The step or source it reads; default: the step before it (for the first step, the
    /// only source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Watched numeric column path.
    pub value: String,
    /// Smoothing factor.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// |z| above this is an anomaly.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Rows per key before alerts.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Forget a key not seen for this long (event time); a key that comes back starts its
    /// warm-up again. None: keys are kept for the whole run.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub state_ttl: Option<Duration>,
}

fn default_alpha() -> f64 {
    0.1
}
fn default_threshold() -> f64 {
    4.0
}
fn default_warmup() -> u64 {
    20
}

/// A sink step. In YAML its connector is a key beside `id`: `sink: {id: out, file: {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Step id.
    pub id: String,
    /// Where rows go, with the connector's settings.
    pub connector: SinkConnector,
    /// A column holding each row's creation time in µs since the epoch (the generator's
    /// `created_us`): the sink then records creation-to-write latency (summary and metrics).
    pub latency_column: Option<String>,
    /// Retries of failed writes.
    pub retry: RetryConfig,
    /// The step or source it writes; default: the last step.
    pub input: Option<String>,
}

/// Retries of transient sink failures (a server that is down, a full disk).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all before the batch is dead-lettered; absent: retry until the sink is back
    /// (its input waits, and backpressure reaches the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Delay before the first retry; it doubles up to `max_backoff`, with jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: None, initial_backoff: default_initial_backoff(), max_backoff: default_max_backoff() }
    }
}

/// Dead-letter output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// JSON Lines file, created on the first dead letter.
    #[serde(default = "default_dlq")]
    pub path: String,
    /// A Kafka topic instead of the file: one record per entry (the same JSON), keyed by step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTopicSettings>,
}

/// A Kafka topic to write entries to (dead letters, quarantined rows).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTopicSettings {
    /// Bootstrap brokers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// librdkafka properties; values are never logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaTopicSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTopicSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("properties", &weir_connectors::redacted(&self.properties))
            .finish()
    }
}

fn default_dlq() -> String {
    "dead-letters.jsonl".into()
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self { path: default_dlq(), kafka: None }
    }
}

/// Runtime settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Messages (batches) each channel holds before its sender waits.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
}

fn default_channel_capacity() -> usize {
    4
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { channel_capacity: default_channel_capacity() }
    }
}

impl SourceConfig {
    /// A source with the given id and connector, and default settings.
    pub fn new(id: impl Into<String>, connector: SourceConnector) -> Self {
        Self {
            id: id.into(),
            connector,
            schema: None,
            event_time: None,
            watermark: WatermarkConfig::default(),
            batch_size: default_batch_size(),
            max_linger: default_max_linger(),
        }
    }
}

impl SinkConfig {
    /// A sink with the given id and connector.
    pub fn new(id: impl Into<String>, connector: SinkConnector) -> Self {
        Self { id: id.into(), connector, latency_column: None, retry: RetryConfig::default(), input: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step without a kind is told every kind there is: the list is the struct's keys.
    #[test]
    fn a_step_without_a_kind_is_told_every_kind() {
        // serde lists a struct's fields when it meets an unknown one.
        let unknown = serde_yaml::from_str::<StepRepr>("nope: 1").unwrap_err().to_string();
        let expected = STEP_KINDS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
        assert!(unknown.contains(&expected), "{unknown} vs {expected}");
        let err = StepConfig::try_from(StepRepr::default()).unwrap_err();
        for k in STEP_KINDS {
            assert!(err.contains(&format!("`{k}`")), "{err}");
        }
    }

    /// Every example parses, and writing it back as YAML gives the same configuration, so the
    /// serialised form (and every default) is valid input.
    #[test]
    fn examples_round_trip_through_yaml() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let w4 = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("w4-"));
            let cfg = crate::yaml::parse_with("x", &text, |k| match k {
                "INPUT" | "OUTPUT" | "INPUT_A" | "INPUT_B" => Some(format!("/tmp/{k}")),
                // W4's device table (other examples use `DEVICES` for a count, with a default).
                "DEVICES" if w4 => Some(format!("{}/../../tests/data/devices-50.csv", env!("CARGO_MANIFEST_DIR"))),
                // Tests run in the crate's folder; the examples name the model from the root.
                "MODEL" => Some(format!("{}/../../models/sensor_anomaly.onnx", env!("CARGO_MANIFEST_DIR"))),
                _ => None,
            })
            .unwrap();
            let again: PipelineConfig = serde_yaml::from_str(&serde_yaml::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(cfg, again, "{}", path.display());
            crate::Pipeline::from_config(cfg).build().unwrap();
            seen += 1;
        }
        assert!(seen >= 4);
    }

    #[test]
    fn defaults_are_valid() {
        let cfg: PipelineConfig =
            serde_yaml::from_str("name: d\nsource: {id: s, generator: {}}\nsink: {id: o, stdout: {}}\n").unwrap();
        assert_eq!(cfg.source().batch_size, 8192);
        assert_eq!(cfg.source().watermark, WatermarkConfig::default());
        assert_eq!(cfg.dead_letters.path, "dead-letters.jsonl");
        crate::Pipeline::from_config(cfg).build().unwrap();
    }

    #[test]
    fn late_policy_forms() {
        let w = |late: &str| serde_yaml::from_str::<LateConfig>(late);
        assert_eq!(w("drop").unwrap(), LateConfig::Drop);
        assert_eq!(w("{side_output: late.jsonl}").unwrap(), LateConfig::SideOutput("late.jsonl".into()));
        assert_eq!(w("{allowed_lateness: 5s}").unwrap(), LateConfig::AllowedLateness(Duration::from_secs(5)));
        assert!(w("keep").unwrap_err().to_string().contains("unknown late policy `keep`"));
    }
}
