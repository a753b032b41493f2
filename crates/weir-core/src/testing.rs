//! Helpers for testing operators without a runtime: feed batches and watermarks by hand and
//! look at what comes out, with the same counting the runtime does.

use std::sync::Mutex;

use crate::batch::{Batch, END_OF_TIME};
use crate::deadletter::{DeadLetter, DeadLetterSink};
use crate::error::Result;
use crate::ids::StepId;
use crate::metrics::{StepMetrics, StepSnapshot};
use crate::operator::{OpContext, Operator, OperatorFactory};

/// A dead-letter sink that keeps entries in memory.
#[derive(Debug, Default)]
pub struct MemoryDeadLetters(Mutex<Vec<DeadLetter>>);

impl MemoryDeadLetters {
    /// The entries written so far.
    pub fn entries(&self) -> Vec<DeadLetter> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(letters);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Drives one operator instance by hand.
#[derive(Debug)]
pub struct OpHarness {
    op: Box<dyn Operator>,
    step: StepId,
    metrics: StepMetrics,
    dead: MemoryDeadLetters,
    watermark: Option<i64>,
    registry: crate::metrics::Registry,
}

impl OpHarness {
    /// Makes worker 0 of 1 from the factory.
    pub fn new(factory: &dyn OperatorFactory) -> Result<Self> {
        Ok(Self {
            op: factory.create(0, 1)?,
            step: StepId::new("under-test"),
            metrics: StepMetrics::default(),
            dead: MemoryDeadLetters::default(),
            watermark: None,
            registry: crate::metrics::Registry::default(),
        })
    }

    fn call(&mut self, f: impl FnOnce(&mut dyn Operator, &mut OpContext<'_>) -> Result<()>) -> Result<Vec<Batch>> {
        let mut out = Vec::new();
        let mut cx = OpContext {
            step: &self.step,
            worker: 0,
            metrics: &self.metrics,
            dead_letters: &self.dead,
            watermark: self.watermark,
            registry: &self.registry,
            out: &mut out,
        };
        f(self.op.as_mut(), &mut cx)?;
        Ok(out)
    }

    /// Processes a batch; returns what the operator emitted.
    pub fn process(&mut self, batch: Batch) -> Result<Vec<Batch>> {
        StepMetrics::add(&self.metrics.rows_in, batch.num_rows() as u64);
        StepMetrics::add(&self.metrics.batches_in, 1);
        self.call(|op, cx| op.process(batch, cx))
    }

    /// Processes a batch of input `input` (a join's left is 0, its right 1).
    pub fn process_from(&mut self, input: usize, batch: Batch) -> Result<Vec<Batch>> {
        StepMetrics::add(&self.metrics.rows_in, batch.num_rows() as u64);
        StepMetrics::add(&self.metrics.batches_in, 1);
        self.call(|op, cx| op.process_from(input, batch, cx))
    }

    /// Advances input `input`'s own watermark; returns what the operator emitted.
    pub fn input_watermark(&mut self, input: usize, wm: i64) -> Result<Vec<Batch>> {
        self.call(|op, cx| op.on_input_watermark(input, wm, cx))
    }

    /// Advances the watermark; returns what the operator emitted.
    pub fn watermark(&mut self, wm: i64) -> Result<Vec<Batch>> {
        let out = self.call(|op, cx| op.on_watermark(wm, cx))?;
        self.watermark = Some(wm);
        Ok(out)
    }

    /// Runs a processing-time tick.
    pub fn tick(&mut self, now_ms: i64) -> Result<Vec<Batch>> {
        self.call(|op, cx| op.on_tick(now_ms, cx))
    }

    /// Ends input as the runtime does: the final watermark, then `on_end`.
    pub fn end(&mut self) -> Result<Vec<Batch>> {
        let mut out = self.watermark(END_OF_TIME)?;
        out.extend(self.call(|op, cx| op.on_end(cx))?);
        Ok(out)
    }

    /// Snapshots the operator as a checkpoint would, through the stored (Arrow IPC) form.
    pub fn snapshot(&mut self) -> Result<Option<arrow_array::RecordBatch>> {
        match self.op.snapshot()? {
            Some(t) => Ok(Some(crate::state::decode(&crate::state::encode(&t)?)?)),
            None => Ok(None),
        }
    }

    /// A fresh instance restored from `state` at watermark `watermark`, as after a recovery.
    pub fn restored(
        factory: &dyn OperatorFactory,
        state: Option<arrow_array::RecordBatch>,
        watermark: Option<i64>,
    ) -> Result<Self> {
        let mut h = Self::new(factory)?;
        if let Some(t) = state {
            h.op.restore(t)?;
        }
        h.watermark = watermark;
        Ok(h)
    }

    /// The current watermark.
    pub fn current_watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Keys the operator holds and keys it forgot (`state_ttl`).
    pub fn metrics_state(&self) -> (u64, u64) {
        (
            self.metrics.state_keys.load(std::sync::atomic::Ordering::Relaxed),
            self.metrics.state_evicted.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The operator's counters.
    pub fn metrics(&self) -> StepSnapshot {
        self.metrics.snapshot()
    }

    /// The job-wide metrics the operator reported to.
    pub fn registry(&self) -> &crate::metrics::Registry {
        &self.registry
    }

    /// Dead letters written by the operator.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.entries()
    }
}

/// A source that replays batches: partition `p` is read by worker `p % workers`, in order.
#[derive(Debug, Clone)]
pub struct VecSourceFactory {
    schema: arrow_schema::SchemaRef,
    partitions: Vec<Vec<Batch>>,
}

impl VecSourceFactory {
    /// Replays `partitions` (each a list of batches, all of `schema`).
    pub fn new(schema: arrow_schema::SchemaRef, partitions: Vec<Vec<Batch>>) -> Self {
        Self { schema, partitions }
    }
}

impl crate::operator::SourceFactory for VecSourceFactory {
    fn schema(&self) -> arrow_schema::SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn crate::operator::Source>> {
        let mine: Vec<std::collections::VecDeque<Batch>> = self
            .partitions
            .iter()
            .enumerate()
            .filter(|(p, _)| p % workers == worker)
            .map(|(_, b)| b.iter().cloned().collect())
            .collect();
        Ok(Box::new(VecSource { parts: mine, next: 0, ended: Vec::new() }))
    }
}

#[derive(Debug)]
struct VecSource {
    parts: Vec<std::collections::VecDeque<Batch>>,
    next: usize,
    ended: Vec<usize>,
}

#[async_trait::async_trait]
impl crate::operator::Source for VecSource {
    fn partitions(&self) -> usize {
        self.parts.len()
    }

    async fn poll(&mut self, cx: &mut crate::operator::SourceContext) -> Result<crate::operator::SourcePoll> {
        use crate::operator::SourcePoll;
        // Round-robin over partitions, one batch at a time, like interleaved arrival.
        for _ in 0..self.parts.len() {
            let p = self.next % self.parts.len();
            self.next += 1;
            if let Some(b) = self.parts[p].pop_front() {
                cx.count_records(b.num_rows() as u64);
                return Ok(SourcePoll::Rows { partition: p, batch: b });
            }
            if !self.ended.contains(&p) {
                self.ended.push(p);
                return Ok(SourcePoll::PartitionEnd(p));
            }
        }
        Ok(SourcePoll::End)
    }
}

/// A sink that keeps every batch in memory, shared by all workers.
#[derive(Debug, Clone, Default)]
pub struct CollectSink(pub std::sync::Arc<Mutex<Vec<arrow_array::RecordBatch>>>);

impl CollectSink {
    /// Everything written so far.
    pub fn batches(&self) -> Vec<arrow_array::RecordBatch> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl crate::operator::SinkFactory for CollectSink {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn crate::operator::Sink>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl crate::operator::Sink for CollectSink {
    async fn write(&mut self, rows: &arrow_array::RecordBatch) -> Result<()> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(rows.clone());
        Ok(())
    }
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Polls `f` every 20 ms until it gives a value, for tests that wait on another thread or
/// process: a condition with a deadline instead of a fixed sleep.
///
/// # Panics
/// When 20 s pass first.
pub fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "the condition did not hold within 20 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
