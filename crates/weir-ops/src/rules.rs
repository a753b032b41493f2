//! The `detect` step: several keyed detection rules over one stream, each row checked by every
//! rule, giving one stream of detections with a fixed shape for the alert manager.
//!
//! Rules: a static threshold with hysteresis, the EWMA z-score, a robust rolling median/MAD
//! score, the rate of change between a key's consecutive events, and silence (no event from a
//! key for a while, on the wall clock: the dead-man switch).

use std::collections::VecDeque;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::deadletter::now_ms;
use weir_core::keys::{key_columns, KeyInterner};
use weir_core::metrics::StepMetrics;
use weir_core::time::column_by_path;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

use crate::{field_by_path, leaf_name};

/// What a rule checks.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// `value` above `above` (or below `below`) starts the condition; it holds until the value
    /// goes back past the clear level (`clear_below` / `clear_above`, default: the trigger
    /// level), so a value hovering at the limit does not flap.
    Threshold {
        /// Watched numeric column.
        value: String,
        /// Fires when the value exceeds this.
        above: Option<f64>,
        /// Once fired from above, clears when the value falls below this.
        clear_below: Option<f64>,
        /// Fires when the value falls below this.
        below: Option<f64>,
        /// Once fired from below, clears when the value rises above this.
        clear_above: Option<f64>,
    },
    /// Exponentially weighted z-score, as the `ewma_zscore` step.
    Ewma {
        /// Watched numeric column.
        value: String,
        /// Smoothing factor in (0, 1].
        alpha: f64,
        /// |z| above this is anomalous.
        threshold: f64,
        /// Rows a key must have seen first.
        warmup: u64,
    },
    /// Robust score against the key's last `window` values: `0.6745 * (x - median) / MAD`,
    /// which a single outlier cannot drag as it drags a mean and a standard deviation.
    Mad {
        /// Watched numeric column.
        value: String,
        /// Values kept per key.
        window: usize,
        /// |score| above this is anomalous.
        threshold: f64,
        /// Values a key must have before it is scored.
        warmup: usize,
    },
    /// |dx/dt| between a key's consecutive events (by event time), per second.
    RateOfChange {
        /// Watched numeric column.
        value: String,
        /// Anomalous above this many units per second.
        max_per_second: f64,
    },
    /// No event from a key for `timeout_ms` of wall-clock time: one detection per silence,
    /// raised from the timer; the key's next event clears it.
    Silence {
        /// How long a key may be quiet.
        timeout_ms: i64,
    },
    /// An ONNX model's score of each row's `inputs` (in the model's feature order), scored a
    /// batch at a time; above `threshold` is anomalous.
    Model {
        /// The loaded model.
        model: crate::model::OnnxModel,
        /// Numeric columns, one per model feature.
        inputs: Vec<String>,
        /// Score above this is anomalous.
        threshold: f64,
        /// Rows per inference call at most.
        max_batch: usize,
        /// A column to report as the detection's `value` (else null).
        value: Option<String>,
    },
}

/// One named rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSpec {
    /// The rule's name, written in each detection (and the alert's rule).
    pub name: String,
    /// Severity written in each detection: `info`, `warning`, `critical`, ...
    pub severity: String,
    /// What it checks.
    pub kind: RuleKind,
    /// Labels carried by its detections to the alerts they raise (`team: pumps`), for routing.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The `detect` step: keys (from the `key_by` before it) and rules.
///
/// Output, one row per detection: the key columns (by last path segment), then `rule`,
/// `severity`, `value` (the watched value; null for silence), `score` (how far past the limit:
/// the z or MAD score, the excess over a threshold, the rate, or the seconds of silence),
/// `anomaly` (true; false for clearing rows when `emit_all`) and `event_time` (ms; the wall
/// clock for silence). With `emit_all`, every evaluation is emitted, normal ones with
/// `anomaly = false`, which lets the alert manager count clear observations.
#[derive(Debug, Clone)]
pub struct DetectSpec {
    /// Key column paths.
    pub keys: Vec<String>,
    /// The rules, checked in order on every row.
    pub rules: Vec<RuleSpec>,
    /// Emit normal evaluations too.
    pub emit_all: bool,
    /// Keys not seen for this long (event time) are forgotten; a key still awaited by a
    /// `silence` rule stays until that rule has fired.
    pub state_ttl: Option<std::time::Duration>,
    /// Where changed rule settings come from while the job runs (live reconfiguration).
    pub live: Option<LiveRules>,
}

/// A `detect` step's rules as they may change while the job runs: thresholds, severities,
/// labels and the other settings that keep a rule what it is. The step picks up a new version
/// before its next batch (or timer), keeping every key's state.
#[derive(Debug, Clone)]
pub struct LiveRules(Arc<LiveInner>);

#[derive(Debug)]
struct LiveInner {
    version: std::sync::atomic::AtomicU64,
    rules: std::sync::RwLock<Vec<RuleSpec>>,
    input: SchemaRef,
}

impl LiveRules {
    /// The rules a step starts with, checked later against `input` (the step's input schema).
    pub fn new(rules: Vec<RuleSpec>, input: SchemaRef) -> Self {
        Self(Arc::new(LiveInner {
            version: std::sync::atomic::AtomicU64::new(0),
            rules: std::sync::RwLock::new(rules),
            input,
        }))
    }

    /// The rules now.
    pub fn rules(&self) -> Vec<RuleSpec> {
        self.0.rules.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The step's input schema, which rules are checked against.
    pub fn input(&self) -> SchemaRef {
        self.0.input.clone()
    }

    fn version(&self) -> u64 {
        self.0.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the rules, if each keeps its name, kind and what it watches (so every key's
    /// state still fits it) and its settings are valid. Returns what changed, one line per rule.
    ///
    /// # Errors
    /// A rule added, removed, renamed, moved or of another kind or column; labels where there
    /// were none (or the other way round: the output's columns would change); a bad setting.
    pub fn update(&self, new: Vec<RuleSpec>) -> Result<Vec<String>> {
        let mut rules = self.0.rules.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let names = |rs: &[RuleSpec]| rs.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(", ");
        weir_core::ensure_config!(
            rules.len() == new.len() && rules.iter().zip(&new).all(|(a, b)| a.name == b.name),
            "the rules ({}) cannot change to ({}) while running: adding, removing, renaming or reordering rules needs a restart",
            names(&rules),
            names(&new)
        );
        let labelled = |rs: &[RuleSpec]| rs.iter().any(|r| !r.labels.is_empty());
        weir_core::ensure_config!(
            labelled(&rules) == labelled(&new),
            "labels on rules that had none (or none where there were some) change the step's columns: that needs a restart"
        );
        let mut changed = Vec::new();
        for (old, r) in rules.iter().zip(&new) {
            weir_core::ensure_config!(
                same_shape(&old.kind, &r.kind),
                "rule `{}`: its kind, its column (or a MAD window, a model) cannot change while running; that needs a restart",
                r.name
            );
            check_rule(r, &self.0.input).map_err(|e| CoreError::Config(format!("detect rule `{}`: {e}", r.name)))?;
            if old != r {
                changed.push(format!("rule `{}`: {:?} -> {:?}", r.name, settings(old), settings(r)));
            }
        }
        if !changed.is_empty() {
            *rules = new;
            self.0.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(changed)
    }
}

/// Whether a rule's state fits another version of it: same kind and column, and for MAD the
/// same window, for a model the same model and inputs.
fn same_shape(a: &RuleKind, b: &RuleKind) -> bool {
    match (a, b) {
        (RuleKind::Threshold { value: x, .. }, RuleKind::Threshold { value: y, .. })
        | (RuleKind::Ewma { value: x, .. }, RuleKind::Ewma { value: y, .. })
        | (RuleKind::RateOfChange { value: x, .. }, RuleKind::RateOfChange { value: y, .. }) => x == y,
        (RuleKind::Mad { value: x, window: w, .. }, RuleKind::Mad { value: y, window: v, .. }) => x == y && w == v,
        (RuleKind::Silence { .. }, RuleKind::Silence { .. }) => true,
        (
            RuleKind::Model { model: m, inputs: i, value: v, .. },
            RuleKind::Model { model: n, inputs: j, value: u, .. },
        ) => m == n && i == j && v == u,
        _ => false,
    }
}

/// A rule's settings, for the log line of a change.
fn settings(r: &RuleSpec) -> String {
    let kind = match &r.kind {
        RuleKind::Model { threshold, max_batch, .. } => format!("model threshold {threshold}, max_batch {max_batch}"),
        other => format!("{other:?}"),
    };
    format!("{kind}, severity {}, labels {:?}", r.severity, r.labels)
}

/// The detection columns after the keys.
pub const DETECTION_COLUMNS: [&str; 6] = ["rule", "severity", "value", "score", "anomaly", "event_time"];

/// The detection fields after the keys (the [`DETECTION_COLUMNS`], typed).
pub(crate) fn detection_fields() -> [Field; 6] {
    [
        Field::new("rule", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("score", DataType::Float64, false),
        Field::new("anomaly", DataType::Boolean, false),
        Field::new("event_time", DataType::Int64, false),
    ]
}

/// The last detection column when any rule has labels: the rule's labels as a JSON object.
pub const LABELS_COLUMN: &str = "labels";

impl DetectSpec {
    /// Validates against the input schema; returns the factory and the detection schema.
    ///
    /// # Errors
    /// No keys or rules, duplicate rule names, unknown or non-numeric columns, bad settings.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        weir_core::ensure_config!(!self.keys.is_empty(), "detect is keyed: put a `key_by` step before it");
        weir_core::ensure_config!(!self.rules.is_empty(), "detect needs at least one rule");
        let mut fields = Vec::new();
        let mut key_types = Vec::new();
        for k in &self.keys {
            let f = field_by_path(input, k)?;
            key_types.push(f.data_type().clone());
            let name = leaf_name(k);
            weir_core::ensure_config!(
                !DETECTION_COLUMNS.contains(&name) && name != LABELS_COLUMN,
                "detect: key `{k}` is named like a detection column; rename it first"
            );
            fields.push(Field::new(name, f.data_type().clone(), true));
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.rules {
            weir_core::ensure_config!(!r.name.is_empty(), "detect: a rule has an empty name");
            weir_core::ensure_config!(names.insert(r.name.as_str()), "detect: rule `{}` is defined twice", r.name);
            check_rule(r, input).map_err(|e| CoreError::Config(format!("detect rule `{}`: {e}", r.name)))?;
        }
        fields.extend(detection_fields());
        if self.rules.iter().any(|r| !r.labels.is_empty()) {
            fields.push(Field::new(LABELS_COLUMN, DataType::Utf8, false));
        }
        let out = Arc::new(Schema::new(fields));
        Ok((Arc::new(DetectFactory { spec: self.clone(), out: out.clone(), key_types }), out))
    }
}

fn check_rule(r: &RuleSpec, input: &SchemaRef) -> Result<()> {
    let numeric = |v: &str| -> Result<()> {
        let f = field_by_path(input, v)?;
        weir_core::ensure_config!(
            f.data_type().is_numeric(),
            "value `{v}` must be numeric, but it is {}",
            f.data_type()
        );
        Ok(())
    };
    match &r.kind {
        RuleKind::Threshold { value, above, clear_below, below, clear_above } => {
            numeric(value)?;
            weir_core::ensure_config!(above.is_some() || below.is_some(), "a threshold needs `above` or `below`");
            if let (Some(a), Some(c)) = (above, clear_below) {
                weir_core::ensure_config!(c <= a, "clear_below ({c}) must not exceed above ({a})");
            }
            if let (Some(b), Some(c)) = (below, clear_above) {
                weir_core::ensure_config!(c >= b, "clear_above ({c}) must not be under below ({b})");
            }
        }
        RuleKind::Ewma { value, alpha, threshold, .. } => {
            numeric(value)?;
            weir_core::ensure_config!(*alpha > 0.0 && *alpha <= 1.0, "alpha must be in (0, 1], got {alpha}");
            weir_core::ensure_config!(*threshold > 0.0, "threshold must be positive, got {threshold}");
        }
        RuleKind::Mad { value, window, threshold, warmup } => {
            numeric(value)?;
            weir_core::ensure_config!(*window >= 3, "window must hold at least 3 values, got {window}");
            weir_core::ensure_config!(warmup <= window, "warmup ({warmup}) must not exceed window ({window})");
            weir_core::ensure_config!(*threshold > 0.0, "threshold must be positive, got {threshold}");
        }
        RuleKind::RateOfChange { value, max_per_second } => {
            numeric(value)?;
            weir_core::ensure_config!(*max_per_second > 0.0, "max_per_second must be positive, got {max_per_second}");
        }
        RuleKind::Silence { timeout_ms } => {
            weir_core::ensure_config!(*timeout_ms > 0, "silence timeout must be positive");
        }
        RuleKind::Model { model, inputs, threshold, max_batch, value } => {
            weir_core::ensure_config!(
                inputs.len() == model.features(),
                "the model takes {} features but `inputs` lists {}",
                model.features(),
                inputs.len()
            );
            for i in inputs {
                numeric(i)?;
            }
            if let Some(v) = value {
                numeric(v)?;
            }
            weir_core::ensure_config!(threshold.is_finite(), "threshold must be a number, got {threshold}");
            weir_core::ensure_config!(*max_batch >= 1, "max_batch must be at least 1");
        }
    }
    Ok(())
}

/// A rule's value column, if it has one.
fn value_of(kind: &RuleKind) -> Option<&str> {
    match kind {
        RuleKind::Threshold { value, .. }
        | RuleKind::Ewma { value, .. }
        | RuleKind::Mad { value, .. }
        | RuleKind::RateOfChange { value, .. } => Some(value),
        RuleKind::Model { value, .. } => value.as_deref(),
        RuleKind::Silence { .. } => None,
    }
}

#[derive(Debug)]
struct DetectFactory {
    spec: DetectSpec,
    out: SchemaRef,
    key_types: Vec<DataType>,
}

impl OperatorFactory for DetectFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        // A run that starts after a live change (a restart) starts with the changed rules.
        let mut spec = self.spec.clone();
        let live = spec.live.clone().map(|l| {
            let v = l.version();
            spec.rules = l.rules();
            (l, v)
        });
        let silence = spec.rules.iter().filter_map(|r| match r.kind {
            RuleKind::Silence { timeout_ms } => Some(timeout_ms),
            _ => None,
        });
        let tick = silence.min().map(|t| std::time::Duration::from_millis((t as u64 / 4).clamp(10, 1000)));
        Ok(Box::new(DetectOp {
            keys: KeyInterner::new(&self.key_types)?.with_ttl(spec.state_ttl),
            spec,
            out: self.out.clone(),
            state: Vec::new(),
            vacant: std::collections::HashSet::new(),
            tick,
            live,
        }))
    }
}

/// Per key and rule.
#[derive(Debug, Clone, PartialEq)]
enum RuleState {
    Threshold {
        firing: Option<bool>,
    },
    Ewma {
        mean: f64,
        var: f64,
        n: u64,
    },
    /// The window in arrival order (what expires next) and sorted (for the median).
    Mad {
        values: VecDeque<f64>,
        sorted: Vec<f64>,
    },
    Rate {
        last: Option<(f64, i64)>,
    },
    Silence {
        last_seen_ms: i64,
        fired: bool,
    },
    /// A model keeps no per-key state.
    Model,
}

impl RuleState {
    fn new(kind: &RuleKind, now: i64) -> Self {
        match kind {
            RuleKind::Threshold { .. } => Self::Threshold { firing: None },
            RuleKind::Ewma { .. } => Self::Ewma { mean: 0.0, var: 0.0, n: 0 },
            RuleKind::Mad { .. } => Self::Mad { values: VecDeque::new(), sorted: Vec::new() },
            RuleKind::RateOfChange { .. } => Self::Rate { last: None },
            RuleKind::Silence { .. } => Self::Silence { last_seen_ms: now, fired: false },
            RuleKind::Model { .. } => Self::Model,
        }
    }

    /// As numbers, for checkpoints.
    fn encode(&self) -> Vec<f64> {
        match self {
            Self::Threshold { firing } => vec![match firing {
                None => 0.0,
                Some(false) => 1.0,
                Some(true) => 2.0,
            }],
            Self::Ewma { mean, var, n } => vec![*mean, *var, *n as f64],
            Self::Mad { values, .. } => values.iter().copied().collect(),
            Self::Rate { last } => last.map_or_else(Vec::new, |(x, t)| vec![x, t as f64]),
            Self::Silence { last_seen_ms, fired } => vec![*last_seen_ms as f64, f64::from(u8::from(*fired))],
            Self::Model => Vec::new(),
        }
    }

    fn decode(kind: &RuleKind, v: &[f64]) -> Result<Self> {
        let bad = || CoreError::Config("a detect rule's saved state has the wrong shape; was the rule changed?".into());
        Ok(match kind {
            RuleKind::Threshold { .. } => Self::Threshold {
                firing: match v.first().copied().ok_or_else(bad)? as u8 {
                    0 => None,
                    1 => Some(false),
                    _ => Some(true),
                },
            },
            RuleKind::Ewma { .. } => match v {
                [mean, var, n] => Self::Ewma { mean: *mean, var: *var, n: *n as u64 },
                _ => return Err(bad()),
            },
            RuleKind::Mad { .. } => {
                let mut sorted = v.to_vec();
                sorted.sort_by(f64::total_cmp);
                Self::Mad { values: v.iter().copied().collect(), sorted }
            }
            RuleKind::RateOfChange { .. } => match v {
                [] => Self::Rate { last: None },
                [x, t] => Self::Rate { last: Some((*x, *t as i64)) },
                _ => return Err(bad()),
            },
            RuleKind::Silence { .. } => match v {
                [t, f] => Self::Silence { last_seen_ms: *t as i64, fired: *f != 0.0 },
                _ => return Err(bad()),
            },
            RuleKind::Model { .. } => Self::Model,
        })
    }
}

/// A rule's verdict on one value: `None` while it cannot judge yet (warm-up).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Verdict {
    anomaly: bool,
    score: f64,
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The median of `|v - med|` over sorted values, without sorting the deviations: those below
/// the median grow leftwards and those above it rightwards, so merging the two runs outwards
/// from the median meets them in order.
fn median_abs_deviation(sorted: &[f64], med: f64) -> f64 {
    let n = sorted.len();
    let split = sorted.partition_point(|v| *v < med);
    let (mut l, mut r) = (split, split);
    let mut next = || {
        let left = (l > 0).then(|| med - sorted[l - 1]);
        let right = (r < n).then(|| sorted[r] - med);
        match (left, right) {
            (Some(a), Some(b)) if a < b => {
                l -= 1;
                a
            }
            (_, Some(b)) => {
                r += 1;
                b
            }
            (Some(a), None) => {
                l -= 1;
                a
            }
            (None, None) => f64::NAN,
        }
    };
    let mut prev = f64::NAN;
    for _ in 0..n / 2 {
        prev = next();
    }
    let mid = next();
    if n % 2 == 1 {
        mid
    } else {
        (prev + mid) / 2.0
    }
}

/// Checks `x` at event time `t` against a rule and updates the key's state.
fn judge(kind: &RuleKind, state: &mut RuleState, x: f64, t: i64) -> Option<Verdict> {
    match (kind, state) {
        (RuleKind::Threshold { above, clear_below, below, clear_above, .. }, RuleState::Threshold { firing }) => {
            let was = firing.unwrap_or(false);
            let high = above.map(|a| (x > a, x - a, clear_below.unwrap_or(a)));
            let low = below.map(|b| (x < b, b - x, clear_above.unwrap_or(b)));
            let now = if was {
                // Holds until the value is back past a clear level.
                high.is_some_and(|(_, _, c)| x >= c) || low.is_some_and(|(_, _, c)| x <= c)
            } else {
                high.is_some_and(|(on, _, _)| on) || low.is_some_and(|(on, _, _)| on)
            };
            *firing = Some(now);
            let score = high.map_or(f64::NEG_INFINITY, |(_, d, _)| d).max(low.map_or(f64::NEG_INFINITY, |(_, d, _)| d));
            Some(Verdict { anomaly: now, score })
        }
        (RuleKind::Ewma { alpha, threshold, warmup, .. }, RuleState::Ewma { mean, var, n }) => {
            if *n == 0 {
                (*mean, *var, *n) = (x, 0.0, 1);
                return None;
            }
            let std = var.sqrt();
            let z = if std > 0.0 { (x - *mean) / std } else { 0.0 };
            let verdict = (*n >= *warmup).then(|| Verdict { anomaly: (x - *mean).abs() > threshold * std, score: z });
            let d = x - *mean;
            *mean += alpha * d;
            *var = (1.0 - alpha) * (*var + alpha * d * d);
            *n += 1;
            verdict
        }
        (RuleKind::Mad { window, threshold, warmup, .. }, RuleState::Mad { values, sorted }) => {
            let verdict = (values.len() >= *warmup.max(&3)).then(|| {
                let med = median(sorted);
                let mad = median_abs_deviation(sorted, med);
                let score = if mad > 0.0 {
                    0.6745 * (x - med) / mad
                } else if x == med {
                    0.0
                } else {
                    f64::INFINITY.copysign(x - med)
                };
                Verdict { anomaly: score.abs() > *threshold, score }
            });
            // Keep the window sorted as it slides: O(window) moves, no sort, no allocation.
            values.push_back(x);
            sorted.insert(sorted.partition_point(|v| v.total_cmp(&x).is_lt()), x);
            while values.len() > *window {
                if let Some(old) = values.pop_front() {
                    let at = sorted.partition_point(|v| v.total_cmp(&old).is_lt());
                    sorted.remove(at);
                }
            }
            verdict
        }
        (RuleKind::RateOfChange { max_per_second, .. }, RuleState::Rate { last }) => {
            let verdict = last.and_then(|(px, pt)| {
                let dt = (t - pt) as f64 / 1000.0;
                (dt > 0.0).then(|| {
                    let rate = (x - px).abs() / dt;
                    Verdict { anomaly: rate > *max_per_second, score: rate }
                })
            });
            // Out-of-order events do not move the reference point back.
            if last.is_none_or(|(_, pt)| t >= pt) {
                *last = Some((x, t));
            }
            verdict
        }
        _ => None,
    }
}

/// A numeric column (by path) as f64.
fn f64_column(rows: &RecordBatch, path: &str) -> Result<Float64Array> {
    let col = arrow_cast::cast(&column_by_path(rows, path)?, &DataType::Float64)?;
    col.as_any()
        .downcast_ref::<Float64Array>()
        .cloned()
        .ok_or_else(|| CoreError::Internal("cast to f64 gave another type".into()))
}

/// The model's score of every row (`None` where an input is null), `max_batch` rows per call.
fn score_batch(
    model: &crate::model::OnnxModel,
    inputs: &[String],
    max_batch: usize,
    rows: &RecordBatch,
    rule: &str,
    cx: &OpContext<'_>,
) -> Result<Vec<Option<f32>>> {
    let cols = inputs.iter().map(|p| f64_column(rows, p)).collect::<Result<Vec<_>>>()?;
    let n = rows.num_rows();
    let k = cols.len();
    let valid: Vec<bool> = (0..n).map(|i| cols.iter().all(|c| !c.is_null(i))).collect();
    let mut matrix = vec![0f32; n * k];
    for (j, c) in cols.iter().enumerate() {
        for (i, v) in c.values().iter().enumerate() {
            matrix[i * k + j] = *v as f32;
        }
    }
    let started = std::time::Instant::now();
    let mut scores = Vec::with_capacity(n);
    let mut calls = 0u32;
    for chunk in matrix.chunks(max_batch * k) {
        scores.extend(model.score(chunk)?);
        calls += 1;
    }
    let m = &cx.registry.connectors;
    let labels = [("step", cx.step.as_str()), ("rule", rule)];
    m.add("weir_model_rows_total", "Rows scored by ONNX models.", &labels, n as f64);
    m.add("weir_model_calls_total", "ONNX inference calls (each up to max_batch rows).", &labels, f64::from(calls));
    m.add(
        "weir_model_inference_seconds_total",
        "Time spent in ONNX inference.",
        &labels,
        started.elapsed().as_secs_f64(),
    );
    Ok(scores.into_iter().zip(valid).map(|(s, ok)| ok.then_some(s)).collect())
}

#[derive(Debug)]
struct DetectOp {
    spec: DetectSpec,
    out: SchemaRef,
    keys: KeyInterner,
    /// Per key id, per rule.
    state: Vec<Vec<RuleState>>,
    /// Ids of forgotten keys (`state_ttl`) no new key has taken yet: their state is not
    /// snapshotted, nor watched by `silence` rules.
    vacant: std::collections::HashSet<u32>,
    tick: Option<std::time::Duration>,
    /// The live rules and the version of them in `spec.rules`.
    live: Option<(LiveRules, u64)>,
}

/// Detections being gathered for one output batch.
#[derive(Default)]
struct Detections {
    keys: Vec<u32>,
    rules: Vec<usize>,
    values: Vec<Option<f64>>,
    scores: Vec<f64>,
    anomaly: Vec<bool>,
    times: Vec<i64>,
}

impl Detections {
    fn push(&mut self, key: u32, rule: usize, value: Option<f64>, v: Verdict, t: i64) {
        self.keys.push(key);
        self.rules.push(rule);
        self.values.push(value);
        self.scores.push(v.score);
        self.anomaly.push(v.anomaly);
        self.times.push(t);
    }
}

impl DetectOp {
    /// Takes changed rule settings (live reconfiguration); every key's state stays.
    fn refresh(&mut self) {
        if let Some((live, seen)) = &mut self.live {
            let v = live.version();
            if v != *seen {
                self.spec.rules = live.rules();
                *seen = v;
            }
        }
    }

    fn ensure_key(&mut self, k: usize, now: i64) {
        while self.state.len() <= k {
            self.state.push(self.spec.rules.iter().map(|r| RuleState::new(&r.kind, now)).collect());
        }
    }

    fn emit(&self, d: Detections, cx: &mut OpContext<'_>) -> Result<()> {
        if d.keys.is_empty() {
            return Ok(());
        }
        let mut cols = self.keys.columns(&d.keys)?;
        let names: Vec<&str> = d.rules.iter().map(|&r| self.spec.rules[r].name.as_str()).collect();
        let sev: Vec<&str> = d.rules.iter().map(|&r| self.spec.rules[r].severity.as_str()).collect();
        cols.push(Arc::new(StringArray::from(names)));
        cols.push(Arc::new(StringArray::from(sev)));
        cols.push(Arc::new(Float64Array::from(d.values)));
        cols.push(Arc::new(Float64Array::from(d.scores)));
        cols.push(Arc::new(BooleanArray::from(d.anomaly)));
        let times = Int64Array::from(d.times);
        cols.push(Arc::new(times.clone()));
        if self.out.column_with_name(LABELS_COLUMN).is_some() {
            let labels: Vec<String> = d
                .rules
                .iter()
                .map(|&r| serde_json::to_string(&self.spec.rules[r].labels).unwrap_or_default())
                .collect();
            cols.push(Arc::new(StringArray::from(labels)));
        }
        let rows = RecordBatch::try_new(self.out.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rows.num_rows() as u64);
        cx.emit(Batch::new(rows, times)?);
        Ok(())
    }
}

impl Operator for DetectOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.refresh();
        let kc = key_columns(&batch.rows, &self.spec.keys)?;
        let ids = self.keys.intern_at(&kc, Some(&batch.time))?.to_vec();
        let now = now_ms();
        if let Some(&max) = ids.iter().max() {
            self.ensure_key(max as usize, now);
        }
        if !self.vacant.is_empty() {
            // A new key took a forgotten key's id: it starts afresh.
            for id in &ids {
                if self.vacant.remove(id) {
                    self.state[*id as usize] = self.spec.rules.iter().map(|r| RuleState::new(&r.kind, now)).collect();
                }
            }
        }
        let mut values: Vec<Option<Float64Array>> = Vec::with_capacity(self.spec.rules.len());
        let mut scores: Vec<Option<Vec<Option<f32>>>> = Vec::with_capacity(self.spec.rules.len());
        for r in &self.spec.rules {
            values.push(value_of(&r.kind).map(|v| f64_column(&batch.rows, v)).transpose()?);
            scores.push(match &r.kind {
                RuleKind::Model { model, inputs, max_batch, .. } => {
                    Some(score_batch(model, inputs, *max_batch, &batch.rows, &r.name, cx)?)
                }
                _ => None,
            });
        }
        let mut out = Detections::default();
        let times = batch.time.values();
        for (i, &k) in ids.iter().enumerate() {
            let t = times[i];
            for (r, rule) in self.spec.rules.iter().enumerate() {
                let state = &mut self.state[k as usize][r];
                if let RuleState::Silence { last_seen_ms, fired } = state {
                    // Seen again: the silence (if any) is over.
                    let was = *fired;
                    *last_seen_ms = now;
                    *fired = false;
                    if was || self.spec.emit_all {
                        out.push(k, r, None, Verdict { anomaly: false, score: 0.0 }, t);
                    }
                    continue;
                }
                if let Some(model_scores) = &scores[r] {
                    let (Some(score), RuleKind::Model { threshold, .. }) = (model_scores[i], &rule.kind) else {
                        continue;
                    };
                    let value = values[r].as_ref().and_then(|v| (!v.is_null(i)).then(|| v.value(i)));
                    let score = f64::from(score);
                    if score > *threshold || self.spec.emit_all {
                        out.push(k, r, value, Verdict { anomaly: score > *threshold, score }, t);
                    }
                    continue;
                }
                let Some(vals) = &values[r] else { continue };
                if vals.is_null(i) {
                    continue;
                }
                let x = vals.value(i);
                if let Some(v) = judge(&rule.kind, state, x, t) {
                    if v.anomaly || self.spec.emit_all {
                        out.push(k, r, Some(x), v, t);
                    }
                }
            }
        }
        StepMetrics::add(&cx.metrics.aggregated, batch.num_rows() as u64);
        self.emit(out, cx)
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if self.spec.state_ttl.is_some() && wm != weir_core::batch::END_OF_TIME {
            // A key a silence rule still waits on stays until the rule has fired.
            let state = &self.state;
            let gone = self.keys.expire(wm, |id| {
                state
                    .get(id as usize)
                    .is_some_and(|rules| rules.iter().any(|s| matches!(s, RuleState::Silence { fired: false, .. })))
            });
            crate::note_expired(cx, gone.len(), self.keys.len());
            self.vacant.extend(gone);
        }
        Ok(())
    }

    fn on_tick(&mut self, now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        self.refresh();
        let mut out = Detections::default();
        for (k, rules) in self.state.iter_mut().enumerate() {
            if self.vacant.contains(&(k as u32)) {
                continue;
            }
            for (r, state) in rules.iter_mut().enumerate() {
                let (RuleState::Silence { last_seen_ms, fired }, RuleKind::Silence { timeout_ms }) =
                    (state, &self.spec.rules[r].kind)
                else {
                    continue;
                };
                let quiet = now_ms - *last_seen_ms;
                if !*fired && quiet > *timeout_ms {
                    *fired = true;
                    out.push(k as u32, r, None, Verdict { anomaly: true, score: quiet as f64 / 1000.0 }, now_ms);
                }
            }
        }
        self.emit(out, cx)
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        self.tick
    }

    /// One row per key and rule: the rule's index and its state as numbers.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let (mut ids, mut rules, mut blobs) = (Vec::new(), Vec::new(), Vec::new());
        for (k, states) in self.state.iter().enumerate() {
            if self.vacant.contains(&(k as u32)) {
                continue;
            }
            for (r, s) in states.iter().enumerate() {
                ids.push(k as u32);
                rules.push(r as u32);
                blobs.push(s.encode().iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let fields = vec![Field::new("rule", DataType::UInt32, false), Field::new("state", DataType::Binary, false)];
        let cols: Vec<ArrayRef> =
            vec![Arc::new(UInt32Array::from(rules)), Arc::new(BinaryArray::from_iter_values(blobs.iter()))];
        crate::snapshot::keyed_table(&self.keys, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, t: RecordBatch) -> Result<()> {
        let ids = crate::snapshot::read_keys(&mut self.keys, self.spec.keys.len(), &t)?;
        let rules = crate::snapshot::col(&t, "rule", &DataType::UInt32)?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| CoreError::Internal("rule column".into()))?;
        let blobs = crate::snapshot::col(&t, "state", &DataType::Binary)?
            .as_any()
            .downcast_ref::<BinaryArray>()
            .cloned()
            .ok_or_else(|| CoreError::Internal("state column".into()))?;
        let now = now_ms();
        for (i, &k) in ids.iter().enumerate() {
            self.ensure_key(k as usize, now);
            let r = rules.value(i) as usize;
            let Some(rule) = self.spec.rules.get(r) else {
                return Err(CoreError::Config(format!(
                    "the checkpoint has state for detect rule #{r}, but the step has {} rules; was it changed?",
                    self.spec.rules.len()
                )));
            };
            let nums: Vec<f64> =
                blobs.value(i).chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            self.state[k as usize][r] = RuleState::decode(&rule.kind, &nums)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th(above: f64, clear: f64) -> RuleKind {
        RuleKind::Threshold {
            value: "v".into(),
            above: Some(above),
            clear_below: Some(clear),
            below: None,
            clear_above: None,
        }
    }

    fn run(kind: &RuleKind, xs: &[(f64, i64)]) -> Vec<Option<bool>> {
        let mut s = RuleState::new(kind, 0);
        xs.iter().map(|&(x, t)| judge(kind, &mut s, x, t).map(|v| v.anomaly)).collect()
    }

    #[test]
    fn threshold_with_hysteresis_does_not_flap() {
        // value: 70 81 79 76 74 81
        // state: .  F  F  F  .  F      (fires above 80, clears below 75)
        let got = run(&th(80.0, 75.0), &[(70.0, 0), (81.0, 1), (79.0, 2), (76.0, 3), (74.0, 4), (81.0, 5)]);
        assert_eq!(got, [false, true, true, true, false, true].map(Some));
    }

    #[test]
    fn threshold_below_and_its_score() {
        let k = RuleKind::Threshold {
            value: "v".into(),
            above: None,
            clear_below: None,
            below: Some(5.0),
            clear_above: Some(7.0),
        };
        let mut s = RuleState::new(&k, 0);
        let v = judge(&k, &mut s, 3.0, 0).unwrap();
        assert!(v.anomaly && (v.score - 2.0).abs() < 1e-12);
        assert!(judge(&k, &mut s, 6.0, 1).unwrap().anomaly, "still below the clear level");
        assert!(!judge(&k, &mut s, 7.5, 2).unwrap().anomaly);
    }

    #[test]
    fn mad_ignores_one_outlier_in_its_window() {
        let k = RuleKind::Mad { value: "v".into(), window: 9, threshold: 3.5, warmup: 5 };
        let mut xs: Vec<(f64, i64)> = [10.0, 10.2, 9.8, 10.1, 9.9, 50.0, 10.0, 10.3].iter().map(|&x| (x, 0)).collect();
        xs.push((10.1, 0));
        let got = run(&k, &xs);
        // warm-up for five values, then the outlier fires, and the next values do not,
        // though the outlier is in their window (a mean/std score would be thrown off).
        assert_eq!(got, [None, None, None, None, None, Some(true), Some(false), Some(false), Some(false)]);
    }

    proptest::proptest! {
        #[test]
        fn the_sliding_mad_equals_sorting_the_deviations(
            xs in proptest::collection::vec(-50i32..50, 1..60), window in 3usize..12,
        ) {
            let k = RuleKind::Mad { value: "v".into(), window, threshold: 3.0, warmup: 3 };
            let mut s = RuleState::new(&k, 0);
            let mut plain: VecDeque<f64> = VecDeque::new();
            for x in xs.iter().map(|x| f64::from(*x) / 4.0) {
                let want = (plain.len() >= 3).then(|| {
                    let mut v: Vec<f64> = plain.iter().copied().collect();
                    v.sort_by(f64::total_cmp);
                    let med = median(&v);
                    let mut dev: Vec<f64> = v.iter().map(|y| (y - med).abs()).collect();
                    dev.sort_by(f64::total_cmp);
                    (med, median(&dev))
                });
                if let (Some((med, mad)), RuleState::Mad { sorted, .. }) = (want, &s) {
                    proptest::prop_assert_eq!(median(sorted), med);
                    proptest::prop_assert_eq!(median_abs_deviation(sorted, med), mad);
                }
                judge(&k, &mut s, x, 0);
                plain.push_back(x);
                while plain.len() > window {
                    plain.pop_front();
                }
            }
        }
    }

    #[test]
    fn rate_of_change_uses_event_time() {
        let k = RuleKind::RateOfChange { value: "v".into(), max_per_second: 2.0 };
        // +1 in 1 s (ok), +10 in 2 s (5/s), an out-of-order event is judged against the latest.
        let got = run(&k, &[(0.0, 0), (1.0, 1000), (11.0, 3000), (11.5, 2000)]);
        assert_eq!(got, [None, Some(false), Some(true), None]);
    }

    #[test]
    fn states_survive_encoding() {
        let kinds = [
            th(1.0, 0.5),
            RuleKind::Ewma { value: "v".into(), alpha: 0.1, threshold: 3.0, warmup: 2 },
            RuleKind::Mad { value: "v".into(), window: 5, threshold: 3.0, warmup: 3 },
            RuleKind::RateOfChange { value: "v".into(), max_per_second: 1.0 },
        ];
        for k in &kinds {
            let mut s = RuleState::new(k, 0);
            for (i, x) in [1.0, 2.0, 1.5].iter().enumerate() {
                judge(k, &mut s, *x, i as i64 * 1000);
            }
            assert_eq!(RuleState::decode(k, &s.encode()).unwrap(), s, "{k:?}");
        }
        let k = RuleKind::Silence { timeout_ms: 10 };
        let s = RuleState::Silence { last_seen_ms: 1234, fired: true };
        assert_eq!(RuleState::decode(&k, &s.encode()).unwrap(), s);
    }

    fn harness(rules: Vec<RuleSpec>) -> weir_core::testing::OpHarness {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let spec = DetectSpec { keys: vec!["k".into()], rules, emit_all: false, state_ttl: None, live: None };
        let (f, _) = spec.plan(&input).unwrap();
        weir_core::testing::OpHarness::new(f.as_ref()).unwrap()
    }

    fn batch(rows: &[(&str, f64, i64)]) -> Batch {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let rb = RecordBatch::try_new(
            input,
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        Batch::new(rb, Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())).unwrap()
    }

    fn rule(name: &str, kind: RuleKind) -> RuleSpec {
        RuleSpec { name: name.into(), severity: "warning".into(), kind, labels: Default::default() }
    }

    fn detections(out: &[Batch]) -> Vec<(String, String, bool)> {
        out.iter()
            .flat_map(|b| {
                let k = b.rows.column(0).as_any().downcast_ref::<StringArray>().unwrap().clone();
                let r = b.rows.column(1).as_any().downcast_ref::<StringArray>().unwrap().clone();
                let a = b.rows.column(5).as_any().downcast_ref::<BooleanArray>().unwrap().clone();
                (0..b.num_rows()).map(move |i| (k.value(i).to_string(), r.value(i).to_string(), a.value(i)))
            })
            .collect()
    }

    #[test]
    fn every_rule_checks_every_row_and_keys_are_separate() {
        let mut h = harness(vec![
            rule("hot", th(80.0, 75.0)),
            rule("jump", RuleKind::RateOfChange { value: "v".into(), max_per_second: 10.0 }),
        ]);
        // a: 70 -> 90 in 1 s: hot and a jump; b: 85 from the start: hot only.
        let out = h.process(batch(&[("a", 70.0, 0), ("b", 85.0, 0), ("a", 90.0, 1000)])).unwrap();
        let got = detections(&out);
        assert_eq!(
            got,
            vec![("b".into(), "hot".into(), true), ("a".into(), "hot".into(), true), ("a".into(), "jump".into(), true)]
        );
        assert_eq!(h.metrics().aggregated, 3);
        assert_eq!(h.metrics().results_out, 3);
    }

    #[test]
    fn silence_fires_once_per_quiet_spell_and_clears_on_the_next_event() {
        let mut h = harness(vec![rule("dead-man", RuleKind::Silence { timeout_ms: 1000 })]);
        assert!(h.process(batch(&[("a", 1.0, 0), ("b", 1.0, 0)])).unwrap().is_empty());
        let now = now_ms();
        // time:  t0 (a, b seen) .. t0+0.5 s (quiet, fine) .. t0+2 s (both silent) .. b again
        assert!(h.tick(now + 500).unwrap().is_empty());
        let fired = detections(&h.tick(now + 2000).unwrap());
        assert_eq!(fired, vec![("a".into(), "dead-man".into(), true), ("b".into(), "dead-man".into(), true)]);
        assert!(h.tick(now + 3000).unwrap().is_empty(), "one detection per silence");
        let cleared = detections(&h.process(batch(&[("b", 2.0, 5)])).unwrap());
        assert_eq!(cleared, vec![("b".into(), "dead-man".into(), false)]);
    }

    /// With a `state_ttl`, keys not seen for that long are forgotten: a key that comes back
    /// starts afresh (its threshold is judged anew), a forgotten key is not watched for silence,
    /// and a key a silence rule still waits on is kept until the rule fires.
    #[test]
    fn live_rules_change_thresholds_on_the_next_batch_and_keep_every_keys_state() {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let live = LiveRules::new(vec![rule("hot", th(80.0, 75.0))], input.clone());
        let spec = DetectSpec {
            keys: vec!["k".into()],
            rules: live.rules(),
            emit_all: false,
            state_ttl: None,
            live: Some(live.clone()),
        };
        let (f, _) = spec.plan(&input).unwrap();
        let mut h = weir_core::testing::OpHarness::new(f.as_ref()).unwrap();
        // `a` fires at 90 and stays firing down to its clear level.
        assert_eq!(detections(&h.process(batch(&[("a", 90.0, 0)])).unwrap()).len(), 1);
        assert_eq!(detections(&h.process(batch(&[("a", 60.0, 1)])).unwrap()), vec![]);
        // Raise the limit to 100 (clearing below 95): 90 is normal from the next batch on.
        let changed = live.update(vec![rule("hot", th(100.0, 95.0))]).unwrap();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(detections(&h.process(batch(&[("b", 90.0, 2)])).unwrap()), vec![]);
        assert_eq!(detections(&h.process(batch(&[("b", 101.0, 3)])).unwrap()).len(), 1);
        // The same settings again change nothing.
        assert!(live.update(vec![rule("hot", th(100.0, 95.0))]).unwrap().is_empty());
        // What would not fit the state is refused, and the rules stay as they were.
        let refused = |rules: Vec<RuleSpec>| live.update(rules).unwrap_err().to_string();
        assert!(refused(vec![rule("warm", th(1.0, 1.0))]).contains("renaming"));
        assert!(refused(vec![rule("hot", th(1.0, 1.0)), rule("cold", th(1.0, 1.0))]).contains("adding"));
        let ewma = RuleKind::Ewma { value: "v".into(), alpha: 0.1, threshold: 3.0, warmup: 5 };
        assert!(refused(vec![rule("hot", ewma)]).contains("kind"));
        assert!(refused(vec![rule("hot", th(50.0, 60.0))]).contains("clear_below"));
        let mut labelled = rule("hot", th(1.0, 1.0));
        labelled.labels.insert("team".into(), "pumps".into());
        assert!(refused(vec![labelled]).contains("labels"));
        assert_eq!(live.rules(), vec![rule("hot", th(100.0, 95.0))]);
        // A run that starts after the change (a restart) starts with it.
        let mut h = weir_core::testing::OpHarness::new(f.as_ref()).unwrap();
        assert_eq!(detections(&h.process(batch(&[("c", 90.0, 4)])).unwrap()), vec![]);
    }

    #[test]
    fn a_state_ttl_forgets_keys_and_new_keys_start_afresh() {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let spec = DetectSpec {
            keys: vec!["k".into()],
            rules: vec![rule("hot", th(80.0, 75.0))],
            emit_all: false,
            state_ttl: Some(std::time::Duration::from_secs(10)),
            live: None,
        };
        let (f, _) = spec.plan(&input).unwrap();
        let mut h = weir_core::testing::OpHarness::new(f.as_ref()).unwrap();
        // `a` goes hot (fires), then is not seen for a minute of event time.
        assert_eq!(detections(&h.process(batch(&[("a", 90.0, 0)])).unwrap()).len(), 1);
        h.process(batch(&[("b", 1.0, 60_000)])).unwrap();
        h.watermark(60_000).unwrap();
        assert_eq!(h.metrics_state(), (1, 1), "a forgotten, b held");
        // `a` again, still hot: without its old state it fires anew.
        let again = detections(&h.process(batch(&[("a", 91.0, 60_001)])).unwrap());
        assert_eq!(again, vec![("a".into(), "hot".into(), true)]);
        assert!(h.snapshot().unwrap().unwrap().num_rows() == 2, "only the keys held are saved");

        // A silence rule keeps its key until it fired.
        let spec = DetectSpec {
            keys: vec!["k".into()],
            rules: vec![rule("dead-man", RuleKind::Silence { timeout_ms: 1000 })],
            emit_all: false,
            state_ttl: Some(std::time::Duration::from_secs(10)),
            live: None,
        };
        let (f, _) = spec.plan(&input).unwrap();
        let mut h = weir_core::testing::OpHarness::new(f.as_ref()).unwrap();
        h.process(batch(&[("quiet", 1.0, 0)])).unwrap();
        h.watermark(60_000).unwrap();
        assert_eq!(h.metrics_state(), (1, 0), "waited on by the silence rule");
        let fired = detections(&h.tick(now_ms() + 5_000).unwrap());
        assert_eq!(fired, vec![("quiet".into(), "dead-man".into(), true)]);
        h.watermark(120_000).unwrap();
        assert_eq!(h.metrics_state(), (0, 1));
        assert!(h.tick(now_ms() + 10_000).unwrap().is_empty(), "a forgotten key is not watched");
    }

    #[test]
    fn state_is_restored_from_a_snapshot() {
        let rules = || vec![rule("hot", th(80.0, 75.0))];
        let mut h = harness(rules());
        h.process(batch(&[("a", 90.0, 0)])).unwrap();
        let snap = h.snapshot().unwrap();
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let (f, _) =
            DetectSpec { keys: vec!["k".into()], rules: rules(), emit_all: false, state_ttl: None, live: None }
                .plan(&input)
                .unwrap();
        let mut again = weir_core::testing::OpHarness::restored(f.as_ref(), snap, None).unwrap();
        // 78 is under the trigger but over the clear level: still firing after the restore.
        let got = detections(&again.process(batch(&[("a", 78.0, 1)])).unwrap());
        assert_eq!(got, vec![("a".into(), "hot".into(), true)]);
    }

    #[test]
    fn plans_reject_bad_rules() {
        let input =
            Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("s", DataType::Utf8, true)]));
        let spec = |kind| DetectSpec {
            live: None,
            keys: vec!["k".into()],
            rules: vec![rule("r", kind)],
            emit_all: false,
            state_ttl: None,
        };
        let err = spec(th(1.0, 2.0)).plan(&input).unwrap_err().to_string();
        assert!(err.contains("unknown column `v`") || err.contains("`v`"), "{err}");
        let k = RuleKind::Threshold {
            value: "s".into(),
            above: Some(1.0),
            clear_below: None,
            below: None,
            clear_above: None,
        };
        assert!(spec(k).plan(&input).unwrap_err().to_string().contains("must be numeric"));
        let k = RuleKind::Silence { timeout_ms: 0 };
        assert!(spec(k).plan(&input).unwrap_err().to_string().contains("timeout must be positive"));
    }
}
