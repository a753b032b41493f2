//! Dead letters: records and rows that could not be processed, kept with their reason.

use std::fmt;

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
