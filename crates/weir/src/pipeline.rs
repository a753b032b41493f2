//! The pipeline builder: stable step ids, `build()` validates without I/O, `plan()` resolves
//! schemas and compiles expressions, `run()` executes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use weir_connectors::{FileDeadLetters, FileSideWriter};
use weir_core::graph::{Edge, JobGraph, Node, NodeKind, Partitioning};
use weir_core::quarantine::{Quarantine, QuarantineSpec, QuarantiningDeadLetters};
use weir_core::runtime::{Job, RunSummary, WatermarkSpec};
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
    /// A builder call that cannot apply (`input` after a union), reported by `build()`.
    misuse: Option<String>,
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
                sources: vec![placeholder],
                steps: Vec::new(),
                sink,
                dead_letters: DeadLetterConfig::default(),
                runtime: RuntimeConfig::default(),
                quarantine: QuarantineConfig::default(),
                load_shedding: None,
                checkpoints: None,
                api: None,
                log: None,
                traces: None,
            },
            functions: Functions::new(),
            code: CodeEnds::default(),
            source_set: false,
            sink_set: false,
            misuse: None,
        }
    }

    /// A pipeline from its configuration (the YAML form).
    pub fn from_config(cfg: PipelineConfig) -> Self {
        Self {
            cfg,
            functions: Functions::new(),
            code: CodeEnds::default(),
            source_set: true,
            sink_set: true,
            misuse: None,
        }
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
        match self.cfg.sources.iter_mut().find(|s| s.id == id && self.source_set) {
            // A source of that id (one of several) becomes the code's; its other settings stay.
            Some(s) => s.connector = SourceConnector::Code(CodeSettings {}),
            None => {
                self.source(SourceConfig::new(id, SourceConnector::Code(CodeSettings {})));
            }
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
        self.step(StepConfig::Function(FunctionConfig { id: id.into(), input: None }))
    }

    /// Sets the source (the only one; see [`Pipeline::add_source`] for several).
    pub fn source(&mut self, cfg: SourceConfig) -> &mut Self {
        self.cfg.sources = vec![cfg];
        self.source_set = true;
        self
    }

    /// Adds a source beside the ones already set; steps name what they read with `input`.
    pub fn add_source(&mut self, cfg: SourceConfig) -> &mut Self {
        if self.source_set {
            self.cfg.sources.push(cfg);
        } else {
            self.cfg.sources = vec![cfg];
        }
        self.source_set = true;
        self
    }

    /// Makes the step added last read `id` (a source or an earlier step) instead of the step
    /// before it: `p.filter("hot", "temp > 30").input("plant-a")`.
    pub fn input(&mut self, id: &str) -> &mut Self {
        match self.cfg.steps.last_mut().map(StepConfig::input_mut) {
            Some(Some(slot)) => *slot = Some(id.into()),
            Some(None) => {
                self.misuse =
                    Some(format!("`input(\"{id}\")` after a union or join: those name their inputs themselves"))
            }
            None => self.misuse = Some(format!("`input(\"{id}\")` before any step")),
        }
        self
    }

    /// Every row of several streams with the same columns, as one stream.
    pub fn union<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, id: &str, inputs: I) -> &mut Self {
        self.step(StepConfig::Union(UnionConfig {
            id: id.into(),
            inputs: inputs.into_iter().map(Into::into).collect(),
        }))
    }

    /// Pairs rows of two streams with the same key and close times (see [`JoinConfig`]; set
    /// `between`).
    pub fn interval_join(&mut self, cfg: JoinConfig) -> &mut Self {
        self.step(StepConfig::IntervalJoin(cfg))
    }

    /// Pairs rows of two streams with the same key in the same window (see [`JoinConfig`];
    /// set one of `tumbling`, `hopping`, `session`).
    pub fn window_join(&mut self, cfg: JoinConfig) -> &mut Self {
        self.step(StepConfig::WindowJoin(cfg))
    }

    /// Joins each row of `left` with its key's version in the changelog `right` at its time
    /// (see [`JoinConfig`]).
    pub fn temporal_join(&mut self, cfg: JoinConfig) -> &mut Self {
        self.step(StepConfig::TemporalJoin(cfg))
    }

    /// Keeps the current value per key and emits its changes (see [`TableConfig`]).
    pub fn table(&mut self, cfg: TableConfig) -> &mut Self {
        self.step(StepConfig::Table(cfg))
    }

    /// Adds a sink of its own that writes what step `input` makes (several sinks, each
    /// reading the step it names).
    pub fn add_sink(&mut self, mut cfg: SinkConfig, input: &str) -> &mut Self {
        cfg.input = Some(input.into());
        let mut sinks = match std::mem::replace(&mut self.cfg.sink.connector, SinkConnector::FanOut(Default::default()))
        {
            SinkConnector::FanOut(f) => f.0,
            _ if !self.sink_set => Vec::new(),
            other => {
                let mut first = self.cfg.sink.clone();
                first.connector = other;
                vec![first]
            }
        };
        sinks.push(cfg);
        self.cfg.sink =
            SinkConfig::new("sinks", SinkConnector::FanOut(crate::connector::fan_out::FanOutSettings(sinks)));
        self.sink_set = true;
        self
    }

    /// Adds a step.
    pub fn step(&mut self, step: StepConfig) -> &mut Self {
        self.cfg.steps.push(step);
        self
    }

    /// Keeps rows matching a SQL predicate.
    pub fn filter(&mut self, id: &str, predicate: &str) -> &mut Self {
        self.step(StepConfig::Filter(FilterConfig { id: id.into(), predicate: predicate.into(), input: None }))
    }

    /// Chooses, renames and computes columns.
    pub fn select<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, id: &str, columns: I) -> &mut Self {
        self.step(StepConfig::Select(SelectConfig {
            id: id.into(),
            input: None,
            columns: columns.into_iter().map(Into::into).collect(),
        }))
    }

    /// Partitions by key columns for the keyed steps that follow.
    pub fn key_by<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, id: &str, keys: I) -> &mut Self {
        self.step(StepConfig::KeyBy(KeyByConfig {
            id: id.into(),
            input: None,
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
        if let Some(m) = &self.misuse {
            return Err(CoreError::Config(m.clone()));
        }
        weir_core::ensure_config!(self.sink_set, "pipeline `{}` has no sink", self.cfg.name);
        let c = &self.cfg;
        let mut ids = HashSet::new();
        let sink_ids = c.sink_nodes().into_iter().map(|s| s.id.as_str());
        let all_ids = c.sources.iter().map(|s| s.id.as_str()).chain(c.steps.iter().map(StepConfig::id)).chain(sink_ids);
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
        for src in &c.sources {
            weir_core::ensure_config!(src.batch_size > 0, "source `{}`: batch_size must be positive", src.id);
        }
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
        let code_sources: Vec<&str> = c
            .sources
            .iter()
            .filter(|s| matches!(s.connector, SourceConnector::Code(_)))
            .map(|s| s.id.as_str())
            .collect();
        weir_core::ensure_config!(
            code_sources.is_empty() || self.code.source.is_some(),
            "source `{}` is `code`, but no source was registered from code",
            code_sources.join("`, `")
        );
        weir_core::ensure_config!(
            code_sources.len() <= 1,
            "sources `{}` are `code`: a pipeline takes one source written in code",
            code_sources.join("`, `")
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
            tables: weir_ops::Tables::default(),
            live: Arc::default(),
            recent: Arc::default(),
        };
        // With every source's schema known (declared, or given by code), the steps are checked
        // now; otherwise when the pipeline is planned.
        let mut schemas = Vec::new();
        for src in &c.sources {
            let schema = match (&src.schema, &src.connector) {
                (Some(schema), _) => {
                    src.connector.row_schema(schema.to_arrow()).map_err(|e| e.in_step(&StepId::new(&src.id)))?
                }
                (None, SourceConnector::Code(_)) => match &self.code.source {
                    Some(f) => f.schema(),
                    None => break,
                },
                (None, _) => break,
            };
            schemas.push((src.id.clone(), schema));
        }
        if schemas.len() == c.sources.len() {
            built.plan_graph(&schemas, false)?;
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
    /// The `table` steps' state while the job runs, for queries.
    tables: weir_ops::Tables,
    /// The `detect` steps' rules as they run, by step id, for live reconfiguration.
    live: Arc<std::sync::Mutex<BTreeMap<String, weir_ops::rules::LiveRules>>>,
    /// The last dead letters of the planned job, for the console.
    recent: Arc<weir_core::deadletter::RecentDeadLetters>,
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
    /// Each `alert` step's routes as planned last (the running job's), for live changes.
    pub(crate) routers: Arc<std::sync::Mutex<BTreeMap<String, Arc<weir_connectors::alerting::AlertRouter>>>>,
}

/// Rows as the planner sees them at a step or source: which node makes them, their schema,
/// and how they are spread over workers.
#[derive(Debug, Clone)]
struct Stream {
    /// The node producing the rows (a `key_by` has none of its own: its input's).
    producer: String,
    schema: SchemaRef,
    /// The key columns of the last `key_by` (keyed steps key their state by them).
    keys: Vec<String>,
    /// Whether rows are spread by `keys` (or all on worker 0 after a keyless window).
    keyed: bool,
    /// How a step reading these rows gets them: by key right after a `key_by`, else from its
    /// own worker.
    part: Partitioning,
}

/// A step planned as a node: its operator and its inputs (producer node, partitioning).
#[derive(Debug)]
struct PlannedStep {
    id: StepId,
    op: Arc<dyn OperatorFactory>,
    inputs: Vec<(String, Partitioning)>,
}

/// The planned steps, the sinks with the rows each reads, and each `alert` step's notifiers.
struct PlannedGraph {
    steps: Vec<PlannedStep>,
    /// The rows of every source and step.
    streams: BTreeMap<String, Stream>,
    sinks: Vec<(SinkConfig, Stream)>,
    notifiers: Vec<(String, Vec<Arc<dyn weir_ops::alerts::AlertNotify>>)>,
}

/// What a step that names no input reads: the step before it, or the only source.
fn default_input(prev: Option<&str>, sources: &[(String, SchemaRef)], step: &str) -> Result<String> {
    match (prev, sources) {
        (Some(p), _) => Ok(p.to_string()),
        (None, [(only, _)]) => Ok(only.clone()),
        (None, _) => Err(CoreError::Config(format!(
            "`{step}` does not say what it reads, and the pipeline has {} sources: name one with `input`",
            sources.len()
        ))),
    }
}

/// The error for an input that names nothing before it, with the closest known name.
fn unknown_input(name: &str, streams: &BTreeMap<String, Stream>) -> CoreError {
    let known: Vec<&str> = streams.keys().map(String::as_str).collect();
    let hint = known
        .iter()
        .map(|k| (strsim_distance(name, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    CoreError::Config(format!(
        "input `{name}` is not a source or a step before this one{hint}; known: {} (steps read sources and earlier steps, so a pipeline has no cycles)",
        known.join(", ")
    ))
}

/// Edit distance between two short names, for suggestions.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The one input of a step that reads one stream.
fn single(inputs: &[Stream]) -> Result<&Stream> {
    match inputs {
        [one] => Ok(one),
        _ => Err(CoreError::Config(format!("this step reads one input, not {}", inputs.len()))),
    }
}

/// Checks that two streams of a union have the same columns, naming the first difference.
fn same_columns(a: &str, sa: &SchemaRef, b: &str, sb: &SchemaRef) -> Result<()> {
    let (fa, fb) = (sa.fields(), sb.fields());
    for i in 0..fa.len().max(fb.len()) {
        let describe = |f: Option<&arrow_schema::FieldRef>| match f {
            Some(f) => format!("`{}` {}{}", f.name(), f.data_type(), if f.is_nullable() { "" } else { " not null" }),
            None => "nothing".into(),
        };
        let (x, y) = (fa.get(i), fb.get(i));
        let same = match (x, y) {
            (Some(x), Some(y)) => {
                x.name() == y.name() && x.data_type() == y.data_type() && x.is_nullable() == y.is_nullable()
            }
            _ => false,
        };
        if !same {
            return Err(CoreError::Config(format!(
                "a union's inputs need the same columns in the same order: column {} is {} in `{a}` but {} in `{b}`",
                i + 1,
                describe(x),
                describe(y)
            )));
        }
    }
    Ok(())
}

/// A signed duration: `50ms`, `-2s`.
fn signed_ms(key: &str, v: &str) -> Result<i64> {
    let (neg, body) = match v.trim().strip_prefix('-') {
        Some(rest) => (true, rest.trim()),
        None => (false, v.trim()),
    };
    let d = humantime::parse_duration(body)
        .map_err(|e| CoreError::Config(format!("{key}: `{v}` is not a duration like `-50ms` or `2s`: {e}")))?;
    let ms = i64::try_from(d.as_millis()).map_err(|_| CoreError::Config(format!("{key}: `{v}` is too long")))?;
    Ok(if neg { -ms } else { ms })
}

/// A planned join of two streams: the operator, its output schema, and each side's keys.
struct PlannedJoin {
    op: Arc<dyn OperatorFactory>,
    schema: SchemaRef,
    keys: [Vec<String>; 2],
    names: [String; 2],
}

/// A join step's settings on its two input streams. `step` is the kind as written
/// (`interval_join`...), for errors about settings that belong to another kind.
fn join_spec(step: &StepConfig, inputs: &[Stream]) -> Result<PlannedJoin> {
    let (kind_name, j) = match step {
        StepConfig::IntervalJoin(j) => ("interval_join", j),
        StepConfig::WindowJoin(j) => ("window_join", j),
        StepConfig::TemporalJoin(j) => ("temporal_join", j),
        _ => weir_core::bail_internal!("{} is not a join", step.id()),
    };
    let [l, r] = inputs else { weir_core::bail_internal!("a join with {} inputs", inputs.len()) };
    let names = j.names.clone().unwrap_or_else(|| [j.left.clone(), j.right.clone()]);
    weir_core::ensure_config!(names[0] != names[1], "as: the two sides need different names, not `{}` twice", names[0]);
    let keys = [j.on.clone(), j.right_on.clone().unwrap_or_else(|| j.on.clone())];
    let schemas = [l.schema.clone(), r.schema.clone()];
    let kind = match j.kind {
        JoinKindConfig::Inner => weir_ops::JoinKind::Inner,
        JoinKindConfig::Left => weir_ops::JoinKind::Left,
        JoinKindConfig::Right => weir_ops::JoinKind::Right,
        JoinKindConfig::Full => weir_ops::JoinKind::Full,
    };
    // Each kind's own settings; another kind's are a mistake worth naming.
    let windowed = j.tumbling.is_some() || j.hopping.is_some() || j.session.is_some();
    let foreign = [
        ("between", j.between.is_some(), "interval_join"),
        ("tumbling/hopping/session", windowed, "window_join"),
        ("state_ttl", j.state_ttl.is_some(), "temporal_join"),
    ];
    for (key, set, owner) in foreign {
        weir_core::ensure_config!(!set || owner == kind_name, "`{key}` is a setting of {owner}, not of {kind_name}");
    }
    let (op, schema): (Arc<dyn OperatorFactory>, SchemaRef) = match step {
        StepConfig::IntervalJoin(_) => {
            let between = j.between.as_ref().ok_or_else(|| {
                CoreError::Config("interval_join needs `between: [from, to]`, e.g. `[-50ms, 50ms]`".into())
            })?;
            let spec = weir_ops::IntervalJoinSpec {
                schemas,
                keys: keys.clone(),
                names: names.clone(),
                lo: signed_ms("between", &between[0])?,
                hi: signed_ms("between", &between[1])?,
                kind,
            };
            let schema = spec.output_schema()?;
            (Arc::new(spec), schema)
        }
        StepConfig::WindowJoin(_) => {
            let window = window_kind(j.tumbling, j.hopping.as_ref(), j.session.as_ref(), "a window_join")?;
            let spec = weir_ops::WindowJoinSpec { schemas, keys: keys.clone(), names: names.clone(), window, kind };
            let schema = spec.output_schema()?;
            (Arc::new(spec), schema)
        }
        _ => {
            let spec = weir_ops::TemporalJoinSpec {
                schemas,
                keys: keys.clone(),
                names: names.clone(),
                kind,
                state_ttl_ms: j.state_ttl.map(ms),
            };
            let schema = spec.output_schema()?;
            (Arc::new(spec), schema)
        }
    };
    Ok(PlannedJoin { op, schema, keys, names })
}

/// The window shape of `tumbling`, `hopping` and `session` settings, exactly one set.
fn window_kind(
    tumbling: Option<Duration>,
    hopping: Option<&HoppingConfig>,
    session: Option<&SessionConfig>,
    what: &str,
) -> Result<WindowKind> {
    Ok(match (tumbling, hopping, session) {
        (Some(size), None, None) => WindowKind::Tumbling { size_ms: ms(size) },
        (None, Some(h), None) => WindowKind::Hopping { size_ms: ms(h.size), slide_ms: ms(h.slide) },
        (None, None, Some(s)) => WindowKind::Session { gap_ms: ms(s.gap) },
        _ => return Err(CoreError::Config(format!("{what} needs exactly one of `tumbling`, `hopping`, `session`"))),
    })
}

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

/// The operator settings of a step, given the current key.
enum OpSpec {
    /// Planned on its input by the graph planner.
    KeyBy,
    Filter(FilterSpec),
    Select(SelectSpec),
    Window(WindowSpec),
    Ewma(EwmaZscoreSpec),
    Detect(weir_ops::DetectSpec),
    Alert(weir_ops::AlertSpec),
    Custom(Arc<dyn CustomStep>),
    Lookup(weir_ops::lookup::LookupSpec),
    /// A step with several inputs (union, join), planned on its inputs' schemas.
    Multi,
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
            OpSpec::KeyBy
        }
        StepConfig::Window(w) => {
            let kind = window_kind(w.tumbling, w.hopping.as_ref(), w.session.as_ref(), "a window")?;
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
            live: None,
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
                // A router even without routes: a reload may add some.
                let router = Arc::new(weir_connectors::alerting::AlertRouter::new(
                    routes,
                    a.drain_timeout,
                    hub.dead_letters.clone(),
                )?);
                hub.routers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(a.id.clone(), router.clone());
                vec![hub.live.clone() as Arc<dyn weir_ops::alerts::AlertNotify>, router]
            },
        }),
        StepConfig::Lookup(l) => OpSpec::Lookup(lookup_spec(l, append)?),
        StepConfig::Union(_)
        | StepConfig::IntervalJoin(_)
        | StepConfig::WindowJoin(_)
        | StepConfig::TemporalJoin(_)
        | StepConfig::Table(_) => OpSpec::Multi,
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
pub(crate) fn route_spec(r: &RouteConfig) -> Result<weir_connectors::alerting::RouteSpec> {
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
pub(crate) fn rule_spec(r: &RuleConfig) -> Result<weir_ops::RuleSpec> {
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
            tables: self.tables.clone(),
            holders: job.key_holders(),
            reloader: None,
            console: Some(Arc::new(crate::console::ConsoleInfo::new(
                {
                    let kinds = crate::plan::kinds(&self.cfg);
                    job.topology()
                        .into_iter()
                        .map(|(id, inputs)| {
                            let kind = kinds.get(&id).cloned().unwrap_or_else(|| "step".into());
                            (id, kind, inputs)
                        })
                        .collect()
                },
                job.stages(),
                self.recent.clone(),
            ))),
            recent_dead_letters: Some(self.recent.clone()),
        }
    }

    /// Applies changed versions of this pipeline's file while it runs (see [`crate::live`]).
    /// `file` is the pipeline file (read again by [`crate::live::Reloader::reload_file`]);
    /// relative paths in it are resolved against its folder.
    pub fn reloader(&self, file: &std::path::Path) -> crate::live::Reloader {
        let base = file.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        crate::live::Reloader::new(
            file.display().to_string(),
            base,
            self.cfg.clone(),
            self.live.clone(),
            self.alerts.routers.clone(),
        )
    }

    /// The running `table` steps, for queries from code (the API port serves the same).
    pub fn tables(&self) -> weir_ops::Tables {
        self.tables.clone()
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

    /// Starts exporting traces if the pipeline has a `traces` section (and this build has the
    /// `otlp` feature), with exports made on the current runtime. Keep the returned guard for
    /// the run and [`Traces::finish`] it after, so the last spans are sent.
    ///
    /// # Errors
    /// A bad `traces` setting, or a `traces` section in a build without the `otlp` feature.
    pub fn start_traces(&self) -> Result<Option<Traces>> {
        let Some(t) = &self.cfg.traces else { return Ok(None) };
        #[cfg(feature = "otlp")]
        {
            let mut attributes = vec![("weir.job".to_string(), self.cfg.name.clone())];
            if let Some(m) = self.cfg.checkpoints.as_ref().and_then(|c| c.member.clone()) {
                attributes.push(("weir.member".into(), m));
            }
            let cfg = weir_connectors::otlp::TracesConfig {
                endpoint: t.endpoint.clone(),
                sample_ratio: t.sample_ratio,
                service_name: t.service_name.clone(),
                attributes,
                headers: t.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                timeout: t.timeout,
                delay: t.export_delay,
            };
            let rt = tokio::runtime::Handle::try_current()
                .map_err(|_| CoreError::Internal("traces are started outside a runtime".into()))?;
            Ok(Some(Traces(weir_connectors::otlp::TraceExporter::start(&cfg, rt)?)))
        }
        #[cfg(not(feature = "otlp"))]
        {
            let _ = t;
            Err(CoreError::Config("`traces` needs a build with the `otlp` feature (the default)".into()))
        }
    }

    /// Where the HTTP port listens: `flag` (the command's `--metrics-addr`), else the `api`
    /// section's address, else nowhere.
    pub fn http_addr(&self, flag: Option<&str>) -> Option<String> {
        flag.map(str::to_string).or_else(|| self.cfg.api.as_ref().map(|a| a.addr.clone()))
    }

    /// Plans the steps as a graph over the sources' schemas: each step on the streams it
    /// reads, in file order (a step reads sources and steps listed before it, so the graph
    /// has no cycle). Checks inputs, schemas at a union, join keys, and that every source and
    /// step is read by something.
    fn plan_graph(&self, sources: &[(String, SchemaRef)], append: bool) -> Result<PlannedGraph> {
        let mut streams: BTreeMap<String, Stream> = BTreeMap::new();
        for (id, schema) in sources {
            streams.insert(
                id.clone(),
                Stream {
                    producer: id.clone(),
                    schema: schema.clone(),
                    keys: Vec::new(),
                    keyed: false,
                    part: Partitioning::Forward,
                },
            );
        }
        let mut read: HashSet<String> = HashSet::new();
        let mut steps = Vec::new();
        let mut notifiers: Vec<(String, Vec<Arc<dyn weir_ops::alerts::AlertNotify>>)> = Vec::new();
        let mut prev: Option<String> = None;
        for s in &self.cfg.steps {
            let id = StepId::new(s.id());
            let planned = (|| -> Result<()> {
                let named = s.inputs();
                let names: Vec<String> = if named.is_empty() {
                    vec![default_input(prev.as_deref(), sources, s.id())?]
                } else {
                    named.iter().map(|n| (*n).to_string()).collect()
                };
                let mut inputs: Vec<Stream> = Vec::with_capacity(names.len());
                for n in &names {
                    let st = streams.get(n).ok_or_else(|| unknown_input(n, &streams))?;
                    inputs.push(st.clone());
                    read.insert(n.clone());
                }
                let edge = |st: &Stream| (st.producer.clone(), st.part.clone());
                match s {
                    StepConfig::KeyBy(k) => {
                        let st = single(&inputs)?;
                        weir_core::ensure_config!(!k.keys.is_empty(), "key_by needs at least one key column");
                        for key in &k.keys {
                            weir_ops::field_by_path(&st.schema, key)?;
                        }
                        // No step of its own: the steps reading it get their rows by key.
                        streams.insert(
                            s.id().to_string(),
                            Stream {
                                keys: k.keys.clone(),
                                keyed: true,
                                part: Partitioning::Hash(k.keys.clone()),
                                ..st.clone()
                            },
                        );
                    }
                    StepConfig::Union(_) => {
                        weir_core::ensure_config!(inputs.len() >= 2, "a union needs at least two `inputs`");
                        for (n, st) in names.iter().zip(&inputs).skip(1) {
                            same_columns(&names[0], &inputs[0].schema, n, &st.schema)?;
                        }
                        // Rows stay on their worker, so a key they were spread by still holds
                        // when every input was spread by it.
                        let same_keys = inputs.iter().all(|i| i.keyed && i.keys == inputs[0].keys);
                        steps.push(PlannedStep {
                            id: id.clone(),
                            op: Arc::new(weir_ops::UnionSpec),
                            inputs: inputs.iter().map(edge).collect(),
                        });
                        streams.insert(
                            s.id().to_string(),
                            Stream {
                                producer: s.id().to_string(),
                                schema: inputs[0].schema.clone(),
                                keys: if same_keys { inputs[0].keys.clone() } else { Vec::new() },
                                keyed: same_keys,
                                part: Partitioning::Forward,
                            },
                        );
                    }
                    StepConfig::IntervalJoin(_) | StepConfig::WindowJoin(_) | StepConfig::TemporalJoin(_) => {
                        let PlannedJoin { op, schema: out, keys, names } = join_spec(s, &inputs)?;
                        let out_keys: Vec<String> = keys[0].iter().map(|k| format!("{}.{k}", names[0])).collect();
                        steps.push(PlannedStep {
                            id: id.clone(),
                            op,
                            // Both sides by key, so each key's rows of both meet on one worker.
                            inputs: inputs
                                .iter()
                                .zip(keys)
                                .map(|(st, k)| (st.producer.clone(), Partitioning::Hash(k)))
                                .collect(),
                        });
                        streams.insert(
                            s.id().to_string(),
                            Stream {
                                producer: s.id().to_string(),
                                schema: out,
                                keys: out_keys,
                                keyed: true,
                                part: Partitioning::Forward,
                            },
                        );
                    }
                    StepConfig::Table(t) => {
                        let st = single(&inputs)?;
                        let values = if t.latest {
                            weir_core::ensure_config!(
                                t.aggregates.is_empty(),
                                "a table keeps `aggregates` or the `latest` row, not both"
                            );
                            weir_ops::TableValues::Latest
                        } else {
                            weir_ops::TableValues::Aggregates(
                                t.aggregates
                                    .iter()
                                    .map(|(name, f)| AggSpec::parse(name, f))
                                    .collect::<Result<Vec<_>>>()?,
                            )
                        };
                        let spec = weir_ops::TableSpec {
                            id: t.id.clone(),
                            keys: t.key.clone(),
                            values,
                            state_ttl: t.state_ttl,
                            tables: self.tables.clone(),
                        };
                        let (op, out) = spec.plan(&st.schema)?;
                        // Each key's rows on one worker, whatever spread them before.
                        steps.push(PlannedStep {
                            id: id.clone(),
                            op,
                            inputs: vec![(st.producer.clone(), Partitioning::Hash(t.key.clone()))],
                        });
                        let keys = if t.latest {
                            t.key.clone()
                        } else {
                            t.key.iter().map(|k| weir_ops::leaf_name(k).to_string()).collect()
                        };
                        streams.insert(
                            s.id().to_string(),
                            Stream {
                                producer: s.id().to_string(),
                                schema: out,
                                keys,
                                keyed: true,
                                part: Partitioning::Forward,
                            },
                        );
                    }
                    _ => {
                        let st = single(&inputs)?;
                        let (op, out) = self.plan_op(s, st, append, &mut notifiers)?;
                        let mut part = st.part.clone();
                        let mut keyed = st.keyed;
                        let mut keys = st.keys.clone();
                        if matches!(s, StepConfig::Window(_)) {
                            // A keyless window is global: everything to one worker first.
                            if !keyed {
                                part = Partitioning::Hash(Vec::new());
                                keyed = true;
                            }
                            // Window output is keyed by the leaf names of its keys.
                            keys = keys.iter().map(|k| weir_ops::leaf_name(k).to_string()).collect();
                        }
                        steps.push(PlannedStep { id: id.clone(), op, inputs: vec![(st.producer.clone(), part)] });
                        streams.insert(
                            s.id().to_string(),
                            Stream {
                                producer: s.id().to_string(),
                                schema: out,
                                keys,
                                keyed,
                                part: Partitioning::Forward,
                            },
                        );
                    }
                }
                Ok(())
            })()
            .map_err(|e| e.in_step(&id));
            planned?;
            prev = Some(s.id().to_string());
        }
        let last = match &prev {
            Some(p) => p.clone(),
            None => default_input(None, sources, &self.cfg.sink.id)?,
        };
        let mut sinks = Vec::new();
        for sink in self.cfg.sink_nodes() {
            let from = sink.input.clone().unwrap_or_else(|| last.clone());
            let st =
                streams.get(&from).ok_or_else(|| unknown_input(&from, &streams).in_step(&StepId::new(&sink.id)))?;
            read.insert(from.clone());
            sinks.push((sink.clone(), st.clone()));
        }
        let ids = sources.iter().map(|(id, _)| id.clone()).chain(self.cfg.steps.iter().map(|s| s.id().to_string()));
        for id in ids {
            if !read.contains(&id) {
                return Err(CoreError::Config(
                    "nothing reads this step's rows: add a step or a sink with `input` naming it, or remove it".into(),
                )
                .in_step(&StepId::new(&id)));
            }
        }
        Ok(PlannedGraph { steps, sinks, notifiers, streams })
    }

    /// Plans one step that reads one stream.
    fn plan_op(
        &self,
        s: &StepConfig,
        st: &Stream,
        append: bool,
        notifiers: &mut Vec<(String, Vec<Arc<dyn weir_ops::alerts::AlertNotify>>)>,
    ) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        let schema = &st.schema;
        Ok(match step_spec(s, &st.keys, append, &self.functions, &self.alerts)? {
            OpSpec::KeyBy | OpSpec::Multi => weir_core::bail_internal!("`{}` planned as a one-input step", s.id()),
            OpSpec::Filter(f) => f.plan(schema)?,
            OpSpec::Select(f) => f.plan(schema)?,
            OpSpec::Window(w) => w.plan(schema)?,
            OpSpec::Ewma(e) => {
                weir_core::ensure_config!(!e.keys.is_empty(), "ewma_zscore is keyed: put a `key_by` step before it");
                e.plan(schema)?
            }
            OpSpec::Detect(mut d) => {
                // The rules as they run, which a reload may change (see `crate::live`).
                let live = self
                    .live
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(s.id().to_string())
                    .or_insert_with(|| weir_ops::rules::LiveRules::new(d.rules.clone(), schema.clone()))
                    .clone();
                d.live = Some(live);
                d.plan(schema)?
            }
            OpSpec::Alert(a) => {
                notifiers.push((s.id().to_string(), a.notify.clone()));
                a.plan(schema)?
            }
            OpSpec::Custom(c) => c.plan(schema, &st.keys)?,
            OpSpec::Lookup(l) => l.plan(schema)?,
        })
    }

    /// Resolves the source schema (inferring it when needed, which reads the input), compiles
    /// every step and builds the job.
    ///
    /// # Errors
    /// Missing input, schema problems, unknown columns, bad expressions.
    pub fn plan(&self, opts: &RunOptions) -> Result<JobGraph> {
        Ok(self.plan_with_schema(opts)?.0)
    }

    /// [`BuiltPipeline::plan`], also returning the schema of the rows that reach the sink.
    ///
    /// # Errors
    /// As [`BuiltPipeline::plan`].
    pub fn plan_with_schema(&self, opts: &RunOptions) -> Result<(JobGraph, SchemaRef)> {
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

    /// The graph `weir plan` prints: planned as [`BuiltPipeline::check`] does (no input
    /// read when schemas are declared), with each node's kind and rows.
    ///
    /// # Errors
    /// As [`BuiltPipeline::check`].
    pub fn plan_view(&self, opts: &RunOptions) -> Result<crate::plan::PlanView> {
        let (graph, _, streams) = self.plan_all(opts, Planning::Check)?;
        Ok(crate::plan::PlanView {
            graph,
            kinds: crate::plan::kinds(&self.cfg),
            streams: streams.into_iter().map(|(id, st)| (id, (st.schema, st.keys))).collect(),
        })
    }

    fn plan_for(&self, opts: &RunOptions, planning: Planning) -> Result<(JobGraph, SchemaRef)> {
        if let Some(at) =
            self.cfg.steps.iter().position(|s| matches!(s, StepConfig::KeyBy(k) if k.repartition.is_some()))
        {
            return self.plan_repartitioned(opts, at, planning);
        }
        let (graph, schema, _) = self.plan_all(opts, planning)?;
        Ok((graph, schema))
    }

    /// Plans the pipeline (not split by a repartition topic): the graph, the schema of the
    /// rows reaching the (first) sink, and the rows of every source and step.
    fn plan_all(
        &self,
        opts: &RunOptions,
        planning: Planning,
    ) -> Result<(JobGraph, SchemaRef, BTreeMap<String, Stream>)> {
        let c = &self.cfg;
        let workers = opts.workers.or(c.workers).unwrap_or_else(default_workers).max(1);
        // Kafka in and exactly once out, on one cluster: the source's positions are committed to
        // its group inside the output's transactions (a transaction cannot commit offsets of
        // another cluster).
        #[cfg(feature = "kafka")]
        let transactional_offsets = match (c.sources.as_slice(), &c.sink.connector) {
            ([src], SinkConnector::Kafka(k)) => match &src.connector {
                SourceConnector::Kafka(s)
                    if k.mode == "exactly_once" && s.brokers == k.brokers && c.checkpoints.is_some() =>
                {
                    Some(Arc::new(weir_connectors::kafka::TransactionalOffsets::default()))
                }
                _ => None,
            },
            _ => None,
        };
        let keep_order = c.steps.iter().any(|s| match s {
            StepConfig::EwmaZscore(_) | StepConfig::Detect(_) => true,
            StepConfig::Function(f) => self.functions.get(&f.id).is_some_and(|c| c.order_sensitive()),
            _ => false,
        });
        let mut nodes: Vec<Node> = Vec::new();
        let mut source_schemas: Vec<(String, SchemaRef)> = Vec::new();
        for src in &c.sources {
            let source_step = StepId::new(&src.id);
            let event_time = src.event_time.as_ref().map(EventTimeConfig::spec);
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
            source_schemas.push((src.id.clone(), schema));
            nodes.push(Node {
                id: source_step,
                kind: NodeKind::Source {
                    factory: source,
                    watermark: WatermarkSpec {
                        bound: src.watermark.max_out_of_orderness,
                        idle_timeout: src.watermark.idle_timeout,
                    },
                },
                inputs: Vec::new(),
            });
        }
        // A run resuming from checkpoints keeps what earlier runs wrote to its side files.
        let resuming = c.checkpoints.is_some() && !opts.fresh;
        let planned = self.plan_graph(&source_schemas, resuming)?;
        let index = |nodes: &[Node], id: &str| -> Result<usize> {
            nodes
                .iter()
                .position(|n| n.id.as_str() == id)
                .ok_or_else(|| CoreError::Internal(format!("planned step `{id}` reads `{id}`, which was not planned")))
        };
        for st in planned.steps {
            let inputs = st
                .inputs
                .into_iter()
                .map(|(from, part)| Ok(Edge { from: index(&nodes, &from)?, part }))
                .collect::<Result<Vec<_>>>()?;
            nodes.push(Node { id: st.id, kind: NodeKind::Op(st.op), inputs });
        }
        let sink_schema = planned
            .sinks
            .first()
            .map(|(_, st)| st.schema.clone())
            .ok_or_else(|| CoreError::Internal("no sink planned".into()))?;
        for (sink_cfg, st) in &planned.sinks {
            let step = StepId::new(&sink_cfg.id);
            let sink = sink_cfg.connector.build(&crate::connector::SinkCx {
                sink: sink_cfg,
                step: step.clone(),
                pipeline: &c.name,
                schema: st.schema.clone(),
                checkpoints: c.checkpoints.as_ref(),
                code: self.code.sink.clone(),
                feeds: &self.feeds,
                #[cfg(feature = "kafka")]
                source_offsets: transactional_offsets.clone(),
                #[cfg(feature = "kafka")]
                create_topic: self.link.topic.clone(),
            })?;
            weir_core::ensure_config!(
                sink_cfg.retry.max_attempts != Some(0),
                "sink `{}`: retry.max_attempts must be at least 1",
                sink_cfg.id
            );
            let from = index(&nodes, &st.producer)?;
            nodes.push(Node {
                id: step,
                kind: NodeKind::Sink {
                    factory: sink,
                    latency_column: sink_cfg.latency_column.clone(),
                    retry: weir_core::runtime::RetryPolicy {
                        max_attempts: sink_cfg.retry.max_attempts,
                        initial_backoff: sink_cfg.retry.initial_backoff,
                        max_backoff: sink_cfg.retry.max_backoff,
                    },
                },
                inputs: vec![Edge { from, part: st.part.clone() }],
            });
        }
        let notifiers = planned.notifiers;
        let streams = planned.streams;
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
        let quarantine = match self.quarantine(&source_schemas)? {
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
        // The console shows the last dead letters.
        let dead: Arc<dyn DeadLetterSink> =
            Arc::new(weir_core::deadletter::TappedDeadLetters { inner: dead, recent: self.recent.clone() });
        let graph = JobGraph {
            upstream: None,
            counts_input: self.link.done.is_none(),
            counts_output: !self.link.writes_topic(),
            name: c.name.clone(),
            workers,
            nodes,
            dead_letters: dead,
            channel_capacity: c.runtime.channel_capacity,
            quarantine,
            shedding: self.shedding(&source_schemas)?,
            checkpoint: match &c.checkpoints {
                None => None,
                Some(k) => {
                    weir_core::ensure_config!(k.keep >= 1, "checkpoints.keep must be at least 1");
                    let mut store = weir_core::store::CheckpointStore::open_with(&k.dir, &c.name, &k.options)
                        .map_err(|e| CoreError::Config(format!("checkpoints.dir: {e}")))?;
                    if let Some(m) = &k.member {
                        // The first Kafka source joins the group; the others read the same
                        // partition numbers of their own topics (`weir_core::handoff`).
                        if let Some(src) = c.sources.iter().find(|s| s.connector.name() != "kafka") {
                            return Err(CoreError::Config(format!(
                                "checkpoints.member: state follows the partitions of Kafka sources between processes; source `{}` is not Kafka",
                                src.id
                            )));
                        }
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
        Ok((graph, sink_schema, streams))
    }

    /// Plans a pipeline whose `key_by` at step `at` goes through a repartition topic: the
    /// steps before it become a job writing the topic (keyed by the first key, so Kafka's
    /// partitioner puts each key in one partition), run alongside the job that reads it and
    /// does the rest.
    #[cfg(not(feature = "kafka"))]
    fn plan_repartitioned(&self, _: &RunOptions, _: usize, _: Planning) -> Result<(JobGraph, SchemaRef)> {
        Err(without_kafka("`repartition` through a Kafka topic"))
    }

    #[cfg(feature = "kafka")]
    fn plan_repartitioned(&self, opts: &RunOptions, at: usize, planning: Planning) -> Result<(JobGraph, SchemaRef)> {
        let c = &self.cfg;
        let StepConfig::KeyBy(k) = &c.steps[at] else { weir_core::bail_internal!("repartition without key_by") };
        let step = StepId::new(&k.id);
        let r = k.repartition.clone().unwrap_or_default();
        weir_core::ensure_config!(
            c.sources.len() == 1 && !c.steps.iter().any(|s| !s.inputs().is_empty()) && c.sink_nodes().len() == 1,
            "`repartition` splits a straight pipeline (one source, steps one after the other, one sink); this one is a graph"
        );
        let SourceConnector::Kafka(src) = &c.source().connector else {
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
        if let SourceConnector::Kafka(s) = &mut up.source_mut().connector {
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
            input: None,
        };
        let like = (src.topics.len() == 1 && !src.topics[0].starts_with('^')).then(|| src.topics[0].clone());
        let writing = self.half(
            up,
            Link { done: None, topic: Some(weir_connectors::kafka::KafkaTopicSpec { partitions: r.partitions, like }) },
        );
        let (up_spec, link_schema) = writing.plan_for(opts, planning)?;
        if let Some(e) = &c.source().event_time {
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
        down.sources = vec![SourceConfig {
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
            ..c.source().clone()
        }];
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
            tables: self.tables.clone(),
            live: self.live.clone(),
            recent: self.recent.clone(),
        }
    }

    /// The quarantine settings, if quarantine is on and its key columns come from the source.
    /// Keys named in the config must exist; the default (the first `key_by`) applies only when
    /// its columns are source columns.
    /// With several sources, the key columns must be in every source.
    fn quarantine(&self, sources: &[(String, SchemaRef)]) -> Result<Option<QuarantineSpec>> {
        let q = &self.cfg.quarantine;
        if !q.enabled {
            return Ok(None);
        }
        let in_all = |key: &str| sources.iter().all(|(_, s)| weir_ops::field_by_path(s, key).is_ok());
        let keys = match &q.keys {
            Some(k) => {
                for key in k {
                    for (id, schema) in sources {
                        weir_ops::field_by_path(schema, key)
                            .map_err(|e| CoreError::Config(format!("quarantine.keys: {e} (source `{id}`)")))?;
                    }
                }
                k.clone()
            }
            None => {
                let first = self.cfg.steps.iter().find_map(|s| match s {
                    StepConfig::KeyBy(k) => Some(k.keys.clone()),
                    _ => None,
                });
                match first {
                    Some(k) if k.iter().all(|key| in_all(key)) => k,
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
    fn shedding(&self, sources: &[(String, SchemaRef)]) -> Result<Option<(OverloadSpec, Arc<dyn ShedPredicate>)>> {
        let Some(l) = &self.cfg.load_shedding else { return Ok(None) };
        let [(_, schema)] = sources else {
            return Err(CoreError::Config(format!(
                "load_shedding drops rows at the source by one predicate; this pipeline has {} sources",
                sources.len()
            )));
        };
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

/// Traces being exported ([`BuiltPipeline::start_traces`]).
#[derive(Debug)]
pub struct Traces(#[cfg(feature = "otlp")] weir_connectors::otlp::TraceExporter);

impl Traces {
    /// Stops tracing and sends the spans still queued.
    pub async fn finish(self) {
        #[cfg(feature = "otlp")]
        {
            let exporter = self.0;
            let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
        }
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
