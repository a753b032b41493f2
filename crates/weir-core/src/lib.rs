//! The core of Weir: what flows (Arrow [`Batch`]es and [`Message`]s), what processes it
//! ([`Operator`], [`Source`], [`Sink`]), and the runtime that wires them into tasks joined by
//! bounded channels.
//!
//! Invariants every other crate relies on:
//! - every channel is bounded; a full channel blocks its sender, and a blocked source stops
//!   reading, so memory stays bounded whatever the input rate;
//! - a batch's event-time column is always aligned with its rows (see [`Batch`]);
//! - watermarks only move forward on a channel, and an operator's input watermark is the minimum
//!   over its live, non-idle inputs;
//! - every row is accounted for per step: `in = out + filtered + aggregated + dead_lettered +
//!   late_dropped` (see [`metrics::StepMetrics`]).
//!
//! This crate knows nothing of Kafka, file formats or Python.
#![warn(missing_docs)]

pub mod batch;
pub mod changes;
pub mod checkpoint;
mod checkpointing;
pub mod deadletter;
pub mod error;
pub mod exchange;
pub mod fanout;
pub mod graph;
pub mod handoff;
pub mod ids;
pub mod keys;
pub mod linger;
pub mod lookup;
pub mod metrics;
pub mod notify;
pub mod operator;
pub mod quarantine;
pub mod runtime;
pub mod shed;
pub mod state;
pub mod store;
pub mod task;
pub mod testing;
pub mod time;
pub mod trace;

pub use batch::{Batch, Message, Watermark};
pub use deadletter::{DeadLetter, DeadLetterSink, ErrorKind, Payload};
pub use error::{Blame, CoreError, RefusedRow, Result, Retry};
pub use ids::StepId;
pub use operator::{
    Committer, OpContext, Operator, OperatorFactory, RunRestart, Sink, SinkFactory, Source, SourceContext,
    SourceFactory, SourcePoll, Visible,
};
