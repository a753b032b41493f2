//! Steps with two inputs: `union` of streams with one schema, and the interval join of two
//! streams on key and event time.
//!
//! The interval join pairs each row `a` of its left input with each row `b` of its right
//! input that has the same key and `lo <= b.ts - a.ts <= hi`. A pair is emitted when its
//! second row arrives, so its output time, the later of the two, is never behind either
//! input's watermark. Each side keeps the rows the other side can still match: the input
//! batches themselves (their Arrow arrays, no copy), and per key a short list of (time, row).
//! A left row is dropped once the right input's watermark passes `a.ts + hi` (no right row to
//! come can match it), a right row once the left's passes `b.ts - lo`; with watermarks of
//! bounded disorder, state holds about `bound + hi - lo` of each side.
//!
//! Output: one struct column per side, named by the side (`a`, `b`), holding that side's whole
//! row; a later `select` picks fields (`a.readings.temp`). Left, right and full outer joins
//! also emit each row that found no partner when it is dropped, with a null struct for the
//! other side; such rows can be older than the watermark, so the step holds its output
//! watermark back by the interval.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StructArray, UInt8Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::keys::{key_columns, KeyInterner};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

/// A union: every batch of every input, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnionSpec;

impl OperatorFactory for UnionSpec {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(Union))
    }
}

#[derive(Debug)]
struct Union;

impl Operator for Union {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        StepMetrics::add(&cx.metrics.rows_out, batch.num_rows() as u64);
        cx.emit(batch);
        Ok(())
    }
}

/// Which rows without a partner an interval join emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JoinKind {
    /// Only pairs.
    #[default]
    Inner,
    /// Pairs, and left rows that found none (with a null right side).
    Left,
    /// Pairs, and right rows that found none.
    Right,
    /// Pairs, and rows of either side that found none.
    Full,
}

impl JoinKind {
    fn pads(self, side: usize) -> bool {
        matches!((self, side), (Self::Full, _) | (Self::Left, 0) | (Self::Right, 1))
    }
}

/// A planned interval join (see the module documentation).
#[derive(Debug, Clone)]
pub struct IntervalJoinSpec {
    /// The two inputs' schemas, left then right.
    pub schemas: [SchemaRef; 2],
    /// Key column paths of each side (as many on both, of the same types).
    pub keys: [Vec<String>; 2],
    /// Names of the output's two struct columns.
    pub names: [String; 2],
    /// `lo <= right.ts - left.ts <= hi`, ms.
    pub lo: i64,
    /// See `lo`.
    pub hi: i64,
    /// Which unmatched rows are emitted.
    pub kind: JoinKind,
}

impl IntervalJoinSpec {
    /// Checks the keys' types and builds the output schema.
    ///
    /// # Errors
    /// A key missing on a side, key types that differ between the sides, or `lo > hi`.
    pub fn output_schema(&self) -> Result<SchemaRef> {
        if self.lo > self.hi {
            return Err(CoreError::Config(format!(
                "the interval is empty: its start ({} ms) is after its end ({} ms)",
                self.lo, self.hi
            )));
        }
        if self.keys[0].is_empty() || self.keys[0].len() != self.keys[1].len() {
            return Err(CoreError::Config(
                "a join needs the same number (at least one) of key columns on both sides".into(),
            ));
        }
        for (l, r) in self.keys[0].iter().zip(&self.keys[1]) {
            let lt = crate::field_by_path(&self.schemas[0], l)?.data_type().clone();
            let rt = crate::field_by_path(&self.schemas[1], r)?.data_type().clone();
            if lt != rt {
                return Err(CoreError::Config(format!(
                    "join key `{l}` is {lt} on the left (`{}`) but `{r}` is {rt} on the right (`{}`)",
                    self.names[0], self.names[1]
                )));
            }
        }
        Ok(Arc::new(Schema::new(self.out_fields())))
    }

    fn out_fields(&self) -> Vec<Field> {
        (0..2).map(|s| Field::new(&self.names[s], DataType::Struct(self.schemas[s].fields().clone()), true)).collect()
    }

    /// How far behind its input's watermark the step may still emit rows (padded rows of an
    /// outer join), ms.
    fn hold(&self) -> i64 {
        if self.kind == JoinKind::Inner {
            0
        } else {
            self.hi.max(-self.lo).max(0)
        }
    }
}

impl OperatorFactory for IntervalJoinSpec {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let key_types = self.keys[0]
            .iter()
            .map(|k| Ok(crate::field_by_path(&self.schemas[0], k)?.data_type().clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(IntervalJoin {
            interner: KeyInterner::new(&key_types)?,
            sides: [Side::default(), Side::default()],
            watermarks: [i64::MIN, i64::MIN],
            out_schema: self.output_schema()?,
            spec: self.clone(),
        }))
    }
}

/// One row kept in state.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ts: i64,
    slot: u32,
    row: u32,
    matched: bool,
}

/// Granularity of the expiry index, ms: rows are dropped at most this much after they could be.
const BUCKET_MS: i64 = 64;

/// The rows one side keeps.
#[derive(Debug, Default)]
struct Side {
    /// Retained input batches (as struct arrays) with how many of their rows are still kept.
    slots: Vec<Option<(StructArray, usize)>>,
    free: Vec<u32>,
    /// Per key id, the kept rows.
    per_key: Vec<Vec<Entry>>,
    /// Keys with rows that expire in each bucket (of the time the other side's watermark must
    /// pass).
    expiry: BTreeMap<i64, Vec<u32>>,
    /// Rows kept.
    rows: usize,
    /// The most rows it has kept at once.
    peak: usize,
}

impl Side {
    fn keep_batch(&mut self, rows: StructArray, live: usize) -> u32 {
        match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some((rows, live));
                s
            }
            None => {
                self.slots.push(Some((rows, live)));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Keeps a row of key `k` until the other side's watermark passes `expires`.
    fn keep(&mut self, k: u32, e: Entry, expires: i64) {
        self.per_key[k as usize].push(e);
        self.expiry.entry(expires.div_euclid(BUCKET_MS)).or_default().push(k);
        self.rows += 1;
    }

    fn release(&mut self, slot: u32) {
        if let Some((_, live)) = self.slots[slot as usize].as_mut() {
            *live -= 1;
            if *live == 0 {
                self.slots[slot as usize] = None;
                self.free.push(slot);
            }
        }
    }

    fn array(&self, slot: u32) -> Result<&StructArray> {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|(a, _)| a)
            .ok_or_else(|| CoreError::Internal(format!("join state refers to a dropped batch {slot}")))
    }
}

#[derive(Debug)]
struct IntervalJoin {
    spec: IntervalJoinSpec,
    interner: KeyInterner,
    /// Left (0) and right (1).
    sides: [Side; 2],
    /// Each input's own watermark.
    watermarks: [i64; 2],
    out_schema: SchemaRef,
}

/// A row of an output pair: (index into the side's list of arrays, row).
type Ref = (usize, usize);

/// When a row of `side` at `ts` can find no partner any more (`lo <= right - left <= hi`): a
/// left row once the right watermark passes `ts + hi`, a right row once the left passes
/// `ts - lo`.
fn expires_at(side: usize, ts: i64, lo: i64, hi: i64) -> i64 {
    if side == 0 {
        ts.saturating_add(hi)
    } else {
        ts.saturating_sub(lo)
    }
}

impl IntervalJoin {
    /// The time before which a row of `side` at `ts` can find no partner any more: the other
    /// side's watermark must pass it.
    fn expires_at(&self, side: usize, ts: i64) -> i64 {
        expires_at(side, ts, self.spec.lo, self.spec.hi)
    }

    /// Builds an output batch from pairs of rows: `own[i]`/`other[i]` index into the arrays of
    /// `side` and of the other side, where array 0 is a one-row null struct (the missing side
    /// of a pad).
    fn output(
        &self,
        side: usize,
        own: (&[&dyn Array], &[Ref]),
        other: (&[&dyn Array], &[Ref]),
        times: Vec<i64>,
        cx: &mut OpContext<'_>,
    ) -> Result<()> {
        if times.is_empty() {
            return Ok(());
        }
        let (sources, refs) =
            if side == 0 { ([own.0, other.0], [own.1, other.1]) } else { ([other.0, own.0], [other.1, own.1]) };
        let cols: Vec<ArrayRef> = (0..2)
            .map(|s| arrow_select::interleave::interleave(sources[s], refs[s]).map_err(CoreError::from))
            .collect::<Result<_>>()?;
        let rb = RecordBatch::try_new(self.out_schema.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rb.num_rows() as u64);
        cx.emit(Batch::new(rb, Int64Array::from(times))?);
        Ok(())
    }

    fn null_side(&self, side: usize) -> ArrayRef {
        arrow_array::new_null_array(&DataType::Struct(self.spec.schemas[side].fields().clone()), 1)
    }

    fn process_side(&mut self, side: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows();
        let other = 1 - side;
        let (lo, hi) = (self.spec.lo, self.spec.hi);
        let keys = key_columns(&batch.rows, &self.spec.keys[side])?;
        let null_key: Option<arrow_buffer::NullBuffer> = keys
            .iter()
            .filter_map(|k| k.logical_nulls())
            .reduce(|a, b| arrow_buffer::NullBuffer::union(Some(&a), Some(&b)).unwrap_or(a));
        let ids = self.interner.intern(&keys)?.to_vec();
        if self.sides[0].per_key.len() < self.interner.capacity() {
            for s in &mut self.sides {
                s.per_key.resize_with(self.interner.capacity(), Vec::new);
            }
        }
        let own_wm = self.watermarks[side];
        let other_wm = self.watermarks[other];
        let times = batch.time.values();
        // The batch's own rows are source 1 of its side; the other side's kept batches follow
        // the null row, in the order first met.
        let mut other_sources: Vec<u32> = Vec::new();
        let mut other_index: std::collections::HashMap<u32, usize> = Default::default();
        let mut own_refs: Vec<Ref> = Vec::new();
        let mut other_refs: Vec<Ref> = Vec::new();
        let mut out_times: Vec<i64> = Vec::new();
        let mut keep: Vec<(usize, u32, bool)> = Vec::new();
        let mut pads: Vec<usize> = Vec::new();
        let (mut late, mut no_key) = (0u64, 0u64);
        for i in 0..n {
            let ts = times[i];
            if ts < own_wm {
                late += 1;
                continue;
            }
            if null_key.as_ref().is_some_and(|nb| nb.is_null(i)) {
                // A null key equals nothing, not even another null.
                no_key += 1;
                if self.spec.kind.pads(side) {
                    pads.push(i);
                }
                continue;
            }
            let k = ids[i];
            let mut matched = false;
            for e in &mut self.sides[other].per_key[k as usize] {
                // d = right.ts - left.ts
                let d = if side == 0 { e.ts - ts } else { ts - e.ts };
                if d < lo || d > hi {
                    continue;
                }
                matched = true;
                e.matched = true;
                let src = *other_index.entry(e.slot).or_insert_with(|| {
                    other_sources.push(e.slot);
                    other_sources.len()
                });
                own_refs.push((1, i));
                other_refs.push((src, e.row as usize));
                out_times.push(ts.max(e.ts));
            }
            // Kept only while a row still to come on the other side can match it.
            if self.expires_at(side, ts) >= other_wm {
                keep.push((i, k, matched));
            } else if !matched && self.spec.kind.pads(side) {
                pads.push(i);
            }
        }
        StepMetrics::add(&cx.metrics.late_dropped, late);
        StepMetrics::add(&cx.metrics.filtered, no_key);
        StepMetrics::add(&cx.metrics.aggregated, n as u64 - late - no_key);
        if late > 0 {
            tracing::debug!(step = %cx.step, late, "Rows behind their input's watermark were dropped by the join.");
        }
        let own = StructArray::from(batch.rows.clone());
        // Pads of rows that are not kept: this batch's rows with the other side null.
        for &i in &pads {
            own_refs.push((1, i));
            other_refs.push((0, 0));
            out_times.push(times[i]);
        }
        {
            let null_own = self.null_side(side);
            let null_other = self.null_side(other);
            let own_sources: [&dyn Array; 2] = [null_own.as_ref(), &own];
            let mut others: Vec<&dyn Array> = vec![null_other.as_ref()];
            for slot in &other_sources {
                others.push(self.sides[other].array(*slot)?);
            }
            self.output(side, (&own_sources, &own_refs), (&others, &other_refs), out_times, cx)?;
        }
        if !keep.is_empty() {
            let st = &mut self.sides[side];
            let slot = st.keep_batch(own, keep.len());
            for (i, k, matched) in keep {
                let ts = times[i];
                st.keep(
                    k,
                    Entry { ts, slot, row: i as u32, matched },
                    expires_at(side, ts, self.spec.lo, self.spec.hi),
                );
            }
            st.peak = st.peak.max(st.rows);
        }
        self.report(cx);
        Ok(())
    }

    /// The rows each side keeps now, and the most it has kept, as gauges per worker.
    fn report(&self, cx: &mut OpContext<'_>) {
        let worker = cx.worker.to_string();
        for (side, st) in self.sides.iter().enumerate() {
            let labels =
                [("step", cx.step.as_str()), ("side", self.spec.names[side].as_str()), ("worker", worker.as_str())];
            let m = &cx.registry.connectors;
            m.set(
                "weir_join_state_rows",
                "Rows an interval join keeps of one side, waiting for partners.",
                &labels,
                st.rows as f64,
            );
            m.set(
                "weir_join_state_rows_peak",
                "The most rows an interval join has kept of one side at once (this run).",
                &labels,
                st.peak as f64,
            );
        }
    }

    /// Drops the rows of `side` that the other side's watermark `wm` leaves without a future
    /// partner, emitting the unmatched ones of an outer side.
    fn evict(&mut self, side: usize, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let other = 1 - side;
        let pads = self.spec.kind.pads(side);
        // Buckets wholly before the watermark: every row in them expires at most then.
        let first_kept = wm.div_euclid(BUCKET_MS);
        let (lo, hi) = (self.spec.lo, self.spec.hi);
        let st = &mut self.sides[side];
        let mut dropped: Vec<Entry> = Vec::new();
        while let Some(entry) = st.expiry.first_entry() {
            if *entry.key() >= first_kept {
                break;
            }
            for k in entry.remove() {
                st.per_key[k as usize].retain(|e| {
                    let gone = expires_at(side, e.ts, lo, hi) < wm;
                    if gone {
                        dropped.push(*e);
                    }
                    !gone
                });
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        st.rows -= dropped.len();
        if pads {
            let unmatched: Vec<&Entry> = dropped.iter().filter(|e| !e.matched).collect();
            if !unmatched.is_empty() {
                let mut slots: Vec<u32> = Vec::new();
                let mut index: std::collections::HashMap<u32, usize> = Default::default();
                let mut own_refs = Vec::with_capacity(unmatched.len());
                let mut times = Vec::with_capacity(unmatched.len());
                for e in &unmatched {
                    let src = *index.entry(e.slot).or_insert_with(|| {
                        slots.push(e.slot);
                        slots.len()
                    });
                    own_refs.push((src, e.row as usize));
                    times.push(e.ts);
                }
                let other_refs = vec![(0, 0); own_refs.len()];
                let null_own = self.null_side(side);
                let null_other = self.null_side(other);
                let mut own: Vec<&dyn Array> = vec![null_own.as_ref()];
                for s in &slots {
                    own.push(self.sides[side].array(*s)?);
                }
                let others: [&dyn Array; 1] = [null_other.as_ref()];
                self.output(side, (&own, &own_refs), (&others, &other_refs), times, cx)?;
            }
        }
        for e in dropped {
            self.sides[side].release(e.slot);
        }
        self.report(cx);
        Ok(())
    }

    /// Every kept row of `side`, as rows of a state table: key id, time, matched, and the row.
    fn kept(&self, side: usize) -> Vec<(u32, Entry)> {
        let mut out = Vec::with_capacity(self.sides[side].rows);
        for (k, entries) in self.sides[side].per_key.iter().enumerate() {
            out.extend(entries.iter().map(|e| (k as u32, *e)));
        }
        out
    }
}

impl Operator for IntervalJoin {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(0, batch, cx)
    }

    fn process_from(&mut self, input: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        match input {
            0 | 1 => self.process_side(input, batch, cx),
            _ => Err(CoreError::Internal(format!("a join has two inputs, not input {input}"))),
        }
    }

    fn on_input_watermark(&mut self, input: usize, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if input > 1 || wm <= self.watermarks[input] {
            return Ok(());
        }
        self.watermarks[input] = wm;
        // The left input's progress ends right rows, and the other way round.
        self.evict(1 - input, wm, cx)
    }

    fn output_watermark(&self, wm: i64) -> i64 {
        wm.saturating_sub(self.spec.hold())
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        // Nothing more comes on either side: every kept row is done.
        for side in 0..2 {
            self.evict(side, i64::MAX, cx)?;
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let rows: Vec<(u8, u32, Entry)> =
            (0..2).flat_map(|s| self.kept(s).into_iter().map(move |(k, e)| (s as u8, k, e))).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let ids: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2.ts))),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.2.matched)))),
        ];
        for side in 0..2 {
            let null = self.null_side(side);
            let mut sources: Vec<&dyn Array> = vec![null.as_ref()];
            let mut index: std::collections::HashMap<u32, usize> = Default::default();
            let mut refs = Vec::with_capacity(rows.len());
            for (s, _, e) in &rows {
                if usize::from(*s) != side {
                    refs.push((0, 0));
                    continue;
                }
                let src = match index.get(&e.slot) {
                    Some(i) => *i,
                    None => {
                        sources.push(self.sides[side].array(e.slot)?);
                        index.insert(e.slot, sources.len() - 1);
                        sources.len() - 1
                    }
                };
                refs.push((src, e.row as usize));
            }
            cols.push(arrow_select::interleave::interleave(&sources, &refs)?);
        }
        let mut fields = vec![
            Field::new("side", DataType::UInt8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("matched", DataType::Boolean, false),
        ];
        fields.extend(self.spec.out_fields());
        crate::snapshot::keyed_table(&self.interner, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let nkeys = self.spec.keys[0].len();
        let ids = crate::snapshot::read_keys(&mut self.interner, nkeys, &state)?;
        for s in &mut self.sides {
            s.per_key.resize_with(self.interner.capacity(), Vec::new);
        }
        let side = crate::snapshot::col(&state, "side", &DataType::UInt8)?
            .as_primitive::<arrow_array::types::UInt8Type>()
            .clone();
        let ts = crate::snapshot::i64s(&state, "ts")?.clone();
        let matched = crate::snapshot::col(&state, "matched", &DataType::Boolean)?.as_boolean().clone();
        for s in 0..2 {
            let ty = DataType::Struct(self.spec.schemas[s].fields().clone());
            let col = crate::snapshot::col(&state, &self.spec.names[s], &ty)?;
            let mask = BooleanArray::from_iter(side.iter().map(|v| Some(v == Some(s as u8))));
            let rows = arrow_select::filter::filter(col, &mask)?;
            if rows.is_empty() {
                continue;
            }
            let rows = rows.as_struct().clone();
            let picked: Vec<usize> = (0..state.num_rows()).filter(|&i| side.value(i) == s as u8).collect();
            let st = &mut self.sides[s];
            let slot = st.keep_batch(rows, picked.len());
            for (row, i) in picked.into_iter().enumerate() {
                let k = ids[i];
                let t = ts.value(i);
                let e = Entry { ts: t, slot, row: row as u32, matched: matched.value(i) };
                st.keep(k, e, expires_at(s, t, self.spec.lo, self.spec.hi));
            }
            st.peak = st.peak.max(st.rows);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
