//! The traits a step implements: [`Operator`] for transformations, [`Source`] and [`Sink`] for
//! the ends, each built per worker by its factory.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::batch::Batch;
use crate::checkpoint::Epoch;
use crate::deadletter::{DeadLetter, DeadLetterSink};
use crate::error::Result;
use crate::ids::StepId;
use crate::metrics::StepMetrics;

/// What an operator sees besides its input: where its output goes, its metrics and the
/// dead-letter output.
#[derive(Debug)]
pub struct OpContext<'a> {
    /// The step being run.
    pub step: &'a StepId,
    /// Index of this worker, `0..workers`.
    pub worker: usize,
    /// This step's counters on this worker.
    pub metrics: &'a StepMetrics,
    /// The job's dead-letter output.
    pub dead_letters: &'a dyn DeadLetterSink,
    /// The current input watermark, ms (`None` before the first).
    pub watermark: Option<i64>,
    /// The job's metrics, for series of the step's own (labelled with its id) in
    /// [`crate::metrics::Registry::connectors`].
    pub registry: &'a crate::metrics::Registry,
    pub(crate) out: &'a mut Vec<Batch>,
}

impl OpContext<'_> {
    /// Sends a batch downstream. Empty batches are dropped here, so operators need not check.
    pub fn emit(&mut self, batch: Batch) {
        if !batch.is_empty() {
            self.out.push(batch);
        }
    }

    /// Writes dead letters and counts them for this step.
    ///
    /// # Errors
    /// If the dead-letter output itself fails, which stops the job: losing rows silently is
    /// worse than stopping.
    pub fn dead_letter(&mut self, letters: Vec<DeadLetter>) -> Result<()> {
        StepMetrics::add(&self.metrics.dead_lettered, letters.len() as u64);
        self.dead_letters.write(letters)
    }
}

/// A step that turns input batches into output batches.
///
/// One instance runs per worker, driven by one task: hooks are called one at a time, in input
/// order, so implementations need no locks. Hooks are synchronous because operators are CPU
/// work on a batch; I/O belongs in sources and sinks.
///
/// Counting: the runtime counts `rows_in` and `batches_in`. An operator MUST count what it does
/// with each input row in exactly one of `rows_out`, `filtered`, `aggregated`, `dead_lettered`
/// (done by [`OpContext::dead_letter`]), `late_dropped` or `late_side`, so that the accounting
/// identity of [`StepMetrics`] holds; rows it later emits from state go in `results_out`.
pub trait Operator: Send + fmt::Debug {
    /// Processes one batch, emitting any output through `cx`.
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()>;

    /// Processes one batch of input `input` (0 for a step with one input; a join's left is
    /// 0 and its right 1). The default is [`Operator::process`].
    fn process_from(&mut self, input: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let _ = input;
        self.process(batch, cx)
    }

    /// For a step with several inputs: input `input`'s own watermark advanced to `wm`, before
    /// the watermark of all inputs together ([`Operator::on_watermark`]) does. A join drops
    /// the rows of one side that no future row of the other can match here.
    fn on_input_watermark(&mut self, input: usize, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let _ = (input, wm, cx);
        Ok(())
    }

    /// The watermark the step forwards when its input's is `wm`: the same (the default), or
    /// less for a step that may still emit rows older than its input's watermark (an outer
    /// join's unmatched rows), so they are not late downstream. Never more than `wm`.
    fn output_watermark(&self, wm: i64) -> i64 {
        wm
    }

    /// Called when the input watermark advances to `wm` (ms), after the batches before it.
    /// Windows close here. The runtime forwards the watermark downstream after this returns.
    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let _ = (wm, cx);
        Ok(())
    }

    /// Called every [`Operator::tick_interval`] with the wall clock in ms, for processing-time
    /// windows and timeouts.
    fn on_tick(&mut self, now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let _ = (now_ms, cx);
        Ok(())
    }

    /// How often [`Operator::on_tick`] should run; `None` (the default) for never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Called once at the end of input, after the final watermark. Flush what is left.
    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        let _ = cx;
        Ok(())
    }

    /// The operator's state for a checkpoint, as a table led by the key-group column (see
    /// [`crate::state`]); `None` for a stateless operator (the default). Called between
    /// hooks, when every input before the barrier has been processed.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// Restores state from tables that [`Operator::snapshot`] wrote, already narrowed to the
    /// key groups this worker owns. Called once, before any other hook.
    ///
    /// # Errors
    /// The default refuses: an operator that snapshots state must restore it.
    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        Err(crate::CoreError::Config(format!(
            "this step keeps no state, but the checkpoint holds {} rows for it; was the pipeline changed?",
            state.num_rows()
        )))
    }
}

/// Builds one [`Operator`] per worker. Made after planning, so the schemas are known.
pub trait OperatorFactory: Send + Sync + fmt::Debug {
    /// Makes the instance for `worker` of `workers`.
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Operator>>;
}

/// What a source partition produced.
#[derive(Debug)]
pub enum SourcePoll {
    /// Decoded rows of one partition, with their event times (ms).
    Rows {
        /// The partition, an index local to this source instance. An index at or past
        /// [`Source::partitions`] adds partitions (a Kafka consumer is assigned more); each new
        /// one holds the watermark back until it has data or goes idle, as a new one must.
        partition: usize,
        /// The rows.
        batch: Batch,
    },
    /// Nothing arrived within the source's wait; poll again. Lets the runtime run idle
    /// detection and timers.
    Waiting,
    /// The partition is finished (bounded input) and sends nothing more.
    PartitionEnd(usize),
    /// The partition is not read by this instance for now (a Kafka partition revoked, or
    /// none assigned yet): it stops holding the watermark back until it sends rows again.
    /// Unlike [`SourcePoll::PartitionEnd`] it does not count as the end of time, so an
    /// instance left without partitions cannot close every window downstream.
    PartitionIdle(usize),
    /// Every partition of this instance is finished.
    End,
}

/// What a source sees: the shutdown signal and its dead-letter output.
#[derive(Debug)]
pub struct SourceContext {
    /// The step id of the source.
    pub step: StepId,
    /// Counters of the source step (records in, dead-lettered).
    pub metrics: Arc<StepMetrics>,
    /// The job's dead-letter output.
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Becomes true when the job should stop reading (SIGINT, SIGTERM), or this run should
    /// end for a restart ([`SourceContext::start_again`]): a source waiting for data MUST
    /// wake on it and return [`SourcePoll::End`].
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Job-wide counters of records and bytes read.
    pub registry: Arc<crate::metrics::Registry>,
    /// Whether records read count as the job's input ([`SourceContext::count_records`]): not
    /// for the source reading a repartition topic, whose records were counted once already.
    pub counts_input: bool,
    /// Ends the job's current run at a checkpoint ([`SourceContext::start_again`]).
    pub restart: RunRestart,
}

/// Ends a job's run at a checkpoint, without draining, after which the job starts again
/// from that checkpoint at once: what a source asks for when the input it reads changed
/// under it (a Kafka consumer was given or asked to give up partitions) and the job's state
/// must be laid out anew, without reading again what it already read.
///
/// Asking sets the run's stop signal, so every source of the run ends as on a shutdown
/// (handing out what it holds, then [`SourcePoll::End`]); the final checkpoint keeps open
/// windows open, and the job's next run restores it.
#[derive(Debug, Clone)]
pub struct RunRestart {
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    reason: Arc<std::sync::Mutex<Option<String>>>,
}

impl RunRestart {
    /// A restart that, when asked for, sets `stop` (the run's sources' stop signal).
    pub fn new(stop: Arc<tokio::sync::watch::Sender<bool>>) -> Self {
        Self { stop, reason: Arc::default() }
    }

    /// Asks for the run to end at a checkpoint and start again; the first reason is kept.
    pub fn request(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason.into());
        }
        drop(r);
        self.stop.send_replace(true);
    }

    /// Why a restart was asked for, if it was.
    pub fn requested(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl SourceContext {
    /// Counts `n` records read in the source step and, unless the source reads what another
    /// part of the job wrote, in the job's input.
    pub fn count_records(&self, n: u64) {
        StepMetrics::add(&self.metrics.rows_in, n);
        if self.counts_input {
            StepMetrics::add(&self.registry.source_records, n);
        }
    }

    /// Whether shutdown was requested (the job's, or the run's end for a restart).
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Ends this run at a checkpoint and starts the job again from it ([`RunRestart`]).
    pub fn start_again(&self, reason: impl Into<String>) {
        self.restart.request(reason);
    }
}

/// The reading side of one worker's share of a source.
///
/// A source instance owns several partitions; it reads, decodes and assigns event times, and
/// hands over batches. It is polled in a loop by one task; returning from `poll` promptly when
/// nothing is ready (with [`SourcePoll::Waiting`]) keeps idle detection and shutdown working.
#[async_trait::async_trait]
pub trait Source: Send + fmt::Debug {
    /// Number of partitions this instance reads (for watermarks). It may grow while the
    /// source runs (a Kafka consumer is assigned partitions); the runtime asks after every
    /// poll, and a new partition holds the watermark back until it has data or goes idle.
    fn partitions(&self) -> usize;
    /// Produces the next output.
    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll>;

    /// This instance's read positions as a table, covering exactly the rows handed out so
    /// far (not those read ahead), for a checkpoint. `None` (the default) when the source
    /// cannot resume; [`SourceFactory::resumable`] tells before the job starts.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// [`Source::snapshot`] for checkpoint `epoch`, which is what the runtime calls: a source
    /// whose positions also go elsewhere with the checkpoint (a Kafka consumer's, into the
    /// output's transaction) needs to know which checkpoint they belong to.
    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<RecordBatch>> {
        let _ = epoch;
        self.snapshot()
    }

    /// Checkpoint `epoch` completed: its state is durable and the sinks committed its output.
    /// A source whose server forgets what is acknowledged (MQTT, AMQP, Redis Streams, NATS)
    /// acknowledges here what it handed out before that checkpoint's barrier, so a crash
    /// before this point re-delivers instead of losing. Called on the source's task between
    /// polls, and once after the final checkpoint; the default does nothing.
    async fn checkpoint_complete(&mut self, epoch: Epoch) -> Result<()> {
        let _ = epoch;
        Ok(())
    }

    /// Resumes from the position tables of every instance of the previous run (they may have
    /// been more or fewer): the instance picks the positions of what it now reads. Called once
    /// before the first poll.
    fn restore(&mut self, positions: &[RecordBatch]) -> Result<()> {
        let _ = positions;
        Err(crate::CoreError::Config("this source cannot resume from a checkpoint".into()))
    }
}

/// Builds one [`Source`] per worker.
pub trait SourceFactory: Send + Sync + fmt::Debug {
    /// The schema of the rows the source produces.
    fn schema(&self) -> SchemaRef;
    /// Makes the instance for `worker` of `workers`. No I/O happens before the first poll
    /// beyond opening files.
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>>;

    /// Whether instances record positions and can resume from them (needed for checkpoints).
    fn resumable(&self) -> bool {
        false
    }

    /// The group this process shares its input with, when its keyed state must follow
    /// partitions between processes (see [`crate::handoff`]); `None` (the default) when the
    /// process reads all of its input.
    fn group(&self) -> Option<Arc<dyn crate::handoff::GroupMember>> {
        None
    }
}

/// Where results go. One instance per worker; instances that write to one place (a file)
/// share it internally.
#[async_trait::async_trait]
pub trait Sink: Send + fmt::Debug {
    /// Writes a batch of rows.
    async fn write(&mut self, rows: &RecordBatch) -> Result<()>;
    /// Flushes and closes; called once at the end of input.
    async fn close(&mut self) -> Result<()>;

    /// Rows written from now until [`Sink::pre_commit`] of `epoch` belong to checkpoint
    /// `epoch`. Called before the first write and after each pre-commit.
    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        let _ = epoch;
        Ok(())
    }

    /// The barrier of `epoch` arrived: make the epoch's rows durable but not yet visible.
    /// They become visible when [`Committer::commit`] runs after the checkpoint completes.
    async fn pre_commit(&mut self, epoch: Epoch) -> Result<()> {
        let _ = epoch;
        Ok(())
    }

    /// [`Sink::write`], told which attempt this is: 1 for a new batch, more when the runtime
    /// writes the same batch again after a transient failure. A sink made of others (several
    /// sinks) uses it to skip those that had taken the batch; the default writes.
    async fn write_attempt(&mut self, rows: &RecordBatch, attempt: u32) -> Result<()> {
        let _ = attempt;
        self.write(rows).await
    }

    /// Puts the sink's own figures (produce latency, transactions, ...) into the job's
    /// metrics; called after writes, so it must be cheap.
    fn report(&self, metrics: &crate::metrics::ConnectorMetrics) {
        let _ = metrics;
    }

    /// The trace the next write belongs to (the span of that write), set before each traced
    /// write and cleared before each untraced one. A sink whose records carry headers (Kafka)
    /// writes it as `traceparent`, so the trace goes on in whatever reads them
    /// ([`crate::trace`]); the default ignores it.
    fn trace(&mut self, cx: Option<&opentelemetry::trace::SpanContext>) {
        let _ = cx;
    }
}

/// Makes pre-committed output visible, or discards it, for every instance of a sink at once.
///
/// Both calls are idempotent, because recovery repeats them after a crash that may have come
/// in the middle of one.
#[async_trait::async_trait]
pub trait Committer: Send + Sync + fmt::Debug {
    /// Makes visible everything pre-committed for checkpoints up to `epoch`.
    async fn commit(&self, epoch: Epoch) -> Result<()>;
    /// Discards everything pre-committed for checkpoints after `epoch`: they never completed.
    async fn abort_after(&self, epoch: Epoch) -> Result<()>;

    /// Asked once at recovery, before anything is restored: the newest checkpoint whose
    /// output the sink has made visible. A sink that cannot commit again after a crash (a
    /// Kafka transaction dies with its producer) says how far it got, and recovery restores
    /// from there, so a checkpoint that completed but whose output never became visible is
    /// produced again. The default, [`Visible::Unknown`], leaves recovery to the store.
    async fn visible(&self) -> Result<Visible> {
        Ok(Visible::Unknown)
    }

    /// Whether the sink keeps its own record of the last checkpoint it made visible (what
    /// [`Committer::visible`] reads) because a crash can lose output that cannot be committed
    /// again (a database or Kafka transaction). Of several sinks, at most one can be so.
    fn records_progress(&self) -> bool {
        false
    }
}

/// What a sink has made visible, as far as it can tell (see [`Committer::visible`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible {
    /// The sink does not know; [`Committer::commit`] can always be repeated.
    Unknown,
    /// Nothing yet: restore no checkpoint.
    Nothing,
    /// Output up to and including this checkpoint.
    Through(Epoch),
}

impl Visible {
    /// The newest checkpoint recovery may restore; `None` for no limit.
    pub fn limit(self) -> Option<Epoch> {
        match self {
            Self::Unknown => None,
            Self::Nothing => Some(Epoch(0)),
            Self::Through(e) => Some(e),
        }
    }
}

/// Builds one [`Sink`] per worker.
pub trait SinkFactory: Send + Sync + fmt::Debug {
    /// Makes the instance for `worker` of `workers`.
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Sink>>;

    /// The committer of a sink whose output is exactly-once under checkpoints; `None` (the
    /// default) for a sink that writes at once (at-least-once after a recovery).
    fn committer(&self) -> Option<Arc<dyn Committer>> {
        None
    }

    /// Called once before each run, before any sink is created: makes sure what the sink
    /// writes to exists (a repartition topic is created here).
    ///
    /// # Errors
    /// What it needs cannot be made.
    fn prepare(&self) -> futures::future::BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// What another process of the same pipeline needs to settle this process's output when
    /// it takes some of its input over (see [`crate::handoff`]); written next to this
    /// process's checkpoints. `None` (the default): nothing beyond the checkpoints.
    fn member_record(&self) -> Option<serde_json::Value> {
        None
    }

    /// The committer of another process's output, from the record it wrote
    /// ([`SinkFactory::member_record`]), to ask how far that output is visible and to stop
    /// that process from committing more. `None` (the default): its checkpoints count as
    /// they are.
    ///
    /// # Errors
    /// A record this sink cannot read.
    fn peer_committer(&self, record: &serde_json::Value) -> Result<Option<Arc<dyn Committer>>> {
        let _ = record;
        Ok(None)
    }
}
