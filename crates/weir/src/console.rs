//! The web console: static files compiled into the binary, served at `/` on the API port,
//! and the JSON they read (`GET /api/console`, and the same every second as Server-Sent Events
//! on `GET /api/console/stream`).
//!
//! A snapshot holds the pipeline's graph (the runtime's nodes and edges, each with its kind as
//! written in the file) and, per node, its counters (rows in and out, dead letters, late rows,
//! busy time) and the fill of the channels into its task (backpressure); the job's records
//! read and rows written, watermark, checkpoints, Kafka partition lag, quarantined keys and
//! alerts. Rates are the browser's business: it has the snapshots a second apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use weir_core::deadletter::RecentDeadLetters;

use crate::http::HttpState;

/// The page.
pub const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script.
pub const CONSOLE_JS: &str = include_str!("console/console.js");
/// Its style.
pub const CONSOLE_CSS: &str = include_str!("console/console.css");

/// A node of the graph: its id, its kind as written, and its inputs (producer, how rows are
/// spread: empty for forward, the key columns, or `*`).
pub type GraphNode = (String, String, Vec<(String, String)>);

/// What the console shows of a job besides its metrics: the graph and how its nodes map to
/// the runtime's stages.
#[derive(Debug)]
pub struct ConsoleInfo {
    /// Node id, its kind as written, and its inputs (producer, spread).
    pub nodes: Vec<GraphNode>,
    /// Per stage, the nodes it runs (its channels are `stage<N>-w<worker>`).
    pub stages: Vec<Vec<String>>,
    /// The last dead letters.
    pub recent: Arc<RecentDeadLetters>,
    /// The job's figures a second apart over the last minutes, for the charts.
    pub history: std::sync::Mutex<std::collections::VecDeque<Sample>>,
}

/// The job's figures at one moment: (ms since the epoch, records read, rows written,
/// watermark lag in seconds, end-to-end latency: sum in µs and rows measured so far).
pub type Sample = (i64, u64, u64, Option<f64>, u64, u64);

/// How many samples the charts get: five minutes, a second apart.
const HISTORY: usize = 300;

impl ConsoleInfo {
    /// The console's view of a job.
    pub fn new(nodes: Vec<GraphNode>, stages: Vec<Vec<String>>, recent: Arc<RecentDeadLetters>) -> Self {
        Self { nodes, stages, recent, history: std::sync::Mutex::default() }
    }

    /// Records the job's figures now (the HTTP port does, every second).
    pub fn sample(&self, reg: &weir_core::metrics::Registry) {
        let now = weir_core::deadletter::now_ms();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let lag = reg
            .watermark()
            .filter(|w| *w != weir_core::batch::END_OF_TIME)
            .map(|w| (now.saturating_sub(w)).max(0) as f64 / 1000.0);
        let mut h = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back((
            now,
            get(&reg.source_records),
            get(&reg.sink_rows),
            lag,
            reg.latency.sum_us(),
            reg.latency.count(),
        ));
    }
}

/// One snapshot of the running job (see the module documentation).
pub fn snapshot(s: &HttpState, info: &ConsoleInfo) -> Value {
    let reg = &s.registry;
    let steps: BTreeMap<String, weir_core::metrics::StepSnapshot> =
        reg.steps().into_iter().map(|(id, m)| (id.as_str().to_string(), m)).collect();
    // The fullest channel into each stage.
    let mut fill: BTreeMap<usize, f64> = BTreeMap::new();
    for (name, f) in reg.channel_fill() {
        if let Some(stage) = name.strip_prefix("stage").and_then(|r| r.split('-').next()).and_then(|n| n.parse().ok()) {
            let e = fill.entry(stage).or_insert(0.0);
            *e = e.max(f);
        }
    }
    let stage_of: BTreeMap<&str, usize> =
        info.stages.iter().enumerate().flat_map(|(i, ids)| ids.iter().map(move |id| (id.as_str(), i))).collect();
    let nodes: Vec<Value> = info
        .nodes
        .iter()
        .map(|(id, kind, inputs)| {
            let m = steps.get(id).copied().unwrap_or_default();
            let stage = stage_of.get(id.as_str()).copied();
            json!({
                "id": id,
                "kind": kind,
                "inputs": inputs.iter().map(|(from, by)| json!({ "from": from, "by": by })).collect::<Vec<_>>(),
                "stage": stage,
                "fill": stage.and_then(|t| fill.get(&t)).copied().unwrap_or(0.0),
                "rows_in": m.rows_in,
                "rows_out": m.rows_out + m.results_out,
                "filtered": m.filtered,
                "dead_letters": m.dead_lettered,
                "late": m.late_dropped + m.late_side,
                "busy_s": m.busy_ns as f64 / 1e9,
            })
        })
        .collect();
    let ck = &reg.checkpoints;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let partitions: Vec<Value> = reg
        .connectors
        .series("weir_kafka_consumer_lag")
        .into_iter()
        .map(|(labels, lag)| {
            let l: BTreeMap<String, String> = labels.into_iter().collect();
            json!({ "topic": l.get("topic"), "partition": l.get("partition"), "lag": lag })
        })
        .collect();
    let quarantine: Vec<Value> = s
        .quarantine
        .as_ref()
        .map(|q| q.list(Instant::now(), weir_core::deadletter::now_ms()))
        .unwrap_or_default()
        .into_iter()
        .map(|k| json!({ "key": k.key, "until_ms": k.until_ms }))
        .collect();
    let alerts: Vec<Value> = s
        .alerts
        .list(None, None, None)
        .iter()
        .filter(|a| a.state != weir_ops::alerts::AlertState::Resolved)
        .take(200)
        .map(weir_ops::alerts::alert_json)
        .collect();
    let watermark = reg.watermark().filter(|w| *w != weir_core::batch::END_OF_TIME);
    json!({
        "job": s.job,
        "phase": reg.phase.get().as_str(),
        "now_ms": weir_core::deadletter::now_ms(),
        "source_records": get(&reg.source_records),
        "sink_rows": get(&reg.sink_rows),
        "watermark_ms": watermark,
        "nodes": nodes,
        "checkpoints": {
            "enabled": get(&ck.enabled) > 0,
            "completed": get(&ck.completed),
            "failed": get(&ck.failed),
            "last_epoch": get(&ck.last_epoch),
            "last_duration_s": get(&ck.last_duration_us) as f64 / 1e6,
            "last_bytes": get(&ck.last_bytes),
            "last_completed_ms": get(&ck.last_completed_ms),
        },
        "partitions": partitions,
        "quarantine": quarantine,
        "alerts": alerts,
        "history": info.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().collect::<Vec<_>>(),
    })
}

/// The last dead letters, newest first, of `kind` and `step` when given.
pub fn recent_dead_letters(recent: &RecentDeadLetters, kind: Option<&str>, step: Option<&str>, limit: usize) -> Value {
    let rows = recent.newest(limit, |l| kind.is_none_or(|k| l.kind.as_str() == k) && step.is_none_or(|s| l.step == s));
    Value::Array(
        rows.into_iter()
            .map(|l| {
                json!({
                    "kind": l.kind.as_str(), "step": l.step, "reason": l.reason, "origin": l.origin,
                    "position": l.position, "time_ms": l.time_ms,
                })
            })
            .collect(),
    )
}
