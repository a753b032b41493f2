//! What leaves the pipeline beside its rows, as seen by the connectors that carry it: alert
//! events (the `alert` step makes them, routes deliver them) and side outputs (late rows).
//! These live in the core so that connectors need not depend on the operators.

use std::collections::BTreeMap;

use arrow_array::RecordBatch;

use crate::error::Result;

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertState {
    /// The condition holds and nobody has acknowledged it.
    Firing,
    /// Someone took it; it no longer escalates, and still resolves on its own.
    Acknowledged,
    /// Over.
    Resolved,
}

impl AlertState {
    /// The state's name in output rows and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    /// Parses [`AlertState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "firing" => Some(Self::Firing),
            "acknowledged" => Some(Self::Acknowledged),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }
}

/// What just happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertEvent {
    /// A new alert.
    Fired,
    /// A repeat of a live alert (or one re-opened within its cool-down).
    Updated,
    /// Unacknowledged for too long: severity raised.
    Escalated,
    /// Someone acknowledged it.
    Acknowledged,
    /// The condition cleared, or someone resolved it.
    Resolved,
}

impl AlertEvent {
    /// The event's name in output rows and routes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fired => "fired",
            Self::Updated => "updated",
            Self::Escalated => "escalated",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    /// Parses [`AlertEvent::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fired" => Some(Self::Fired),
            "updated" => Some(Self::Updated),
            "escalated" => Some(Self::Escalated),
            "acknowledged" => Some(Self::Acknowledged),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Stable id: rule, key and the event time it first fired at.
    pub id: String,
    /// The key, rendered (`dev-42`, or `a|b` for several key columns).
    pub key: String,
    /// The rule that fired.
    pub rule: String,
    /// Current severity (raised by escalation).
    pub severity: String,
    /// The last anomalous value.
    pub value: Option<f64>,
    /// The last anomaly's score.
    pub score: f64,
    /// Event time of the first anomaly, ms.
    pub first_seen: i64,
    /// Event time of the last anomaly, ms.
    pub last_seen: i64,
    /// Anomalies folded into this alert.
    pub count: u64,
    /// Where it is in its life.
    pub state: AlertState,
    /// Whether it escalated.
    pub escalated: bool,
    /// Clock time it fired, last saw an anomaly, and resolved (ms).
    pub fired_at: i64,
    /// Clock time of the last anomaly.
    pub last_anomaly_at: i64,
    /// Clock time it resolved, when it did.
    pub resolved_at: Option<i64>,
    /// Normal observations in a row since the last anomaly.
    pub clear_count: u64,
    /// The labels of the rule that raised it.
    pub labels: BTreeMap<String, String>,
}

/// One alert event, as notifiers receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertNotice {
    /// The `alert` step that made it.
    pub step: String,
    /// What happened.
    pub event: AlertEvent,
    /// The alert after the event.
    pub alert: Alert,
    /// The manager's clock at the event, ms.
    pub at: i64,
}

impl AlertNotice {
    /// The notice as a JSON object with the columns of the step's output (plus `step`): what
    /// webhooks, Redis and the live stream carry.
    pub fn to_json(&self) -> serde_json::Value {
        let a = &self.alert;
        serde_json::json!({
            "alert_id": a.id, "event": self.event.as_str(), "state": a.state.as_str(), "key": a.key,
            "rule": a.rule, "severity": a.severity, "value": a.value, "score": a.score,
            "first_seen": a.first_seen, "last_seen": a.last_seen, "count": a.count,
            "escalated": a.escalated, "at": self.at, "step": self.step, "labels": a.labels,
        })
    }
}

/// Something told of alert events as they happen: the routes to webhooks, Redis, Kafka and
/// files, and the HTTP live stream. Called on the worker's thread, so it must only queue.
pub trait AlertNotify: Send + Sync + std::fmt::Debug {
    /// Queues one event for delivery; never blocks.
    fn notify(&self, notice: &AlertNotice);
    /// Reports delivery counters (called on the worker's timer).
    fn report(&self, _metrics: &crate::metrics::ConnectorMetrics) {}
    /// Waits, within its own time limit, until what was queued has been delivered or given
    /// up on: called when the input ends, so that a finite run does not exit with alerts unsent.
    fn drain(&self) {}
}

/// Somewhere late rows (or other side outputs) can be written. Shared by all workers.
pub trait SideWriter: Send + Sync + std::fmt::Debug {
    /// Writes rows.
    fn write(&self, rows: &RecordBatch) -> Result<()>;
}
