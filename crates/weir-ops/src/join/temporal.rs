//! The temporal (as-of) join: each row of the left stream joined with the version of its key
//! that the right stream, a changelog, held at the row's time.
//!
//! The right stream's rows are versions: a row for key `k` at time `t` is `k`'s value from
//! `t` until the next version. A left row at `ts` is paired with the version of its key with
//! the greatest time at or before `ts`. Its answer is only known once no version before `ts`
//! can still arrive, so left rows wait until the watermark of both inputs together passes
//! them, and are emitted then, in time order, with their own time. (A right input that has
//! gone idle stops holding them back, as it stops holding any watermark back.)
//!
//! State: the waiting left rows, and per key the versions that a row still to come can need:
//! the newest at or before the watermark, and every later one. With `state_ttl`, a key whose
//! newest version is older than the watermark by more than the TTL is forgotten.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StructArray, UInt8Array};
use arrow_schema::{Schema, SchemaRef};
use hashbrown::{HashMap, HashSet};
use weir_core::keys::KeyInterner;
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, OpContext, Operator, OperatorFactory, Result};

use super::{intern_keys, key_types, report_state, restore_rows, side_fields, state_fields};
use super::{side_of, Gather, JoinKind, RowRef, Store};

/// A planned temporal join (see the module documentation).
#[derive(Debug, Clone)]
pub struct TemporalJoinSpec {
    /// The two inputs' schemas: the events (left), then the changelog (right).
    pub schemas: [SchemaRef; 2],
    /// Key column paths of each side (as many on both, of the same types).
    pub keys: [Vec<String>; 2],
    /// Names of the output's two struct columns.
    pub names: [String; 2],
    /// `Inner` drops left rows whose key had no version at their time; `Left` emits them with
    /// a null right side.
    pub kind: JoinKind,
    /// Forget a key whose newest version is this much older than the watermark (ms).
    pub state_ttl_ms: Option<i64>,
}

impl TemporalJoinSpec {
    /// Checks the keys and builds the output schema: the two sides' struct columns.
    ///
    /// # Errors
    /// A key missing on a side, key types that differ between the sides, a kind other than
    /// inner or left, a TTL that is not positive.
    pub fn output_schema(&self) -> Result<SchemaRef> {
        weir_core::ensure_config!(
            matches!(self.kind, JoinKind::Inner | JoinKind::Left),
            "a temporal join is inner or left: a version without events has no time to be emitted at"
        );
        weir_core::ensure_config!(self.state_ttl_ms.is_none_or(|t| t > 0), "state_ttl must be positive");
        key_types(&self.schemas, &self.keys, &self.names)?;
        Ok(Arc::new(Schema::new(side_fields(&self.schemas, &self.names))))
    }
}

impl OperatorFactory for TemporalJoinSpec {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let types = key_types(&self.schemas, &self.keys, &self.names)?;
        Ok(Box::new(TemporalJoin {
            interner: KeyInterner::new(&types)?,
            stores: [Store::default(), Store::default()],
            waiting: BTreeMap::new(),
            versions: HashMap::new(),
            superseded: HashSet::new(),
            ttl_index: BTreeMap::new(),
            rows: [0, 0],
            peak: [0, 0],
            out_schema: self.output_schema()?,
            spec: self.clone(),
        }))
    }
}

/// A left row waiting for its answer: key id and where it is.
type Waiting = (u32, RowRef);

/// Granularity of the TTL index, ms.
const TTL_BUCKET_MS: i64 = 1024;

#[derive(Debug)]
struct TemporalJoin {
    spec: TemporalJoinSpec,
    interner: KeyInterner,
    stores: [Store; 2],
    /// Left rows by time, waiting for the watermark to pass them.
    waiting: BTreeMap<i64, Vec<Waiting>>,
    /// Per key, its versions in time order.
    versions: HashMap<u32, Vec<(i64, RowRef)>>,
    /// Keys with more than one version, to prune on the next watermark.
    superseded: HashSet<u32>,
    /// Keys by the TTL bucket their newest version (as of insertion) expires in.
    ttl_index: BTreeMap<i64, Vec<u32>>,
    rows: [usize; 2],
    peak: [usize; 2],
    out_schema: SchemaRef,
}

impl TemporalJoin {
    fn add_version(&mut self, key: u32, ts: i64, at: RowRef) {
        let list = self.versions.entry(key).or_default();
        // Versions mostly come in order; a late one is put in its place.
        let i = list.partition_point(|v| v.0 <= ts);
        list.insert(i, (ts, at));
        if list.len() > 1 {
            self.superseded.insert(key);
        }
        if let Some(ttl) = self.spec.state_ttl_ms {
            self.ttl_index.entry(ts.saturating_add(ttl).div_euclid(TTL_BUCKET_MS)).or_default().push(key);
        }
        self.stores[1].retain(at.0);
        self.rows[1] += 1;
    }

    fn process_side(&mut self, side: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows();
        let (ids, null_key) = intern_keys(&mut self.interner, &batch, &self.spec.keys[side])?;
        let wm = cx.watermark.unwrap_or(i64::MIN);
        let times = batch.time.values().clone();
        let slot = self.stores[side].keep(StructArray::from(batch.rows), 1);
        let (mut late, mut no_key) = (0u64, 0u64);
        // A null key equals nothing, so an event with one needs no waiting: of a left join
        // it is emitted now, alone.
        let mut alone = Gather::default();
        for (i, &ts) in times.iter().enumerate() {
            let at = (slot, i as u32);
            if side == 0 && ts < wm {
                // Its answer may depend on versions already let go.
                late += 1;
                continue;
            }
            if null_key.as_ref().is_some_and(|nb| nb.is_null(i)) {
                no_key += 1;
                if side == 0 && self.spec.kind == JoinKind::Left {
                    alone.push([Some(at), None], ts);
                }
                continue;
            }
            if side == 1 {
                self.add_version(ids[i], ts, at);
                continue;
            }
            self.waiting.entry(ts).or_default().push((ids[i], at));
            self.stores[0].retain(slot);
            self.rows[0] += 1;
        }
        StepMetrics::add(&cx.metrics.late_dropped, late);
        StepMetrics::add(&cx.metrics.filtered, no_key);
        StepMetrics::add(&cx.metrics.aggregated, n as u64 - late - no_key);
        alone.emit([&self.stores[0], &self.stores[1]], &self.spec.schemas, &self.out_schema, Vec::new(), cx)?;
        self.stores[side].release(slot);
        self.peak = [self.peak[0].max(self.rows[0]), self.peak[1].max(self.rows[1])];
        report_state(cx, &self.spec.names, self.rows, self.peak);
        Ok(())
    }

    /// Answers the waiting left rows before `wm`, then lets go of versions no row to come
    /// can need.
    fn advance(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let mut out = Gather::default();
        let mut answered: Vec<RowRef> = Vec::new();
        let mut unmatched = 0u64;
        while let Some(entry) = self.waiting.first_entry() {
            let ts = *entry.key();
            if ts >= wm {
                break;
            }
            for (key, at) in entry.remove() {
                let version = self.versions.get(&key).and_then(|list| {
                    let i = list.partition_point(|v| v.0 <= ts);
                    (i > 0).then(|| list[i - 1].1)
                });
                match version {
                    Some(v) => out.push([Some(at), Some(v)], ts),
                    None if self.spec.kind == JoinKind::Left => out.push([Some(at), None], ts),
                    None => unmatched += 1,
                }
                answered.push(at);
            }
        }
        StepMetrics::add(&cx.metrics.filtered, unmatched);
        out.emit([&self.stores[0], &self.stores[1]], &self.spec.schemas, &self.out_schema, Vec::new(), cx)?;
        self.rows[0] -= answered.len();
        for at in answered {
            self.stores[0].release(at.0);
        }
        self.prune(wm);
        report_state(cx, &self.spec.names, self.rows, self.peak);
        Ok(())
    }

    /// Every row to come is at or after `wm`: of each key's versions at or before it, only the
    /// newest can still be asked for. With a TTL, keys whose newest version expired go.
    fn prune(&mut self, wm: i64) {
        let mut released: Vec<RowRef> = Vec::new();
        for key in std::mem::take(&mut self.superseded) {
            let Some(list) = self.versions.get_mut(&key) else { continue };
            let at_or_before = list.partition_point(|v| v.0 <= wm);
            if at_or_before > 1 {
                released.extend(list.drain(..at_or_before - 1).map(|v| v.1));
            }
            if list.len() > 1 {
                self.superseded.insert(key);
            }
        }
        if let Some(ttl) = self.spec.state_ttl_ms {
            while let Some(entry) = self.ttl_index.first_entry() {
                if *entry.key() >= wm.div_euclid(TTL_BUCKET_MS) {
                    break;
                }
                for key in entry.remove() {
                    let expired =
                        self.versions.get(&key).and_then(|l| l.last()).is_some_and(|v| v.0.saturating_add(ttl) < wm);
                    if expired {
                        if let Some(list) = self.versions.remove(&key) {
                            released.extend(list.into_iter().map(|v| v.1));
                        }
                        self.superseded.remove(&key);
                    }
                }
            }
        }
        self.rows[1] -= released.len();
        for at in released {
            self.stores[1].release(at.0);
        }
    }
}

impl Operator for TemporalJoin {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(0, batch, cx)
    }

    fn process_from(&mut self, input: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(side_of(input)?, batch, cx)
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        self.advance(wm, cx)
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        self.advance(i64::MAX, cx)
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        // (side, key, time, row)
        let mut kept: Vec<(u8, u32, i64, RowRef)> = Vec::new();
        for (ts, list) in &self.waiting {
            kept.extend(list.iter().map(|(k, at)| (0, *k, *ts, *at)));
        }
        for (k, list) in &self.versions {
            kept.extend(list.iter().map(|(ts, at)| (1, *k, *ts, *at)));
        }
        if kept.is_empty() {
            return Ok(None);
        }
        let mut rows = Gather::default();
        for (side, _, ts, at) in &kept {
            rows.push(super::ordered(usize::from(*side), Some(*at), None), *ts);
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt8Array::from_iter_values(kept.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(kept.iter().map(|r| r.2))),
        ];
        cols.extend(rows.columns([&self.stores[0], &self.stores[1]], &self.spec.schemas)?);
        let fields = state_fields(Vec::new(), &self.spec.schemas, &self.spec.names);
        let ids: Vec<u32> = kept.iter().map(|r| r.1).collect();
        crate::snapshot::keyed_table(&self.interner, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let ids = crate::snapshot::read_keys(&mut self.interner, self.spec.keys[0].len(), &state)?;
        let ts = crate::snapshot::i64s(&state, "ts")?.clone();
        let rows = restore_rows(&state, &self.spec.schemas, &self.spec.names, &mut self.stores)?;
        let [left, right] = rows;
        for (i, at) in left {
            self.waiting.entry(ts.value(i)).or_default().push((ids[i], at));
            self.rows[0] += 1;
        }
        for (i, at) in right {
            self.add_version(ids[i], ts.value(i), at);
            // restore_rows counted this reference already.
            self.stores[1].release(at.0);
        }
        self.peak = self.rows;
        Ok(())
    }
}
