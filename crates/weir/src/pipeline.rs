//! The pipeline builder: stable step ids, `build()` validates without I/O, `plan()` resolves
//! schemas and compiles expressions, `run()` executes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use weir_connectors::{FileDeadLetters, FileSideWriter};
use weir_core::quarantine::{Quarantine, QuarantineSpec, QuarantiningDeadLetters};
use weir_core::runtime::{Job, JobSpec, RunSummary, StageSpec, WatermarkSpec};
use weir_core::shed::{OverloadSpec, ShedPredicate};
use weir_core::{CoreError, DeadLetterSink, OperatorFactory, Result, SinkFactory, SourceFactory, StepId};
use weir_formats::{infer_json_schema, split_records, FormatSpec};
use weir_ops::{AggSpec, EwmaZscoreSpec, FilterSpec, LatePolicy, SelectSpec, TimeDomain, WindowKind, WindowSpec};

use crate::config::*;

/// A pipeline under construction. Step ids must be unique; they name steps in metrics, logs
/// and dead letters, and will key their state in checkpoints, so keep them stable.
///
/// ```
/// use weir::prelude::*;
///
/// let mut p = Pipeline::new("hot-sensors");
/// p.source(SourceConfig::new("events", SourceConnector::Generator(GeneratorSettings { count: Some(1000), ..Default::default() })))
///     .filter("hot", "readings.temp > 25.0")
///     .select("cols", ["device_id", "ts", "readings.temp * 1.8 + 32 AS temp_f"])
///     .sink(SinkConfig::new("out", SinkConnector::Stdout(StdoutSettings { format: FormatSpec::Json })));
/// let built = p.build().expect("valid pipeline");
/// assert_eq!(built.config().steps.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct Pipeline {
    cfg: PipelineConfig,
    functions: Functions,
    code: CodeEnds,
    source_set: bool,
    sink_set: bool,
}

/// The source and sink written in code, for `code: {}` connectors.
#[derive(Debug, Clone, Default)]
struct CodeEnds {
    source: Option<Arc<dyn SourceFactory>>,
    sink: Option<Arc<dyn SinkFactory>>,
}

/// The code of `function` steps, by step id.
pub type Functions = BTreeMap<String, Arc<dyn CustomStep>>;

/// A step written in code (a Rust operator, or a Python function through the `weir` Python
/// package) rather than configuration. It is placed by a `function` step with its id.
pub trait CustomStep: Send + Sync + std::fmt::Debug {
    /// Compiles the step for its input schema. `keys` are the stream's key columns (empty when
    /// no `key_by` came before), for steps that keep per-key state.
    ///
    /// # Errors
    /// A schema the step cannot work on, or a keyed step on an unkeyed stream.
    fn plan(&self, input: &SchemaRef, keys: &[String]) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)>;

    /// Whether each key's rows must reach the step in input order, as for a detector. A file
    /// source is then read by one worker per file rather than in chunks.
    fn order_sensitive(&self) -> bool {
        false
    }
}

impl Pipeline {
    /// A new, empty pipeline.
    pub fn new(name: impl Into<String>) -> Self {
        let placeholder = SourceConfig::new("", SourceConnector::Stdin(StdinSettings { format: FormatSpec::Json }));
        let sink = SinkConfig::new("", SinkConnector::Stdout(StdoutSettings { format: FormatSpec::Json }));
        Self {
            cfg: PipelineConfig {
                name: name.into(),
                workers: None,
                source: placeholder,
                steps: Vec::new(),
                sink,
                dead_letters: DeadLetterConfig::default(),
                runtime: RuntimeConfig::default(),
                quarantine: QuarantineConfig::default(),
                load_shedding: None,
                checkpoints: None,
                api: None,
            },
            functions: Functions::new(),
            code: CodeEnds::default(),
            source_set: false,
            sink_set: false,
        }
    }

    /// A pipeline from its configuration (the YAML form).
    pub fn from_config(cfg: PipelineConfig) -> Self {
        Self { cfg, functions: Functions::new(), code: CodeEnds::default(), source_set: true, sink_set: true }
    }

    /// Registers the code of the `function` step `id` of a pipeline made from configuration.
    pub fn register_function(&mut self, id: impl Into<String>, step: Arc<dyn CustomStep>) -> &mut Self {
        self.functions.insert(id.into(), step);
        self
    }

    /// Sets a source written in code: the pipeline's source becomes `id` with `code: {}`, and
    /// the other source settings (event time, watermark) still apply.
    pub fn source_code(&mut self, id: &str, factory: Arc<dyn SourceFactory>) -> &mut Self {
        self.code.source = Some(factory);
        if !matches!(self.cfg.source.connector, SourceConnector::Code(_)) || self.cfg.source.id != id {
            self.source(SourceConfig::new(id, SourceConnector::Code(CodeSettings {})));
        }
        self
    }

    /// Sets a sink written in code; the pipeline's sink becomes `id` with `code: {}`.
    pub fn sink_code(&mut self, id: &str, factory: Arc<dyn SinkFactory>) -> &mut Self {
        self.code.sink = Some(factory);
        if !matches!(self.cfg.sink.connector, SinkConnector::Code(_)) || self.cfg.sink.id != id {
            self.sink(SinkConfig::new(id, SinkConnector::Code(CodeSettings {})));
        }
        self
    }

    /// Adds a step written in code.
    pub fn function(&mut self, id: &str, step: Arc<dyn CustomStep>) -> &mut Self {
        self.register_function(id, step);
        self.step(StepConfig::Function(FunctionConfig { id: id.into() }))
    }

    /// Sets the source.
    pub fn source(&mut self, cfg: SourceConfig) -> &mut Self {
        self.cfg.source = cfg;
        self.source_set = true;
        self
    }

    /// Adds a step.
    pub fn step(&mut self, step: StepConfig) -> &mut Self {
        self.cfg.steps.push(step);
        self
    }

    /// Keeps rows matching a SQL predicate.
    pub fn filter(&mut self, id: &str, predicate: &str) -> &mut Self {
        self.step(StepConfig::Filter(FilterConfig { id: id.into(), predicate: predicate.into() }))
    }

    /// Chooses, renames and computes columns.
    pub fn select<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, id: &str, columns: I) -> &mut Self {
        self.step(StepConfig::Select(SelectConfig {
            id: id.into(),
            columns: columns.into_iter().map(Into::into).collect(),
        }))
    }

    /// Partitions by key columns for the keyed steps that follow.
    pub fn key_by<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, id: &str, keys: I) -> &mut Self {
        self.step(StepConfig::KeyBy(KeyByConfig {
            id: id.into(),
            keys: keys.into_iter().map(Into::into).collect(),
            repartition: None,
        }))
    }

    /// Aggregates in windows.
    pub fn window(&mut self, cfg: WindowConfig) -> &mut Self {
        self.step(StepConfig::Window(cfg))
    }

    /// Adds an EWMA z-score detector.
    pub fn ewma_zscore(&mut self, cfg: EwmaConfig) -> &mut Self {
        self.step(StepConfig::EwmaZscore(cfg))
    }

    /// Sets the sink.
    pub fn sink(&mut self, cfg: SinkConfig) -> &mut Self {
        self.cfg.sink = cfg;
        self.sink_set = true;
        self
    }

    /// Sets the dead-letter file.
    pub fn dead_letters(&mut self, path: impl Into<String>) -> &mut Self {
        self.cfg.dead_letters.path = path.into();
        self
    }

    /// Takes a checkpoint every `interval` into `dir` (a directory or URL), keeping three.
    pub fn checkpoints(&mut self, dir: impl Into<String>, interval: Duration) -> &mut Self {
        self.cfg.checkpoints =
            Some(CheckpointConfig { dir: dir.into(), options: BTreeMap::new(), interval, keep: 3, member: None });
        self
    }

    /// Sets the default worker count.
    pub fn workers(&mut self, n: usize) -> &mut Self {
        self.cfg.workers = Some(n);
        self
    }

    /// Checks the pipeline's structure and settings without touching files or servers.
    /// With a declared schema, columns and expressions are checked too.
    ///
    /// # Errors
    /// The first problem, naming its step.
    pub fn build(&self) -> Result<BuiltPipeline> {
        weir_core::ensure_config!(self.source_set, "pipeline `{}` has no source", self.cfg.name);
        weir_core::ensure_config!(self.sink_set, "pipeline `{}` has no sink", self.cfg.name);
        let c = &self.cfg;
        let mut ids = HashSet::new();
        let all_ids = std::iter::once(c.source.id.as_str())
            .chain(c.steps.iter().map(StepConfig::id))
            .chain(std::iter::once(c.sink.id.as_str()));
        check_name("pipeline name", &c.name)?;
        for id in all_ids {
            weir_core::ensure_config!(!id.is_empty(), "a step has an empty id");
            check_name("step id", id)?;
            weir_core::ensure_config!(ids.insert(id), "step id `{id}` is used twice; ids must be unique");
        }
        weir_core::ensure_config!(
            c.sink.retry.max_attempts != Some(0),
            "sink `{}`: retry.max_attempts must be at least 1",
            c.sink.id
        );
        weir_core::ensure_config!(c.source.batch_size > 0, "source `{}`: batch_size must be positive", c.source.id);
        weir_core::ensure_config!(c.workers != Some(0), "workers must be at least 1");
        weir_core::ensure_config!(c.runtime.channel_capacity > 0, "runtime.channel_capacity must be positive");
        for s in &c.steps {
            step_spec(s, &[], false, &self.functions, &Arc::default()).map_err(|e| e.in_step(&StepId::new(s.id())))?;
        }
        if let Some(unused) = self.functions.keys().find(|id| !c.steps.iter().any(|s| s.id() == id.as_str())) {
            return Err(CoreError::Config(format!(
                "function `{unused}` is registered but no `function` step with that id places it"
            )));
        }
        weir_core::ensure_config!(
            !matches!(c.source.connector, SourceConnector::Code(_)) || self.code.source.is_some(),
            "source `{}` is `code`, but no source was registered from code",
            c.source.id
        );
        weir_core::ensure_config!(
            !matches!(c.sink.connector, SinkConnector::Code(_)) || self.code.sink.is_some(),
            "sink `{}` is `code`, but no sink was registered from code",
            c.sink.id
        );
        let built = BuiltPipeline {
            cfg: c.clone(),
            functions: self.functions.clone(),
            code: self.code.clone(),
            alerts: AlertHub::default(),
            link: Link::default(),
            ingest: Arc::default(),
            feeds: Arc::default(),
        };
        if let Some(schema) = &c.source.schema {
            let schema =
                c.source.connector.row_schema(schema.to_arrow()).map_err(|e| e.in_step(&StepId::new(&c.source.id)))?;
            built.plan_steps(&schema, 1, false)?;
        } else if let Some(f) = &self.code.source {
            built.plan_steps(&f.schema(), 1, false)?;
        }
        Ok(built)
    }
}

/// A checked pipeline, ready to plan and run.
#[derive(Debug, Clone)]
pub struct BuiltPipeline {
    cfg: PipelineConfig,
    functions: Functions,
    code: CodeEnds,
    alerts: AlertHub,
    link: Link,
    /// The HTTP ingest sources' hubs, by source id, filled when the pipeline is planned.
    ingest: Arc<crate::connector::IngestHubs>,
    /// The live feed sinks' hubs, by sink id, filled when the pipeline is planned.
    feeds: Arc<crate::connector::FeedHubs>,
}

/// The error for a Kafka feature used in a build without the `kafka` cargo feature.
#[cfg(not(feature = "kafka"))]
fn without_kafka(what: &str) -> CoreError {
    CoreError::Config(format!("{what} needs Kafka, which this build of Weir leaves out (cargo feature `kafka`)"))
}

/// Where a half of a repartitioned pipeline meets the topic (see [`RepartitionConfig`]).
#[derive(Debug, Clone, Default)]
struct Link {
    /// The reading half: set when the writing half finished.
    done: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The writing half: the topic to create.
    #[cfg(feature = "kafka")]
    topic: Option<weir_connectors::kafka::KafkaTopicSpec>,
}

impl Link {
    /// Whether this is the writing half, whose output is not the job's.
    fn writes_topic(&self) -> bool {
        #[cfg(feature = "kafka")]
        return self.topic.is_some();
        #[cfg(not(feature = "kafka"))]
        false
    }
}

/// What the HTTP port needs from the `alert` steps: their books and their live events.
#[derive(Debug, Clone, Default)]
struct AlertHub {
    board: Arc<weir_ops::AlertBoard>,
    live: Arc<weir_connectors::alerting::LiveAlerts>,
    /// The planned job's dead-letter output, for events the routes' full queues cannot take.
    dead_letters: weir_connectors::alerting::DeadLetterSlot,
}

/// Planned steps: the stages, the schema reaching the sink, and each `alert` step's notifiers.
type PlannedSteps = (Vec<StageSpec>, SchemaRef, Vec<(String, Vec<Arc<dyn weir_ops::alerts::AlertNotify>>)>);

/// Turns keys going in and out of quarantine into alert events of rule `quarantine`, sent
/// through the first `alert` step's routes and live stream: someone learns of a device that
/// keeps failing without reading logs. The events go around the step's book (they are about
/// the pipeline's input, not a detection), so they are not acknowledged through the API; the
/// quarantine API lists and releases the keys.
fn quarantine_alerts(
    step: String,
    notify: Vec<Arc<dyn weir_ops::alerts::AlertNotify>>,
) -> weir_core::quarantine::QuarantineListener {
    use weir_core::quarantine::QuarantineChange;
    use weir_ops::alerts::{Alert, AlertEvent, AlertNotice, AlertState};
    Arc::new(move |change: &QuarantineChange| {
        let now = weir_core::deadletter::now_ms();
        let (key, event, count, labels) = match change {
            QuarantineChange::Quarantined { key, failures, until_ms } => (
                key,
                AlertEvent::Fired,
                u64::from(*failures),
                [("until_ms".to_string(), until_ms.to_string())].into_iter().collect(),
            ),
            QuarantineChange::Released { key, early } => (
                key,
                AlertEvent::Resolved,
                0,
                [("released".to_string(), if *early { "early" } else { "cool_down" }.to_string())]
                    .into_iter()
                    .collect(),
            ),
        };
        let resolved = event == AlertEvent::Resolved;
        let notice = AlertNotice {
            step: step.clone(),
            event,
            alert: Alert {
                id: format!("quarantine/{key}"),
                key: key.clone(),
                rule: "quarantine".into(),
                severity: "warning".into(),
                value: None,
                score: count as f64,
                first_seen: now,
                last_seen: now,
                count,
                state: if resolved { AlertState::Resolved } else { AlertState::Firing },
                escalated: false,
                fired_at: now,
                last_anomaly_at: now,
                resolved_at: resolved.then_some(now),
                clear_count: 0,
                labels,
            },
            at: now,
        };
        for n in &notify {
            n.notify(&notice);
        }
    })
}

/// How to run a pipeline.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Worker count; default: the pipeline's, else the number of cores.
    pub workers: Option<usize>,
    /// Ignore (and delete) earlier checkpoints instead of resuming from the newest.
    pub fresh: bool,
}

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planning {
    Run,
    /// Only to check the pipeline ([`BuiltPipeline::check`]): the plan is never run.
    Check,
}

/// What planning a step gives: a stage boundary or an operator.
enum Planned {
    Exchange(Vec<String>),
    Op(Arc<dyn OperatorFactory>, SchemaRef),
}

/// The operator settings of a step, given the current key.
enum OpSpec {
    KeyBy(Vec<String>),
    Filter(FilterSpec),
    Select(SelectSpec),
    Window(WindowSpec),
    Ewma(EwmaZscoreSpec),
    Detect(weir_ops::DetectSpec),
    Alert(weir_ops::AlertSpec),
    Custom(Arc<dyn CustomStep>),
    Lookup(weir_ops::lookup::LookupSpec),
}

/// Opens a `lookup` step's table (it is read here: the step's columns are the table's).
fn lookup_spec(l: &LookupConfig, append: bool) -> Result<weir_ops::lookup::LookupSpec> {
    use weir_ops::lookup::{JoinKind, Missing};
    let kind = match l.join.as_str() {
        "inner" => JoinKind::Inner,
        "left" => JoinKind::Left,
        other => return Err(CoreError::Config(format!("join: `{other}` is not a join; use `inner` or `left`"))),
    };
    let key = l.table.key.clone().unwrap_or_else(|| l.key.clone());
    if key.len() != l.key.len() {
        return Err(CoreError::Config(format!(
            "table.key has {} column(s) and key {}: they are matched in order",
            key.len(),
            l.key.len()
        )));
    }
    let t = &l.table;
    let (table, refresh): (Arc<dyn weir_core::lookup::LookupTable>, _) = match (&t.file, &t.postgres, &t.redis) {
        (Some(f), None, None) => {
            let table = weir_connectors::lookup_file::FileTable::open(weir_connectors::lookup_file::FileTableSpec {
                path: f.path.clone().into(),
                format: f.format,
                schema: t.schema.as_ref().map(weir_formats::SchemaSpec::to_arrow),
                key,
                columns: t.columns.clone(),
            })?;
            (Arc::new(table), f.reload)
        }
        // Asked per batch; the tick only reports its cache.
        (None, Some(pg), None) => (postgres_table(pg, t, key)?, Some(Duration::from_secs(10))),
        (None, None, Some(r)) => (redis_table(r, t)?, Some(Duration::from_secs(10))),
        _ => return Err(CoreError::Config("table: give exactly one of `file`, `postgres`, `redis`".into())),
    };
    Ok(weir_ops::lookup::LookupSpec {
        table,
        key: l.key.clone(),
        kind,
        missing: match &l.missing {
            MissingConfig::Drop => Missing::Drop,
            MissingConfig::DeadLetter => Missing::DeadLetter,
            MissingConfig::SideOutput(p) => Missing::Side(Arc::new(FileSideWriter::new(p).appending(append))),
        },
        refresh,
    })
}

/// A table of Redis hashes: its columns are `schema` (typed) or `columns` (text).
fn redis_table(r: &LookupRedisConfig, t: &LookupTableConfig) -> Result<Arc<dyn weir_core::lookup::LookupTable>> {
    let schema = match (&t.schema, &t.columns) {
        (Some(s), None) => s.to_arrow(),
        (None, Some(c)) => Arc::new(arrow_schema::Schema::new(
            c.iter().map(|n| arrow_schema::Field::new(n, arrow_schema::DataType::Utf8, true)).collect::<Vec<_>>(),
        )),
        _ => {
            return Err(CoreError::Config(
                "table: a Redis table needs `columns` (read as text) or `schema` (typed), one of them".into(),
            ))
        }
    };
    // A key that is not there gets nulls.
    let schema = Arc::new(arrow_schema::Schema::new(
        schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    weir_connectors::lookup_redis::open(weir_connectors::lookup_redis::RedisTableSpec {
        url: r.url.clone(),
        prefix: r.prefix.clone(),
        schema,
        cache_size: t.cache.size.max(1),
        cache_ttl: t.cache.ttl,
    })
}

#[cfg(feature = "postgres")]
fn postgres_table(
    pg: &LookupPostgresConfig,
    t: &LookupTableConfig,
    key: Vec<String>,
) -> Result<Arc<dyn weir_core::lookup::LookupTable>> {
    if t.schema.is_some() {
        return Err(CoreError::Config("table.schema: a PostgreSQL table brings its own column types".into()));
    }
    let spec = weir_connectors::postgres::lookup::PgTableSpec {
        url: pg.url.clone(),
        table: pg.table.clone(),
        key,
        columns: t.columns.clone(),
        cache_size: t.cache.size.max(1),
        cache_ttl: t.cache.ttl,
        ca_file: pg.ca_file.clone().map(Into::into),
    };
    weir_connectors::postgres::lookup::open(spec)
}

#[cfg(not(feature = "postgres"))]
fn postgres_table(
    _: &LookupPostgresConfig,
    _: &LookupTableConfig,
    _: Vec<String>,
) -> Result<Arc<dyn weir_core::lookup::LookupTable>> {
    Err(CoreError::Config("table.postgres: this build of Weir has no PostgreSQL (the `postgres` feature)".into()))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `append`: side outputs keep what an earlier run wrote (resuming from a checkpoint).
fn step_spec(s: &StepConfig, keys: &[String], append: bool, functions: &Functions, hub: &AlertHub) -> Result<OpSpec> {
    Ok(match s {
        StepConfig::Filter(f) => OpSpec::Filter(FilterSpec { predicate: f.predicate.clone() }),
        StepConfig::Select(f) => {
            weir_core::ensure_config!(!f.columns.is_empty(), "select needs at least one column");
            OpSpec::Select(SelectSpec { columns: f.columns.clone() })
        }
        StepConfig::KeyBy(k) => {
            weir_core::ensure_config!(!k.keys.is_empty(), "key_by needs at least one key column");
            OpSpec::KeyBy(k.keys.clone())
        }
        StepConfig::Window(w) => {
            let kind = match (w.tumbling, &w.hopping, &w.session) {
                (Some(size), None, None) => WindowKind::Tumbling { size_ms: ms(size) },
                (None, Some(h), None) => WindowKind::Hopping { size_ms: ms(h.size), slide_ms: ms(h.slide) },
                (None, None, Some(s)) => WindowKind::Session { gap_ms: ms(s.gap) },
                _ => {
                    return Err(CoreError::Config(
                        "a window needs exactly one of `tumbling`, `hopping`, `session`".into(),
                    ))
                }
            };
            let aggs = w.aggregates.iter().map(|(name, f)| AggSpec::parse(name, f)).collect::<Result<Vec<_>>>()?;
            weir_core::ensure_config!(!aggs.is_empty(), "a window needs at least one aggregate");
            let late = match &w.late {
                LateConfig::Drop => LatePolicy::Drop,
                LateConfig::SideOutput(p) => LatePolicy::Side(Arc::new(FileSideWriter::new(p).appending(append))),
                LateConfig::AllowedLateness(d) => LatePolicy::Update { allowed_ms: ms(*d) },
            };
            let domain = match w.time {
                TimeDomainConfig::Event => TimeDomain::Event,
                TimeDomainConfig::Processing => TimeDomain::Processing,
            };
            OpSpec::Window(WindowSpec { keys: keys.to_vec(), kind, domain, aggs, late, state_ttl: w.state_ttl })
        }
        StepConfig::EwmaZscore(e) => OpSpec::Ewma(EwmaZscoreSpec {
            keys: keys.to_vec(),
            value: e.value.clone(),
            alpha: e.alpha,
            threshold: e.threshold,
            warmup: e.warmup,
            state_ttl: e.state_ttl,
        }),
        StepConfig::Detect(d) => OpSpec::Detect(weir_ops::DetectSpec {
            keys: keys.to_vec(),
            rules: d.rules.iter().map(rule_spec).collect::<Result<Vec<_>>>()?,
            emit_all: d.emit == DetectEmit::All,
            state_ttl: d.state_ttl,
        }),
        StepConfig::Alert(a) => OpSpec::Alert(weir_ops::AlertSpec {
            policy: weir_ops::AlertPolicy {
                resolve_after_ms: ms(a.resolve_after),
                resolve_after_count: a.resolve_after_count,
                cool_down_ms: ms(a.cool_down),
                escalate_after_ms: a.escalate_after.map(ms),
                escalate_to: a.escalate_to.clone(),
                retain_ms: ms(a.retain),
            },
            events: a.events.iter().map(|e| alert_event(e)).collect::<Result<_>>()?,
            clock: weir_ops::alerts::Clock::Wall,
            board: hub.board.clone(),
            notify: {
                let routes = a.routes.iter().map(route_spec).collect::<Result<Vec<_>>>()?;
                let mut n: Vec<Arc<dyn weir_ops::alerts::AlertNotify>> = vec![hub.live.clone()];
                if !routes.is_empty() {
                    n.push(Arc::new(weir_connectors::alerting::AlertRouter::new(
                        routes,
                        a.drain_timeout,
                        hub.dead_letters.clone(),
                    )?));
                }
                n
            },
        }),
        StepConfig::Lookup(l) => OpSpec::Lookup(lookup_spec(l, append)?),
        StepConfig::Function(f) => OpSpec::Custom(
            functions
                .get(&f.id)
                .ok_or_else(|| {
                    CoreError::Config(format!(
                        "no code is registered for function `{}` (register it from Rust with `Pipeline::register_function`, or from Python)",
                        f.id
                    ))
                })?
                .clone(),
        ),
    })
}

fn alert_event(e: &str) -> Result<weir_ops::alerts::AlertEvent> {
    weir_ops::alerts::AlertEvent::parse(e).ok_or_else(|| {
        CoreError::Config(format!(
            "alert: unknown event `{e}`; expected fired, updated, escalated, acknowledged or resolved"
        ))
    })
}

/// A route's settings as the router's.
fn route_spec(r: &RouteConfig) -> Result<weir_connectors::alerting::RouteSpec> {
    use weir_connectors::alerting::{AlertMatch, RouteSpec, RouteTarget, WebhookTarget};
    let mut targets = Vec::new();
    if let Some(w) = &r.webhook {
        targets.push(RouteTarget::Webhook(WebhookTarget {
            url: w.url.clone(),
            headers: w.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            slack: w.slack,
            timeout: w.timeout,
        }));
    }
    if let Some(x) = &r.redis {
        targets.push(RouteTarget::Redis { url: x.url.clone(), channel: x.channel.clone() });
    }
    if let Some(k) = &r.kafka {
        #[cfg(feature = "kafka")]
        targets.push(RouteTarget::Kafka {
            client: weir_connectors::kafka::KafkaClientConfig {
                brokers: k.brokers.clone(),
                properties: k.properties.clone(),
            },
            topic: k.topic.clone(),
        });
        #[cfg(not(feature = "kafka"))]
        return Err(without_kafka(&format!("route `{}` to Kafka topic `{}`", r.name, k.topic)));
    }
    if let Some(f) = &r.file {
        targets.push(RouteTarget::File(f.path.clone().into()));
    }
    if r.stdout.is_some() {
        targets.push(RouteTarget::Stdout);
    }
    weir_core::ensure_config!(
        targets.len() == 1,
        "alert route `{}` needs exactly one of `webhook`, `redis`, `kafka`, `file`, `stdout`",
        r.name
    );
    let m = &r.matcher;
    Ok(RouteSpec {
        name: r.name.clone(),
        matcher: AlertMatch {
            severity: m.severity.clone(),
            rule: m.rule.clone(),
            key: m.key.clone(),
            event: m.event.iter().map(|e| alert_event(e)).collect::<Result<_>>()?,
            labels: m.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        },
        target: targets.remove(0),
        retry: weir_core::runtime::RetryPolicy {
            max_attempts: r.retry.max_attempts,
            initial_backoff: r.retry.initial_backoff,
            max_backoff: r.retry.max_backoff,
        },
        queue: r.queue,
        when_full: match r.when_full {
            WhenFullConfig::DeadLetter => weir_connectors::alerting::WhenFull::DeadLetter,
            WhenFullConfig::Drop => weir_connectors::alerting::WhenFull::Drop,
        },
    })
}

/// A rule's settings as the operator's.
fn rule_spec(r: &RuleConfig) -> Result<weir_ops::RuleSpec> {
    use weir_ops::RuleKind;
    let mut kinds = Vec::new();
    if let Some(t) = &r.threshold {
        kinds.push(RuleKind::Threshold {
            value: t.value.clone(),
            above: t.above,
            clear_below: t.clear_below,
            below: t.below,
            clear_above: t.clear_above,
        });
    }
    if let Some(e) = &r.ewma {
        kinds.push(RuleKind::Ewma { value: e.value.clone(), alpha: e.alpha, threshold: e.threshold, warmup: e.warmup });
    }
    if let Some(m) = &r.mad {
        kinds.push(RuleKind::Mad {
            value: m.value.clone(),
            window: m.window,
            threshold: m.threshold,
            warmup: m.warmup,
        });
    }
    if let Some(c) = &r.rate_of_change {
        kinds.push(RuleKind::RateOfChange { value: c.value.clone(), max_per_second: c.max_per_second });
    }
    if let Some(s) = &r.silence {
        kinds.push(RuleKind::Silence { timeout_ms: ms(s.timeout) });
    }
    if let Some(m) = &r.model {
        kinds.push(RuleKind::Model {
            model: weir_ops::model::OnnxModel::load(&m.path, m.inputs.len())
                .map_err(|e| CoreError::Config(format!("detect rule `{}`: {e}", r.name)))?,
            inputs: m.inputs.clone(),
            threshold: m.threshold,
            max_batch: m.max_batch,
            value: m.value.clone(),
        });
    }
    weir_core::ensure_config!(
        kinds.len() == 1,
        "detect rule `{}` needs exactly one of `threshold`, `ewma`, `mad`, `rate_of_change`, `silence`, `model`",
        r.name
    );
    Ok(weir_ops::RuleSpec {
        name: r.name.clone(),
        severity: r.severity.clone(),
        kind: kinds.remove(0),
        labels: r.labels.clone(),
    })
}

/// Step ids and the pipeline's name label metrics, name checkpoint folders and appear in logs
/// and URLs: they keep to letters, digits, `_`, `-`, `.` and `:`, at most 128 of them, so that
/// none of those places needs escaping and none can be confused.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
    if let Some(bad) = name.chars().find(|c| !ok(*c)) {
        return Err(CoreError::Config(format!(
            "{what} `{}` has the character {bad:?}; use letters, digits, `_`, `-`, `.` and `:`",
            name.escape_debug()
        )));
    }
    weir_core::ensure_config!(
        name.len() <= 128,
        "{what} `{name}` is {} characters long; at most 128 are allowed",
        name.len()
    );
    Ok(())
}

impl BuiltPipeline {
    /// The pipeline's configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// The alerts of the pipeline's `alert` steps, for the HTTP API, once it runs.
    pub fn alert_board(&self) -> Arc<weir_ops::AlertBoard> {
        self.alerts.board.clone()
    }

    /// The live stream of the pipeline's alert events, for the HTTP port.
    pub fn alert_stream(&self) -> Arc<weir_connectors::alerting::LiveAlerts> {
        self.alerts.live.clone()
    }

    /// What the HTTP port serves for this pipeline while `job` (planned from it) runs.
    pub fn http_state(&self, job: &Job) -> crate::http::HttpState {
        let token = self.api_token();
        crate::http::HttpState {
            job: self.cfg.name.clone(),
            registry: job.registry(),
            alerts: self.alert_board(),
            live: self.alert_stream(),
            quarantine: job.quarantine(),
            token,
            ingest: self.ingest.clone(),
            feeds: self.feeds.clone(),
        }
    }

    /// The API's bearer token: `api.token`, else `WEIR_API_TOKEN`.
    fn api_token(&self) -> Option<String> {
        self.cfg
            .api
            .as_ref()
            .and_then(|a| a.token.clone())
            .or_else(|| std::env::var("WEIR_API_TOKEN").ok())
            .filter(|t| !t.is_empty())
    }

    /// Where the HTTP port listens: `flag` (the command's `--metrics-addr`), else the `api`
    /// section's address, else nowhere.
    pub fn http_addr(&self, flag: Option<&str>) -> Option<String> {
        flag.map(str::to_string).or_else(|| self.cfg.api.as_ref().map(|a| a.addr.clone()))
    }

    /// Plans the steps on a schema: returns, per stage, its key and operators, and the final
    /// schema.
    fn plan_steps(&self, schema: &SchemaRef, _workers: usize, append: bool) -> Result<PlannedSteps> {
        let mut stages = vec![StageSpec { key: None, ops: Vec::new() }];
        let mut notifiers: Vec<(String, Vec<Arc<dyn weir_ops::alerts::AlertNotify>>)> = Vec::new();
        let mut schema = schema.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut keyed = false;
        for s in &self.cfg.steps {
            let id = StepId::new(s.id());
            let planned = (|| -> Result<Planned> {
                let spec = step_spec(s, &keys, append, &self.functions, &self.alerts)?;
                Ok(match spec {
                    OpSpec::KeyBy(k) => {
                        for key in &k {
                            weir_ops::field_by_path(&schema, key)?;
                        }
                        Planned::Exchange(k)
                    }
                    OpSpec::Filter(f) => {
                        let (f, o) = f.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Select(f) => {
                        let (f, o) = f.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Window(w) => {
                        let (f, o) = w.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Ewma(e) => {
                        weir_core::ensure_config!(
                            !e.keys.is_empty(),
                            "ewma_zscore is keyed: put a `key_by` step before it"
                        );
                        let (f, o) = e.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Detect(d) => {
                        let (f, o) = d.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Alert(a) => {
                        notifiers.push((s.id().to_string(), a.notify.clone()));
                        let (f, o) = a.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Custom(c) => {
                        let (f, o) = c.plan(&schema, &keys)?;
                        Planned::Op(f, o)
                    }
                    OpSpec::Lookup(l) => {
                        let (f, o) = l.plan(&schema)?;
                        Planned::Op(f, o)
                    }
                })
            })()
            .map_err(|e| e.in_step(&id))?;
            match planned {
                Planned::Exchange(k) => {
                    keys = k.clone();
                    keyed = true;
                    stages.push(StageSpec { key: Some(k), ops: Vec::new() });
                }
                Planned::Op(f, out) => {
                    // A keyless window is global: route everything to one worker first.
                    if matches!(s, StepConfig::Window(_)) && !keyed {
                        stages.push(StageSpec { key: Some(Vec::new()), ops: Vec::new() });
                        keyed = true;
                    }
                    if matches!(s, StepConfig::Window(_)) {
                        // Window output is keyed by the leaf names of its keys.
                        keys = keys.iter().map(|k| weir_ops::leaf_name(k).to_string()).collect();
                    }
                    let stage = stages.last_mut().ok_or_else(|| CoreError::Internal("no stage".into()))?;
                    stage.ops.push((id, f));
                    schema = out;
                }
            }
        }
        Ok((stages, schema, notifiers))
    }

    /// Resolves the source schema (inferring it when needed, which reads the input), compiles
    /// every step and builds the job.
    ///
    /// # Errors
    /// Missing input, schema problems, unknown columns, bad expressions.
    pub fn plan(&self, opts: &RunOptions) -> Result<JobSpec> {
        Ok(self.plan_with_schema(opts)?.0)
    }

    /// [`BuiltPipeline::plan`], also returning the schema of the rows that reach the sink.
    ///
    /// # Errors
    /// As [`BuiltPipeline::plan`].
    pub fn plan_with_schema(&self, opts: &RunOptions) -> Result<(JobSpec, SchemaRef)> {
        self.plan_for(opts, Planning::Run)
    }

    /// Checks the pipeline as planning it for a run does (schemas, columns, expressions,
    /// settings), without needing its input: a file source with a declared schema does not
    /// look for its files, so a pipeline can be checked where its data is not (`weir
    /// validate`, `Pipeline.validate()`). Returns the schema of the rows that reach the sink.
    ///
    /// # Errors
    /// As [`BuiltPipeline::plan`], but for missing input files when the schema is declared.
    pub fn check(&self, opts: &RunOptions) -> Result<SchemaRef> {
        Ok(self.plan_for(opts, Planning::Check)?.1)
    }

    fn plan_for(&self, opts: &RunOptions, planning: Planning) -> Result<(JobSpec, SchemaRef)> {
        if let Some(at) =
            self.cfg.steps.iter().position(|s| matches!(s, StepConfig::KeyBy(k) if k.repartition.is_some()))
        {
            return self.plan_repartitioned(opts, at, planning);
        }
        let c = &self.cfg;
        let workers = opts.workers.or(c.workers).unwrap_or_else(default_workers).max(1);
        let src = &c.source;
        let source_step = StepId::new(&src.id);
        let event_time = src.event_time.as_ref().map(EventTimeConfig::spec);
        // Kafka in and exactly once out, on one cluster: the source's positions are committed to
        // its group inside the output's transactions (a transaction cannot commit offsets of
        // another cluster).
        #[cfg(feature = "kafka")]
        let transactional_offsets = match (&src.connector, &c.sink.connector) {
            (SourceConnector::Kafka(s), SinkConnector::Kafka(k))
                if k.mode == "exactly_once" && s.brokers == k.brokers && c.checkpoints.is_some() =>
            {
                Some(Arc::new(weir_connectors::kafka::TransactionalOffsets::default()))
            }
            _ => None,
        };
        let keep_order = c.steps.iter().any(|s| match s {
            StepConfig::EwmaZscore(_) | StepConfig::Detect(_) => true,
            StepConfig::Function(f) => self.functions.get(&f.id).is_some_and(|c| c.order_sensitive()),
            _ => false,
        });
        let (source, schema) = src.connector.build(&crate::connector::SourceCx {
            src,
            step: source_step.clone(),
            pipeline: &c.name,
            event_time: event_time.clone(),
            checking: matches!(planning, Planning::Check),
            keep_order,
            checkpoints: c.checkpoints.as_ref(),
            code: self.code.source.clone(),
            until: self.link.done.clone(),
            api_token: self.api_token(),
            ingest: &self.ingest,
            #[cfg(feature = "kafka")]
            transactional_offsets: transactional_offsets.clone(),
        })?;
        if let Some(et) = &event_time {
            weir_ops::field_by_path(&schema, &et.column)
                .map_err(|e| CoreError::Config(format!("event_time: {e}")).in_step(&source_step))?;
        }
        let (stages, out_schema, notifiers) =
            self.plan_steps(&schema, workers, c.checkpoints.is_some() && !opts.fresh)?;
        let sink_step = StepId::new(&c.sink.id);
        // A run resuming from checkpoints keeps what earlier runs wrote to its side files.
        let resuming = c.checkpoints.is_some() && !opts.fresh;
        let sink_schema = out_schema.clone();
        let sink = c.sink.connector.build(&crate::connector::SinkCx {
            sink: &c.sink,
            step: sink_step.clone(),
            pipeline: &c.name,
            schema: out_schema,
            checkpoints: c.checkpoints.as_ref(),
            code: self.code.sink.clone(),
            feeds: &self.feeds,
            #[cfg(feature = "kafka")]
            source_offsets: transactional_offsets.clone(),
            #[cfg(feature = "kafka")]
            create_topic: self.link.topic.clone(),
        })?;
        let entries = |path: &str, kafka: &Option<KafkaTopicSettings>, what: &str| -> Result<Arc<dyn DeadLetterSink>> {
            Ok(match kafka {
                None => Arc::new(FileDeadLetters::new(path).appending(resuming)),
                #[cfg(feature = "kafka")]
                Some(k) => Arc::new(weir_connectors::kafka::KafkaDeadLetters::new(
                    &crate::connector::kafka::client(&k.brokers, &k.properties),
                    &k.topic,
                    what,
                )?),
                #[cfg(not(feature = "kafka"))]
                Some(k) => return Err(without_kafka(&format!("{what} to Kafka topic `{}`", k.topic))),
            })
        };
        let mut dead = entries(&c.dead_letters.path, &c.dead_letters.kafka, "dead letters")?;
        *self.alerts.dead_letters.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dead.clone());
        let quarantine = match self.quarantine(&schema)? {
            None => None,
            Some(spec) => {
                let output = entries(&c.quarantine.output, &c.quarantine.kafka, "quarantine")?;
                let q = Arc::new(Quarantine::new(spec, output));
                if let Some((step, notify)) = notifiers.first().cloned() {
                    q.listen(quarantine_alerts(step, notify));
                }
                dead = Arc::new(QuarantiningDeadLetters { inner: dead.clone(), quarantine: q.clone() });
                Some(q)
            }
        };
        let spec = JobSpec {
            upstream: None,
            counts_input: self.link.done.is_none(),
            counts_output: !self.link.writes_topic(),
            name: c.name.clone(),
            workers,
            source_step,
            source,
            stages,
            sink_step,
            sink,
            dead_letters: dead,
            watermark: WatermarkSpec {
                bound: src.watermark.max_out_of_orderness,
                idle_timeout: src.watermark.idle_timeout,
            },
            channel_capacity: c.runtime.channel_capacity,
            latency_column: c.sink.latency_column.clone(),
            quarantine,
            shedding: self.shedding(&schema)?,
            sink_retry: weir_core::runtime::RetryPolicy {
                max_attempts: c.sink.retry.max_attempts,
                initial_backoff: c.sink.retry.initial_backoff,
                max_backoff: c.sink.retry.max_backoff,
            },
            checkpoint: match &c.checkpoints {
                None => None,
                Some(k) => {
                    weir_core::ensure_config!(k.keep >= 1, "checkpoints.keep must be at least 1");
                    let mut store = weir_core::store::CheckpointStore::open_with(&k.dir, &c.name, &k.options)
                        .map_err(|e| CoreError::Config(format!("checkpoints.dir: {e}")))?;
                    if let Some(m) = &k.member {
                        weir_core::ensure_config!(
                            src.connector.name() == "kafka",
                            "checkpoints.member: state follows partitions of a Kafka source between processes; source `{}` is not Kafka",
                            src.id
                        );
                        store = store.member(m)?;
                    }
                    Some(weir_core::runtime::CheckpointSpec {
                        store,
                        interval: (!k.interval.is_zero()).then_some(k.interval),
                        keep: k.keep,
                        fresh: opts.fresh,
                    })
                }
            },
        };
        Ok((spec, sink_schema))
    }

    /// Plans a pipeline whose `key_by` at step `at` goes through a repartition topic: the
    /// steps before it become a job writing the topic (keyed by the first key, so Kafka's
    /// partitioner puts each key in one partition), run alongside the job that reads it and
    /// does the rest.
    #[cfg(not(feature = "kafka"))]
    fn plan_repartitioned(&self, _: &RunOptions, _: usize, _: Planning) -> Result<(JobSpec, SchemaRef)> {
        Err(without_kafka("`repartition` through a Kafka topic"))
    }

    #[cfg(feature = "kafka")]
    fn plan_repartitioned(&self, opts: &RunOptions, at: usize, planning: Planning) -> Result<(JobSpec, SchemaRef)> {
        let c = &self.cfg;
        let StepConfig::KeyBy(k) = &c.steps[at] else { weir_core::bail_internal!("repartition without key_by") };
        let step = StepId::new(&k.id);
        let r = k.repartition.clone().unwrap_or_default();
        let SourceConnector::Kafka(src) = &c.source.connector else {
            return Err(CoreError::Config(
                "`repartition` goes through a Kafka topic on the source's brokers: it needs a Kafka source".into(),
            )
            .in_step(&step));
        };
        weir_core::ensure_config!(
            !c.steps[at + 1..].iter().any(|s| matches!(s, StepConfig::KeyBy(k) if k.repartition.is_some())),
            "only one `key_by` of a pipeline can `repartition`"
        );
        let Some(first_key) = k.keys.first() else {
            return Err(CoreError::Config("`repartition` needs a key".into()).in_step(&step));
        };
        let topic = r.topic.clone().unwrap_or_else(|| format!("{}.{}", c.name, k.id));
        let member = c.checkpoints.as_ref().and_then(|k| k.member.clone());
        fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T> {
            serde_json::from_value(v).map_err(|e| CoreError::Internal(format!("repartition {what}: {e}")))
        }
        let group = src.group_id.clone().unwrap_or_else(|| format!("weir-{}", c.name));
        // The writing half: the source and the steps before the key_by, into the topic.
        let mut up = c.clone();
        up.name = format!("{}.{}", c.name, k.id);
        if let SourceConnector::Kafka(s) = &mut up.source.connector {
            // The source's group stays the pipeline's (its name is the half's).
            s.group_id = Some(group.clone());
        }
        up.steps = c.steps[..at].to_vec();
        up.api = None;
        let txn_id = (r.mode == "exactly_once").then(|| match &member {
            Some(m) => format!("{}.{}.{m}", c.name, k.id),
            None => format!("{}.{}", c.name, k.id),
        });
        up.sink = SinkConfig {
            id: format!("{}.out", k.id),
            latency_column: None,
            connector: SinkConnector::Kafka(json(
                serde_json::json!({
                    "brokers": src.brokers, "topic": topic, "format": "json", "key": first_key,
                    "mode": r.mode, "transactional_id": txn_id, "properties": src.properties,
                }),
                "sink",
            )?),
            retry: c.sink.retry.clone(),
        };
        let like = (src.topics.len() == 1 && !src.topics[0].starts_with('^')).then(|| src.topics[0].clone());
        let writing = self.half(
            up,
            Link { done: None, topic: Some(weir_connectors::kafka::KafkaTopicSpec { partitions: r.partitions, like }) },
        );
        let (up_spec, link_schema) = writing.plan_for(opts, planning)?;
        if let Some(e) = &c.source.event_time {
            weir_ops::field_by_path(&link_schema, &e.column).map_err(|_| {
                CoreError::Config(format!(
                    "`repartition`: the event-time column `{}` must reach the key_by (a step before it drops it)",
                    e.column
                ))
                .in_step(&step)
            })?;
        }
        // The reading half: the topic, then the key_by and everything after it.
        let mut down = c.clone();
        down.source = SourceConfig {
            id: format!("{}.in", k.id),
            connector: SourceConnector::Kafka(json(
                serde_json::json!({
                    "brokers": src.brokers, "topics": [topic], "group_id": format!("{group}.{}", k.id),
                    "start": "earliest", "format": "json", "properties": src.properties,
                }),
                "source",
            )?),
            schema: Some(weir_formats::SchemaSpec::from_arrow(&link_schema).map_err(|e| {
                CoreError::Config(format!("`repartition`: the rows reaching it cannot go through JSON: {e}"))
                    .in_step(&step)
            })?),
            ..c.source.clone()
        };
        let mut steps = c.steps[at..].to_vec();
        if let Some(StepConfig::KeyBy(k)) = steps.first_mut() {
            k.repartition = None;
        }
        down.steps = steps;
        // Shedding and quarantine act where the input enters, in the writing half.
        down.load_shedding = None;
        down.quarantine = QuarantineConfig::default();
        if down.dead_letters.kafka.is_none() {
            // Each half has its own dead-letter file: two writers must not share one.
            down.dead_letters.path = format!("{}.{}", down.dead_letters.path, k.id);
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reading = self.half(down, Link { done: Some(done.clone()), topic: None });
        let (mut spec, schema) = reading.plan_for(opts, planning)?;
        spec.upstream = Some(weir_core::runtime::Upstream { spec: Box::new(up_spec), done });
        Ok((spec, schema))
    }

    /// One half of a repartitioned pipeline: `cfg`, with this pipeline's functions, code
    /// ends and alert books.
    fn half(&self, cfg: PipelineConfig, link: Link) -> BuiltPipeline {
        BuiltPipeline {
            cfg,
            functions: self.functions.clone(),
            code: self.code.clone(),
            alerts: self.alerts.clone(),
            link,
            ingest: self.ingest.clone(),
            feeds: self.feeds.clone(),
        }
    }

    /// The quarantine settings, if quarantine is on and its key columns come from the source.
    /// Keys named in the config must exist; the default (the first `key_by`) applies only when
    /// its columns are source columns.
    fn quarantine(&self, schema: &SchemaRef) -> Result<Option<QuarantineSpec>> {
        let q = &self.cfg.quarantine;
        if !q.enabled {
            return Ok(None);
        }
        let keys = match &q.keys {
            Some(k) => {
                for key in k {
                    weir_ops::field_by_path(schema, key)
                        .map_err(|e| CoreError::Config(format!("quarantine.keys: {e}")))?;
                }
                k.clone()
            }
            None => {
                let first = self.cfg.steps.iter().find_map(|s| match s {
                    StepConfig::KeyBy(k) => Some(k.keys.clone()),
                    _ => None,
                });
                match first {
                    Some(k) if k.iter().all(|key| weir_ops::field_by_path(schema, key).is_ok()) => k,
                    _ => return Ok(None),
                }
            }
        };
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(QuarantineSpec { keys, max_failures: q.max_dead_letters, window: q.within, cool_down: q.cool_down }))
    }

    /// The load-shedding settings, with the predicate compiled against the source schema.
    fn shedding(&self, schema: &SchemaRef) -> Result<Option<(OverloadSpec, Arc<dyn ShedPredicate>)>> {
        let Some(l) = &self.cfg.load_shedding else { return Ok(None) };
        weir_core::ensure_config!(
            l.max_lag.is_some() || l.max_queue_fill.is_some(),
            "load_shedding needs `max_lag` or `max_queue_fill` to say when the job is overloaded"
        );
        let pred = weir_expr::Predicate::compile(&l.drop_where, schema)
            .map_err(|e| CoreError::Config(format!("load_shedding.drop_where: {e}")))?;
        let spec = OverloadSpec {
            max_lag: l.max_lag,
            max_queue_fill: l.max_queue_fill,
            sustained: l.sustained,
            pause: l.pause,
        };
        Ok(Some((spec, Arc::new(ExprShed(pred)))))
    }

    /// Plans and runs the pipeline to the end of its input.
    ///
    /// # Errors
    /// Planning errors, or the first runtime failure.
    pub async fn run(&self, opts: &RunOptions) -> Result<RunSummary> {
        Job::new(self.plan(opts)?)?.run().await
    }
}

/// A load-shedding predicate in SQL.
#[derive(Debug)]
struct ExprShed(weir_expr::Predicate);

impl ShedPredicate for ExprShed {
    fn evaluate(&self, batch: &weir_core::Batch) -> Result<arrow_array::BooleanArray> {
        self.0.evaluate(&batch.rows).map_err(CoreError::user)
    }
}

/// The number of cores, the default worker count.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Infers a schema from the first records of the first file (JSON only).
pub(crate) fn infer_from_file(path: &str, format: &FormatSpec) -> Result<SchemaRef> {
    weir_core::ensure_config!(
        matches!(format, FormatSpec::Json),
        "a {} source needs a declared `schema`; only JSON schemas can be inferred",
        match format {
            FormatSpec::Csv(_) => "csv",
            _ => "msgpack",
        }
    );
    let files = weir_connectors::file::expand_paths(path)?;
    let first = &files[0];
    let mut buf = vec![0u8; 1 << 20];
    let n = {
        use std::io::Read as _;
        let mut f = std::fs::File::open(first)
            .map_err(|e| CoreError::io(format!("cannot open input file `{}`", first.display()), e))?;
        let mut n = 0;
        loop {
            let k = f.read(&mut buf[n..]).map_err(|e| CoreError::io(format!("reading `{}`", first.display()), e))?;
            n += k;
            if k == 0 || n == buf.len() {
                break n;
            }
        }
    };
    let mut ranges = Vec::new();
    split_records(format, &buf[..n], n < buf.len(), &mut ranges).map_err(CoreError::user)?;
    let samples: Vec<&[u8]> = ranges.iter().take(1000).map(|r| &buf[r.clone()]).collect();
    let spec = infer_json_schema(&samples).map_err(|e| {
        CoreError::Config(format!("cannot infer a schema from `{}`: {e}; declare one with `schema:`", first.display()))
    })?;
    tracing::info!(file = %first.display(), fields = spec.fields.len(), "Inferred the input schema from the first records.");
    Ok(spec.to_arrow())
}
