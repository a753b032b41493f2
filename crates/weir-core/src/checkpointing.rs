//! Carrying out the checkpoint protocol in a running job: the coordinator's side (a loop
//! inside [`crate::runtime::Job::run`] that starts checkpoints, writes what tasks acknowledge
//! to the store, writes manifests and commits sinks) and the handles tasks use to take part.
//!
//! The decisions themselves are [`crate::checkpoint`]'s; this module only does the I/O.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{Action, Coordinator, Epoch, SnapshotRef, StateRole, TaskKey};
use crate::error::{CoreError, Result};
use crate::metrics::Registry;
use crate::operator::Committer;
use crate::store::CheckpointStore;

/// What the coordinator asks the sources to do; a watch channel carries the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Idle,
    /// Inject `Barrier(epoch)`.
    Barrier(Epoch),
    /// Every source has finished: end with this final checkpoint.
    Final(Epoch),
}

/// A task's snapshot of one epoch, sent to the coordinator.
#[derive(Debug)]
pub(crate) struct Ack {
    pub(crate) task: TaskKey,
    pub(crate) epoch: Epoch,
    pub(crate) tables: Vec<(String, StateRole, RecordBatch)>,
    pub(crate) watermarks: BTreeMap<String, i64>,
    pub(crate) alignment: Duration,
    /// For the final checkpoint: whether the task drained (flushed) its state.
    pub(crate) last: Option<bool>,
}

/// What a task holds to take part in checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct TaskCheckpoint {
    pub(crate) task: TaskKey,
    pub(crate) first_epoch: Epoch,
    acks: mpsc::Sender<Ack>,
}

impl TaskCheckpoint {
    pub(crate) fn ack(&self, ack: Ack) -> Result<()> {
        // At most one checkpoint is in flight and each task acknowledges it once, so the
        // channel (room for two acks per task) never fills.
        self.acks.try_send(ack).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CoreError::Internal("checkpoint acknowledgements overflowed".into()),
            mpsc::error::TrySendError::Closed(_) => CoreError::Task("the checkpoint coordinator stopped".into()),
        })
    }
}

/// What a source task holds besides its [`TaskCheckpoint`].
#[derive(Debug)]
pub(crate) struct SourceControl {
    rx: watch::Receiver<Control>,
    completed: watch::Receiver<Option<Epoch>>,
    finished: mpsc::Sender<()>,
}

impl SourceControl {
    /// Waits until checkpoint `epoch` has completed; `None` when the coordinator went away
    /// first (the job failed, and the checkpoint will not complete).
    pub(crate) async fn completion_of(&mut self, epoch: Epoch) -> Option<Epoch> {
        self.completed.wait_for(|c| c.is_some_and(|c| c >= epoch)).await.ok().and(Some(epoch))
    }

    pub(crate) fn finished(&self) {
        let _ = self.finished.try_send(());
    }
}

/// What a source task hears from the coordinator.
#[derive(Debug)]
pub(crate) enum Heard {
    /// An instruction.
    Control(Control),
    /// A checkpoint completed.
    Completed(Epoch),
}

impl SourceControl {
    /// Waits for an instruction or a completed checkpoint, instructions first. Cancel safe.
    pub(crate) async fn hear(&mut self) -> Heard {
        let Self { rx, completed, .. } = self;
        tokio::select! {
            biased;
            Ok(()) = rx.changed() => Heard::Control(*rx.borrow_and_update()),
            Ok(()) = completed.changed() => match *completed.borrow_and_update() {
                Some(e) => Heard::Completed(e),
                None => Heard::Control(Control::Idle),
            },
            else => std::future::pending().await,
        }
    }
}

/// Waits for what the coordinator says when there is a control channel, forever otherwise.
pub(crate) async fn hear(c: &mut Option<SourceControl>) -> Heard {
    match c {
        Some(c) => c.hear().await,
        None => std::future::pending().await,
    }
}

/// Something the coordinator reacts to.
#[derive(Debug)]
pub(crate) enum Event {
    Ack(Ack),
    AcksClosed,
    SourceFinished,
    Start,
}

/// The coordinator's loop state.
#[derive(Debug)]
pub(crate) struct Coordinating {
    proto: Coordinator,
    store: CheckpointStore,
    committer: Option<Arc<dyn Committer>>,
    dead_letters: Arc<dyn crate::deadletter::DeadLetterSink>,
    quarantine: Option<Arc<crate::quarantine::Quarantine>>,
    job: String,
    workers: usize,
    reg: Arc<Registry>,
    ctl: watch::Sender<Control>,
    /// The last checkpoint that completed (manifest written, sinks committed), for sources
    /// that acknowledge what they read to their server only then.
    completed: watch::Sender<Option<Epoch>>,
    acks: mpsc::Receiver<Ack>,
    acks_tx: Option<mpsc::Sender<Ack>>,
    finished: mpsc::Receiver<()>,
    finished_tx: Option<mpsc::Sender<()>>,
    on_demand: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
    ticks: mpsc::Receiver<()>,
    sources: usize,
    sources_finished: usize,
    final_epoch: Option<Epoch>,
    final_done: bool,
    drained: bool,
    started: Option<(Epoch, Instant)>,
    alignment: Duration,
    bytes: u64,
    pub(crate) closed: bool,
    /// State of partitions handed on, written into every checkpoint (see [`crate::handoff`]).
    parked: crate::store::Parked,
    /// The span of the checkpoint in flight (recorded when traces are on).
    span: crate::trace::Span,
}

impl Coordinating {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        tasks: Vec<TaskKey>,
        sources: usize,
        last: Option<Epoch>,
        spec: &crate::runtime::CheckpointSpec,
        committer: Option<Arc<dyn Committer>>,
        dead_letters: Arc<dyn crate::deadletter::DeadLetterSink>,
        quarantine: Option<Arc<crate::quarantine::Quarantine>>,
        job: &str,
        workers: usize,
        reg: Arc<Registry>,
        on_demand: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
    ) -> Self {
        let (acks_tx, acks) = mpsc::channel(2 * tasks.len() + 2);
        let (finished_tx, finished) = mpsc::channel(sources.max(1));
        let (ctl, _) = watch::channel(Control::Idle);
        // The interval runs on a thread of its own: tokio's timers are driven by worker
        // threads, which busy tasks can keep from parking for far longer than the interval.
        let (tick_tx, ticks) = mpsc::channel(1);
        if let Some(every) = spec.interval {
            let spawned = std::thread::Builder::new().name("weir-checkpoint-timer".into()).spawn(move || loop {
                std::thread::sleep(every);
                if let Err(mpsc::error::TrySendError::Closed(())) = tick_tx.try_send(()) {
                    return;
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start the checkpoint timer; only the final checkpoint will be taken.");
            }
        }
        reg.checkpoints.enabled.store(1, Ordering::Relaxed);
        Self {
            proto: Coordinator::new(tasks.into_iter().collect(), spec.keep, last),
            store: spec.store.clone(),
            committer,
            dead_letters,
            quarantine,
            job: job.into(),
            workers,
            reg,
            ctl,
            completed: watch::channel(None).0,
            acks,
            acks_tx: Some(acks_tx),
            finished,
            finished_tx: Some(finished_tx),
            on_demand,
            ticks,
            sources,
            sources_finished: 0,
            final_epoch: None,
            final_done: false,
            drained: true,
            started: None,
            alignment: Duration::ZERO,
            bytes: 0,
            closed: false,
            parked: crate::store::Parked::default(),
            span: crate::trace::Span::none(),
        }
    }

    /// Carries `parked` in every checkpoint of this run (one table per step and role).
    pub(crate) fn park(&mut self, mut parked: crate::store::Parked) -> Result<()> {
        for map in [&mut parked.sources, &mut parked.operators] {
            for tables in map.values_mut() {
                if tables.len() > 1 {
                    let one = arrow_select::concat::concat_batches(&tables[0].schema(), tables.iter())?;
                    *tables = vec![one];
                }
            }
        }
        self.parked = parked;
        Ok(())
    }

    /// The first epoch tasks write into.
    pub(crate) fn first_epoch(&self) -> Epoch {
        self.proto.next_epoch()
    }

    pub(crate) fn task(&self, task: TaskKey) -> TaskCheckpoint {
        let acks = self.acks_tx.clone().unwrap_or_else(|| mpsc::channel(1).0);
        TaskCheckpoint { task, first_epoch: self.first_epoch(), acks }
    }

    pub(crate) fn source(&self) -> SourceControl {
        let finished = self.finished_tx.clone().unwrap_or_else(|| mpsc::channel(1).0);
        SourceControl { rx: self.ctl.subscribe(), completed: self.completed.subscribe(), finished }
    }

    /// Drops the coordinator's own senders once every task has its clones, so the channels
    /// close when the tasks are gone.
    pub(crate) fn tasks_started(&mut self) {
        self.acks_tx = None;
        self.finished_tx = None;
    }

    /// Whether the final checkpoint completed.
    pub(crate) fn finished_cleanly(&self) -> bool {
        self.final_done
    }

    /// Waits for the next event. Cancel safe: every branch is.
    pub(crate) async fn next_event(&mut self) -> Event {
        let on_demand = self.on_demand.clone();
        tokio::select! {
            biased;
            a = self.acks.recv() => a.map_or(Event::AcksClosed, Event::Ack),
            Some(()) = self.finished.recv() => Event::SourceFinished,
            Some(()) = async { on_demand.lock().await.recv().await } => Event::Start,
            Some(()) = self.ticks.recv() => Event::Start,
        }
    }

    /// Handles an event. Not cancel safe: run it outside any `select!`.
    pub(crate) async fn handle(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Ack(a) => self.on_ack(a).await?,
            Event::AcksClosed => self.closed = true,
            Event::SourceFinished => {
                self.sources_finished += 1;
                self.try_final()?;
            }
            Event::Start => self.start(),
        }
        Ok(())
    }

    fn start(&mut self) {
        // Sources that finished early still take part (they wait for the final checkpoint
        // and answer barriers meanwhile); only once all have is the final one due instead.
        if self.sources_finished >= self.sources || self.final_epoch.is_some() {
            return;
        }
        match self.proto.start() {
            Ok(Action::InjectBarrier(e)) => {
                self.begin(e, false);
                tracing::debug!(checkpoint = e.0, "Checkpoint started.");
                let _ = self.ctl.send(Control::Barrier(e));
            }
            Ok(_) => {}
            Err(_) => tracing::debug!("A checkpoint is still in flight; skipping this one."),
        }
    }

    fn try_final(&mut self) -> Result<()> {
        if self.sources_finished < self.sources || self.final_epoch.is_some() || self.proto.in_flight().is_some() {
            return Ok(());
        }
        match self.proto.start() {
            Ok(Action::InjectBarrier(e)) => {
                self.final_epoch = Some(e);
                self.begin(e, true);
                let _ = self.ctl.send(Control::Final(e));
                Ok(())
            }
            other => Err(CoreError::Internal(format!("final checkpoint could not start: {other:?}"))),
        }
    }

    fn begin(&mut self, e: Epoch, last: bool) {
        self.started = Some((e, Instant::now()));
        self.alignment = Duration::ZERO;
        self.bytes = 0;
        let attrs = vec![
            crate::trace::kv("weir.job", self.job.clone()),
            crate::trace::kv("weir.checkpoint", e.0 as i64),
            crate::trace::kv("weir.final", last),
        ];
        self.span = crate::trace::Span::start("checkpoint", None, attrs);
    }

    async fn on_ack(&mut self, a: Ack) -> Result<()> {
        if self.proto.in_flight() != Some(a.epoch) {
            tracing::debug!(checkpoint = a.epoch.0, task = %a.task.0, "Ignoring an acknowledgement of an abandoned checkpoint.");
            return Ok(());
        }
        let is_final = self.final_epoch == Some(a.epoch);
        if let Some(drain) = a.last {
            self.drained &= drain;
        }
        self.alignment = self.alignment.max(a.alignment);
        match self.write_ack(a).await {
            Ok(()) => {}
            Err(e) if !is_final => {
                let epoch = self.proto.abandon();
                self.reg.checkpoints.failed.fetch_add(1, Ordering::Relaxed);
                self.span.fail(&e);
                self.span = crate::trace::Span::none();
                tracing::warn!(checkpoint = epoch.map(|e| e.0), error = %e, "Checkpoint failed; it is abandoned and the next one will cover its data.");
                self.try_final()?;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn write_ack(&mut self, a: Ack) -> Result<()> {
        let mut snap = SnapshotRef { files: Vec::new(), watermarks: a.watermarks };
        let mut span = crate::trace::Span::child(
            "checkpoint state",
            self.span.context().as_ref(),
            vec![
                crate::trace::kv("weir.task", a.task.0.clone()),
                crate::trace::kv("weir.tables", a.tables.len() as i64),
            ],
        );
        let before = self.bytes;
        for (step, role, table) in &a.tables {
            let f = self.store.put_state(a.epoch, &a.task, step, *role, table).await?;
            self.bytes += f.bytes;
            snap.files.push(f);
        }
        span.set(crate::trace::kv("weir.bytes", (self.bytes - before) as i64));
        drop(span);
        let Some(Action::WriteManifest(mut m)) =
            self.proto.ack(a.task, a.epoch, snap).map_err(|e| CoreError::Internal(format!("checkpoint ack: {e:?}")))?
        else {
            return Ok(());
        };
        // The quarantine is job-wide and wall-clock driven, so it is taken here rather than at
        // a barrier: a key's failure count a few milliseconds off does not change any result.
        if let Some(t) = match &self.quarantine {
            Some(q) => q.snapshot(Instant::now(), crate::deadletter::now_ms())?,
            None => None,
        } {
            let task = TaskKey("job".into());
            let step = crate::quarantine::STATE_STEP;
            let f = self.store.put_state(m.epoch, &task, step, StateRole::Operator, &t).await?;
            self.bytes += f.bytes;
            m.tasks.insert(task, SnapshotRef { files: vec![f], watermarks: BTreeMap::new() });
        }
        if !self.parked.is_empty() {
            let task = TaskKey(crate::store::PARKED_TASK.into());
            let mut snap = SnapshotRef { files: Vec::new(), watermarks: self.parked.watermarks.clone() };
            let roles = [(StateRole::Source, &self.parked.sources), (StateRole::Operator, &self.parked.operators)];
            for (role, map) in roles {
                for (step, tables) in map {
                    for t in tables {
                        let f = self.store.put_state(m.epoch, &task, step, role, t).await?;
                        self.bytes += f.bytes;
                        snap.files.push(f);
                    }
                }
            }
            m.tasks.insert(task, snap);
        }
        let is_final = self.final_epoch == Some(m.epoch);
        // Dead letters of rows before the barrier must be durable before the checkpoint that
        // will never replay those rows exists.
        self.dead_letters.flush()?;
        let manifest = crate::trace::Span::child("checkpoint manifest", self.span.context().as_ref(), Vec::new());
        self.store.put_manifest(&m, &self.job, self.workers, is_final && self.drained).await?;
        drop(manifest);
        let actions =
            self.proto.manifest_written(m.epoch).map_err(|e| CoreError::Internal(format!("checkpoint: {e:?}")))?;
        let c = &self.reg.checkpoints;
        c.completed.fetch_add(1, Ordering::Relaxed);
        c.last_epoch.store(m.epoch.0, Ordering::Relaxed);
        c.last_bytes.store(self.bytes, Ordering::Relaxed);
        c.last_alignment_us.store(self.alignment.as_micros() as u64, Ordering::Relaxed);
        c.last_completed_ms.store(crate::deadletter::now_ms().max(0) as u64, Ordering::Relaxed);
        let took = self.started.map(|(_, t)| t.elapsed()).unwrap_or_default();
        c.last_duration_us.store(took.as_micros() as u64, Ordering::Relaxed);
        tracing::info!(
            checkpoint = m.epoch.0,
            bytes = self.bytes,
            duration_ms = took.as_millis() as u64,
            alignment_ms = self.alignment.as_millis() as u64,
            "Checkpoint complete."
        );
        for action in actions {
            match action {
                Action::CommitSinks(e) => {
                    if let Some(c) = &self.committer {
                        let mut span =
                            crate::trace::Span::child("checkpoint commit", self.span.context().as_ref(), Vec::new());
                        if let Err(err) = c.commit(e).await {
                            span.fail(&err);
                            return Err(err);
                        }
                    }
                }
                Action::Discard(old) => {
                    for e in old {
                        if let Err(err) = self.store.delete(e).await {
                            tracing::warn!(checkpoint = e.0, error = %err, "Could not delete an old checkpoint.");
                        }
                    }
                }
                _ => {}
            }
        }
        let mut span = std::mem::take(&mut self.span);
        span.set(crate::trace::kv("weir.bytes", self.bytes as i64));
        span.set(crate::trace::kv("weir.alignment_ms", self.alignment.as_millis() as i64));
        drop(span);
        self.completed.send_replace(Some(m.epoch));
        if is_final {
            self.final_done = true;
        }
        self.try_final()
    }
}
