//! What travels on channels: batches of rows, watermarks and the end of input.

use std::sync::Arc;

use arrow_array::{Array, BooleanArray, Int64Array, RecordBatch, UInt32Array};
use arrow_select::filter::filter;
use arrow_select::take::take;

use crate::error::Result;

/// A micro-batch: Arrow rows plus their event time.
///
/// `time` holds one event time per row in milliseconds since the Unix epoch, with no nulls
/// (rows without a usable time are dead-lettered before they become a batch). It is kept beside
/// the rows rather than inside them so that projections cannot drop it; every method here keeps
/// the two aligned, and operators MUST build new batches through them or [`Batch::new`].
#[derive(Debug, Clone)]
pub struct Batch {
    /// The rows.
    pub rows: RecordBatch,
    /// Event time of each row, in ms since the epoch.
    pub time: Int64Array,
    /// The span that last worked on these rows, when the batch is traced ([`crate::trace`]).
    /// Kept by every method here, so a step that filters or reshapes rows keeps its batch in
    /// its trace; a batch an operator builds anew (a window's results) starts without one.
    pub trace: Option<Arc<opentelemetry::trace::SpanContext>>,
}

impl Batch {
    /// Pairs rows with their times.
    ///
    /// # Errors
    /// If the lengths differ or `time` has nulls: an internal error, since sources guarantee both.
    pub fn new(rows: RecordBatch, time: Int64Array) -> Result<Self> {
        if rows.num_rows() != time.len() || time.null_count() > 0 {
            crate::bail_internal!(
                "batch of {} rows paired with {} times ({} null)",
                rows.num_rows(),
                time.len(),
                time.null_count()
            );
        }
        Ok(Self { rows, time, trace: None })
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.rows.num_rows()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.num_rows() == 0
    }

    /// Keeps the rows where `mask` is true.
    pub fn filter(&self, mask: &BooleanArray) -> Result<Self> {
        let rows = arrow_select::filter::filter_record_batch(&self.rows, mask)?;
        let time = filter(&self.time, mask)?;
        Ok(Self { rows, time: downcast_time(time.as_ref())?, trace: self.trace.clone() })
    }

    /// Picks rows by index, in the given order.
    pub fn take(&self, indices: &UInt32Array) -> Result<Self> {
        let rows = arrow_select::take::take_record_batch(&self.rows, indices)?;
        let time = take(&self.time, indices, None)?;
        Ok(Self { rows, time: downcast_time(time.as_ref())?, trace: self.trace.clone() })
    }

    /// A zero-copy slice.
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        Self { rows: self.rows.slice(offset, len), time: self.time.slice(offset, len), trace: self.trace.clone() }
    }

    /// Replaces the rows, keeping the times (for operators that change columns, not rows).
    pub fn with_rows(&self, rows: RecordBatch) -> Result<Self> {
        Ok(Self { trace: self.trace.clone(), ..Self::new(rows, self.time.clone())? })
    }

    /// The same rows in the trace of `cx` (none: out of any trace).
    pub fn traced(mut self, cx: Option<opentelemetry::trace::SpanContext>) -> Self {
        self.trace = cx.map(Arc::new);
        self
    }

    /// The schema of the rows.
    pub fn schema(&self) -> arrow_schema::SchemaRef {
        self.rows.schema()
    }

    /// Largest event time in the batch.
    pub fn max_time(&self) -> Option<i64> {
        arrow_arith_max(&self.time)
    }
}

fn arrow_arith_max(a: &Int64Array) -> Option<i64> {
    a.values().iter().copied().max()
}

fn downcast_time(a: &dyn Array) -> Result<Int64Array> {
    match a.as_any().downcast_ref::<Int64Array>() {
        Some(t) => Ok(t.clone()),
        None => crate::bail_internal!("event-time column is not Int64"),
    }
}

/// Shared pointer to a schema, re-exported for convenience.
pub type SchemaRef = Arc<arrow_schema::Schema>;

/// An event-time watermark: the promise that no more rows older than it will arrive on this
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// Rows with event time `< t` (ms) are complete.
    At(i64),
    /// The sender has had no data for its idle timeout; receivers leave it out of their minimum
    /// until it sends again, so a quiet partition cannot stall every window.
    Idle,
}

/// The end-of-input watermark: every window may close.
pub const END_OF_TIME: i64 = i64::MAX;

/// One item on a channel between tasks.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Message {
    /// Rows.
    Batch(Batch),
    /// Event-time progress.
    Watermark(Watermark),
    /// Checkpoint `n`: everything before it belongs to the snapshot of epoch `n`.
    Barrier(crate::checkpoint::Epoch),
    /// The sender will send nothing more. Bounded inputs end with this after a final
    /// `Watermark::At(END_OF_TIME)`, which is how open windows get flushed. Under checkpoints
    /// it carries the final checkpoint, which it also acts as the barrier of.
    End(Option<Final>),
}

/// The last checkpoint of a run, carried by [`Message::End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Final {
    /// Its epoch.
    pub epoch: crate::checkpoint::Epoch,
    /// The input was consumed and windows are flushed (true), or the job was stopped and its
    /// open state is saved to resume from (false).
    pub drain: bool,
}
