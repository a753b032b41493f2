//! The alert lifecycle: detections in, alerts out, deduplicated, throttled, escalated and
//! resolved. This module is the pure state machine, driven by an explicit clock so that every
//! lifecycle can be tested on a virtual one; the operator around it feeds it detections and
//! timer ticks.
//!
//! ```text
//! detections   x  x x        x                      (x: anomaly for one key and rule)
//! state        F  F F        F ......... R           F fired/firing, R resolved
//! events       fired updated  updated    resolved   (after `resolve_after` without one)
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

use crate::rules::DETECTION_COLUMNS;
pub use weir_core::notify::{Alert, AlertEvent, AlertNotice, AlertNotify, AlertState};

/// How alerts behave. Times are ms on the manager's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertPolicy {
    /// A firing alert resolves when no anomaly has come for this long.
    pub resolve_after_ms: i64,
    /// Or when this many normal observations in a row have come (with `detect` emitting all).
    pub resolve_after_count: Option<u64>,
    /// After an alert resolves, an anomaly within this time re-opens it quietly instead of
    /// raising a new alert: flapping is not paged twice.
    pub cool_down_ms: i64,
    /// An alert still unacknowledged this long after it fired escalates (once).
    pub escalate_after_ms: Option<i64>,
    /// The severity of an escalated alert.
    pub escalate_to: String,
    /// Resolved alerts are kept this long for the API, then forgotten.
    pub retain_ms: i64,
}

impl Default for AlertPolicy {
    fn default() -> Self {
        Self {
            resolve_after_ms: 60_000,
            resolve_after_count: None,
            cool_down_ms: 300_000,
            escalate_after_ms: None,
            escalate_to: "critical".into(),
            retain_ms: 3_600_000,
        }
    }
}

/// A detection as the manager sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation<'a> {
    /// Rendered key.
    pub key: &'a str,
    /// Rule name.
    pub rule: &'a str,
    /// The rule's severity.
    pub severity: &'a str,
    /// The watched value.
    pub value: Option<f64>,
    /// The score.
    pub score: f64,
    /// Whether the rule flagged the row.
    pub anomaly: bool,
    /// Event time, ms.
    pub event_time: i64,
    /// The rule's labels as a JSON object, when the detections carry them.
    pub labels: Option<&'a str>,
}

/// Why an API call on an alert failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertError {
    /// No alert has that id (or it was forgotten after `retain`).
    NotFound(String),
    /// The alert is already resolved.
    Resolved(String),
}

impl std::fmt::Display for AlertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(id) => write!(f, "no alert `{id}`"),
            Self::Resolved(id) => write!(f, "alert `{id}` is already resolved"),
        }
    }
}

impl std::error::Error for AlertError {}

/// The alerts of one manager: at most one live alert per (rule, key).
#[derive(Debug, Clone, Default)]
pub struct AlertBook {
    policy: AlertPolicy,
    /// By (rule, key): the current or last alert.
    alerts: BTreeMap<(String, String), Alert>,
}

impl AlertBook {
    /// An empty book.
    pub fn new(policy: AlertPolicy) -> Self {
        Self { policy, alerts: BTreeMap::new() }
    }

    /// The policy.
    pub fn policy(&self) -> &AlertPolicy {
        &self.policy
    }

    /// Every alert held, live ones and resolved ones still retained.
    pub fn alerts(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.values()
    }

    /// Puts an alert back (restoring a checkpoint).
    pub fn insert(&mut self, a: Alert) {
        self.alerts.insert((a.rule.clone(), a.key.clone()), a);
    }

    /// Folds in one detection at clock time `now`; returns what changed.
    pub fn observe(&mut self, o: &Observation<'_>, now: i64) -> Option<(AlertEvent, Alert)> {
        let slot = (o.rule.to_string(), o.key.to_string());
        if !o.anomaly {
            let a = self.alerts.get_mut(&slot)?;
            if a.state == AlertState::Resolved {
                return None;
            }
            a.clear_count += 1;
            if self.policy.resolve_after_count.is_some_and(|n| a.clear_count >= n) {
                a.state = AlertState::Resolved;
                a.resolved_at = Some(now);
                return Some((AlertEvent::Resolved, a.clone()));
            }
            return None;
        }
        match self.alerts.get_mut(&slot) {
            Some(a)
                if a.state != AlertState::Resolved
                    || a.resolved_at.is_some_and(|r| now - r < self.policy.cool_down_ms) =>
            {
                // A repeat, or a flap within the cool-down: the same alert, quietly re-opened.
                if a.state == AlertState::Resolved {
                    a.state = AlertState::Firing;
                    a.resolved_at = None;
                }
                a.count += 1;
                a.last_seen = a.last_seen.max(o.event_time);
                a.value = o.value;
                a.score = o.score;
                a.last_anomaly_at = now;
                a.clear_count = 0;
                Some((AlertEvent::Updated, a.clone()))
            }
            _ => {
                let a = Alert {
                    id: format!("{}/{}/{}", o.rule, o.key, o.event_time),
                    key: o.key.to_string(),
                    rule: o.rule.to_string(),
                    severity: o.severity.to_string(),
                    value: o.value,
                    score: o.score,
                    first_seen: o.event_time,
                    last_seen: o.event_time,
                    count: 1,
                    state: AlertState::Firing,
                    escalated: false,
                    fired_at: now,
                    last_anomaly_at: now,
                    resolved_at: None,
                    clear_count: 0,
                    labels: o.labels.and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default(),
                };
                self.alerts.insert(slot, a.clone());
                Some((AlertEvent::Fired, a))
            }
        }
    }

    /// Advances the clock: resolves quiet alerts, escalates neglected ones, forgets old ones.
    pub fn tick(&mut self, now: i64) -> Vec<(AlertEvent, Alert)> {
        let p = &self.policy;
        let mut out = Vec::new();
        self.alerts.retain(|_, a| {
            !(a.state == AlertState::Resolved
                && a.resolved_at.is_some_and(|r| now - r >= p.retain_ms.max(p.cool_down_ms)))
        });
        for a in self.alerts.values_mut() {
            if a.state == AlertState::Resolved {
                continue;
            }
            if now - a.last_anomaly_at >= p.resolve_after_ms {
                a.state = AlertState::Resolved;
                a.resolved_at = Some(now);
                out.push((AlertEvent::Resolved, a.clone()));
                continue;
            }
            if a.state == AlertState::Firing
                && !a.escalated
                && p.escalate_after_ms.is_some_and(|e| now - a.fired_at >= e)
            {
                a.escalated = true;
                a.severity = p.escalate_to.clone();
                out.push((AlertEvent::Escalated, a.clone()));
            }
        }
        out
    }

    fn by_id(&mut self, id: &str) -> Result<&mut Alert, AlertError> {
        self.alerts.values_mut().find(|a| a.id == id).ok_or_else(|| AlertError::NotFound(id.to_string()))
    }

    /// Acknowledges a live alert: it stops escalating.
    ///
    /// # Errors
    /// Unknown id, or an alert already resolved.
    pub fn acknowledge(&mut self, id: &str) -> Result<(AlertEvent, Alert), AlertError> {
        let a = self.by_id(id)?;
        if a.state == AlertState::Resolved {
            return Err(AlertError::Resolved(id.to_string()));
        }
        a.state = AlertState::Acknowledged;
        Ok((AlertEvent::Acknowledged, a.clone()))
    }

    /// Resolves a live alert by hand.
    ///
    /// # Errors
    /// Unknown id, or an alert already resolved.
    pub fn resolve(&mut self, id: &str, now: i64) -> Result<(AlertEvent, Alert), AlertError> {
        let a = self.by_id(id)?;
        if a.state == AlertState::Resolved {
            return Err(AlertError::Resolved(id.to_string()));
        }
        a.state = AlertState::Resolved;
        a.resolved_at = Some(now);
        Ok((AlertEvent::Resolved, a.clone()))
    }
}

/// The manager's clock: the wall clock, or one a test moves by hand.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// Milliseconds since the epoch, by the system.
    #[default]
    Wall,
    /// A virtual clock.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// Now, in ms.
    pub fn now(&self) -> i64 {
        match self {
            Self::Wall => weir_core::deadletter::now_ms(),
            Self::Manual(t) => t.load(Ordering::Relaxed),
        }
    }
}

/// Every worker's alert book, for the HTTP API: listing reads them, acknowledging and
/// resolving change them and queue the event for the owning worker to emit.
#[derive(Debug, Default)]
pub struct AlertBoard {
    books: Mutex<Vec<Arc<Mutex<WorkerBook>>>>,
}

/// One worker's book and the events that API calls made, waiting to be emitted.
#[derive(Debug)]
pub struct WorkerBook {
    /// The alerts.
    pub book: AlertBook,
    /// Events made by API calls, emitted on the worker's next tick.
    pub pending: Vec<(AlertEvent, Alert)>,
    /// The key group of each alert's key, by (rule, key), for checkpoints.
    groups: BTreeMap<(String, String), u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AlertBoard {
    fn register(&self, b: Arc<Mutex<WorkerBook>>) {
        lock(&self.books).push(b);
    }

    /// Every alert of every worker, filtered; newest first.
    pub fn list(&self, state: Option<AlertState>, key: Option<&str>, severity: Option<&str>) -> Vec<Alert> {
        let mut out: Vec<Alert> = lock(&self.books)
            .iter()
            .flat_map(|b| lock(b).book.alerts().cloned().collect::<Vec<_>>())
            .filter(|a| state.is_none_or(|s| a.state == s))
            .filter(|a| key.is_none_or(|k| a.key == k))
            .filter(|a| severity.is_none_or(|s| a.severity == s))
            .collect();
        out.sort_by(|a, b| b.fired_at.cmp(&a.fired_at).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// Acknowledges (`resolve` false) or resolves an alert by id.
    ///
    /// # Errors
    /// Unknown id, or an alert already resolved.
    pub fn act(&self, id: &str, resolve: bool, now: i64) -> Result<Alert, AlertError> {
        for b in lock(&self.books).iter() {
            let mut wb = lock(b);
            if !wb.book.alerts().any(|a| a.id == id) {
                continue;
            }
            let ev = if resolve { wb.book.resolve(id, now)? } else { wb.book.acknowledge(id)? };
            let alert = ev.1.clone();
            wb.pending.push(ev);
            return Ok(alert);
        }
        Err(AlertError::NotFound(id.to_string()))
    }
}

/// The `alert` step: detections (the `detect` step's output) in, alert events out.
///
/// Output, one row per event: `alert_id`, `event` (fired, updated, escalated, acknowledged,
/// resolved), `state`, `key`, `rule`, `severity`, `value`, `score`, `first_seen`, `last_seen`
/// (event time, ms), `count`, `escalated`, `at` (the manager's clock, ms).
#[derive(Debug, Clone)]
pub struct AlertSpec {
    /// Lifecycle settings.
    pub policy: AlertPolicy,
    /// Which events to emit (default: all of them).
    pub events: Vec<AlertEvent>,
    /// The clock timers run on.
    pub clock: Clock,
    /// Where the HTTP API finds the books.
    pub board: Arc<AlertBoard>,
    /// Who hears of every event (routes to webhooks and the like, the live stream), whatever
    /// `events` lets through to the output.
    pub notify: Vec<Arc<dyn AlertNotify>>,
}

/// The alert event columns.
pub fn alert_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("score", DataType::Float64, false),
        Field::new("first_seen", DataType::Int64, false),
        Field::new("last_seen", DataType::Int64, false),
        Field::new("count", DataType::UInt64, false),
        Field::new("escalated", DataType::Boolean, false),
        Field::new("at", DataType::Int64, false),
        Field::new("labels", DataType::Utf8, false),
    ]))
}

impl AlertSpec {
    /// Checks that the input is a stream of detections; returns the factory and the alert
    /// event schema.
    ///
    /// # Errors
    /// A detection column missing or of the wrong type, or no key columns.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        for want in crate::rules::detection_fields() {
            let (name, ty) = (want.name(), want.data_type());
            let f = input.field_with_name(name).map_err(|_| {
                CoreError::Config(format!(
                    "alert takes detections (a `detect` step's output), but its input has no `{name}` column"
                ))
            })?;
            weir_core::ensure_config!(
                f.data_type() == ty,
                "alert: column `{name}` is {}, expected {ty}",
                f.data_type()
            );
        }
        let keys: Vec<String> = input
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !DETECTION_COLUMNS.contains(&n.as_str()) && n != crate::rules::LABELS_COLUMN)
            .collect();
        weir_core::ensure_config!(!keys.is_empty(), "alert: the detections carry no key columns");
        let p = &self.policy;
        weir_core::ensure_config!(p.resolve_after_ms > 0, "alert: resolve_after must be positive");
        let out = alert_schema();
        Ok((Arc::new(AlertFactory { spec: self.clone(), keys, out: out.clone() }), out))
    }
}

#[derive(Debug)]
struct AlertFactory {
    spec: AlertSpec,
    keys: Vec<String>,
    out: SchemaRef,
}

impl OperatorFactory for AlertFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let book = Arc::new(Mutex::new(WorkerBook {
            book: AlertBook::new(self.spec.policy.clone()),
            pending: Vec::new(),
            groups: BTreeMap::new(),
        }));
        self.spec.board.register(book.clone());
        Ok(Box::new(AlertOp { spec: self.spec.clone(), keys: self.keys.clone(), out: self.out.clone(), book }))
    }
}

#[derive(Debug)]
struct AlertOp {
    spec: AlertSpec,
    keys: Vec<String>,
    out: SchemaRef,
    book: Arc<Mutex<WorkerBook>>,
}

/// A column of a known type (planning checked it), by name.
fn typed<A: Array + Clone + 'static>(batch: &RecordBatch, name: &str) -> Result<A> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>().cloned())
        .ok_or_else(|| CoreError::Internal(format!("column `{name}` is missing or of another type")))
}

fn strings(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    typed(batch, name)
}

impl AlertOp {
    fn emit(&self, events: Vec<(AlertEvent, Alert)>, now: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if !self.spec.notify.is_empty() {
            for (event, alert) in &events {
                let notice = AlertNotice { step: cx.step.to_string(), event: *event, alert: alert.clone(), at: now };
                for n in &self.spec.notify {
                    n.notify(&notice);
                }
            }
        }
        let events: Vec<(AlertEvent, Alert)> =
            events.into_iter().filter(|(e, _)| self.spec.events.is_empty() || self.spec.events.contains(e)).collect();
        if events.is_empty() {
            return Ok(());
        }
        let s = |f: &dyn Fn(&(AlertEvent, Alert)) -> String| -> ArrayRef {
            Arc::new(StringArray::from(events.iter().map(f).collect::<Vec<_>>()))
        };
        let i = |f: &dyn Fn(&Alert) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from(events.iter().map(|e| f(&e.1)).collect::<Vec<_>>()))
        };
        let cols: Vec<ArrayRef> = vec![
            s(&|e| e.1.id.clone()),
            s(&|e| e.0.as_str().to_string()),
            s(&|e| e.1.state.as_str().to_string()),
            s(&|e| e.1.key.clone()),
            s(&|e| e.1.rule.clone()),
            s(&|e| e.1.severity.clone()),
            Arc::new(Float64Array::from(events.iter().map(|e| e.1.value).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(events.iter().map(|e| e.1.score).collect::<Vec<_>>())),
            i(&|a| a.first_seen),
            i(&|a| a.last_seen),
            Arc::new(UInt64Array::from(events.iter().map(|e| e.1.count).collect::<Vec<_>>())),
            Arc::new(BooleanArray::from(events.iter().map(|e| e.1.escalated).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(vec![now; events.len()])),
            s(&|e| serde_json::to_string(&e.1.labels).unwrap_or_default()),
        ];
        let rows = RecordBatch::try_new(self.out.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rows.num_rows() as u64);
        let m = &cx.registry.connectors;
        for (e, a) in &events {
            m.add(
                "weir_alert_events_total",
                "Alert events, by kind and severity.",
                &[("step", cx.step.as_str()), ("event", e.as_str()), ("severity", &a.severity)],
                1.0,
            );
        }
        cx.emit(Batch::new(rows, Int64Array::from(vec![now; events.len()]))?);
        Ok(())
    }

    fn report_live(&self, wb: &WorkerBook, cx: &OpContext<'_>) {
        let live = wb.book.alerts().filter(|a| a.state != AlertState::Resolved).count();
        cx.registry.connectors.set(
            "weir_alerts_live",
            "Alerts firing or acknowledged, on this worker.",
            &[("step", cx.step.as_str()), ("worker", &cx.worker.to_string())],
            live as f64,
        );
    }
}

impl Operator for AlertOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let rows = &batch.rows;
        let keys = weir_core::quarantine::key_texts(rows, &self.keys)?;
        let groups = weir_core::state::key_groups(&weir_core::keys::key_columns(rows, &self.keys)?, rows.num_rows())?;
        let (rule, sev) = (strings(rows, "rule")?, strings(rows, "severity")?);
        let value: Float64Array = typed(rows, "value")?;
        let score: Float64Array = typed(rows, "score")?;
        let anomaly: BooleanArray = typed(rows, "anomaly")?;
        let labels: Option<StringArray> =
            rows.schema().column_with_name(crate::rules::LABELS_COLUMN).map(|_| strings(rows, "labels")).transpose()?;
        let now = self.spec.clock.now();
        let mut events = Vec::new();
        let book = self.book.clone();
        let mut wb = lock(&book);
        for (i, key) in keys.iter().enumerate() {
            let key = key.as_deref().unwrap_or("").replace('\u{1f}', "|");
            let o = Observation {
                key: &key,
                rule: rule.value(i),
                severity: sev.value(i),
                value: (!value.is_null(i)).then(|| value.value(i)),
                score: score.value(i),
                anomaly: anomaly.value(i),
                event_time: batch.time.value(i),
                labels: labels.as_ref().map(|l| l.value(i)),
            };
            if let Some(ev) = wb.book.observe(&o, now) {
                wb.groups.insert((o.rule.to_string(), key.clone()), groups.value(i));
                events.push(ev);
            }
        }
        StepMetrics::add(&cx.metrics.aggregated, rows.num_rows() as u64);
        self.report_live(&wb, cx);
        drop(wb);
        self.emit(events, now, cx)
    }

    fn on_tick(&mut self, _now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        // The manager's own clock, so that a virtual clock drives the timers in tests.
        let now = self.spec.clock.now();
        let book = self.book.clone();
        let mut wb = lock(&book);
        let mut events = std::mem::take(&mut wb.pending);
        events.extend(wb.book.tick(now));
        let WorkerBook { book: b, groups, .. } = &mut *wb;
        groups.retain(|slot, _| {
            b.alerts().any(|a| (a.rule.as_str(), a.key.as_str()) == (slot.0.as_str(), slot.1.as_str()))
        });
        self.report_live(&wb, cx);
        drop(wb);
        for n in &self.spec.notify {
            n.report(&cx.registry.connectors);
        }
        self.emit(events, now, cx)
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        // Events an API call made since the last tick, then everything queued delivered.
        self.on_tick(0, cx)?;
        for n in &self.spec.notify {
            n.drain();
            n.report(&cx.registry.connectors);
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(100))
    }

    /// One row per alert held: its key group, and the alert's fields.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let wb = lock(&self.book);
        let alerts: Vec<&Alert> = wb.book.alerts().collect();
        if alerts.is_empty() {
            return Ok(None);
        }
        let groups: Vec<u32> =
            alerts.iter().map(|a| wb.groups.get(&(a.rule.clone(), a.key.clone())).copied().unwrap_or(0)).collect();
        let json: Vec<String> = alerts.iter().map(|a| encode_alert(a)).collect();
        weir_core::state::state_table(
            UInt32Array::from(groups),
            vec![Field::new("alert", DataType::Utf8, false)],
            vec![Arc::new(StringArray::from(json))],
        )
        .map(Some)
    }

    fn restore(&mut self, t: RecordBatch) -> Result<()> {
        let groups = t
            .column(0)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| CoreError::Internal("key groups".into()))?;
        let alerts = strings(&t, "alert")?;
        let mut wb = lock(&self.book);
        for i in 0..t.num_rows() {
            let a = decode_alert(alerts.value(i))?;
            wb.groups.insert((a.rule.clone(), a.key.clone()), groups.value(i));
            wb.book.insert(a);
        }
        Ok(())
    }
}

/// An alert as a JSON object, for checkpoints and the API.
pub fn alert_json(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "key": a.key, "rule": a.rule, "severity": a.severity, "value": a.value, "score": a.score,
        "first_seen": a.first_seen, "last_seen": a.last_seen, "count": a.count, "state": a.state.as_str(),
        "escalated": a.escalated, "fired_at": a.fired_at, "last_anomaly_at": a.last_anomaly_at,
        "resolved_at": a.resolved_at, "clear_count": a.clear_count, "labels": a.labels,
    })
}

fn encode_alert(a: &Alert) -> String {
    alert_json(a).to_string()
}

fn decode_alert(s: &str) -> Result<Alert> {
    let bad = |what: &str| {
        CoreError::Config(format!("a checkpointed alert has no valid `{what}`; was it written by another version?"))
    };
    let v: serde_json::Value = serde_json::from_str(s).map_err(|_| bad("JSON"))?;
    let st = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| bad(k));
    let int = |k: &str| v[k].as_i64().ok_or_else(|| bad(k));
    Ok(Alert {
        id: st("id")?,
        key: st("key")?,
        rule: st("rule")?,
        severity: st("severity")?,
        value: v["value"].as_f64(),
        score: v["score"].as_f64().unwrap_or(0.0),
        first_seen: int("first_seen")?,
        last_seen: int("last_seen")?,
        count: v["count"].as_u64().ok_or_else(|| bad("count"))?,
        state: v["state"].as_str().and_then(AlertState::parse).ok_or_else(|| bad("state"))?,
        escalated: v["escalated"].as_bool().unwrap_or(false),
        fired_at: int("fired_at")?,
        last_anomaly_at: int("last_anomaly_at")?,
        resolved_at: v["resolved_at"].as_i64(),
        clear_count: v["clear_count"].as_u64().unwrap_or(0),
        labels: serde_json::from_value(v["labels"].clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AlertPolicy {
        AlertPolicy {
            resolve_after_ms: 3,
            resolve_after_count: None,
            cool_down_ms: 5,
            escalate_after_ms: Some(4),
            escalate_to: "critical".into(),
            retain_ms: 20,
        }
    }

    /// Plays a timeline, one character per clock step: `x` an anomaly, `o` a normal
    /// observation, `a` an acknowledgement, `r` a manual resolve, anything else nothing. After
    /// each step the clock ticks. Returns the events, as `t:event` words.
    fn play(book: &mut AlertBook, timeline: &str) -> String {
        let mut out = Vec::new();
        for (t, c) in timeline.chars().enumerate() {
            let t = t as i64;
            let obs = |anomaly| Observation {
                key: "dev-1",
                rule: "hot",
                severity: "warning",
                value: Some(1.0),
                score: 2.0,
                anomaly,
                event_time: t * 1000,
                labels: None,
            };
            let mut events = Vec::new();
            match c {
                'x' => events.extend(book.observe(&obs(true), t)),
                'o' => events.extend(book.observe(&obs(false), t)),
                'a' => {
                    let id = book.alerts().next().map(|a| a.id.clone()).unwrap_or_default();
                    events.extend(book.acknowledge(&id).ok());
                }
                'r' => {
                    let id = book.alerts().next().map(|a| a.id.clone()).unwrap_or_default();
                    events.extend(book.resolve(&id, t).ok());
                }
                _ => {}
            }
            events.extend(book.tick(t));
            out.extend(events.iter().map(|(e, _)| format!("{t}:{}", e.as_str())));
        }
        out.join(" ")
    }

    #[test]
    fn fire_repeat_resolve() {
        // clock   0123456
        // input   xx.x...         resolve_after 3 steps without an anomaly
        // events  F U U  R
        let mut b = AlertBook::new(AlertPolicy { escalate_after_ms: None, ..policy() });
        assert_eq!(play(&mut b, "xx.x..."), "0:fired 1:updated 3:updated 6:resolved");
        let a = b.alerts().next().unwrap();
        assert_eq!((a.count, a.first_seen, a.last_seen, a.state), (3, 0, 3000, AlertState::Resolved));
        assert_eq!(a.id, "hot/dev-1/0");
    }

    #[test]
    fn unacknowledged_alerts_escalate_once() {
        // clock   012345
        // input   xxxxxx          never acknowledged: escalates at 4, once
        let mut b = AlertBook::new(policy());
        assert_eq!(play(&mut b, "xxxxxx"), "0:fired 1:updated 2:updated 3:updated 4:updated 4:escalated 5:updated");
        assert_eq!(b.alerts().next().unwrap().severity, "critical");
    }

    #[test]
    fn acknowledged_alerts_do_not_escalate_and_still_resolve() {
        // clock   01234567
        // input   xaxx....
        // events  F A U U   R (3 steps after the last x)
        let mut b = AlertBook::new(policy());
        assert_eq!(play(&mut b, "xaxx...."), "0:fired 1:acknowledged 2:updated 3:updated 6:resolved");
    }

    #[test]
    fn flapping_within_the_cool_down_reopens_the_same_alert() {
        // clock   0123456789012345
        // input   x...x.......x...     resolved at 3; x at 4 is within 5 of it: same alert;
        //                              resolved at 7; x at 12 is past the cool-down: a new one
        let mut b = AlertBook::new(AlertPolicy { escalate_after_ms: None, ..policy() });
        let got = play(&mut b, "x...x.......x...");
        assert_eq!(got, "0:fired 3:resolved 4:updated 7:resolved 12:fired 15:resolved");
        assert_eq!(b.alerts().next().unwrap().id, "hot/dev-1/12000");
    }

    #[test]
    fn clear_observations_can_resolve_by_count() {
        // clock   012345
        // input   xoxooo    two normal observations in a row resolve it (the x resets the count)
        let mut b = AlertBook::new(AlertPolicy {
            resolve_after_ms: 100,
            resolve_after_count: Some(2),
            escalate_after_ms: None,
            ..policy()
        });
        assert_eq!(play(&mut b, "xoxoo"), "0:fired 2:updated 4:resolved");
    }

    #[test]
    fn manual_resolve_and_errors() {
        let mut b = AlertBook::new(policy());
        assert_eq!(play(&mut b, "xr"), "0:fired 1:resolved");
        let id = b.alerts().next().unwrap().id.clone();
        assert_eq!(b.acknowledge(&id), Err(AlertError::Resolved(id.clone())));
        assert_eq!(b.resolve("nope", 2), Err(AlertError::NotFound("nope".into())));
        // Forgotten once retained long enough.
        b.tick(100);
        assert_eq!(b.alerts().count(), 0);
    }

    mod operator {
        use super::super::*;
        use weir_core::testing::OpHarness;

        fn detections(rows: &[(&str, bool, i64)]) -> Batch {
            let mut fields = vec![Field::new("device_id", DataType::Utf8, true)];
            fields.extend(crate::rules::detection_fields());
            let schema = Arc::new(Schema::new(fields));
            let n = rows.len();
            let rb = RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                    Arc::new(StringArray::from(vec!["hot"; n])),
                    Arc::new(StringArray::from(vec!["warning"; n])),
                    Arc::new(Float64Array::from(vec![Some(40.0); n])),
                    Arc::new(Float64Array::from(vec![5.0; n])),
                    Arc::new(BooleanArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                    Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
                ],
            )
            .unwrap();
            Batch::new(rb, Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())).unwrap()
        }

        fn events(out: &[Batch]) -> Vec<String> {
            out.iter()
                .flat_map(|b| {
                    let ev = strings(&b.rows, "event").unwrap();
                    let key = strings(&b.rows, "key").unwrap();
                    (0..b.num_rows()).map(move |i| format!("{}:{}", key.value(i), ev.value(i))).collect::<Vec<_>>()
                })
                .collect()
        }

        fn manual(clock: &Arc<AtomicI64>) -> AlertSpec {
            AlertSpec {
                policy: AlertPolicy { resolve_after_ms: 1000, escalate_after_ms: Some(600), ..AlertPolicy::default() },
                events: Vec::new(),
                clock: Clock::Manual(clock.clone()),
                board: Arc::default(),
                notify: Vec::new(),
            }
        }

        #[test]
        fn detections_become_alerts_on_a_virtual_clock() {
            // clock ms   0      300      700         1300      2000
            // dev-1      x      x        (escalate)  x         ...      resolved at 2300
            // dev-2             x                    (ack'd)            resolved at 1300
            let clock = Arc::new(AtomicI64::new(0));
            let spec = manual(&clock);
            let (f, schema) = spec.plan(&detections(&[]).rows.schema()).unwrap();
            assert_eq!(schema.field(0).name(), "alert_id");
            let mut h = OpHarness::new(f.as_ref()).unwrap();
            let mut log = events(&h.process(detections(&[("dev-1", true, 10)])).unwrap());
            clock.store(300, Ordering::Relaxed);
            log.extend(events(&h.process(detections(&[("dev-1", true, 20), ("dev-2", true, 21)])).unwrap()));
            clock.store(700, Ordering::Relaxed);
            log.extend(events(&h.tick(700).unwrap()));
            // The API acknowledges dev-2's alert; its event leaves on the next tick.
            let id = spec.board.list(None, Some("dev-2"), None)[0].id.clone();
            assert_eq!(spec.board.act(&id, false, 700).unwrap().state, AlertState::Acknowledged);
            log.extend(events(&h.tick(700).unwrap()));
            clock.store(1300, Ordering::Relaxed);
            log.extend(events(&h.process(detections(&[("dev-1", true, 30)])).unwrap()));
            log.extend(events(&h.tick(1300).unwrap()));
            clock.store(2300, Ordering::Relaxed);
            log.extend(events(&h.tick(2300).unwrap()));
            assert_eq!(
                log,
                [
                    "dev-1:fired",
                    "dev-1:updated",
                    "dev-2:fired",
                    "dev-1:escalated",
                    "dev-2:acknowledged",
                    "dev-1:updated",
                    "dev-2:resolved",
                    "dev-1:resolved"
                ]
            );
            let all = spec.board.list(Some(AlertState::Resolved), None, None);
            assert_eq!(all.len(), 2);
            let d1 = all.iter().find(|a| a.key == "dev-1").unwrap();
            assert_eq!((d1.count, d1.first_seen, d1.last_seen, d1.severity.as_str()), (3, 10, 30, "critical"));
            assert!(spec.board.act("nope", true, 0).is_err());
        }

        #[test]
        fn alerts_survive_a_checkpoint() {
            let clock = Arc::new(AtomicI64::new(0));
            let spec = manual(&clock);
            let (f, _) = spec.plan(&detections(&[]).rows.schema()).unwrap();
            let mut h = OpHarness::new(f.as_ref()).unwrap();
            h.process(detections(&[("dev-1", true, 10)])).unwrap();
            let snap = h.snapshot().unwrap();
            let spec2 = manual(&clock);
            let (f2, _) = spec2.plan(&detections(&[]).rows.schema()).unwrap();
            let mut again = OpHarness::restored(f2.as_ref(), snap, None).unwrap();
            // The restored alert is updated, not raised again.
            assert_eq!(events(&again.process(detections(&[("dev-1", true, 20)])).unwrap()), ["dev-1:updated"]);
            assert_eq!(spec2.board.list(None, None, None)[0].id, "hot/dev-1/10");
        }

        #[test]
        fn the_input_must_be_detections() {
            let clock = Arc::new(AtomicI64::new(0));
            let schema = Arc::new(Schema::new(vec![Field::new("device_id", DataType::Utf8, true)]));
            let err = manual(&clock).plan(&schema).unwrap_err().to_string();
            assert!(err.contains("alert takes detections"), "{err}");
        }
    }
}
