//! The runtime: turns a [`JobSpec`] into tasks joined by bounded channels and runs them.
//!
//! Shape of a job with `W` workers and stages `S0..Sk` (a stage is a chain of operators
//! between exchanges):
//! ```text
//! worker w:  [source w] -> S0 ops --exchange(key)--> S1 ops --> ... --> Sk ops -> [sink w]
//!                                  \ every S(i) task of worker w sends to the S(i+1) task of
//!                                    the worker owning each row's key
//! ```
//! Operators inside a stage are chained: one task calls them one after the other, with no
//! channel between them. Each stage task after the first receives from all `W` upstream tasks,
//! each on a bounded channel of its own (so a barrier can hold one back while the others are
//! read), and takes the minimum of their watermarks.
//! With one worker there is no exchange at all: the whole pipeline is one task.
//!
//! Backpressure: `send` on a full channel waits, so a slow stage stops the stages before it
//! and finally the source, which then stops reading.
//!
//! Shutdown: at the end of bounded input, or when [`ShutdownHandle::stop`] is called, sources
//! end; the end travels as `Watermark::At(END_OF_TIME)` then `End`, so windows flush and sinks
//! close before [`Job::run`] returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tracing::Instrument as _;

use crate::batch::{Batch, Final, Message, Watermark, END_OF_TIME};
use crate::checkpoint::{BarrierAligner, Epoch, StateRole, TaskKey};
use crate::checkpointing::{hear, Ack, Control, Coordinating, Heard, SourceControl, TaskCheckpoint};
use crate::deadletter::{now_ms, DeadLetterSink};
use crate::error::{CoreError, Result};
use crate::exchange::Partitioner;
use crate::fanout::{FanOutPart, FanOutSinkFactory};
use crate::graph::{Head, JobGraph, NodeId, NodeKind, Partitioning, Target, TaskOutput, TaskPlan};
use crate::handoff::{self, Candidate, GroupMember};
use crate::ids::StepId;
use crate::metrics::{ChannelMetrics, JobPhase, Registry, StepMetrics, StepSnapshot, WorkerClock};
use crate::operator::{
    OpContext, Operator, OperatorFactory, Sink, SinkFactory, Source, SourceContext, SourceFactory, SourcePoll,
};
use crate::store::Restored;
use crate::time::{PartitionWatermark, WatermarkCombiner};
use crate::trace::{kv, Span};

/// The receiving end of one input of a stage task: messages tagged with the sending worker.
type Inbox = mpsc::Receiver<(usize, Message)>;
/// The sending end of an [`Inbox`].
type Outbox = mpsc::Sender<(usize, Message)>;

/// Watermark settings of the job's sources.
#[derive(Debug, Clone, Copy)]
pub struct WatermarkSpec {
    /// Bounded out-of-orderness: rows up to this much older than the newest seen are on time.
    pub bound: Duration,
    /// A partition with no data for this long stops holding the watermark back.
    pub idle_timeout: Option<Duration>,
}

/// A chain of operators between two exchanges.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Key column paths of the exchange in front of the stage; `None` for the first stage.
    pub key: Option<Vec<String>>,
    /// The operators, in order.
    pub ops: Vec<(StepId, Arc<dyn OperatorFactory>)>,
}

/// A planned job: everything needed to run, with schemas resolved and expressions compiled.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Name of the job (metrics label, logs).
    pub name: String,
    /// Number of workers; each runs every stage.
    pub workers: usize,
    /// Step id of the source.
    pub source_step: StepId,
    /// The source.
    pub source: Arc<dyn SourceFactory>,
    /// The stages; at least one (possibly with no operators).
    pub stages: Vec<StageSpec>,
    /// Step id of the sink.
    pub sink_step: StepId,
    /// The sink.
    pub sink: Arc<dyn SinkFactory>,
    /// Where dead letters go.
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Watermark settings.
    pub watermark: WatermarkSpec,
    /// Capacity of each channel, in messages (batches); with batches of `B` rows a channel
    /// holds at most `capacity * B` rows.
    pub channel_capacity: usize,
    /// A column of the sink's input holding each row's creation time in µs since the epoch;
    /// when set, the sink records creation-to-write latency in [`Registry::latency`].
    pub latency_column: Option<String>,
    /// How the sink is retried when a write fails with a transient error.
    pub sink_retry: RetryPolicy,
    /// Keys that keep failing are diverted by the sources while quarantined. The job's
    /// `dead_letters` should be a [`crate::quarantine::QuarantiningDeadLetters`] over the same
    /// quarantine, so that failures are noted.
    pub quarantine: Option<Arc<crate::quarantine::Quarantine>>,
    /// Opt-in load shedding at the sources.
    pub shedding: Option<(crate::shed::OverloadSpec, Arc<dyn crate::shed::ShedPredicate>)>,
    /// Checkpoints: where, how often, and whether to ignore earlier ones.
    pub checkpoint: Option<CheckpointSpec>,
    /// The part of the pipeline before a repartition topic: a job of its own that writes the
    /// topic this one reads, run alongside it with the same metrics and stop signal.
    pub upstream: Option<Upstream>,
    /// Records read count as the job's input (not when the source reads a repartition topic).
    pub counts_input: bool,
    /// Rows written count as the job's output (not when the sink writes a repartition topic).
    pub counts_output: bool,
}

/// The job feeding a repartition topic (see [`JobSpec::upstream`]).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The feeding job.
    pub spec: Box<JobGraph>,
    /// Set once it has finished (its input ended and its output is in the topic): the
    /// reading side may then end at the topic's ends.
    pub done: Arc<std::sync::atomic::AtomicBool>,
}

/// Checkpoint settings of a job.
#[derive(Debug, Clone)]
pub struct CheckpointSpec {
    /// Where checkpoints are kept.
    pub store: crate::store::CheckpointStore,
    /// Time between checkpoints; `None` checkpoints only on demand and at the end.
    pub interval: Option<Duration>,
    /// Complete checkpoints to keep.
    pub keep: usize,
    /// Start over: restore nothing and delete earlier checkpoints (their committed output
    /// stays, and what they pre-committed is settled first).
    pub fresh: bool,
}

/// Which member of a group holds a key, from the members' records in the shared checkpoint
/// store (each written when the member was last assigned partitions).
#[derive(Clone)]
pub struct KeyHolders {
    store: crate::store::CheckpointStore,
    group: Arc<dyn GroupMember>,
}

impl std::fmt::Debug for KeyHolders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHolders").field("member", &self.store.member_name()).finish_non_exhaustive()
    }
}

impl KeyHolders {
    /// Every member of the group with the partitions of its last assignment, this process
    /// first.
    ///
    /// # Errors
    /// Store failures.
    pub async fn members(&self) -> Result<Vec<(String, Vec<i64>)>> {
        let mut stores = vec![self.store.clone()];
        stores.extend(self.store.peers().await?);
        let mut out = Vec::new();
        for s in stores {
            let Some(record) = s.member_record().await? else { continue };
            let parts = record["partitions"].as_array().map(|ps| ps.iter().filter_map(|p| p.as_i64()).collect());
            out.push((s.member_name().unwrap_or_default().to_string(), parts.unwrap_or_default()));
        }
        Ok(out)
    }

    /// The partition of the key (the first value of a key column, as the source's records are
    /// keyed) and the member whose last assignment holds it (`None` if none does).
    ///
    /// # Errors
    /// A key the source cannot place (`Ok(None)` is returned for a null key), or store
    /// failures.
    pub async fn holder(&self, key: &arrow_array::ArrayRef) -> Result<Option<(i32, Option<String>)>> {
        let Some(p) = self.group.partitions_of(key)?.first().copied().flatten() else { return Ok(None) };
        let mut stores = vec![self.store.clone()];
        stores.extend(self.store.peers().await?);
        for s in stores {
            let Some(record) = s.member_record().await? else { continue };
            let holds =
                record["partitions"].as_array().is_some_and(|ps| ps.iter().any(|x| x.as_i64() == Some(i64::from(p))));
            if holds {
                return Ok(Some((p, s.member_name().map(str::to_string))));
            }
        }
        Ok(Some((p, None)))
    }
}

/// Retries with exponential backoff and jitter for transient failures.
///
/// A sink that is down blocks its input while it is retried, so backpressure reaches the
/// source instead of rows piling up or being dropped. After `max_attempts` (if set) the batch
/// goes to the dead-letter output (kind `sink`) and the job goes on. Permanent errors
/// ([`crate::Retry::Never`]) are not retried: they fail the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first try included); `None` retries until the sink is back.
    pub max_attempts: Option<u32>,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: None, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first): doubling from the initial
    /// backoff up to the maximum, with up to 25% random jitter so that many failing tasks do
    /// not retry in lockstep.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self.initial_backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(self.max_backoff);
        // Cheap jitter from the clock's nanoseconds: no RNG state to carry around.
        let nanos = u64::from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()),
        );
        let jitter = base.as_nanos() as u64 / 4 * (nanos % 1000) / 1000;
        base + Duration::from_nanos(jitter)
    }
}

/// Runs `f`, which may wait (a retry's back-off, a queue draining), from synchronous code on a
/// runtime worker (an operator's hook): on a multi-threaded runtime the worker first hands its
/// other tasks to another thread, so they do not stall while this one waits. Elsewhere `f`
/// just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Stops a running job gracefully: sources end, windows flush, sinks close.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Asks the sources to stop reading.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Per-step counters summed over workers, in pipeline order.
    pub steps: Vec<(StepId, StepSnapshot)>,
    /// Records read by the source.
    pub source_records: u64,
    /// Rows written by the sink.
    pub sink_rows: u64,
    /// Creation-to-sink latency quantiles in µs (p50, p99, max), when measured.
    pub latency_us: Option<(u64, u64, u64)>,
    /// The same up to the start of the sink's write (see [`Registry::latency_to_sink_entry`]).
    pub latency_to_sink_entry_us: Option<(u64, u64, u64)>,
}

/// A job ready to run.
#[derive(Debug)]
pub struct Job {
    graph: JobGraph,
    /// How the graph fuses into tasks.
    plan: Vec<TaskPlan>,
    /// The sinks' committer side: the one sink, or every sink together (its id, then the
    /// factory whose committer, member record and preparation stand for all of them).
    commit: (StepId, Arc<dyn SinkFactory>),
    registry: Arc<Registry>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    shutdown_rx: watch::Receiver<bool>,
    on_demand_tx: mpsc::Sender<()>,
    /// Shared by the coordinators of successive runs (a job runs again after a rebalance).
    on_demand_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
}

impl Job {
    /// Prepares a job (a [`JobSpec`] or a [`JobGraph`]); registers its metrics so they can be
    /// served before it starts.
    ///
    /// # Errors
    /// A graph that cannot run: see [`JobGraph::check`]; several sinks that cannot be
    /// committed together.
    pub fn new(spec: impl Into<JobGraph>) -> Result<Self> {
        let graph: JobGraph = spec.into();
        let plan = crate::graph::plan_tasks(&graph)?;
        let commit = Self::committing(&graph)?;
        let registry = Arc::new(Registry::default());
        // Register steps in pipeline order so summaries list them that way.
        let mut feeders = Vec::new();
        let mut up = graph.upstream.as_ref();
        while let Some(u) = up {
            feeders.push(u.spec.as_ref());
            up = u.spec.upstream.as_ref();
        }
        for f in feeders.iter().rev() {
            Self::register(&registry, f);
        }
        Self::register(&registry, &graph);
        if let Some(q) = &graph.quarantine {
            let _ = registry.quarantine.set(q.clone());
        }
        let (tx, rx) = watch::channel(false);
        // One pending request is enough: more would only ask for the same checkpoint.
        let (on_demand_tx, on_demand_rx) = mpsc::channel(1);
        Ok(Self {
            graph,
            plan,
            commit,
            registry,
            shutdown_tx: Arc::new(tx),
            shutdown_rx: rx,
            on_demand_tx,
            on_demand_rx: Arc::new(tokio::sync::Mutex::new(on_demand_rx)),
        })
    }

    fn register(registry: &Registry, g: &JobGraph) {
        for w in 0..g.workers {
            for n in &g.nodes {
                registry.step(&n.id, w);
            }
        }
    }

    /// The committer side of the graph's sinks: one sink stands for itself; several are
    /// committed together, the one keeping its own progress first (see [`FanOutSinkFactory`]).
    fn committing(g: &JobGraph) -> Result<(StepId, Arc<dyn SinkFactory>)> {
        let mut sinks: Vec<(StepId, Arc<dyn SinkFactory>)> = g.sinks().map(|(id, f)| (id.clone(), f.clone())).collect();
        match sinks.len() {
            0 => Err(CoreError::Config("a job needs a sink".into())),
            1 => Ok(sinks.remove(0)),
            _ => {
                let ids: Vec<&str> = sinks.iter().map(|(id, _)| id.as_str()).collect();
                let id = StepId::new(ids.join("+"));
                let parts = sinks.iter().map(|(id, f)| FanOutPart { id: id.to_string(), factory: f.clone() }).collect();
                Ok((id, Arc::new(FanOutSinkFactory::new(parts)?)))
            }
        }
    }

    /// A job sharing `other`'s metrics and stop signal (the feeding side of a repartition).
    fn alongside(graph: JobGraph, other: &Job) -> Result<Self> {
        let plan = crate::graph::plan_tasks(&graph)?;
        let commit = Self::committing(&graph)?;
        let (on_demand_tx, on_demand_rx) = mpsc::channel(1);
        Ok(Self {
            graph,
            plan,
            commit,
            registry: other.registry.clone(),
            shutdown_tx: other.shutdown_tx.clone(),
            shutdown_rx: other.shutdown_rx.clone(),
            on_demand_tx,
            on_demand_rx: Arc::new(tokio::sync::Mutex::new(on_demand_rx)),
        })
    }

    /// The job's metrics.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The job's quarantine, when it has one (listed and released through the HTTP API).
    pub fn quarantine(&self) -> Option<Arc<crate::quarantine::Quarantine>> {
        self.graph.quarantine.clone()
    }

    /// For a process that is one member of a group sharing a partitioned input
    /// (`checkpoints.member` and a consumer-group source): who holds which key.
    pub fn key_holders(&self) -> Option<KeyHolders> {
        let ck = self.graph.checkpoint.as_ref()?;
        ck.store.member_name()?;
        let group = self.graph.sources().find_map(|(_, n)| match &n.kind {
            NodeKind::Source { factory, .. } => factory.group(),
            _ => None,
        })?;
        Some(KeyHolders { store: ck.store.clone(), group })
    }

    /// The graph's nodes in order, each with its inputs: (producer id, how rows are spread:
    /// empty for forward, else the key columns, `*` for all to one worker).
    pub fn topology(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.graph
            .nodes
            .iter()
            .map(|n| {
                let inputs = n
                    .inputs
                    .iter()
                    .map(|e| {
                        let part = match &e.part {
                            Partitioning::Forward => String::new(),
                            Partitioning::Hash(k) if k.is_empty() => "*".into(),
                            Partitioning::Hash(k) => k.join(", "),
                        };
                        (self.graph.nodes[e.from].id.as_str().to_string(), part)
                    })
                    .collect();
                (n.id.as_str().to_string(), inputs)
            })
            .collect()
    }

    /// The ids of the steps and sinks each stage (task) runs, in stage order: its channels are
    /// the metrics' `stage<N>-w<worker>` (what the console shows as a step's backpressure).
    pub fn stages(&self) -> Vec<Vec<String>> {
        self.plan
            .iter()
            .map(|t| {
                let mut ids: Vec<String> = t.ops.iter().map(|&n| self.graph.nodes[n].id.as_str().to_string()).collect();
                for o in &t.outputs {
                    if let TaskOutput::Sink(n) = o {
                        ids.push(self.graph.nodes[*n].id.as_str().to_string());
                    }
                }
                if let Head::Source(n) = t.head {
                    ids.insert(0, self.graph.nodes[n].id.as_str().to_string());
                }
                ids
            })
            .collect()
    }

    /// A handle that stops the job gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// A handle that asks for a checkpoint now (when the job takes checkpoints).
    pub fn checkpoint_handle(&self) -> CheckpointHandle {
        CheckpointHandle(self.on_demand_tx.clone())
    }

    /// Settles what an earlier run left in the checkpoint store and loads the state to resume
    /// from: sinks commit what the newest complete checkpoint covers and discard later
    /// pre-commits; partial or corrupt checkpoints are skipped. `fresh` restores nothing and
    /// deletes the earlier checkpoints.
    async fn recover(&self, ck: &CheckpointSpec) -> Result<(Restored, Option<Epoch>)> {
        let (sink_step, sink) = &self.commit;
        let visible = match sink.committer() {
            Some(c) => c.visible().await.map_err(|e| e.in_step(sink_step))?,
            None => crate::Visible::Unknown,
        };
        let (plan, restored) = ck.store.recover(visible.limit()).await?;
        // New epochs must come after any the sink has made visible, even if the store was
        // emptied by hand, or the sink would take a new checkpoint for an old one.
        let floor = visible.limit().filter(|e| e.0 > 0);
        if let Some(c) = sink.committer() {
            if let Some(e) = plan.commit {
                c.commit(e).await.map_err(|e| e.in_step(sink_step))?;
            }
            if let Some(e) = plan.abort_after {
                c.abort_after(e).await.map_err(|e| e.in_step(sink_step))?;
            }
        }
        if !ck.fresh {
            if let Some(e) = restored.epoch {
                tracing::info!(
                    checkpoint = e.0,
                    store = ck.store.location(),
                    drained = restored.drained,
                    "Resuming from checkpoint."
                );
            }
            return Ok((restored, plan.restore.max(floor)));
        }
        // Starting over: epochs keep growing, so names derived from them never repeat.
        let epochs = ck.store.epochs().await?;
        for e in &epochs {
            ck.store.delete(*e).await?;
        }
        if !epochs.is_empty() {
            tracing::info!(deleted = epochs.len(), "Starting fresh: earlier checkpoints deleted.");
        }
        Ok((Restored::default(), epochs.last().copied().max(plan.restore).max(floor)))
    }

    /// Runs the job to the end of its input (or until stopped).
    ///
    /// # Errors
    /// The first error of any task; the other tasks are then aborted.
    pub async fn run(mut self) -> Result<RunSummary> {
        let Some(up) = self.graph.upstream.take() else { return self.run_alone().await };
        let feeder = Job::alongside(*up.spec, &self)?;
        // The repartition topic exists before either side starts.
        let (sink_step, sink) = &feeder.commit;
        sink.prepare().await.map_err(|e| e.in_step(sink_step))?;
        let done = up.done.clone();
        let mut feeding = crate::task::SpawnedTask::spawn(async move {
            // One level: the feeding side is the part before the (single) repartition.
            let r = feeder.run_alone().await;
            if r.is_ok() {
                done.store(true, std::sync::atomic::Ordering::Release);
            }
            r
        });
        let reading = self.run_alone();
        tokio::pin!(reading);
        tokio::select! {
            r = &mut reading => {
                // The reading side ended first (stopped, or failed): the feeder stops too.
                let _ = self.shutdown_tx.send(true);
                let fed = feeding.await.map_err(|e| CoreError::Task(e.to_string()))?;
                let mut summary = r?;
                fed?;
                summary.steps = self.registry.steps();
                Ok(summary)
            }
            fed = &mut feeding => {
                match fed.map_err(|e| CoreError::Task(e.to_string()))? {
                    Ok(_) => {}
                    Err(e) => {
                        let _ = self.shutdown_tx.send(true);
                        let _ = reading.await;
                        return Err(e);
                    }
                }
                let mut summary = reading.await?;
                summary.steps = self.registry.steps();
                Ok(summary)
            }
        }
    }

    /// Moves the job to phase `p` for readiness probes; the feeding half of a repartitioned
    /// pipeline (which shares the registry) leaves that to the half that writes the output.
    fn phase(&self, p: JobPhase) {
        if self.graph.counts_output {
            self.registry.phase.set(p);
        }
    }

    async fn run_alone(&self) -> Result<RunSummary> {
        // Held across attempts: a run that starts again keeps its checkpoints to itself, so
        // no other run takes them in between, and the next attempt never finds them held.
        let _lock = match &self.graph.checkpoint {
            Some(ck) => ck.store.lock()?,
            None => None,
        };
        loop {
            match self.attempt().await {
                Err(e) if e.starts_again() && !*self.shutdown_rx.borrow() => {
                    let reason = if e.is_rebalance() {
                        self.phase(JobPhase::Rebalancing);
                        tracing::info!(job = %self.graph.name, reason = %e, "Starting again from the last checkpoint with the new assignment.");
                        "rebalance"
                    } else {
                        self.phase(JobPhase::Recovering);
                        tracing::warn!(job = %self.graph.name, reason = %e, "Starting again from the last checkpoint.");
                        "sink"
                    };
                    self.registry.connectors.add(
                        "weir_job_restarts_total",
                        "Times the job started again from its last checkpoint: its partitions moved (rebalance) or a sink lost its open output (sink).",
                        &[("reason", reason)],
                        1.0,
                    );
                }
                r => {
                    self.phase(JobPhase::Finished);
                    return r;
                }
            }
        }
    }

    /// With several processes sharing the input (a checkpoint member and sources in a
    /// group): waits for this process's partitions (the first source's, which the others
    /// follow) and takes each from the checkpoint that read furthest into it, its own or
    /// another member's (see [`crate::handoff`]).
    async fn take_over(
        &self,
        ck: &CheckpointSpec,
        groups: &[(&StepId, Arc<dyn GroupMember>)],
        own: Restored,
    ) -> Result<(Restored, crate::store::Parked)> {
        let (sink_step, sink) = &self.commit;
        let Some((lead_step, leader)) = groups.first() else { crate::bail_internal!("a handoff without a source") };
        let assigned =
            leader.assignment(self.shutdown_rx.clone(), &self.registry).await.map_err(|e| e.in_step(lead_step))?;
        for (step, g) in &groups[1..] {
            g.follow(leader.as_ref(), &assigned, &self.registry).await.map_err(|e| e.in_step(step))?;
        }
        let inputs: Vec<(&str, &dyn GroupMember)> = groups.iter().map(|(s, g)| (s.as_str(), g.as_ref())).collect();
        let me = ck.store.member_name().unwrap_or_default().to_string();
        // The partitions are there for the API's answer to which member holds a key.
        ck.store
            .put_member_record(&serde_json::json!({
                "member": me,
                "sink": sink.member_record(),
                "partitions": assigned.partitions,
            }))
            .await?;
        let own_parked = handoff::parked_candidate(&me, true, &own);
        let mut candidates = vec![handoff::live_candidate(&me, true, own), own_parked];
        if !ck.fresh {
            for peer in ck.store.peers().await? {
                let name = peer.member_name().unwrap_or_default().to_string();
                let Some(r) = peer.newest(None).await? else { continue };
                // What a member parked was visible when it parked it: it needs no settling.
                candidates.push(handoff::parked_candidate(&name, false, &r));
                let live = handoff::live_candidate(&name, false, r);
                if !handoff::wanted(&inputs, &assigned.partitions, &candidates, &live)? {
                    continue;
                }
                // Its live state counts only as far as the member made its output visible,
                // and settling it stops the member from committing more, so what is read
                // here cannot change afterwards.
                let record = peer.member_record().await?.unwrap_or_default();
                let live = match sink.peer_committer(&record["sink"]).map_err(|e| e.in_step(sink_step))? {
                    Some(committer) => {
                        let limit = committer.visible().await.map_err(|e| e.in_step(sink_step))?.limit();
                        let Some(r) = peer.newest(limit).await? else { continue };
                        handoff::live_candidate(&name, false, r)
                    }
                    None => live,
                };
                candidates.push(live);
            }
        }
        let own: Vec<&Candidate> = candidates.iter().filter(|c| c.own).collect();
        let parked = handoff::to_park(&inputs, &assigned.partitions, &own)?;
        let (restored, plan) = handoff::merge(&inputs, &assigned.partitions, candidates)?;
        let moved: Vec<String> = plan
            .taken
            .iter()
            .filter(|(_, (m, _))| *m != me)
            .map(|(p, (m, at))| {
                let at: Vec<String> = at.iter().map(|o| o.map_or_else(|| "-".to_string(), |o| o.to_string())).collect();
                format!("{p} from {m} at {}", at.join("/"))
            })
            .collect();
        if !moved.is_empty() {
            self.registry.connectors.add(
                "weir_partitions_taken_over_total",
                "Partitions whose state and position came from another member's checkpoint.",
                &[],
                moved.len() as f64,
            );
        }
        let parked_partitions =
            leader.positions(parked.sources.get(lead_step.as_str()).map_or(&[][..], Vec::as_slice))?.len();
        tracing::info!(
            member = %me,
            partitions = ?assigned.partitions,
            taken_over = ?moved,
            carried_for_others = parked_partitions,
            "Partitions assigned; their state restored from the members' checkpoints."
        );
        Ok((restored, parked))
    }

    /// One run: until the input ends, the job is stopped, a task fails, or the source's
    /// partitions move ([`CoreError::Rebalanced`], after which [`Job::run`] starts again).
    async fn attempt(&self) -> Result<RunSummary> {
        let started = Instant::now();
        let g = &self.graph;
        let w_count = g.workers;
        let plan = &self.plan;
        let commit_sink = &self.commit.1;
        let source_tasks = plan.iter().filter(|t| matches!(t.head, Head::Source(_))).count();
        // What each sink writes to exists, and its schema is registered, before any is made.
        for (id, f) in g.sinks() {
            f.prepare().await.map_err(|e| e.in_step(id))?;
        }

        let mut restored = Restored::default();
        let mut coord: Option<Coordinating> = None;
        if let Some(ck) = &g.checkpoint {
            self.phase(JobPhase::Recovering);
            for (_, n) in g.sources() {
                if let NodeKind::Source { factory, .. } = &n.kind {
                    crate::ensure_config!(
                        factory.resumable(),
                        "checkpoints need a source that can resume from a recorded position (a file); source `{}` cannot",
                        n.id
                    );
                }
            }
            for (id, f) in g.sinks() {
                if f.committer().is_none() {
                    tracing::warn!(sink = %id, "This sink writes at once: after a recovery, rows since the last checkpoint are written again (at least once).");
                }
            }
            let (r, last) = self.recover(ck).await?;
            restored = r;
            let mut parked = None;
            let mut releasing = false;
            if ck.store.member_name().is_some() {
                let groups: Vec<(&StepId, Arc<dyn GroupMember>)> = g
                    .sources()
                    .filter_map(|(_, n)| match &n.kind {
                        NodeKind::Source { factory, .. } => factory.group().map(|m| (&n.id, m)),
                        _ => None,
                    })
                    .collect();
                if !groups.is_empty() {
                    self.phase(JobPhase::Assigning);
                    let (r, p) = self.take_over(ck, &groups, restored).await?;
                    restored = r;
                    parked = Some(p);
                    releasing = groups.iter().any(|(_, g)| g.releasing());
                }
            }
            let tasks = (0..plan.len()).flat_map(|t| (0..w_count).map(move |w| task_key(t, w))).collect();
            coord = Some(Coordinating::new(
                tasks,
                source_tasks * w_count,
                last,
                ck,
                commit_sink.committer(),
                g.dead_letters.clone(),
                g.quarantine.clone(),
                &g.name,
                w_count,
                self.registry.clone(),
                self.on_demand_rx.clone(),
            ));
            if let (Some(c), Some(p)) = (coord.as_mut(), parked) {
                c.park(p)?;
            }
            if releasing {
                // Partitions given up are handed to the group once a checkpoint carries
                // their state for whoever takes them (see `GroupMember::releasing`): now.
                let _ = self.on_demand_tx.try_send(());
            }
            if let Some(tables) = restored.operators.remove(crate::quarantine::STATE_STEP) {
                if let Some(q) = &g.quarantine {
                    q.restore(&tables, Instant::now(), now_ms())?;
                }
            }
            let known: std::collections::HashSet<&str> =
                g.nodes.iter().filter(|n| matches!(n.kind, NodeKind::Op(_))).map(|n| n.id.as_str()).collect();
            for step in restored.operators.keys().filter(|s| !known.contains(s.as_str())) {
                tracing::warn!(step = %step, "The checkpoint holds state of a step the pipeline no longer has; it is ignored.");
            }
        }
        let restoring = restored.epoch.is_some();
        // The run's own stop signal: set by the job's shutdown, or by a source asking for the
        // run to end at a checkpoint and start again.
        let run_stop = Arc::new(watch::channel(*self.shutdown_rx.borrow()).0);
        let restart = crate::operator::RunRestart::new(run_stop.clone());

        // Channels into every task fed by others: for each input edge of its head, one per
        // upstream worker when the edge is keyed (any worker may hold a row's key), one from
        // the same worker when it is not. One channel per sender, so a task lining up barriers
        // can stop reading just the inputs whose barrier came (their senders then wait: memory
        // stays bounded by the channels' capacity).
        let cap = g.channel_capacity.max(1);
        let task_of_head: std::collections::HashMap<NodeId, usize> =
            plan.iter().enumerate().filter_map(|(t, tp)| head_node(tp).map(|h| (h, t))).collect();
        // inboxes[t][w]: the channels of task t on worker w; ports[t][c]: input of channel c.
        let mut inboxes: Vec<Vec<Vec<Inbox>>> =
            (0..plan.len()).map(|_| (0..w_count).map(|_| Vec::new()).collect()).collect();
        let mut ports: Vec<Vec<usize>> = vec![Vec::new(); plan.len()];
        // into[(node, port)][up_worker][down_worker]: the sender (None when that pair has none).
        let mut into: std::collections::HashMap<(NodeId, usize), Vec<Vec<Option<Outbox>>>> = Default::default();
        let mut chan_metrics: Vec<Vec<Arc<ChannelMetrics>>> = vec![Vec::new(); plan.len()];
        for (t, tp) in plan.iter().enumerate() {
            let Some(h) = head_node(tp) else { continue };
            let mut width = 0;
            for (port, e) in g.nodes[h].inputs.iter().enumerate() {
                let keyed = !matches!(e.part, Partitioning::Forward);
                let mut pairs = vec![vec![None; w_count]; w_count];
                for (down, inbox) in inboxes[t].iter_mut().enumerate() {
                    for (up, pair) in pairs.iter_mut().enumerate() {
                        if keyed || up == down {
                            let (tx, rx) = mpsc::channel(cap);
                            pair[down] = Some(tx);
                            inbox.push(rx);
                        }
                    }
                }
                let n = if keyed { w_count } else { 1 };
                ports[t].extend(std::iter::repeat_n(port, n));
                width += n;
                into.insert((h, port), pairs);
            }
            chan_metrics[t] =
                (0..w_count).map(|w| self.registry.channel(format!("stage{t}-w{w}"), cap * width)).collect();
        }

        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        for w in 0..w_count {
            for (t, tp) in plan.iter().enumerate() {
                let ckpt = coord.as_ref().map(|c| c.task(task_key(t, w)));
                let chain = Chain::build(g, tp, w, &self.registry, &restored)?;
                let mut outputs = Vec::with_capacity(tp.outputs.len());
                for o in &tp.outputs {
                    outputs.push(match *o {
                        TaskOutput::Edge { to, port } => {
                            let part = match &g.nodes[to].inputs[port].part {
                                // With one worker every key is that worker's: nothing to hash.
                                Partitioning::Hash(_) if w_count == 1 => None,
                                Partitioning::Forward => None,
                                Partitioning::Hash(k) => Some(Partitioner::new(k.clone(), w_count)),
                            };
                            let dt = task_of_head[&to];
                            let pairs = &into[&(to, port)];
                            let (senders, metrics) = match part {
                                None => (
                                    vec![pairs[w][w]
                                        .clone()
                                        .ok_or_else(|| CoreError::Internal("no channel".into()))?],
                                    vec![chan_metrics[dt][w].clone()],
                                ),
                                Some(_) => (
                                    pairs[w]
                                        .iter()
                                        .map(|s| s.clone().ok_or_else(|| CoreError::Internal("no channel".into())))
                                        .collect::<Result<Vec<_>>>()?,
                                    chan_metrics[dt].clone(),
                                ),
                            };
                            Output::Exchange { part, senders, metrics, me: w }
                        }
                        TaskOutput::Sink(n) => {
                            let node = &g.nodes[n];
                            let NodeKind::Sink { factory, latency_column, retry } = &node.kind else {
                                crate::bail_internal!("output {} is not a sink", node.id);
                            };
                            Output::Sink {
                                latency: latency_column.clone(),
                                retry: *retry,
                                dead: g.dead_letters.clone(),
                                sink: factory.create(w, w_count).map_err(|e| e.in_step(&node.id))?,
                                metrics: self.registry.step(&node.id, w),
                                registry: self.registry.clone(),
                                step: node.id.clone(),
                                counts: g.counts_output,
                            }
                        }
                    });
                }
                let outputs = Outputs(outputs);
                match tp.head {
                    Head::Source(n) => {
                        let node = &g.nodes[n];
                        let NodeKind::Source { factory, watermark } = &node.kind else {
                            crate::bail_internal!("task head {} is not a source", node.id);
                        };
                        let mut source = factory.create(w, w_count).map_err(|e| e.in_step(&node.id))?;
                        if restoring {
                            let positions = restored.sources.get(node.id.as_str()).map_or(&[][..], Vec::as_slice);
                            source.restore(positions).map_err(|e| e.in_step(&node.id))?;
                        }
                        let cx = SourceContext {
                            step: node.id.clone(),
                            metrics: self.registry.step(&node.id, w),
                            dead_letters: g.dead_letters.clone(),
                            shutdown: run_stop.subscribe(),
                            registry: self.registry.clone(),
                            counts_input: g.counts_input,
                            restart: restart.clone(),
                        };
                        let driver = SourceDriver {
                            shedder: g.shedding.clone().map(|(o, p)| crate::shed::Shedder::new(o, p)),
                            quarantine: g.quarantine.clone(),
                            source,
                            cx,
                            chain,
                            outputs,
                            wm: *watermark,
                            clock: self.registry.clock(),
                            control: coord.as_ref().map(Coordinating::source),
                            ckpt,
                        };
                        // Every log line of the task carries the job, stage and worker: the span is at
                        // error level so that it is on at any log level (an info span would vanish
                        // from the warnings a default run prints).
                        let span =
                            tracing::error_span!("task", job = %g.name, stage = t, worker = w, source = %node.id);
                        tasks.spawn(driver.run().instrument(span));
                    }
                    Head::Inputs => {
                        let rx = std::mem::take(&mut inboxes[t][w]);
                        let driver = StageDriver {
                            rx,
                            ports: ports[t].clone(),
                            blocked: self.registry.clone(),
                            chain,
                            outputs,
                            metrics: chan_metrics[t][w].clone(),
                            ckpt,
                        };
                        let span = tracing::error_span!("task", job = %g.name, stage = t, worker = w);
                        tasks.spawn(driver.run().instrument(span));
                    }
                }
            }
        }
        // The tasks hold their own clones now; dropping ours lets channels close.
        drop(into);
        if let Some(c) = coord.as_mut() {
            c.tasks_started();
        }
        self.phase(JobPhase::Running);

        tracing::info!(job = %g.name, workers = w_count, tasks = plan.len(), "Job started.");
        let mut tasks_done = false;
        let mut job_stop = self.shutdown_rx.clone();
        loop {
            let coordinating = coord.as_ref().is_some_and(|c| !c.closed);
            if tasks_done && !coordinating {
                break;
            }
            enum Next {
                Task(Option<std::result::Result<Result<()>, tokio::task::JoinError>>),
                Coord(crate::checkpointing::Event),
                Stop,
            }
            let next = tokio::select! {
                biased;
                ev = async {
                    match coord.as_mut() {
                        Some(c) => c.next_event().await,
                        None => std::future::pending().await,
                    }
                }, if coordinating => Next::Coord(ev),
                res = tasks.join_next(), if !tasks_done => Next::Task(res),
                Ok(()) = job_stop.changed(), if !*run_stop.borrow() => Next::Stop,
            };
            let res = match next {
                Next::Stop => {
                    if *job_stop.borrow_and_update() {
                        run_stop.send_replace(true);
                    }
                    Ok(())
                }
                Next::Coord(ev) => match coord.as_mut() {
                    Some(c) => c.handle(ev).await,
                    None => Ok(()),
                },
                Next::Task(None) => {
                    tasks_done = true;
                    Ok(())
                }
                Next::Task(Some(res)) => res.map_err(|e| CoreError::Task(e.to_string())).and_then(|r| r),
            };
            if let Err(e) = res {
                if e.starts_again() {
                    tracing::info!(job = %g.name, reason = %e, "Run stopped; it starts again from its last checkpoint.");
                } else {
                    tracing::error!(job = %g.name, error = %e, "Job failed.");
                }
                tasks.abort_all();
                // Gone before anything starts again: a next run shares the source's consumer.
                while tasks.join_next().await.is_some() {}
                let _ = g.dead_letters.flush();
                return Err(e);
            }
        }
        if let Some(c) = &coord {
            if !c.finished_cleanly() {
                return Err(CoreError::Internal("the job ended without its final checkpoint".into()));
            }
        }
        g.dead_letters.flush()?;
        if let Some(reason) = restart.requested().filter(|_| !*self.shutdown_rx.borrow()) {
            // Ended at its final checkpoint on purpose: the next run resumes exactly there.
            return Err(CoreError::Rebalanced(reason));
        }
        tracing::info!(job = %g.name, elapsed_ms = started.elapsed().as_millis() as u64, "Job finished.");
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        Ok(RunSummary {
            elapsed: started.elapsed(),
            steps: self.registry.steps(),
            source_records: g(&self.registry.source_records),
            sink_rows: g(&self.registry.sink_rows),
            latency_us: quantiles(&self.registry.latency),
            latency_to_sink_entry_us: quantiles(&self.registry.latency_to_sink_entry),
        })
    }
}

/// p50, p99 and max of `h` in µs, if it recorded anything.
fn quantiles(h: &crate::metrics::LatencyHistogram) -> Option<(u64, u64, u64)> {
    h.quantile_us(0.5).zip(h.quantile_us(0.99)).map(|(a, b)| (a, b, h.max_us()))
}

/// Asks a running job for a checkpoint now.
#[derive(Debug, Clone)]
pub struct CheckpointHandle(mpsc::Sender<()>);

impl CheckpointHandle {
    /// Starts a checkpoint unless one is in flight (ignored when the job takes none).
    pub fn trigger(&self) {
        let _ = self.0.try_send(());
    }
}

fn task_key(stage: usize, worker: usize) -> TaskKey {
    TaskKey(format!("s{stage}-w{worker}"))
}

/// The node a task fed by channels starts with: its first operator, or its sink.
fn head_node(tp: &TaskPlan) -> Option<NodeId> {
    match (tp.head, tp.root.first()) {
        (Head::Inputs, Some(Target::Link { link, .. })) => Some(tp.ops[*link]),
        (Head::Inputs, Some(Target::Out(o))) => match tp.outputs[*o] {
            TaskOutput::Sink(n) => Some(n),
            TaskOutput::Edge { .. } => None,
        },
        _ => None,
    }
}

/// One operator in a chain, with its counters.
#[derive(Debug)]
struct Link {
    id: StepId,
    op: Box<dyn Operator>,
    metrics: Arc<StepMetrics>,
    /// The watermark of its input (all its inputs together).
    watermark: Option<i64>,
    /// The watermark of each of its inputs, for a step with several.
    port_watermarks: Vec<Option<i64>>,
    /// What it forwards given `watermark` ([`Operator::output_watermark`]).
    forwarded: Option<i64>,
}

/// The operators of one task, run back to back: a tree whose branches end in the task's
/// outputs.
#[derive(Debug)]
struct Chain {
    links: Vec<Link>,
    /// Where the task's input goes.
    root: Vec<Target>,
    /// Where each link's output goes.
    routes: Vec<Vec<Target>>,
    /// The link each link reads from (`None`: the task's input).
    feeds: Vec<Option<usize>>,
    /// The link each output takes its rows from (`None`: the task's input).
    output_from: Vec<Option<usize>>,
    worker: usize,
    dead: Arc<dyn DeadLetterSink>,
    tick: Option<Duration>,
    registry: Arc<Registry>,
}

enum Hook {
    Batch(Batch),
    Watermark(i64),
    InputWatermark(i64),
    Tick(i64),
    End,
}

/// The batches a task's hooks produced, one list per output.
type Outs = Vec<Vec<Batch>>;

impl Chain {
    fn build(g: &JobGraph, tp: &TaskPlan, worker: usize, reg: &Arc<Registry>, restored: &Restored) -> Result<Self> {
        let mut links = Vec::with_capacity(tp.ops.len());
        let mut tick: Option<Duration> = None;
        for &n in &tp.ops {
            let node = &g.nodes[n];
            let NodeKind::Op(f) = &node.kind else { crate::bail_internal!("{} is not an operator", node.id) };
            let id = &node.id;
            let mut op = f.create(worker, g.workers).map_err(|e| e.in_step(id))?;
            if let Some(tables) = restored.operators.get(id.as_str()) {
                if let Some(mine) =
                    crate::state::rows_for_worker(tables, worker, g.workers).map_err(|e| e.in_step(id))?
                {
                    op.restore(mine).map_err(|e| e.in_step(id))?;
                }
            }
            if let Some(t) = op.tick_interval() {
                tick = Some(tick.map_or(t, |c| c.min(t)));
            }
            let watermark = restored.watermarks.get(id.as_str()).copied();
            let port_watermarks = if node.inputs.len() > 1 {
                (0..node.inputs.len()).map(|p| restored.watermarks.get(&port_key(id, p)).copied()).collect()
            } else {
                Vec::new()
            };
            let forwarded = watermark.map(|w| forwarded(op.as_ref(), w));
            links.push(Link {
                id: id.clone(),
                metrics: reg.step(id, worker),
                op,
                watermark,
                port_watermarks,
                forwarded,
            });
        }
        Ok(Self {
            links,
            root: tp.root.clone(),
            routes: tp.routes.clone(),
            feeds: tp.feeds.clone(),
            output_from: tp.output_from.clone(),
            worker,
            dead: g.dead_letters.clone(),
            tick,
            registry: reg.clone(),
        })
    }

    /// Empty lists, one per output.
    fn outs(&self) -> Outs {
        vec![Vec::new(); self.output_from.len()]
    }

    /// Every operator's state and watermarks, for a checkpoint.
    fn snapshot(&mut self) -> Result<TaskState> {
        let (mut tables, mut wms) = (Vec::new(), BTreeMap::new());
        for l in &mut self.links {
            if let Some(t) = l.op.snapshot().map_err(|e| e.in_step(&l.id))? {
                tables.push((l.id.to_string(), StateRole::Operator, t));
            }
            if let Some(w) = l.watermark {
                wms.insert(l.id.to_string(), w);
            }
            for (p, w) in l.port_watermarks.iter().enumerate() {
                if let Some(w) = w {
                    wms.insert(port_key(&l.id, p), *w);
                }
            }
        }
        Ok((tables, wms))
    }

    /// Sends a batch to targets; the last one takes it, the others share its arrays.
    fn deliver(&mut self, targets: &[Target], port: Option<usize>, b: Batch, out: &mut Outs) -> Result<()> {
        let Some((last, rest)) = targets.split_last() else { return Ok(()) };
        for t in rest {
            self.deliver_one(*t, port, b.clone(), out)?;
        }
        self.deliver_one(*last, port, b, out)
    }

    fn deliver_one(&mut self, t: Target, port: Option<usize>, b: Batch, out: &mut Outs) -> Result<()> {
        match t {
            Target::Link { link, port: p } => self.run(link, port.unwrap_or(p), Hook::Batch(b), out),
            Target::Out(o) => {
                out[o].push(b);
                Ok(())
            }
        }
    }

    /// Runs a hook on link `i` (its input `port` for batches and input watermarks), then feeds
    /// its output through the links and outputs after it.
    fn run(&mut self, i: usize, port: usize, hook: Hook, out: &mut Outs) -> Result<()> {
        let Some(link) = self.links.get_mut(i) else { crate::bail_internal!("no link {i}") };
        let mut emitted = Vec::new();
        let t0 = Instant::now();
        let is_batch = matches!(hook, Hook::Batch(_));
        let mut traced: Option<(Span, Option<Arc<opentelemetry::trace::SpanContext>>)> = None;
        {
            let mut cx = OpContext {
                step: &link.id,
                worker: self.worker,
                metrics: &link.metrics,
                dead_letters: self.dead.as_ref(),
                watermark: link.watermark,
                registry: &self.registry,
                out: &mut emitted,
            };
            let res = match hook {
                Hook::Batch(b) => {
                    StepMetrics::add(&link.metrics.rows_in, b.num_rows() as u64);
                    StepMetrics::add(&link.metrics.batches_in, 1);
                    if b.trace.is_some() {
                        traced = Some((step_span(&link.id, self.worker, &b), b.trace.clone()));
                    }
                    link.op.process_from(port, b, &mut cx)
                }
                // A watermark never goes back: after a restore, sources start below the
                // watermark the operators had reached.
                Hook::Watermark(wm) if link.watermark.is_some_and(|w| wm <= w) => Ok(()),
                Hook::Watermark(wm) => {
                    let r = link.op.on_watermark(wm, &mut cx);
                    link.watermark = Some(wm);
                    link.forwarded = Some(forwarded(link.op.as_ref(), wm));
                    r
                }
                Hook::InputWatermark(wm) => match link.port_watermarks.get_mut(port) {
                    Some(w) if w.is_none_or(|w| wm > w) => {
                        *w = Some(wm);
                        link.op.on_input_watermark(port, wm, &mut cx)
                    }
                    _ => Ok(()),
                },
                Hook::Tick(now) => link.op.on_tick(now, &mut cx),
                Hook::End => link.op.on_end(&mut cx),
            };
            res.map_err(|e| e.in_step(&link.id))?;
        }
        let ns = t0.elapsed().as_nanos() as u64;
        StepMetrics::add(&link.metrics.busy_ns, ns);
        if is_batch {
            link.metrics.batch_time.record(ns);
        }
        if let Some((mut span, input)) = traced {
            pass_on_trace(&mut span, input.as_ref(), &mut emitted);
        }
        if emitted.is_empty() {
            return Ok(());
        }
        let routes = std::mem::take(&mut self.routes[i]);
        let res = emitted.into_iter().try_for_each(|b| self.deliver(&routes, None, b, out));
        self.routes[i] = routes;
        res
    }

    /// A batch from the task's input (`port` of the head step, 0 but for a join or union).
    fn batch(&mut self, port: usize, b: Batch, out: &mut Outs) -> Result<()> {
        let root = std::mem::take(&mut self.root);
        let res = self.deliver(&root, Some(port), b, out);
        self.root = root;
        res
    }

    /// Input `port` of the head step advanced its own watermark (steps with several inputs).
    fn input_watermark(&mut self, port: usize, wm: i64, out: &mut Outs) -> Result<()> {
        if self.links.first().is_some_and(|l| l.port_watermarks.len() > port) && self.feeds.first() == Some(&None) {
            self.run(0, port, Hook::InputWatermark(wm), out)?;
        }
        Ok(())
    }

    /// The per-input watermarks a restored head step had reached, replayed before any input
    /// so that it decides lateness as the run before did.
    fn restored_input_watermarks(&mut self, out: &mut Outs) -> Result<()> {
        let Some(l) = self.links.first() else { return Ok(()) };
        let restored: Vec<(usize, i64)> =
            l.port_watermarks.iter().enumerate().filter_map(|(p, w)| w.map(|w| (p, w))).collect();
        for (p, w) in restored {
            self.links[0].port_watermarks[p] = None;
            self.input_watermark(p, w, out)?;
        }
        Ok(())
    }

    /// Advances every link's watermark in order, so rows a link emits on the watermark reach
    /// the next link before the watermark does. Returns the watermark of each output.
    fn watermark(&mut self, wm: i64, out: &mut Outs) -> Result<Vec<i64>> {
        for i in 0..self.links.len() {
            let input = match self.feeds[i] {
                None => wm,
                Some(f) => self.links[f].forwarded.unwrap_or(i64::MIN),
            };
            if input > i64::MIN {
                self.run(i, 0, Hook::Watermark(input), out)?;
            }
        }
        Ok(self
            .output_from
            .iter()
            .map(|f| match f {
                None => wm,
                Some(l) => self.links[*l].forwarded.unwrap_or(i64::MIN),
            })
            .collect())
    }

    fn tick(&mut self, now: i64, out: &mut Outs) -> Result<()> {
        for i in 0..self.links.len() {
            self.run(i, 0, Hook::Tick(now), out)?;
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Outs) -> Result<()> {
        self.watermark(END_OF_TIME, out)?;
        for i in 0..self.links.len() {
            self.run(i, 0, Hook::End, out)?;
        }
        Ok(())
    }
}

/// The span of a step's work on a traced batch.
fn step_span(step: &StepId, worker: usize, b: &Batch) -> Span {
    Span::child(
        format!("step {step}"),
        b.trace.as_deref(),
        vec![
            kv("weir.step", step.to_string()),
            kv("weir.worker", worker as i64),
            kv("weir.rows_in", b.num_rows() as i64),
        ],
    )
}

/// Puts what a step made of a traced batch in the step's span: rows it passed on or reshaped
/// (still in the input's trace) go on from the step, so the next step is its child.
fn pass_on_trace(span: &mut Span, input: Option<&Arc<opentelemetry::trace::SpanContext>>, emitted: &mut [Batch]) {
    span.set(kv("weir.rows_out", emitted.iter().map(|b| b.num_rows() as i64).sum::<i64>()));
    let Some(cx) = span.context().map(Arc::new) else { return };
    for b in emitted {
        let same = match (&b.trace, input) {
            (Some(t), Some(i)) => Arc::ptr_eq(t, i),
            (t, _) => t.is_none(),
        };
        if same {
            b.trace = Some(cx.clone());
        }
    }
}

/// What an operator forwards for input watermark `wm`; the end of time stays the end.
fn forwarded(op: &dyn Operator, wm: i64) -> i64 {
    if wm == END_OF_TIME {
        END_OF_TIME
    } else {
        op.output_watermark(wm).min(wm)
    }
}

/// The key of input `port`'s watermark of a step in a checkpoint's watermarks.
fn port_key(step: &StepId, port: usize) -> String {
    format!("{step}@{port}")
}

/// Where rows leave a task.
#[derive(Debug)]
enum Output {
    /// Into another task, over channels: split by key over every worker's channel, or (no
    /// partitioner) into the one channel of the same worker.
    Exchange {
        part: Option<Partitioner>,
        senders: Vec<mpsc::Sender<(usize, Message)>>,
        metrics: Vec<Arc<ChannelMetrics>>,
        me: usize,
    },
    Sink {
        sink: Box<dyn Sink>,
        metrics: Arc<StepMetrics>,
        registry: Arc<Registry>,
        step: StepId,
        latency: Option<String>,
        retry: RetryPolicy,
        dead: Arc<dyn DeadLetterSink>,
        /// Rows written count as the job's output.
        counts: bool,
    },
}

/// Every output of a task; messages other than batches go to all of them.
#[derive(Debug)]
struct Outputs(Vec<Output>);

impl Outputs {
    async fn batches(&mut self, out: &mut Outs) -> Result<()> {
        for (o, bs) in self.0.iter_mut().zip(out.iter_mut()) {
            o.batches(bs).await?;
        }
        Ok(())
    }

    /// The same watermark to every output.
    async fn watermark(&mut self, wm: Watermark) -> Result<()> {
        for o in &mut self.0 {
            o.watermark(wm).await?;
        }
        Ok(())
    }

    /// Each output's own watermark (a step may hold its output's back).
    async fn watermarks(&mut self, wms: &[i64]) -> Result<()> {
        for (o, w) in self.0.iter_mut().zip(wms) {
            if *w > i64::MIN {
                o.watermark(Watermark::At(*w)).await?;
            }
        }
        Ok(())
    }

    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        for o in &mut self.0 {
            o.begin(epoch).await?;
        }
        Ok(())
    }

    /// Passes the barrier of `epoch` on every output before anything after it, so a task
    /// downstream of two of them (a diamond) lines it up.
    async fn barrier(&mut self, epoch: Epoch) -> Result<()> {
        for o in &mut self.0 {
            o.barrier(epoch).await?;
        }
        Ok(())
    }

    async fn end(&mut self, last: Option<Final>) -> Result<()> {
        for o in &mut self.0 {
            o.end(last).await?;
        }
        Ok(())
    }
}
impl Output {
    async fn batches(&mut self, out: &mut Vec<Batch>) -> Result<()> {
        for b in out.drain(..) {
            match self {
                Self::Exchange { part: None, senders, metrics, me } => {
                    metrics[0].pushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    send(&senders[0], (*me, Message::Batch(b))).await?;
                }
                Self::Exchange { part: Some(part), senders, metrics, me } => {
                    for (w, piece) in part.split(&b)?.into_iter().enumerate() {
                        if let Some(piece) = piece {
                            metrics[w].pushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            send(&senders[w], (*me, Message::Batch(piece))).await?;
                        }
                    }
                }
                Self::Sink { sink, metrics, registry, step, latency, retry, dead, counts } => {
                    let n = b.num_rows() as u64;
                    StepMetrics::add(&metrics.rows_in, n);
                    StepMetrics::add(&metrics.batches_in, 1);
                    // Looked up once: the same stamps are measured again after the write.
                    let stamps = latency.as_deref().map(|col| latency_stamps(&b, col)).transpose()?;
                    if let Some(s) = &stamps {
                        record_latency(&registry.latency_to_sink_entry, s);
                    }
                    let t0 = Instant::now();
                    let mut span = match &b.trace {
                        Some(p) => Span::child(
                            format!("sink {step}"),
                            Some(p),
                            vec![kv("weir.step", step.to_string()), kv("weir.rows", n as i64)],
                        ),
                        None => Span::none(),
                    };
                    if b.trace.is_some() || crate::trace::enabled() {
                        sink.trace(span.context().as_ref());
                    }
                    let outcome = write_with_retry(sink.as_mut(), &b, retry, step, registry, &mut span).await?;
                    let ns = t0.elapsed().as_nanos() as u64;
                    StepMetrics::add(&metrics.busy_ns, ns);
                    metrics.batch_time.record(ns);
                    let written = match outcome {
                        Written::All => n,
                        Written::GaveUp { first_failure_ms } => {
                            dead_letter_batch(dead.as_ref(), &b, step, metrics, retry, first_failure_ms)?;
                            continue;
                        }
                        Written::AllBut(refused) => {
                            let k = refused.len() as u64;
                            dead_letter_refused(dead.as_ref(), &b, step, metrics, refused)?;
                            n - k
                        }
                    };
                    StepMetrics::add(&metrics.rows_out, written);
                    if *counts {
                        StepMetrics::add(&registry.sink_rows, written);
                    }
                    if let Some(s) = &stamps {
                        record_latency(&registry.latency, s);
                    }
                }
            }
        }
        Ok(())
    }

    async fn watermark(&mut self, wm: Watermark) -> Result<()> {
        if let Self::Exchange { senders, me, .. } = self {
            for s in senders.iter() {
                send(s, (*me, Message::Watermark(wm))).await?;
            }
        }
        Ok(())
    }

    /// Rows from now on belong to checkpoint `epoch`.
    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        match self {
            Self::Exchange { .. } => Ok(()),
            Self::Sink { sink, step, .. } => sink.begin(epoch).await.map_err(|e| e.in_step(step)),
        }
    }

    /// Passes the barrier of `epoch` on; a sink pre-commits.
    async fn barrier(&mut self, epoch: Epoch) -> Result<()> {
        match self {
            Self::Exchange { senders, me, .. } => {
                for s in senders.iter() {
                    send(s, (*me, Message::Barrier(epoch))).await?;
                }
                Ok(())
            }
            Self::Sink { sink, step, registry, .. } => {
                sink.pre_commit(epoch).await.map_err(|e| e.in_step(step))?;
                // A sink may settle deliveries at the barrier: its figures move here too.
                sink.report(&registry.connectors);
                sink.begin(Epoch(epoch.0 + 1)).await.map_err(|e| e.in_step(step))
            }
        }
    }

    async fn end(&mut self, last: Option<Final>) -> Result<()> {
        match self {
            Self::Exchange { senders, me, .. } => {
                for s in senders.iter() {
                    send(s, (*me, Message::End(last))).await?;
                }
                Ok(())
            }
            Self::Sink { sink, step, registry, .. } => {
                if let Some(f) = last {
                    sink.pre_commit(f.epoch).await.map_err(|e| e.in_step(step))?;
                }
                sink.close().await.map_err(|e| e.in_step(step))?;
                sink.report(&registry.connectors);
                Ok(())
            }
        }
    }
}

/// What became of a batch handed to a sink.
enum Written {
    /// Every row.
    All,
    /// Every row but these, which the sink refused (each for a reason of its own).
    AllBut(Vec<crate::error::RefusedRow>),
    /// None: the retries ran out; the first failure was at this time.
    GaveUp { first_failure_ms: i64 },
}

/// Writes a batch, retrying transient failures. Rows the sink refuses come back to be
/// dead-lettered, and so does the whole batch when the retries run out; permanent errors fail.
async fn write_with_retry(
    sink: &mut dyn Sink,
    b: &Batch,
    retry: &RetryPolicy,
    step: &StepId,
    reg: &Registry,
    span: &mut Span,
) -> Result<Written> {
    let mut attempt = 1u32;
    let mut down_since: Option<Instant> = None;
    let mut first_failure_ms = 0;
    loop {
        // Each attempt after the first is a span of its own under the write's.
        let mut again = match attempt {
            1 => Span::none(),
            _ => Span::child("sink retry", span.context().as_ref(), vec![kv("weir.attempt", i64::from(attempt))]),
        };
        let res = sink.write_attempt(&b.rows, attempt).await;
        span.set(kv("weir.attempts", i64::from(attempt)));
        if let Err(e) = &res {
            again.fail(e);
            span.event("write failed", vec![kv("weir.attempt", i64::from(attempt)), kv("error", e.to_string())]);
        }
        drop(again);
        if matches!(res, Ok(()) | Err(CoreError::Refused(_))) {
            sink.report(&reg.connectors);
            if let Some(t) = down_since {
                reg.sink_down.store(0, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(step = %step, attempts = attempt, outage_ms = t.elapsed().as_millis() as u64, "Sink recovered.");
            }
        }
        match res {
            Ok(()) => return Ok(Written::All),
            Err(CoreError::Refused(rows)) => {
                if rows.iter().any(|r| r.row >= b.num_rows()) {
                    crate::bail_internal!("sink `{step}` refused a row past the end of its batch");
                }
                tracing::warn!(step = %step, rows = rows.len(), reason = %rows[0].reason, "Sink refused rows; they go to the dead-letter output.");
                return Ok(Written::AllBut(rows));
            }
            Err(e) if e.retry() == crate::Retry::Backoff => {
                StepMetrics::add(&reg.sink_retries, 1);
                if down_since.is_none() {
                    down_since = Some(Instant::now());
                    first_failure_ms = now_ms();
                    reg.sink_down.store(1, std::sync::atomic::Ordering::Relaxed);
                    StepMetrics::add(&reg.sink_outages, 1);
                    tracing::warn!(step = %step, error = %e, "Sink write failed; retrying with backoff while its input waits.");
                }
                if retry.max_attempts.is_some_and(|m| attempt >= m) {
                    span.fail("retries exhausted; the batch went to the dead-letter output");
                    reg.sink_down.store(0, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(step = %step, attempts = attempt, error = %e, "Sink retries exhausted; dead-lettering the batch.");
                    return Ok(Written::GaveUp { first_failure_ms });
                }
                tokio::time::sleep(retry.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                span.fail(&e);
                return Err(e.in_step(step));
            }
        }
    }
}

fn dead_letter_batch(
    dead: &dyn DeadLetterSink,
    b: &Batch,
    step: &StepId,
    metrics: &StepMetrics,
    retry: &RetryPolicy,
    first_failure_ms: i64,
) -> Result<()> {
    let now = now_ms();
    let attempts = retry.max_attempts.unwrap_or(0);
    let letters = (0..b.num_rows())
        .map(|i| crate::deadletter::DeadLetter {
            payload: crate::deadletter::Payload::Row(b.rows.slice(i, 1)),
            kind: crate::deadletter::ErrorKind::Sink,
            reason: format!("sink `{step}` failed {attempts} times"),
            step: step.clone(),
            origin: "sink".into(),
            position: None,
            time_ms: now,
            attempts,
            first_failure_ms: Some(first_failure_ms),
        })
        .collect();
    StepMetrics::add(&metrics.dead_lettered, b.num_rows() as u64);
    dead.write(letters)
}

fn dead_letter_refused(
    dead: &dyn DeadLetterSink,
    b: &Batch,
    step: &StepId,
    metrics: &StepMetrics,
    refused: Vec<crate::error::RefusedRow>,
) -> Result<()> {
    let now = now_ms();
    StepMetrics::add(&metrics.dead_lettered, refused.len() as u64);
    let letters = refused
        .into_iter()
        .map(|r| crate::deadletter::DeadLetter {
            payload: crate::deadletter::Payload::Row(b.rows.slice(r.row, 1)),
            kind: crate::deadletter::ErrorKind::Sink,
            reason: r.reason,
            step: step.clone(),
            origin: "sink".into(),
            position: None,
            time_ms: now,
            attempts: 1,
            first_failure_ms: Some(now),
        })
        .collect();
    dead.write(letters)
}

/// The creation stamps of a batch's rows, from the sink's `latency_column`.
fn latency_stamps(b: &Batch, col: &str) -> Result<arrow_array::Int64Array> {
    let c = crate::time::column_by_path(&b.rows, col)?;
    match c.as_any().downcast_ref::<arrow_array::Int64Array>() {
        Some(created) => Ok(created.clone()),
        None => {
            Err(CoreError::Config(format!("latency column `{col}` must be int64 microseconds, not {}", c.data_type())))
        }
    }
}

/// Records the time from each stamp to now.
fn record_latency(h: &crate::metrics::LatencyHistogram, created: &arrow_array::Int64Array) {
    let now = chrono::Utc::now().timestamp_micros();
    h.record(created.iter().flatten().map(|t| now - t));
}

async fn send(tx: &mpsc::Sender<(usize, Message)>, m: (usize, Message)) -> Result<()> {
    tx.send(m).await.map_err(|_| CoreError::Task("a downstream task stopped".into()))
}

fn tick_timer(every: Option<Duration>) -> Option<tokio::time::Interval> {
    every.map(|d| {
        let mut i = tokio::time::interval(d);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    })
}

async fn next_tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Drives a source and the first stage of one worker.
#[derive(Debug)]
struct SourceDriver {
    shedder: Option<crate::shed::Shedder>,
    quarantine: Option<Arc<crate::quarantine::Quarantine>>,
    source: Box<dyn Source>,
    cx: SourceContext,
    chain: Chain,
    outputs: Outputs,
    wm: WatermarkSpec,
    clock: Arc<WorkerClock>,
    control: Option<SourceControl>,
    ckpt: Option<TaskCheckpoint>,
}

impl SourceDriver {
    async fn run(mut self) -> Result<()> {
        let now = Instant::now();
        let n = self.source.partitions();
        let mut parts: Vec<PartitionWatermark> =
            (0..n).map(|_| PartitionWatermark::new(self.wm.bound, self.wm.idle_timeout, now)).collect();
        let mut comb = WatermarkCombiner::new(n);
        let mut out = self.chain.outs();
        let mut ticks = tick_timer(self.chain.tick);
        let step = self.cx.step.clone();
        if let Some(ck) = &self.ckpt {
            self.outputs.begin(ck.first_epoch).await?;
        }
        loop {
            // Cancel safety: a poll dropped by another branch loses nothing, because sources
            // only hand out data they have fully prepared in the returned value.
            let polled = tokio::select! {
                biased;
                h = hear(&mut self.control) => {
                    match h {
                        Heard::Control(Control::Barrier(e)) => self.barrier(e).await?,
                        Heard::Completed(e) => self.source.checkpoint_complete(e).await.map_err(|e| e.in_step(&step))?,
                        Heard::Control(_) => {}
                    }
                    continue;
                }
                p = self.source.poll(&mut self.cx) => p.map_err(|e| e.in_step(&step))?,
                () = next_tick(&mut ticks) => {
                    self.chain.tick(now_ms(), &mut out)?;
                    self.outputs.batches(&mut out).await?;
                    continue;
                }
            };
            // A source that learned of more partitions (a Kafka assignment) reports them
            // before their first rows, so they hold the watermark back from the start.
            let known = self.source.partitions();
            if known > parts.len() {
                grow(&mut parts, &mut comb, known - 1, &self.wm)?;
            }
            let changed: Option<usize> = match polled {
                SourcePoll::Rows { partition, batch } => {
                    let batch = match &self.quarantine {
                        Some(q) if q.active() > 0 => {
                            let (kept, diverted) = q.divert(batch, &step, "source")?;
                            StepMetrics::add(&self.cx.metrics.quarantined, diverted);
                            kept
                        }
                        _ => batch,
                    };
                    let batch = match self.shedder.as_mut() {
                        Some(sh) => {
                            sh.update(&self.cx.registry, Instant::now());
                            let (kept, shed) = sh.shed(batch).map_err(|e| e.in_step(&step))?;
                            StepMetrics::add(&self.cx.metrics.shed, shed);
                            if let Some(p) = sh.pause() {
                                tokio::time::sleep(p).await;
                            }
                            kept
                        }
                        None => batch,
                    };
                    // Sources count their own `rows_in` (records read, good or bad) and
                    // dead letters; what reaches here is their output.
                    let rows = batch.num_rows() as u64;
                    StepMetrics::add(&self.cx.metrics.rows_out, rows);
                    StepMetrics::add(&self.cx.metrics.batches_in, 1);
                    grow(&mut parts, &mut comb, partition, &self.wm)?;
                    let p = &mut parts[partition];
                    if let Some(t) = batch.max_time() {
                        p.observe(t, Instant::now());
                    }
                    // A traced batch's trip through this task is the span every later one
                    // descends from; a source that read a trace context from its records
                    // (`batch.trace`) makes it that trace's child.
                    let mut span = Span::none();
                    let batch = if crate::trace::enabled() {
                        span = Span::start(
                            format!("batch {step}"),
                            batch.trace.as_deref(),
                            vec![
                                kv("weir.source", step.to_string()),
                                kv("weir.partition", partition as i64),
                                kv("weir.worker", self.chain.worker as i64),
                                kv("weir.rows", rows as i64),
                            ],
                        );
                        let cx = span.context();
                        batch.traced(cx)
                    } else {
                        batch
                    };
                    self.chain.batch(0, batch, &mut out)?;
                    self.outputs.batches(&mut out).await?;
                    drop(span);
                    Some(partition)
                }
                SourcePoll::Waiting => {
                    let now = Instant::now();
                    for (i, p) in parts.iter_mut().enumerate() {
                        p.check_idle(now);
                        if let Some(w) = comb.update(i, p.current()) {
                            self.emit_watermark(w, &mut out).await?;
                        }
                    }
                    None
                }
                SourcePoll::PartitionEnd(p) => {
                    grow(&mut parts, &mut comb, p, &self.wm)?;
                    parts[p].end();
                    Some(p)
                }
                SourcePoll::PartitionIdle(p) => {
                    grow(&mut parts, &mut comb, p, &self.wm)?;
                    parts[p].set_idle();
                    Some(p)
                }
                SourcePoll::End => break,
            };
            if let Some(i) = changed {
                if let Some(w) = comb.update(i, parts[i].current()) {
                    self.emit_watermark(w, &mut out).await?;
                }
            }
        }
        // Under checkpoints the end is the final checkpoint: wait until every source has
        // finished and the coordinator names it, taking part in any checkpoint still running.
        let last = match self.control.take() {
            None => None,
            Some(mut c) => {
                // Meanwhile this source sends nothing more: it counts as idle downstream, or a
                // source that had nothing to read (a Kafka worker without partitions) would
                // hold back every window after an exchange until the job ends.
                if !self.cx.stopping() {
                    self.outputs.watermark(Watermark::Idle).await?;
                }
                c.finished();
                let last = loop {
                    match c.hear().await {
                        Heard::Control(Control::Barrier(e)) => self.barrier(e).await?,
                        Heard::Control(Control::Final(e)) => {
                            break Some(Final { epoch: e, drain: !self.cx.stopping() })
                        }
                        Heard::Control(Control::Idle) => {}
                        Heard::Completed(e) => {
                            self.source.checkpoint_complete(e).await.map_err(|e| e.in_step(&step))?;
                        }
                    }
                };
                self.control = Some(c);
                last
            }
        };
        if last.is_none_or(|f| f.drain) {
            self.clock.watermark.store(END_OF_TIME, std::sync::atomic::Ordering::Relaxed);
            self.chain.end(&mut out)?;
            self.outputs.batches(&mut out).await?;
            self.outputs.watermark(Watermark::At(END_OF_TIME)).await?;
        }
        let Some(f) = last else { return self.outputs.end(None).await };
        let state = self.snapshot(f.epoch)?;
        self.outputs.end(last).await?;
        ack(self.ckpt.as_ref(), f.epoch, state, Duration::ZERO, Some(f.drain))?;
        // What the final checkpoint covers is acknowledged to the source's server once it
        // completes; the coordinator goes on meanwhile, as this task still holds its sender.
        if let Some(mut c) = self.control.take() {
            if let Some(e) = c.completion_of(f.epoch).await {
                self.source.checkpoint_complete(e).await.map_err(|e| e.in_step(&step))?;
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, epoch: Epoch) -> Result<TaskState> {
        let (mut tables, wms) = self.chain.snapshot()?;
        if let Some(t) = self.source.snapshot_for(epoch).map_err(|e| e.in_step(&self.cx.step))? {
            tables.push((self.cx.step.to_string(), StateRole::Source, t));
        }
        Ok((tables, wms))
    }

    /// Checkpoint `epoch` reached this source: record positions and state, pass the barrier.
    async fn barrier(&mut self, epoch: Epoch) -> Result<()> {
        let state = self.snapshot(epoch)?;
        self.outputs.barrier(epoch).await?;
        ack(self.ckpt.as_ref(), epoch, state, Duration::ZERO, None)
    }

    async fn emit_watermark(&mut self, w: Watermark, out: &mut Outs) -> Result<()> {
        match w {
            Watermark::At(t) => {
                self.clock.watermark.store(t, std::sync::atomic::Ordering::Relaxed);
                let each = self.chain.watermark(t, out)?;
                self.outputs.batches(out).await?;
                self.outputs.watermarks(&each).await
            }
            Watermark::Idle => self.outputs.watermark(w).await,
        }
    }
}

/// Makes room for source partition `p`: partitions past the ones a source started with
/// (a Kafka consumer assigned more) join the watermark as inputs that have not reported.
fn grow(parts: &mut Vec<PartitionWatermark>, comb: &mut WatermarkCombiner, p: usize, wm: &WatermarkSpec) -> Result<()> {
    // A bound on growth turns a source's bug into an error instead of an allocation spree.
    if p >= parts.len() + 65_536 {
        crate::bail_internal!("source returned partition {p} of {}", parts.len());
    }
    while parts.len() <= p {
        parts.push(PartitionWatermark::new(wm.bound, wm.idle_timeout, Instant::now()));
        comb.add_input();
    }
    Ok(())
}

/// Drives a stage after an exchange on one worker.
#[derive(Debug)]
struct StageDriver {
    /// The task's channels: for each input of its head step, one per upstream worker when
    /// the input is keyed, else one from the same worker.
    rx: Vec<Inbox>,
    /// The input of the head step each channel feeds.
    ports: Vec<usize>,
    /// Where the count of inputs held back for barrier alignment goes.
    blocked: Arc<Registry>,
    chain: Chain,
    outputs: Outputs,
    metrics: Arc<ChannelMetrics>,
    ckpt: Option<TaskCheckpoint>,
}

impl StageDriver {
    async fn run(mut self) -> Result<()> {
        let inputs = self.rx.len();
        let mut comb = WatermarkCombiner::new(inputs);
        // A step with several inputs also hears each input's own watermark: the minimum over
        // that input's channels (a join drops state by the other side's progress).
        let n_ports = self.ports.iter().max().map_or(1, |p| p + 1);
        let mut local = Vec::with_capacity(inputs);
        let mut port_combs: Vec<WatermarkCombiner> = Vec::new();
        if n_ports > 1 {
            let mut widths = vec![0; n_ports];
            for &p in &self.ports {
                local.push(widths[p]);
                widths[p] += 1;
            }
            port_combs = widths.into_iter().map(WatermarkCombiner::new).collect();
        }
        // Reading in step (several inputs): the channels of an input whose watermark is ahead
        // of the slowest input's are read only when the others have nothing. A join then keeps
        // little more of the faster side than its interval needs, instead of everything that
        // side's channels let its source read ahead. A preference, never a wait: an input
        // with nothing to give cannot hold the others up.
        let mut port_at: Vec<Option<i64>> = vec![None; n_ports];
        let mut port_idle = vec![false; n_ports];
        let mut ahead = vec![false; inputs];
        let mut deferred = false;
        let mut ended = vec![false; inputs];
        // Inputs whose sender went away without `End`: their task failed, and the job hears
        // of that from the task itself (with its real cause), so this one only stops reading.
        let mut closed = vec![false; inputs];
        let mut last: Option<Final> = None;
        let mut out = self.chain.outs();
        let mut ticks = tick_timer(self.chain.tick);
        // Barrier alignment: an input whose barrier came first is not read until the barrier
        // has come on every input; its sender waits on the full channel meanwhile.
        let mut aligner = BarrierAligner::new(inputs);
        let mut aligning_since: Option<Instant> = None;
        let mut next_input = 0;
        if let Some(ck) = &self.ckpt {
            self.outputs.begin(ck.first_epoch).await?;
        }
        self.chain.restored_input_watermarks(&mut out)?;
        self.outputs.batches(&mut out).await?;
        loop {
            // Cancel safety: `poll_recv` takes nothing it does not return, and a tick only
            // runs between messages.
            let (from, msg) = tokio::select! {
                biased;
                m = std::future::poll_fn(|cx| poll_inputs(&mut self.rx, &ended, &mut closed, &aligner, (&ahead, &mut deferred), &mut next_input, cx)) => m?,
                () = next_tick(&mut ticks) => {
                    self.chain.tick(now_ms(), &mut out)?;
                    self.outputs.batches(&mut out).await?;
                    continue;
                }
            };
            match msg {
                Message::Batch(b) => {
                    self.metrics.popped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.chain.batch(self.ports[from], b, &mut out)?;
                    self.outputs.batches(&mut out).await?;
                }
                Message::Watermark(w) => {
                    if n_ports > 1 {
                        let p = self.ports[from];
                        match port_combs[p].update(local[from], Some(w)) {
                            Some(Watermark::At(t)) => {
                                (port_at[p], port_idle[p]) = (Some(t), false);
                                self.chain.input_watermark(p, t, &mut out)?;
                                self.outputs.batches(&mut out).await?;
                            }
                            Some(Watermark::Idle) => port_idle[p] = true,
                            None => {}
                        }
                        let slowest =
                            (0..n_ports).filter(|&q| !port_idle[q]).map(|q| port_at[q].unwrap_or(i64::MIN)).min();
                        for (i, a) in ahead.iter_mut().enumerate() {
                            let q = self.ports[i];
                            *a = slowest.is_some_and(|s| !port_idle[q] && port_at[q].is_some_and(|t| t > s));
                        }
                    }
                    match comb.update(from, Some(w)) {
                        Some(Watermark::At(t)) if t != END_OF_TIME => {
                            let each = self.chain.watermark(t, &mut out)?;
                            self.outputs.batches(&mut out).await?;
                            self.outputs.watermarks(&each).await?;
                        }
                        Some(w) => self.outputs.watermark(w).await?,
                        None => {}
                    }
                }
                Message::Barrier(e) => {
                    let aligned = aligner.on_barrier(from, e).map_err(|p| {
                        CoreError::Internal(format!("barrier {e} from input {from} out of protocol: {p:?}"))
                    })?;
                    match aligned {
                        crate::checkpoint::Alignment::Block(_) => {
                            aligning_since.get_or_insert_with(Instant::now);
                            StepMetrics::add(&self.blocked.inputs_held, 1);
                        }
                        crate::checkpoint::Alignment::Snapshot(e) => {
                            let waited = aligning_since.take().map(|t| t.elapsed()).unwrap_or_default();
                            // Every other input was held; none is now.
                            self.blocked.inputs_held.fetch_sub(inputs as u64 - 1, std::sync::atomic::Ordering::Relaxed);
                            let state = self.chain.snapshot()?;
                            self.outputs.barrier(e).await?;
                            ack(self.ckpt.as_ref(), e, state, waited, None)?;
                        }
                    }
                }
                Message::End(f) => {
                    ended[from] = true;
                    if f.is_some() {
                        last = f;
                    }
                    if ended.iter().all(|e| *e) {
                        if last.is_none_or(|f| f.drain) {
                            self.chain.end(&mut out)?;
                            self.outputs.batches(&mut out).await?;
                            self.outputs.watermark(Watermark::At(END_OF_TIME)).await?;
                        }
                        let Some(f) = last else { return self.outputs.end(None).await };
                        let state = self.chain.snapshot()?;
                        self.outputs.end(last).await?;
                        return ack(self.ckpt.as_ref(), f.epoch, state, Duration::ZERO, Some(f.drain));
                    }
                }
            }
        }
    }
}

/// Takes the next message from the inputs that are neither ended nor held back for barrier
/// alignment, starting after the input read last so that a busy input cannot starve the
/// others. Inputs marked `ahead` are read only when no other has a message, and only after
/// the task has let the others run once (`deferred`): on a runtime with one thread, the task
/// feeding an input that is behind gets its turn before the input ahead is read again.
fn poll_inputs(
    rx: &mut [Inbox],
    ended: &[bool],
    closed: &mut [bool],
    aligner: &BarrierAligner,
    (ahead, deferred): (&[bool], &mut bool),
    next: &mut usize,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<(usize, Message)>> {
    let n = rx.len();
    for later in [false, true] {
        if later && !*deferred && (0..n).any(|i| ahead[i] && !ended[i] && !closed[i]) {
            *deferred = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        for k in 0..n {
            let i = (*next + k) % n;
            if ended[i] || closed[i] || aligner.is_blocked(i) || ahead[i] != later {
                continue;
            }
            match rx[i].poll_recv(cx) {
                std::task::Poll::Ready(Some((_, m))) => {
                    *next = (i + 1) % n;
                    *deferred = false;
                    return std::task::Poll::Ready(Ok((i, m)));
                }
                std::task::Poll::Ready(None) => closed[i] = true,
                std::task::Poll::Pending => {}
            }
        }
    }
    if (0..n).all(|i| ended[i] || closed[i]) {
        return std::task::Poll::Ready(Err(CoreError::Task(
            "every upstream task stopped before the end of input".into(),
        )));
    }
    std::task::Poll::Pending
}

/// A task's state tables (step, role, table) and its operators' watermarks.
type TaskState = (Vec<(String, StateRole, arrow_array::RecordBatch)>, BTreeMap<String, i64>);

/// Sends a task's snapshot of `epoch` to the coordinator (nothing without checkpoints).
fn ack(
    ck: Option<&TaskCheckpoint>,
    epoch: Epoch,
    (tables, watermarks): TaskState,
    alignment: Duration,
    last: Option<bool>,
) -> Result<()> {
    match ck {
        Some(ck) => ck.ack(Ack { task: ck.task.clone(), epoch, tables, watermarks, alignment, last }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{CollectSink, MemoryDeadLetters};

    fn rows(n: usize) -> Batch {
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "v",
            arrow_schema::DataType::Int64,
            false,
        )]));
        let v = arrow_array::Int64Array::from((0..n as i64).collect::<Vec<_>>());
        let rb = arrow_array::RecordBatch::try_new(schema, vec![Arc::new(v)]).unwrap();
        Batch::new(rb, arrow_array::Int64Array::from(vec![0; n])).unwrap()
    }

    /// Polls `f` (yielding to the runtime in between) until it holds; fails after 10 s.
    async fn until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    //  input 0: B1 b b b b ...       (its barrier came first: not read any more, sender waits)
    //  input 1: b b b ... B1         (read on; once its barrier comes, input 0 drains)
    /// While a stage task lines up a barrier, the input whose barrier came first is not read:
    /// its channel fills and its sender waits, instead of the task queueing its messages
    /// without limit, and the other input is still read.
    #[tokio::test]
    async fn barrier_alignment_holds_back_the_early_input_with_bounded_memory() {
        let reg = Arc::new(Registry::default());
        let sink = CollectSink::default();
        let (tx0, rx0) = mpsc::channel(2);
        let (tx1, rx1) = mpsc::channel(2);
        let driver = stage(vec![rx0, rx1], &sink, &reg);
        let task = crate::task::SpawnedTask::spawn(driver.run());
        tx0.send((0, Message::Barrier(Epoch(1)))).await.unwrap();
        until(|| reg.inputs_held.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
        // Input 0 is held: two messages fill its channel, the third cannot be queued.
        tx0.try_send((0, Message::Batch(rows(10)))).unwrap();
        tx0.try_send((0, Message::Batch(rows(10)))).unwrap();
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(tx0.try_send((0, Message::Batch(rows(10)))).is_err(), "a held input's channel stays full");
        // Input 1 is still read.
        for _ in 0..5 {
            tx1.send((1, Message::Batch(rows(1)))).await.unwrap();
        }
        until(|| sink.batches().len() == 5).await;
        // Its barrier releases input 0.
        tx1.send((1, Message::Barrier(Epoch(1)))).await.unwrap();
        until(|| sink.batches().len() == 7).await;
        assert_eq!(reg.inputs_held.load(std::sync::atomic::Ordering::Relaxed), 0);
        for (i, tx) in [tx0, tx1].into_iter().enumerate() {
            tx.send((i, Message::End(None))).await.unwrap();
        }
        task.await.unwrap().unwrap();
        assert_eq!(sink.batches().iter().map(|b| b.num_rows()).sum::<usize>(), 25);
    }

    fn stage(inputs: Vec<Inbox>, sink: &CollectSink, reg: &Arc<Registry>) -> StageDriver {
        // A task with no operators: its input goes straight to its sink.
        let chain = Chain {
            links: Vec::new(),
            root: vec![Target::Out(0)],
            routes: Vec::new(),
            feeds: Vec::new(),
            output_from: vec![None],
            worker: 0,
            dead: Arc::new(MemoryDeadLetters::default()),
            tick: None,
            registry: reg.clone(),
        };
        let ports = vec![0; inputs.len()];
        StageDriver {
            rx: inputs,
            ports,
            blocked: reg.clone(),
            chain,
            outputs: Outputs(vec![Output::Sink {
                sink: SinkFactory::create(sink, 0, 1).unwrap(),
                metrics: reg.step(&StepId::new("out"), 0),
                registry: reg.clone(),
                step: StepId::new("out"),
                latency: None,
                retry: RetryPolicy::default(),
                dead: Arc::new(MemoryDeadLetters::default()),
                counts: true,
            }]),
            metrics: reg.channel("test".into(), 4),
            ckpt: None,
        }
    }

    /// A sink whose write takes a while: every row of the batch pays it.
    #[derive(Debug)]
    struct SlowSink(Duration);

    #[async_trait::async_trait]
    impl Sink for SlowSink {
        async fn write(&mut self, _rows: &arrow_array::RecordBatch) -> Result<()> {
            tokio::time::sleep(self.0).await;
            Ok(())
        }
        async fn close(&mut self) -> Result<()> {
            Ok(())
        }
    }

    /// The latency to the sink's entry leaves out the sink's write, which the latency to the
    /// sink includes: with a write of 50 ms, rows stamped just before reach the sink in well
    /// under that and are taken after it.
    #[tokio::test]
    async fn the_latency_is_split_at_the_start_of_the_sinks_write() {
        let reg = Arc::new(Registry::default());
        let write = Duration::from_millis(50);
        let mut out = Output::Sink {
            sink: Box::new(SlowSink(write)),
            metrics: reg.step(&StepId::new("out"), 0),
            registry: reg.clone(),
            step: StepId::new("out"),
            latency: Some("created".into()),
            retry: RetryPolicy::default(),
            dead: Arc::new(MemoryDeadLetters::default()),
            counts: true,
        };
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "created",
            arrow_schema::DataType::Int64,
            false,
        )]));
        for _ in 0..3 {
            let now = chrono::Utc::now().timestamp_micros();
            let created = arrow_array::Int64Array::from(vec![now; 10]);
            let rb = arrow_array::RecordBatch::try_new(schema.clone(), vec![Arc::new(created)]).unwrap();
            out.batches(&mut vec![Batch::new(rb, arrow_array::Int64Array::from(vec![0; 10])).unwrap()]).await.unwrap();
        }
        let (entry, taken) = (&reg.latency_to_sink_entry, &reg.latency);
        assert_eq!((entry.count(), taken.count()), (30, 30), "every row measured at both points");
        let write_us = write.as_micros() as u64;
        assert!(entry.max_us() < write_us, "at the entry {} µs, before any write", entry.max_us());
        assert!(taken.quantile_us(0.0).unwrap() >= write_us, "taken after the write: {:?}", taken.quantile_us(0.0));
    }

    /// Reading in step: a message of an input that is behind comes first, wherever the round
    /// robin stands; with nothing from it, the task first lets other tasks run (so the one
    /// feeding it can), and only then takes the input ahead.
    #[test]
    fn an_input_ahead_is_read_after_the_others_had_their_turn() {
        let (tx0, rx0) = mpsc::channel(4);
        let (tx1, rx1) = mpsc::channel(4);
        let mut rx = vec![rx0, rx1];
        tx0.try_send((0, Message::Batch(rows(1)))).unwrap();
        tx1.try_send((1, Message::Batch(rows(2)))).unwrap();
        let (ended, mut closed, aligner) = (vec![false; 2], vec![false; 2], BarrierAligner::new(2));
        let (ahead, mut deferred, mut next) = ([false, true], false, 1);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut poll = |deferred: &mut bool, next: &mut usize| match poll_inputs(
            &mut rx,
            &ended,
            &mut closed,
            &aligner,
            (&ahead, deferred),
            next,
            &mut cx,
        ) {
            std::task::Poll::Ready(r) => {
                r.map(|(i, m)| Some((i, matches!(m, Message::Batch(b) if b.num_rows() > 0)))).unwrap()
            }
            std::task::Poll::Pending => None,
        };
        assert_eq!(poll(&mut deferred, &mut next), Some((0, true)), "the input behind first");
        assert_eq!(poll(&mut deferred, &mut next), None, "a turn for the others before the input ahead");
        assert_eq!(poll(&mut deferred, &mut next), Some((1, true)));
        assert_eq!(poll(&mut deferred, &mut next), None, "nothing left");
    }

    /// A graph whose source feeds two sinks: each gets every batch, and both get the same
    /// Arrow arrays (a fan-out copies `Arc`s, not rows).
    #[tokio::test]
    async fn a_fan_out_hands_every_branch_the_same_arrays() {
        use crate::graph::{Edge, Node};
        let schema = rows(1).rows.schema();
        let source = crate::testing::VecSourceFactory::new(schema, vec![vec![rows(100), rows(7), rows(50)]]);
        let (one, two) = (CollectSink::default(), CollectSink::default());
        let sink = |id: &str, s: &CollectSink| Node {
            id: StepId::new(id),
            kind: NodeKind::Sink { factory: Arc::new(s.clone()), latency_column: None, retry: RetryPolicy::default() },
            inputs: vec![Edge { from: 0, part: Partitioning::Forward }],
        };
        let graph = JobGraph {
            name: "fan".into(),
            workers: 1,
            nodes: vec![
                Node {
                    id: StepId::new("src"),
                    kind: NodeKind::Source {
                        factory: Arc::new(source),
                        watermark: WatermarkSpec { bound: Duration::ZERO, idle_timeout: None },
                    },
                    inputs: Vec::new(),
                },
                sink("one", &one),
                sink("two", &two),
            ],
            dead_letters: Arc::new(MemoryDeadLetters::default()),
            channel_capacity: 4,
            quarantine: None,
            shedding: None,
            checkpoint: None,
            upstream: None,
            counts_input: true,
            counts_output: true,
        };
        let summary = Job::new(graph).unwrap().run().await.unwrap();
        assert_eq!(summary.sink_rows, 2 * 157, "both sinks count");
        let (a, b) = (one.batches(), two.batches());
        assert_eq!(a.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), [100, 7, 50]);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (x.column(0).to_data(), y.column(0).to_data());
            assert_eq!(x.buffers()[0].as_ptr(), y.buffers()[0].as_ptr(), "the branches share the batch's buffers");
        }
    }

    /// An upstream task that goes away (it failed, or its run stopped because partitions
    /// moved) does not fail the stage on its own: the job hears of the real cause from that
    /// task; meanwhile the other inputs are read. Only when every input is gone without its
    /// end does the stage fail.
    #[tokio::test]
    async fn an_input_that_goes_away_leaves_the_cause_to_its_task() {
        let reg = Arc::new(Registry::default());
        let sink = CollectSink::default();
        let (tx0, rx0) = mpsc::channel(2);
        let (tx1, rx1) = mpsc::channel(2);
        let task = crate::task::SpawnedTask::spawn(stage(vec![rx0, rx1], &sink, &reg).run());
        drop(tx0);
        tx1.send((1, Message::Batch(rows(3)))).await.unwrap();
        until(|| sink.batches().len() == 1).await;
        assert!(!task.is_finished(), "one input gone is not the stage's failure");
        drop(tx1);
        let err = task.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("every upstream task stopped"), "{err}");
    }
}
