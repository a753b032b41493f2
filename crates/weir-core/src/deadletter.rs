//! Dead letters: records and rows that could not be processed, kept with their reason.

use std::fmt;
use std::sync::Arc;

use arrow_array::RecordBatch;

use crate::error::Result;
use crate::ids::StepId;

/// Which kind of failure sent a record to the dead-letter output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The bytes could not be parsed (truncated JSON, binary garbage, bad UTF-8).
    Decode,
    /// The record parsed but does not fit the schema (missing field, wrong type).
    Schema,
    /// The event time is missing or unparseable.
    EventTime,
    /// The event time is implausible: too far ahead of the wall clock, or too old.
    Clock,
    /// An expression failed on the row.
    Expression,
    /// A user function (Rust or Python) failed on the row, or on the batch holding it.
    Function,
    /// The sink kept failing until its retries ran out.
    Sink,
    /// Not a failure: the row's key was quarantined, so it was diverted.
    Quarantined,
    /// An alert event an alert route could not queue (its queue was full: the receiver is
    /// down or slow); the payload is the event as the route would have sent it.
    Alert,
    /// A lookup join found no table row for the row's key (`missing: dead_letter`).
    Lookup,
}

impl ErrorKind {
    /// The kind as written in dead-letter entries and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Schema => "schema",
            Self::EventTime => "event_time",
            Self::Clock => "clock",
            Self::Expression => "expression",
            Self::Function => "function",
            Self::Sink => "sink",
            Self::Quarantined => "quarantined",
            Self::Alert => "alert",
            Self::Lookup => "lookup",
        }
    }
}

/// What failed: raw bytes, or a row already decoded.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The record as read.
    Raw(Vec<u8>),
    /// A one-row batch; the writer renders it (as a JSON object).
    Row(RecordBatch),
}

/// One dead-lettered record.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The failed record.
    pub payload: Payload,
    /// Kind of failure.
    pub kind: ErrorKind,
    /// Human-readable reason.
    pub reason: String,
    /// The step that rejected it.
    pub step: StepId,
    /// Where the record came from: a file path, `stdin`, `generator`.
    pub origin: String,
    /// Position in the origin: a line number and/or byte offset, rendered.
    pub position: Option<String>,
    /// When it (last) failed, ms since the epoch.
    pub time_ms: i64,
    /// How many times processing it was tried.
    pub attempts: u32,
    /// When it first failed, if earlier than `time_ms` (retried failures).
    pub first_failure_ms: Option<i64>,
}

/// Where dead letters go. Shared by all workers, so implementations synchronise internally;
/// dead letters are rare, so a lock per call is fine.
pub trait DeadLetterSink: Send + Sync + fmt::Debug {
    /// Writes the entries durably enough for the sink's guarantee.
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()>;
    /// Flushes buffered entries.
    fn flush(&self) -> Result<()>;
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The last dead letters of a run, for a look at what fails now (the console, `GET
/// /dead-letters/recent`): kind, step, reason and where, without the payload.
#[derive(Debug, Default)]
pub struct RecentDeadLetters {
    ring: std::sync::Mutex<std::collections::VecDeque<RecentDeadLetter>>,
}

/// One entry of [`RecentDeadLetters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentDeadLetter {
    /// Kind of failure.
    pub kind: ErrorKind,
    /// The step that rejected it.
    pub step: String,
    /// Why.
    pub reason: String,
    /// Where the record came from, and where in it.
    pub origin: String,
    /// Position in the origin, if known.
    pub position: Option<String>,
    /// When it failed, ms since the epoch.
    pub time_ms: i64,
}

/// How many dead letters [`RecentDeadLetters`] keeps.
pub const RECENT_DEAD_LETTERS: usize = 500;

impl RecentDeadLetters {
    /// Remembers `letters`, forgetting the oldest beyond [`RECENT_DEAD_LETTERS`].
    pub fn note(&self, letters: &[DeadLetter]) {
        let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in letters {
            if ring.len() == RECENT_DEAD_LETTERS {
                ring.pop_front();
            }
            ring.push_back(RecentDeadLetter {
                kind: l.kind,
                step: l.step.as_str().to_string(),
                reason: l.reason.clone(),
                origin: l.origin.clone(),
                position: l.position.clone(),
                time_ms: l.time_ms,
            });
        }
    }

    /// The newest first, up to `limit`, of those that `keep` accepts.
    pub fn newest(&self, limit: usize, mut keep: impl FnMut(&RecentDeadLetter) -> bool) -> Vec<RecentDeadLetter> {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().rev().filter(|l| keep(l)).take(limit).cloned().collect()
    }
}

/// A dead-letter sink that also remembers what passes through it in a [`RecentDeadLetters`].
#[derive(Debug)]
pub struct TappedDeadLetters {
    /// Where the entries go.
    pub inner: Arc<dyn DeadLetterSink>,
    /// What remembers them.
    pub recent: Arc<RecentDeadLetters>,
}

impl DeadLetterSink for TappedDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        self.recent.note(&letters);
        self.inner.write(letters)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}
