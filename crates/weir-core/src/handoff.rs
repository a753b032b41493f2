//! State that follows partitions from one process to another.
//!
//! Several processes run the same pipeline and split a partitioned input between them (a
//! Kafka consumer group). Each keeps its checkpoints in a folder of its own in a store they
//! share (`<dir>/<job>/<member>`, see [`crate::store::CheckpointStore::member`]). When
//! partitions move, each process they move from or to ends its run at a checkpoint
//! ([`crate::RunRestart`]) and starts again from it; before reading, it takes each partition
//! it now holds from whichever member's checkpoint read furthest into that partition: the
//! source position, and the rows of each operator's state whose key belongs to the
//! partition. A process giving partitions up holds them for the group until a checkpoint of
//! its new run, which parks their state, has completed ([`GroupMember::releasing`]), so the
//! member taking them finds their state where that process stopped reading them.
//!
//! A member's checkpoint counts only as far as its output is visible. The process's own is
//! settled by its recovery as usual; another member's is first settled through that member's
//! committer ([`crate::SinkFactory::peer_committer`]; for Kafka transactions: fence its
//! transactional ids, then read its commit topic), which also stops a member that is still
//! alive from committing anything more, so what is read cannot change afterwards.
//!
//! Which partition a key belongs to is the source's business
//! ([`GroupMember::partitions_of`]): every record of a key must be in one partition, as with
//! Kafka's default partitioner and a record key equal to the pipeline's key.
//!
//! A job with several such sources (a join of two topics) has one of them join the group;
//! the others follow it ([`GroupMember::follow`]): each reads the same partition numbers of
//! its own input, which must be partitioned alike (same partition count, same keys), so a
//! key's rows of every input and its state meet in one process. A partition then stands for
//! that partition of every input, and moves with the positions of all of them at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, RecordBatch};
use tokio::sync::watch;

use crate::error::Result;
use crate::metrics::Registry;
use crate::state::FIRST_KEY_COLUMN;
use crate::store::Restored;

/// The partitions the group handed this process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Partition numbers, sorted.
    pub partitions: Vec<i32>,
}

/// A source whose process is one member of a group sharing its input.
#[async_trait::async_trait]
pub trait GroupMember: std::any::Any + Send + Sync + fmt::Debug {
    /// Waits until the group has handed this process its partitions; returns early with what
    /// it has (possibly nothing) once `stop` is set. The job's `registry` takes the
    /// source's metrics.
    async fn assignment(&self, stop: watch::Receiver<bool>, registry: &Arc<Registry>) -> Result<Assignment>;

    /// Each partition's position in this source's position tables (as it snapshots them).
    fn positions(&self, tables: &[RecordBatch]) -> Result<HashMap<i32, i64>>;

    /// A position table holding `positions`, as this source snapshots and restores them.
    fn position_table(&self, positions: &BTreeMap<i32, i64>) -> Result<RecordBatch>;

    /// The partition each value of a key column's records are in (`None` when none can be
    /// told, e.g. a null key).
    fn partitions_of(&self, key: &ArrayRef) -> Result<Vec<Option<i32>>>;

    /// Whether this process gave partitions up that it still holds for the group until a
    /// checkpoint of the run now starting carries their state (parked) for whoever takes
    /// them: the job then takes a checkpoint at once. The default: never.
    fn releasing(&self) -> bool {
        false
    }

    /// Takes the partitions the group gave `leader` (another source of the job, which joined
    /// the group) as this source's own, without joining the group itself: the same numbers of
    /// this source's input. Fails when the inputs are not partitioned alike.
    ///
    /// # Errors
    /// A source that cannot follow another, or inputs partitioned differently.
    async fn follow(&self, leader: &dyn GroupMember, assignment: &Assignment, registry: &Arc<Registry>) -> Result<()> {
        let _ = (leader, assignment, registry);
        Err(crate::CoreError::Config(format!("{self:?} cannot share the partitions of another source")))
    }
}

/// The job's sources in a group, with the step each is: the first joined the group, the
/// others follow it.
pub type Inputs<'a> = [(&'a str, &'a dyn GroupMember)];

/// Each partition's positions in every input (in the order of `inputs`; `None` where that
/// input has none): a candidate read further into a partition when these are greater.
type Positions = HashMap<i32, Vec<Option<i64>>>;

/// One member's newest visible checkpoint, loaded.
#[derive(Debug)]
pub struct Candidate {
    /// The member's name.
    pub member: String,
    /// This process's own checkpoint.
    pub own: bool,
    /// When its manifest was written (ms since the epoch): of two checkpoints at the same
    /// position in a partition, the newer holds the newer state (windows fired since).
    pub created_ms: i64,
    /// What it holds.
    pub restored: Restored,
}

/// Which member's checkpoint each assigned partition comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Partition -> (member, its position in each input, `None` where it has none), for the
    /// partitions some checkpoint holds.
    pub taken: BTreeMap<i32, (String, Vec<Option<i64>>)>,
}

/// Whether `peer`'s checkpoint would give some assigned partition a position further on
/// than every one of `known` does (or the same position in a newer checkpoint, or any
/// position where none has one): only such a member needs settling.
///
/// # Errors
/// Position tables of another shape.
pub fn wanted(inputs: &Inputs<'_>, assigned: &[i32], known: &[Candidate], peer: &Candidate) -> Result<bool> {
    let known: Vec<(Positions, i64)> =
        known.iter().map(|c| Ok((positions_of(inputs, &c.restored)?, c.created_ms))).collect::<Result<_>>()?;
    let theirs = positions_of(inputs, &peer.restored)?;
    Ok(assigned.iter().any(|p| {
        let Some(t) = theirs.get(p) else { return false };
        let best = known.iter().filter_map(|(k, at)| k.get(p).map(|o| (o, *at))).max();
        best.is_none_or(|b| (t, peer.created_ms) > b)
    }))
}

/// The parked part of a member's checkpoint as a candidate of its own: state of partitions
/// the member handed on, which loses a tie to any checkpoint that held the partition live.
pub fn parked_candidate(member: &str, own: bool, r: &Restored) -> Candidate {
    let restored = Restored {
        epoch: r.epoch,
        sources: r.parked.sources.clone(),
        operators: r.parked.operators.clone(),
        watermarks: r.parked.watermarks.clone().into_iter().collect(),
        ..Restored::default()
    };
    Candidate { member: member.to_string(), own, created_ms: i64::MIN, restored }
}

/// A member's checkpoint without its parked part.
pub fn live_candidate(member: &str, own: bool, mut r: Restored) -> Candidate {
    r.parked = crate::store::Parked::default();
    Candidate { member: member.to_string(), own, created_ms: r.created_ms.unwrap_or(0), restored: r }
}

/// What this process carries on for partitions it no longer holds: of its own live and
/// parked state, the newer for each such partition.
///
/// # Errors
/// Position or state tables of an unexpected shape.
pub fn to_park(inputs: &Inputs<'_>, assigned: &[i32], own: &[&Candidate]) -> Result<crate::store::Parked> {
    let mut held = std::collections::BTreeSet::new();
    for c in own {
        held.extend(positions_of(inputs, &c.restored)?.into_keys());
    }
    let gone: Vec<i32> = held.into_iter().filter(|p| !assigned.contains(p)).collect();
    if gone.is_empty() {
        return Ok(crate::store::Parked::default());
    }
    // As foreign candidates: rows whose partition cannot be told are not carried.
    let copies = own
        .iter()
        .map(|c| Candidate {
            member: c.member.clone(),
            own: false,
            created_ms: c.created_ms,
            restored: Restored {
                epoch: c.restored.epoch,
                sources: c.restored.sources.clone(),
                operators: c.restored.operators.clone(),
                watermarks: c.restored.watermarks.clone(),
                ..Restored::default()
            },
        })
        .collect();
    let (r, _) = merge(inputs, &gone, copies)?;
    Ok(crate::store::Parked {
        sources: r.sources,
        operators: r.operators,
        watermarks: r.watermarks.into_iter().collect(),
    })
}

fn positions_of(inputs: &Inputs<'_>, r: &Restored) -> Result<Positions> {
    let mut out = Positions::new();
    for (i, (step, group)) in inputs.iter().enumerate() {
        for (p, o) in group.positions(r.sources.get(*step).map_or(&[][..], Vec::as_slice))? {
            out.entry(p).or_insert_with(|| vec![None; inputs.len()])[i] = Some(o);
        }
    }
    Ok(out)
}

/// Builds the state to start from: for each assigned partition, the positions and keyed
/// state of the candidate that read furthest into it (then the newest; then the process's
/// own). With several inputs, a partition's positions in all of them come from one
/// checkpoint, with the state they go with: whoever held a partition later read at least
/// as far into each input, so comparing them in order finds it. State without keys (a global window) and state of keys no partition can be told
/// for stay with the process's own checkpoint; state of partitions not assigned is dropped.
///
/// # Errors
/// Position or state tables of an unexpected shape.
pub fn merge(inputs: &Inputs<'_>, assigned: &[i32], candidates: Vec<Candidate>) -> Result<(Restored, Plan)> {
    let Some(&(_, group)) = inputs.first() else { crate::bail_internal!("a handoff without a source") };
    let positions: Vec<Positions> =
        candidates.iter().map(|c| positions_of(inputs, &c.restored)).collect::<Result<_>>()?;
    let mut won: Vec<HashSet<i32>> = vec![HashSet::new(); candidates.len()];
    let mut plan = Plan::default();
    let mut chosen = BTreeMap::new();
    for &p in assigned {
        let best = (0..candidates.len())
            .filter_map(|i| positions[i].get(&p).map(|o| (o, candidates[i].created_ms, candidates[i].own, i)))
            .max();
        if let Some((offsets, _, _, i)) = best {
            won[i].insert(p);
            chosen.insert(p, offsets.clone());
            plan.taken.insert(p, (candidates[i].member.clone(), offsets.clone()));
        }
    }
    let own_epoch = candidates.iter().find(|c| c.own).and_then(|c| c.restored.epoch);
    let mut out = Restored { epoch: own_epoch, ..Restored::default() };
    for (i, c) in candidates.into_iter().enumerate() {
        if won[i].is_empty() && !c.own {
            continue;
        }
        if out.epoch.is_none() && !won[i].is_empty() {
            // Something is restored although this process has no checkpoint of its own.
            out.epoch = c.restored.epoch;
        }
        for (step, wm) in c.restored.watermarks {
            let e = out.watermarks.entry(step).or_insert(wm);
            *e = (*e).min(wm);
        }
        for (step, tables) in c.restored.operators {
            for t in tables {
                if let Some(kept) = rows_of(group, &t, &won[i], c.own)? {
                    out.operators.entry(step.clone()).or_default().push(kept);
                }
            }
        }
    }
    if !chosen.is_empty() || out.epoch.is_some() {
        for (i, (step, input)) in inputs.iter().enumerate() {
            let at: BTreeMap<i32, i64> = chosen.iter().filter_map(|(&p, o)| o[i].map(|o| (p, o))).collect();
            out.sources.insert((*step).to_string(), vec![input.position_table(&at)?]);
        }
    }
    Ok((out, plan))
}

/// The rows of a state table whose key is in one of `partitions`; a table without keys
/// (and rows whose partition cannot be told) is kept whole by the process's own checkpoint.
fn rows_of(
    group: &dyn GroupMember,
    t: &RecordBatch,
    partitions: &HashSet<i32>,
    own: bool,
) -> Result<Option<RecordBatch>> {
    let Some(key) = t.column_by_name(FIRST_KEY_COLUMN) else {
        return Ok(own.then(|| t.clone()));
    };
    let parts = group.partitions_of(key)?;
    let mask: BooleanArray = parts.iter().map(|p| Some(p.map_or(own, |p| partitions.contains(&p)))).collect();
    let kept = arrow_select::filter::filter_record_batch(t, &mask)?;
    Ok((kept.num_rows() > 0).then_some(kept))
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use arrow_array::{Array, Int32Array, Int64Array, StringArray, UInt32Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::checkpoint::Epoch;

    /// Partitions are the key's first digit; positions are (partition, offset) rows.
    #[derive(Debug)]
    struct Digits;

    #[async_trait::async_trait]
    impl GroupMember for Digits {
        async fn assignment(&self, _: watch::Receiver<bool>, _: &Arc<Registry>) -> Result<Assignment> {
            Ok(Assignment::default())
        }
        fn positions(&self, tables: &[RecordBatch]) -> Result<HashMap<i32, i64>> {
            let mut out = HashMap::new();
            for t in tables {
                let p = t.column(0).as_primitive::<arrow_array::types::Int32Type>();
                let o = t.column(1).as_primitive::<Int64Type>();
                for i in 0..t.num_rows() {
                    out.insert(p.value(i), o.value(i));
                }
            }
            Ok(out)
        }
        fn position_table(&self, positions: &BTreeMap<i32, i64>) -> Result<RecordBatch> {
            let schema = Arc::new(Schema::new(vec![
                Field::new("partition", DataType::Int32, false),
                Field::new("offset", DataType::Int64, false),
            ]));
            let p: Vec<i32> = positions.keys().copied().collect();
            let o: Vec<i64> = positions.values().copied().collect();
            Ok(RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(p)), Arc::new(Int64Array::from(o))])?)
        }
        fn partitions_of(&self, key: &ArrayRef) -> Result<Vec<Option<i32>>> {
            let k = key.as_string::<i32>();
            Ok((0..k.len()).map(|i| k.is_valid(i).then(|| i32::from(k.value(i).as_bytes()[0] - b'0'))).collect())
        }
    }

    fn state(keys: &[&str], counts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(crate::state::KEY_GROUP_COLUMN, DataType::UInt32, false),
            Field::new(FIRST_KEY_COLUMN, DataType::Utf8, true),
            Field::new("count", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt32Array::from(vec![0; keys.len()])),
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(counts.to_vec())),
            ],
        )
        .unwrap()
    }

    fn candidate(
        member: &str,
        own: bool,
        created_ms: i64,
        positions: &[(i32, i64)],
        st: RecordBatch,
        wm: i64,
    ) -> Candidate {
        let mut r = Restored { epoch: Some(Epoch(3)), ..Restored::default() };
        let map: BTreeMap<i32, i64> = positions.iter().copied().collect();
        r.sources.insert("in".into(), vec![Digits.position_table(&map).unwrap()]);
        r.operators.insert("win".into(), vec![st]);
        r.watermarks.insert("win".into(), wm);
        Candidate { member: member.into(), own, created_ms, restored: r }
    }

    fn keys(r: &Restored) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for t in &r.operators["win"] {
            let k = t.column(1).as_string::<i32>();
            let c = t.column(2).as_primitive::<Int64Type>();
            out.extend((0..t.num_rows()).map(|i| (k.value(i).to_string(), c.value(i))));
        }
        out.sort();
        out
    }

    #[test]
    fn each_partition_comes_from_the_checkpoint_that_read_furthest() {
        // This process held partitions 0 and 1; the peer held 2 and, before that, 1.
        let own = candidate("a", true, 100, &[(0, 50), (1, 10)], state(&["0x", "1old"], &[5, 1]), 900);
        let peer = candidate("b", false, 90, &[(1, 40), (2, 70)], state(&["1new", "2y", "3z"], &[4, 7, 9]), 700);
        let (r, plan) = merge(&[("in", &Digits)], &[1, 2], vec![own, peer]).unwrap();
        assert_eq!(plan.taken[&1], ("b".to_string(), vec![Some(40)]));
        assert_eq!(plan.taken[&2], ("b".to_string(), vec![Some(70)]));
        assert!(!plan.taken.contains_key(&0), "partition 0 is no longer assigned");
        // Partition 0's keys are dropped, partition 1's come from the peer, 3 is nobody's here.
        assert_eq!(keys(&r), vec![("1new".to_string(), 4), ("2y".to_string(), 7)]);
        assert_eq!(Digits.positions(&r.sources["in"]).unwrap(), HashMap::from([(1, 40), (2, 70)]));
        assert_eq!(r.watermarks["win"], 700, "the lowest watermark of the checkpoints used");
        assert_eq!(r.epoch, Some(Epoch(3)));
    }

    #[test]
    fn with_two_inputs_a_partition_takes_every_position_and_its_state_from_one_checkpoint() {
        let two = |c: &mut Candidate, other: &[(i32, i64)]| {
            let map: BTreeMap<i32, i64> = other.iter().copied().collect();
            c.restored.sources.insert("other".into(), vec![Digits.position_table(&map).unwrap()]);
        };
        // `a` held partition 1 first; `b` took it over and read on in `other` only, and has
        // read partition 2 of `other` but nothing yet of `in`.
        let mut own = candidate("a", true, 100, &[(1, 10)], state(&["1old"], &[1]), 900);
        two(&mut own, &[(1, 5)]);
        let mut peer = candidate("b", false, 90, &[(1, 10)], state(&["1new", "2y"], &[2, 7]), 800);
        two(&mut peer, &[(1, 9), (2, 3)]);
        let inputs: [(&str, &dyn GroupMember); 2] = [("in", &Digits), ("other", &Digits)];
        let known = [own];
        assert!(wanted(&inputs, &[1], &known, &peer).unwrap(), "b read further into `other`");
        let [own] = known;
        let (r, plan) = merge(&inputs, &[1, 2], vec![own, peer]).unwrap();
        assert_eq!(plan.taken[&1], ("b".to_string(), vec![Some(10), Some(9)]));
        assert_eq!(plan.taken[&2], ("b".to_string(), vec![None, Some(3)]));
        assert_eq!(keys(&r), vec![("1new".to_string(), 2), ("2y".to_string(), 7)]);
        assert_eq!(Digits.positions(&r.sources["in"]).unwrap(), HashMap::from([(1, 10)]));
        assert_eq!(Digits.positions(&r.sources["other"]).unwrap(), HashMap::from([(1, 9), (2, 3)]));
    }

    #[test]
    fn a_tie_goes_to_the_newer_checkpoint_and_keyless_state_stays_home() {
        let keyless = |n: i64| {
            let schema = Arc::new(Schema::new(vec![
                Field::new(crate::state::KEY_GROUP_COLUMN, DataType::UInt32, false),
                Field::new("count", DataType::Int64, false),
            ]));
            RecordBatch::try_new(
                schema,
                vec![Arc::new(UInt32Array::from(vec![0])), Arc::new(Int64Array::from(vec![n]))],
            )
            .unwrap()
        };
        let mut own = candidate("a", true, 100, &[(1, 40)], state(&["1stale"], &[1]), 500);
        own.restored.operators.get_mut("win").unwrap().push(keyless(11));
        let mut peer = candidate("b", false, 200, &[(1, 40)], state(&["1fresh"], &[2]), 500);
        peer.restored.operators.get_mut("win").unwrap().push(keyless(22));
        let (r, plan) = merge(&[("in", &Digits)], &[1], vec![own, peer]).unwrap();
        assert_eq!(plan.taken[&1].0, "b");
        let all: Vec<usize> = r.operators["win"].iter().map(RecordBatch::num_columns).collect();
        assert_eq!(all.iter().filter(|&&n| n == 2).count(), 1, "only the process's own keyless table");
        let keyed: Vec<_> = r.operators["win"].iter().filter(|t| t.num_columns() == 3).cloned().collect();
        let only = Restored { operators: HashMap::from([("win".to_string(), keyed)]), ..Restored::default() };
        assert_eq!(keys(&only), vec![("1fresh".to_string(), 2)]);
    }

    #[test]
    fn a_peer_is_wanted_only_when_it_read_further() {
        let own = candidate("a", true, 5, &[(0, 50), (1, 10)], state(&[], &[]), 0);
        let behind = candidate("b", false, 9, &[(0, 20)], state(&[], &[]), 0);
        let ahead = candidate("b", false, 1, &[(1, 30)], state(&[], &[]), 0);
        let older_tie = candidate("b", false, 1, &[(0, 50)], state(&[], &[]), 0);
        let newer_tie = candidate("b", false, 9, &[(0, 50)], state(&[], &[]), 0);
        let known = [own];
        assert!(!wanted(&[("in", &Digits)], &[0, 1], &known, &behind).unwrap());
        assert!(wanted(&[("in", &Digits)], &[0, 1], &known, &ahead).unwrap());
        assert!(!wanted(&[("in", &Digits)], &[0], &known, &ahead).unwrap(), "partition 1 is not assigned");
        assert!(!wanted(&[("in", &Digits)], &[0], &known, &older_tie).unwrap());
        assert!(wanted(&[("in", &Digits)], &[0], &known, &newer_tie).unwrap());
    }

    #[test]
    fn handed_on_partitions_are_carried_and_lose_ties_to_live_state() {
        let own = candidate("a", true, 100, &[(0, 50), (1, 10)], state(&["0x", "1y"], &[5, 1]), 900);
        let carried = to_park(&[("in", &Digits)], &[0], &[&own]).unwrap();
        assert_eq!(Digits.positions(&carried.sources["in"]).unwrap(), HashMap::from([(1, 10)]));
        let only = Restored { operators: carried.operators.clone(), ..Restored::default() };
        assert_eq!(keys(&only), vec![("1y".to_string(), 1)], "only the partition handed on");
        assert_eq!(carried.watermarks["win"], 900);
        // A later run of `a` carries them in its checkpoints; `b` restores partition 1 from
        // them unless a checkpoint that held it live is as far on.
        let mut later =
            Restored { epoch: Some(Epoch(9)), created_ms: Some(500), parked: carried, ..Restored::default() };
        later.sources.insert("in".into(), vec![Digits.position_table(&BTreeMap::from([(0, 80)])).unwrap()]);
        let from_parked = parked_candidate("a", false, &later);
        let live_tie = candidate("c", false, 1, &[(1, 10)], state(&["1live"], &[3]), 400);
        let (r, plan) = merge(&[("in", &Digits)], &[1], vec![from_parked, live_tie]).unwrap();
        assert_eq!(plan.taken[&1].0, "c");
        assert_eq!(keys(&r), vec![("1live".to_string(), 3)]);
        let (r, plan) = merge(&[("in", &Digits)], &[1], vec![parked_candidate("a", false, &later)]).unwrap();
        assert_eq!(plan.taken[&1], ("a".to_string(), vec![Some(10)]));
        assert_eq!((keys(&r), r.watermarks["win"]), (vec![("1y".to_string(), 1)], 900));
    }
}
