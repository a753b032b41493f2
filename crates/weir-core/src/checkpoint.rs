//! The checkpoint protocol as pure decisions: no I/O, no clocks, no tasks. The runtime (and a
//! later checkpoint store) carries the decisions out; because every input is a plain value,
//! every crash point is an ordinary test case.
//!
//! The protocol (aligned barriers, DESIGN.md):
//! 1. The coordinator starts epoch `n`: sources get `Barrier(n)`.
//! 2. Each task snapshots its state when `Barrier(n)` has arrived on all of its inputs
//!    ([`BarrierAligner`]) and acknowledges with a reference to the snapshot; sinks pre-commit.
//! 3. When every task has acknowledged, the manifest of `n` is written atomically.
//! 4. Then sinks commit `n`; older checkpoints beyond the retention are discarded.
//!
//! Recovery ([`recover`]) restores the newest checkpoint whose manifest is complete and
//! valid, commits its sinks again (commits are idempotent, and the crash may have come in the
//! middle of them), and aborts whatever sinks pre-committed for later epochs.

use std::collections::{BTreeMap, BTreeSet};

/// A checkpoint number; epochs only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A task that takes part in checkpoints: a stage of a worker, named for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TaskKey(pub String);

/// What a state file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateRole {
    /// A source's positions (every new source instance reads all of them).
    Source,
    /// An operator's keyed state (split by key group on restore).
    Operator,
}

/// One state file of a task's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateFile {
    /// The step whose state it is.
    pub step: String,
    /// Source positions or operator state.
    pub role: StateRole,
    /// Path in the checkpoint store, relative to the checkpoint.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Checksum of the content (checked on restore).
    pub checksum: u64,
    /// Rows in the table.
    pub rows: u64,
}

/// Where a task's snapshot of one epoch is, as acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRef {
    /// The task's state files (none for a task without state).
    pub files: Vec<StateFile>,
    /// Each operator's input watermark (ms) when it snapshotted, by step.
    pub watermarks: BTreeMap<String, i64>,
}

/// The content of a complete checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The epoch.
    pub epoch: Epoch,
    /// Every task's snapshot.
    pub tasks: BTreeMap<TaskKey, SnapshotRef>,
}

/// What the coordinator asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `Barrier(epoch)` from every source.
    InjectBarrier(Epoch),
    /// Write this manifest atomically; then report [`Coordinator::manifest_written`].
    WriteManifest(Manifest),
    /// Tell every sink to commit what it pre-committed for this epoch.
    CommitSinks(Epoch),
    /// Delete these checkpoints (past retention).
    Discard(Vec<Epoch>),
}

/// Why the coordinator refused an input: the runtime sent something out of protocol (a bug or
/// a late message from a failed attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A checkpoint is still in flight.
    Busy(Epoch),
    /// An acknowledgement for an epoch that is not in flight.
    NotInFlight(Epoch),
    /// An acknowledgement from a task that is not part of the job.
    UnknownTask(TaskKey),
}

/// The coordinator's decisions for one job. At most one checkpoint is in flight.
#[derive(Debug)]
pub struct Coordinator {
    tasks: BTreeSet<TaskKey>,
    keep: usize,
    next: Epoch,
    in_flight: Option<(Epoch, BTreeMap<TaskKey, SnapshotRef>)>,
    complete: Vec<Epoch>,
}

impl Coordinator {
    /// A coordinator for `tasks`, keeping the newest `keep` complete checkpoints, starting after
    /// `last` (the epoch restored from, if any).
    pub fn new(tasks: BTreeSet<TaskKey>, keep: usize, last: Option<Epoch>) -> Self {
        let next = Epoch(last.map_or(1, |e| e.0 + 1));
        Self { tasks, keep: keep.max(1), next, in_flight: None, complete: last.into_iter().collect() }
    }

    /// The epoch the next checkpoint will have.
    pub fn next_epoch(&self) -> Epoch {
        self.next
    }

    /// The checkpoint in flight, if any.
    pub fn in_flight(&self) -> Option<Epoch> {
        self.in_flight.as_ref().map(|(e, _)| *e)
    }

    /// Starts the next checkpoint.
    ///
    /// # Errors
    /// [`ProtocolError::Busy`] while one is in flight.
    pub fn start(&mut self) -> Result<Action, ProtocolError> {
        if let Some((e, _)) = &self.in_flight {
            return Err(ProtocolError::Busy(*e));
        }
        let e = self.next;
        self.next = Epoch(e.0 + 1);
        self.in_flight = Some((e, BTreeMap::new()));
        Ok(Action::InjectBarrier(e))
    }

    /// A task snapshotted `epoch`. Returns the manifest to write once every task has.
    ///
    /// # Errors
    /// Acks for another epoch or from an unknown task.
    pub fn ack(&mut self, task: TaskKey, epoch: Epoch, snapshot: SnapshotRef) -> Result<Option<Action>, ProtocolError> {
        if !self.tasks.contains(&task) {
            return Err(ProtocolError::UnknownTask(task));
        }
        let Some((e, acks)) = self.in_flight.as_mut().filter(|(e, _)| *e == epoch) else {
            return Err(ProtocolError::NotInFlight(epoch));
        };
        acks.insert(task, snapshot);
        if acks.len() < self.tasks.len() {
            return Ok(None);
        }
        Ok(Some(Action::WriteManifest(Manifest { epoch: *e, tasks: acks.clone() })))
    }

    /// The manifest of `epoch` is durable: sinks may commit, old checkpoints may go.
    ///
    /// # Errors
    /// If `epoch` is not the one in flight.
    pub fn manifest_written(&mut self, epoch: Epoch) -> Result<Vec<Action>, ProtocolError> {
        match &self.in_flight {
            Some((e, acks)) if *e == epoch && acks.len() == self.tasks.len() => {}
            _ => return Err(ProtocolError::NotInFlight(epoch)),
        }
        self.in_flight = None;
        self.complete.push(epoch);
        let mut actions = vec![Action::CommitSinks(epoch)];
        if self.complete.len() > self.keep {
            let old: Vec<Epoch> = self.complete.drain(..self.complete.len() - self.keep).collect();
            actions.push(Action::Discard(old));
        }
        Ok(actions)
    }

    /// The checkpoint in flight failed (a task died, a write failed): it is abandoned, and its
    /// sinks' pre-commits must be aborted by the recovery that follows.
    pub fn abandon(&mut self) -> Option<Epoch> {
        self.in_flight.take().map(|(e, _)| e)
    }
}

/// Lines barriers up across a task's inputs.
///
/// When `Barrier(n)` arrives on an input, that input is blocked (its later messages belong to
/// epoch `n + 1` and must wait) until `Barrier(n)` has arrived on every input; then the task
/// snapshots and all inputs unblock.
#[derive(Debug, Clone)]
pub struct BarrierAligner {
    inputs: usize,
    epoch: Option<Epoch>,
    arrived: BTreeSet<usize>,
}

/// What a task does after a barrier arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alignment {
    /// Stop reading this input until the others catch up.
    Block(usize),
    /// The barrier arrived everywhere: snapshot now, then unblock every input.
    Snapshot(Epoch),
}

impl BarrierAligner {
    /// An aligner over `inputs` inputs.
    pub fn new(inputs: usize) -> Self {
        Self { inputs, epoch: None, arrived: BTreeSet::new() }
    }

    /// `Barrier(epoch)` arrived on `input`.
    ///
    /// # Errors
    /// A barrier for a different epoch during alignment, or twice on one input.
    pub fn on_barrier(&mut self, input: usize, epoch: Epoch) -> Result<Alignment, ProtocolError> {
        match self.epoch {
            Some(e) if e != epoch => return Err(ProtocolError::Busy(e)),
            _ => self.epoch = Some(epoch),
        }
        if !self.arrived.insert(input) {
            return Err(ProtocolError::Busy(epoch));
        }
        if self.arrived.len() == self.inputs {
            self.arrived.clear();
            self.epoch = None;
            return Ok(Alignment::Snapshot(epoch));
        }
        Ok(Alignment::Block(input))
    }

    /// Whether `input` is blocked waiting for the others.
    pub fn is_blocked(&self, input: usize) -> bool {
        self.arrived.contains(&input)
    }
}

/// What a checkpoint store holds for one epoch, as listed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The epoch.
    pub epoch: Epoch,
    /// A manifest file exists.
    pub manifest: bool,
    /// It and the snapshots it names pass their checksums.
    pub valid: bool,
}

/// What to do at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Restore state and source positions from this checkpoint; `None` starts fresh.
    pub restore: Option<Epoch>,
    /// Commit the sinks' pre-commits of this epoch again (idempotent): the crash may have come
    /// between the manifest and the end of the commits.
    pub commit: Option<Epoch>,
    /// Abort the sinks' pre-commits of every later epoch: their checkpoint never completed.
    pub abort_after: Option<Epoch>,
    /// Checkpoints that are partial or corrupt: skip (with a warning) and delete.
    pub discard: Vec<Epoch>,
}

/// Decides how to recover from what the store holds.
pub fn recover(stored: &[Stored]) -> Recovery {
    let mut sorted: Vec<&Stored> = stored.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.epoch));
    let newest_good = sorted.iter().find(|s| s.manifest && s.valid).map(|s| s.epoch);
    let discard = sorted
        .iter()
        .filter(|s| !(s.manifest && s.valid) && newest_good.is_none_or(|g| s.epoch > g))
        .map(|s| s.epoch)
        .collect();
    Recovery { restore: newest_good, commit: newest_good, abort_after: Some(newest_good.unwrap_or(Epoch(0))), discard }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(n: usize) -> BTreeSet<TaskKey> {
        (0..n).map(|i| TaskKey(format!("t{i}"))).collect()
    }

    fn snap(i: u64) -> SnapshotRef {
        let file = StateFile {
            step: format!("s{i}"),
            role: StateRole::Operator,
            path: format!("s{i}"),
            bytes: i,
            checksum: i,
            rows: i,
        };
        SnapshotRef { files: vec![file], watermarks: BTreeMap::new() }
    }

    #[test]
    fn a_checkpoint_completes_when_every_task_acks() {
        let mut c = Coordinator::new(tasks(2), 2, None);
        assert_eq!(c.start(), Ok(Action::InjectBarrier(Epoch(1))));
        assert_eq!(c.start(), Err(ProtocolError::Busy(Epoch(1))));
        assert_eq!(c.ack(TaskKey("t0".into()), Epoch(1), snap(0)), Ok(None));
        assert_eq!(
            c.ack(TaskKey("tX".into()), Epoch(1), snap(0)),
            Err(ProtocolError::UnknownTask(TaskKey("tX".into())))
        );
        assert_eq!(c.ack(TaskKey("t1".into()), Epoch(2), snap(1)), Err(ProtocolError::NotInFlight(Epoch(2))));
        let Ok(Some(Action::WriteManifest(m))) = c.ack(TaskKey("t1".into()), Epoch(1), snap(1)) else { panic!() };
        assert_eq!(m.tasks.len(), 2);
        assert_eq!(c.manifest_written(Epoch(1)), Ok(vec![Action::CommitSinks(Epoch(1))]));
    }

    #[test]
    fn retention_discards_the_oldest() {
        let mut c = Coordinator::new(tasks(1), 2, Some(Epoch(7)));
        for e in 8..=10 {
            assert_eq!(c.start(), Ok(Action::InjectBarrier(Epoch(e))));
            c.ack(TaskKey("t0".into()), Epoch(e), snap(e)).unwrap();
            let acts = c.manifest_written(Epoch(e)).unwrap();
            let discarded: Vec<_> = acts
                .iter()
                .filter_map(|a| if let Action::Discard(v) = a { Some(v.clone()) } else { None })
                .flatten()
                .collect();
            assert_eq!(discarded, if e == 8 { vec![] } else { vec![Epoch(e - 2)] }, "epoch {e}");
        }
    }

    #[test]
    fn an_abandoned_checkpoint_frees_the_coordinator() {
        let mut c = Coordinator::new(tasks(2), 2, None);
        c.start().unwrap();
        c.ack(TaskKey("t0".into()), Epoch(1), snap(0)).unwrap();
        assert_eq!(c.abandon(), Some(Epoch(1)));
        assert_eq!(c.start(), Ok(Action::InjectBarrier(Epoch(2))));
        assert_eq!(c.manifest_written(Epoch(2)), Err(ProtocolError::NotInFlight(Epoch(2))), "not every task acked");
    }

    //  input 0: ..B3.......(blocked)....
    //  input 1: ......B3 -> snapshot 3, both unblock
    #[test]
    fn barriers_align_across_inputs() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, Epoch(3)), Ok(Alignment::Block(0)));
        assert!(a.is_blocked(0) && !a.is_blocked(1));
        assert_eq!(a.on_barrier(0, Epoch(3)), Err(ProtocolError::Busy(Epoch(3))));
        assert_eq!(a.on_barrier(1, Epoch(4)), Err(ProtocolError::Busy(Epoch(3))));
        assert_eq!(a.on_barrier(1, Epoch(3)), Ok(Alignment::Snapshot(Epoch(3))));
        assert!(!a.is_blocked(0));
        assert_eq!(BarrierAligner::new(1).on_barrier(0, Epoch(1)), Ok(Alignment::Snapshot(Epoch(1))));
    }

    /// Every crash point of checkpoint 3 (2 is complete), as the store lists it afterwards.
    #[test]
    fn recovery_at_every_crash_point() {
        let s = |e: u64, manifest: bool, valid: bool| Stored { epoch: Epoch(e), manifest, valid };
        let cases: Vec<(&str, Vec<Stored>, Recovery)> = vec![
            (
                "before any snapshot of 3",
                vec![s(1, true, true), s(2, true, true)],
                Recovery {
                    restore: Some(Epoch(2)),
                    commit: Some(Epoch(2)),
                    abort_after: Some(Epoch(2)),
                    discard: vec![],
                },
            ),
            (
                "after snapshots, before the manifest of 3",
                vec![s(2, true, true), s(3, false, false)],
                Recovery {
                    restore: Some(Epoch(2)),
                    commit: Some(Epoch(2)),
                    abort_after: Some(Epoch(2)),
                    discard: vec![Epoch(3)],
                },
            ),
            (
                "after the manifest of 3, before sinks commit",
                vec![s(2, true, true), s(3, true, true)],
                Recovery {
                    restore: Some(Epoch(3)),
                    commit: Some(Epoch(3)),
                    abort_after: Some(Epoch(3)),
                    discard: vec![],
                },
            ),
            (
                "during the commit of 3 (some sinks done)",
                vec![s(2, true, true), s(3, true, true)],
                Recovery {
                    restore: Some(Epoch(3)),
                    commit: Some(Epoch(3)),
                    abort_after: Some(Epoch(3)),
                    discard: vec![],
                },
            ),
            (
                "manifest of 3 truncated or corrupt",
                vec![s(2, true, true), s(3, true, false)],
                Recovery {
                    restore: Some(Epoch(2)),
                    commit: Some(Epoch(2)),
                    abort_after: Some(Epoch(2)),
                    discard: vec![Epoch(3)],
                },
            ),
            (
                "first checkpoint never completed",
                vec![s(1, false, false)],
                Recovery { restore: None, commit: None, abort_after: Some(Epoch(0)), discard: vec![Epoch(1)] },
            ),
            (
                "empty store",
                vec![],
                Recovery { restore: None, commit: None, abort_after: Some(Epoch(0)), discard: vec![] },
            ),
        ];
        for (name, stored, want) in cases {
            assert_eq!(recover(&stored), want, "{name}");
        }
    }
}
