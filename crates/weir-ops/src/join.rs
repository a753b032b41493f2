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
        key_types(&self.schemas, &self.keys, &self.names)?;
        Ok(Arc::new(Schema::new(side_fields(&self.schemas, &self.names))))
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
        let types = key_types(&self.schemas, &self.keys, &self.names)?;
        Ok(Box::new(IntervalJoin {
            interner: KeyInterner::new(&types)?,
            sides: [Side::default(), Side::default()],
            watermarks: [i64::MIN, i64::MIN],
            out_schema: self.output_schema()?,
            spec: self.clone(),
        }))
    }
}

/// Checks a join's key columns: as many (at least one) on both sides, of the same types.
/// Returns their types.
fn key_types(schemas: &[SchemaRef; 2], keys: &[Vec<String>; 2], names: &[String; 2]) -> Result<Vec<DataType>> {
    if names[0] == names[1] {
        return Err(CoreError::Config(format!("the two sides need different names, not `{}` twice", names[0])));
    }
    if keys[0].is_empty() || keys[0].len() != keys[1].len() {
        return Err(CoreError::Config(
            "a join needs the same number (at least one) of key columns on both sides".into(),
        ));
    }
    let mut types = Vec::with_capacity(keys[0].len());
    for (l, r) in keys[0].iter().zip(&keys[1]) {
        let lt = crate::field_by_path(&schemas[0], l)?.data_type().clone();
        let rt = crate::field_by_path(&schemas[1], r)?.data_type().clone();
        if lt != rt {
            return Err(CoreError::Config(format!(
                "join key `{l}` is {lt} on the left (`{}`) but `{r}` is {rt} on the right (`{}`)",
                names[0], names[1]
            )));
        }
        types.push(lt);
    }
    Ok(types)
}

/// The output's two struct columns, one per side, holding that side's whole row.
fn side_fields(schemas: &[SchemaRef; 2], names: &[String; 2]) -> Vec<Field> {
    (0..2).map(|s| Field::new(&names[s], DataType::Struct(schemas[s].fields().clone()), true)).collect()
}

/// A batch's keys as ids, and which rows have a null in a key column (a null key equals
/// nothing, not even another null).
fn intern_keys(
    interner: &mut KeyInterner,
    batch: &Batch,
    keys: &[String],
) -> Result<(Vec<u32>, Option<arrow_buffer::NullBuffer>)> {
    let cols = key_columns(&batch.rows, keys)?;
    let nulls = cols
        .iter()
        .filter_map(|k| k.logical_nulls())
        .reduce(|a, b| arrow_buffer::NullBuffer::union(Some(&a), Some(&b)).unwrap_or(a));
    Ok((interner.intern(&cols)?.to_vec(), nulls))
}

/// Input batches a join keeps, as struct arrays, each with how many kept rows still point
/// into it; a batch is let go when the last does.
#[derive(Debug, Default)]
struct Store {
    slots: Vec<Option<(StructArray, usize)>>,
    free: Vec<u32>,
}

impl Store {
    /// Keeps `rows` for `live` references.
    fn keep(&mut self, rows: StructArray, live: usize) -> u32 {
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

    /// One more reference to `slot`.
    fn retain(&mut self, slot: u32) {
        if let Some((_, live)) = self.slots[slot as usize].as_mut() {
            *live += 1;
        }
    }

    /// One reference to `slot` fewer.
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

/// A kept row: (slot in its side's [`Store`], row in that batch).
type RowRef = (u32, u32);

/// Output rows of a join being gathered: each names one row of each side, or none (a null
/// struct). The rows are copied out of the kept batches once, when the batch is built.
#[derive(Debug, Default)]
struct Gather {
    slots: [Vec<u32>; 2],
    index: [std::collections::HashMap<u32, usize>; 2],
    refs: [Vec<(usize, usize)>; 2],
    times: Vec<i64>,
}

impl Gather {
    fn push(&mut self, rows: [Option<RowRef>; 2], time: i64) {
        for (side, row) in rows.into_iter().enumerate() {
            let r = match row {
                // Source 0 of each side is a one-row null struct.
                None => (0, 0),
                Some((slot, row)) => {
                    let slots = &mut self.slots[side];
                    let src = *self.index[side].entry(slot).or_insert_with(|| {
                        slots.push(slot);
                        slots.len()
                    });
                    (src, row as usize)
                }
            };
            self.refs[side].push(r);
        }
        self.times.push(time);
    }

    fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// The two struct columns.
    fn columns(&self, stores: [&Store; 2], schemas: &[SchemaRef; 2]) -> Result<Vec<ArrayRef>> {
        (0..2)
            .map(|side| {
                let null = arrow_array::new_null_array(&DataType::Struct(schemas[side].fields().clone()), 1);
                let mut sources: Vec<&dyn Array> = vec![null.as_ref()];
                for s in &self.slots[side] {
                    sources.push(stores[side].array(*s)?);
                }
                Ok(arrow_select::interleave::interleave(&sources, &self.refs[side])?)
            })
            .collect()
    }

    /// Emits the gathered rows as one batch of `schema` (the two struct columns, then
    /// `extra`), counted as results.
    fn emit(
        self,
        stores: [&Store; 2],
        schemas: &[SchemaRef; 2],
        schema: &SchemaRef,
        extra: Vec<ArrayRef>,
        cx: &mut OpContext<'_>,
    ) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut cols = self.columns(stores, schemas)?;
        cols.extend(extra);
        let rb = RecordBatch::try_new(schema.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rb.num_rows() as u64);
        cx.emit(Batch::new(rb, Int64Array::from(self.times))?);
        Ok(())
    }
}

/// The rows a join keeps of each side now, and the most it has kept, as gauges per worker.
fn report_state(cx: &mut OpContext<'_>, names: &[String; 2], rows: [usize; 2], peak: [usize; 2]) {
    let worker = cx.worker.to_string();
    for side in 0..2 {
        let labels = [("step", cx.step.as_str()), ("side", names[side].as_str()), ("worker", worker.as_str())];
        let m = &cx.registry.connectors;
        m.set("weir_join_state_rows", "Rows a join keeps of one side.", &labels, rows[side] as f64);
        m.set(
            "weir_join_state_rows_peak",
            "The most rows a join has kept of one side at once (this run).",
            &labels,
            peak[side] as f64,
        );
    }
}

/// State table columns shared by the joins: which side a row is of, its time, then the
/// operator's own columns, then both sides' struct columns (the other side null).
fn state_fields(own: Vec<Field>, schemas: &[SchemaRef; 2], names: &[String; 2]) -> Vec<Field> {
    let mut fields = vec![Field::new("side", DataType::UInt8, false), Field::new("ts", DataType::Int64, false)];
    fields.extend(own);
    fields.extend(side_fields(schemas, names));
    fields
}

/// Rows read back from a join's state table, per side: (row index in the table, kept row).
fn restore_rows(
    state: &RecordBatch,
    schemas: &[SchemaRef; 2],
    names: &[String; 2],
    stores: &mut [Store; 2],
) -> Result<[Vec<(usize, RowRef)>; 2]> {
    let side =
        crate::snapshot::col(state, "side", &DataType::UInt8)?.as_primitive::<arrow_array::types::UInt8Type>().clone();
    let mut out: [Vec<(usize, RowRef)>; 2] = [Vec::new(), Vec::new()];
    for s in 0..2 {
        let ty = DataType::Struct(schemas[s].fields().clone());
        let col = crate::snapshot::col(state, &names[s], &ty)?;
        let mask = BooleanArray::from_iter(side.iter().map(|v| Some(v == Some(s as u8))));
        let rows = arrow_select::filter::filter(col, &mask)?;
        if rows.is_empty() {
            continue;
        }
        let picked: Vec<usize> = (0..state.num_rows()).filter(|&i| side.value(i) == s as u8).collect();
        let slot = stores[s].keep(rows.as_struct().clone(), picked.len());
        out[s] = picked.into_iter().enumerate().map(|(row, i)| (i, (slot, row as u32))).collect();
    }
    Ok(out)
}

/// One row an interval join keeps.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ts: i64,
    slot: u32,
    row: u32,
    matched: bool,
}

/// Granularity of the expiry index, ms: rows are dropped at most this much after they could be.
const BUCKET_MS: i64 = 64;

/// The rows one side of an interval join keeps.
#[derive(Debug, Default)]
struct Side {
    store: Store,
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
    /// Keeps a row of key `k` until the other side's watermark passes `expires`.
    fn keep(&mut self, k: u32, e: Entry, expires: i64) {
        self.per_key[k as usize].push(e);
        self.expiry.entry(expires.div_euclid(BUCKET_MS)).or_default().push(k);
        self.rows += 1;
        self.peak = self.peak.max(self.rows);
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

/// The side (0 left, 1 right) that input `input` of a join is.
fn side_of(input: usize) -> Result<usize> {
    match input {
        0 | 1 => Ok(input),
        _ => Err(CoreError::Internal(format!("a join has two inputs, not input {input}"))),
    }
}

/// `[own, other]` as `[left, right]`.
fn ordered<T>(side: usize, own: T, other: T) -> [T; 2] {
    if side == 0 {
        [own, other]
    } else {
        [other, own]
    }
}

impl IntervalJoin {
    fn stores(&self) -> [&Store; 2] {
        [&self.sides[0].store, &self.sides[1].store]
    }

    fn emit(&self, out: Gather, cx: &mut OpContext<'_>) -> Result<()> {
        out.emit(self.stores(), &self.spec.schemas, &self.out_schema, Vec::new(), cx)
    }

    fn process_side(&mut self, side: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows();
        let other = 1 - side;
        let (lo, hi) = (self.spec.lo, self.spec.hi);
        let (ids, null_key) = intern_keys(&mut self.interner, &batch, &self.spec.keys[side])?;
        if self.sides[0].per_key.len() < self.interner.capacity() {
            for s in &mut self.sides {
                s.per_key.resize_with(self.interner.capacity(), Vec::new);
            }
        }
        let own_wm = self.watermarks[side];
        let other_wm = self.watermarks[other];
        let times = batch.time.values().clone();
        // The batch is held while its pairs are built, and after for the rows kept.
        let slot = self.sides[side].store.keep(StructArray::from(batch.rows), 1);
        let mut out = Gather::default();
        let mut keep: Vec<(usize, u32, bool)> = Vec::new();
        let (mut late, mut no_key) = (0u64, 0u64);
        for (i, &ts) in times.iter().enumerate() {
            let me = Some((slot, i as u32));
            if ts < own_wm {
                late += 1;
                continue;
            }
            if null_key.as_ref().is_some_and(|nb| nb.is_null(i)) {
                no_key += 1;
                if self.spec.kind.pads(side) {
                    out.push(ordered(side, me, None), ts);
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
                out.push(ordered(side, me, Some((e.slot, e.row))), ts.max(e.ts));
            }
            // Kept only while a row still to come on the other side can match it.
            if expires_at(side, ts, lo, hi) >= other_wm {
                keep.push((i, k, matched));
            } else if !matched && self.spec.kind.pads(side) {
                out.push(ordered(side, me, None), ts);
            }
        }
        StepMetrics::add(&cx.metrics.late_dropped, late);
        StepMetrics::add(&cx.metrics.filtered, no_key);
        StepMetrics::add(&cx.metrics.aggregated, n as u64 - late - no_key);
        if late > 0 {
            tracing::debug!(step = %cx.step, late, "Rows behind their input's watermark were dropped by the join.");
        }
        self.emit(out, cx)?;
        let st = &mut self.sides[side];
        for (i, k, matched) in keep {
            let ts = times[i];
            st.store.retain(slot);
            st.keep(k, Entry { ts, slot, row: i as u32, matched }, expires_at(side, ts, lo, hi));
        }
        st.store.release(slot);
        self.report(cx);
        Ok(())
    }

    fn report(&self, cx: &mut OpContext<'_>) {
        let s = &self.sides;
        report_state(cx, &self.spec.names, [s[0].rows, s[1].rows], [s[0].peak, s[1].peak]);
    }

    /// Drops the rows of `side` that the other side's watermark `wm` leaves without a future
    /// partner, emitting the unmatched ones of an outer side.
    fn evict(&mut self, side: usize, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
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
        if self.spec.kind.pads(side) {
            let mut out = Gather::default();
            for e in dropped.iter().filter(|e| !e.matched) {
                out.push(ordered(side, Some((e.slot, e.row)), None), e.ts);
            }
            self.emit(out, cx)?;
        }
        for e in dropped {
            self.sides[side].store.release(e.slot);
        }
        self.report(cx);
        Ok(())
    }
}

impl Operator for IntervalJoin {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(0, batch, cx)
    }

    fn process_from(&mut self, input: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(side_of(input)?, batch, cx)
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
        let mut ids = Vec::new();
        let (mut sides, mut ts, mut matched) = (Vec::new(), Vec::new(), Vec::new());
        let mut rows = Gather::default();
        for (s, st) in self.sides.iter().enumerate() {
            for (k, entries) in st.per_key.iter().enumerate() {
                for e in entries {
                    ids.push(k as u32);
                    sides.push(s as u8);
                    ts.push(e.ts);
                    matched.push(Some(e.matched));
                    rows.push(ordered(s, Some((e.slot, e.row)), None), e.ts);
                }
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt8Array::from(sides)),
            Arc::new(Int64Array::from(ts)),
            Arc::new(BooleanArray::from(matched)),
        ];
        cols.extend(rows.columns(self.stores(), &self.spec.schemas)?);
        let fields =
            state_fields(vec![Field::new("matched", DataType::Boolean, false)], &self.spec.schemas, &self.spec.names);
        crate::snapshot::keyed_table(&self.interner, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let nkeys = self.spec.keys[0].len();
        let ids = crate::snapshot::read_keys(&mut self.interner, nkeys, &state)?;
        for s in &mut self.sides {
            s.per_key.resize_with(self.interner.capacity(), Vec::new);
        }
        let ts = crate::snapshot::i64s(&state, "ts")?.clone();
        let matched = crate::snapshot::bools(&state, "matched")?.clone();
        let mut stores = [std::mem::take(&mut self.sides[0].store), std::mem::take(&mut self.sides[1].store)];
        let rows = restore_rows(&state, &self.spec.schemas, &self.spec.names, &mut stores)?;
        let [s0, s1] = stores;
        self.sides[0].store = s0;
        self.sides[1].store = s1;
        for (s, list) in rows.into_iter().enumerate() {
            for (i, (slot, row)) in list {
                let t = ts.value(i);
                let e = Entry { ts: t, slot, row, matched: matched.value(i) };
                self.sides[s].keep(ids[i], e, expires_at(s, t, self.spec.lo, self.spec.hi));
            }
        }
        Ok(())
    }
}

mod temporal;
mod window;

pub use temporal::TemporalJoinSpec;
pub use window::WindowJoinSpec;

#[cfg(test)]
mod tests;
