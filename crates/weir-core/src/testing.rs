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
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(letters);
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
        })
    }

    fn call(
        &mut self,
        f: impl FnOnce(&mut dyn Operator, &mut OpContext<'_>) -> Result<()>,
    ) -> Result<Vec<Batch>> {
        let mut out = Vec::new();
        let mut cx = OpContext {
            step: &self.step,
            worker: 0,
            metrics: &self.metrics,
            dead_letters: &self.dead,
            watermark: self.watermark,
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

    /// The step's counters.
    pub fn metrics(&self) -> StepSnapshot {
        self.metrics.snapshot()
    }

    /// Dead letters written by the operator.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.entries()
    }
}
