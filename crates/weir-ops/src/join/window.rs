//! The window join: rows of two streams with the same key in the same window (tumbling,
//! hopping or session) are paired when the window closes.
//!
//! A window `[start, end)` closes when the watermark of both inputs together reaches `end`;
//! each of its pairs is emitted then with event time `end - 1`, as a window aggregate's row
//! is, with `window_start` and `window_end` beside the two sides' struct columns. A left,
//! right or full join also emits, for a window and key that has rows on one side only, each
//! of those rows with the other side null. A session is formed by the rows of both sides:
//! rows of a key closer than the gap to each other, whichever side, are one session.
//!
//! Rows are kept as the input batches themselves (their Arrow arrays) and per window and key
//! a list of references, so a row in several hopping windows is stored once. A row whose
//! windows have all closed is late: dropped and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StructArray, UInt8Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use hashbrown::HashMap;
use weir_core::keys::KeyInterner;
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, OpContext, Operator, OperatorFactory, Result};

use super::{intern_keys, key_types, ordered, report_state, restore_rows, side_fields, state_fields};
use super::{side_of, Gather, JoinKind, RowRef, Store};
use crate::window::WindowKind;

/// A planned window join (see the module documentation).
#[derive(Debug, Clone)]
pub struct WindowJoinSpec {
    /// The two inputs' schemas, left then right.
    pub schemas: [SchemaRef; 2],
    /// Key column paths of each side (as many on both, of the same types).
    pub keys: [Vec<String>; 2],
    /// Names of the output's two struct columns.
    pub names: [String; 2],
    /// The windows.
    pub window: WindowKind,
    /// Which rows without a partner in their window are emitted.
    pub kind: JoinKind,
}

impl WindowJoinSpec {
    /// Checks the keys and the window, and builds the output schema: the two sides' struct
    /// columns, `window_start` and `window_end` (ms).
    ///
    /// # Errors
    /// A key missing on a side, key types that differ between the sides, a window that is not
    /// positive, a hopping slide outside `(0, size]`.
    pub fn output_schema(&self) -> Result<SchemaRef> {
        self.window.check()?;
        key_types(&self.schemas, &self.keys, &self.names)?;
        let mut fields = side_fields(&self.schemas, &self.names);
        fields.push(Field::new("window_start", DataType::Int64, false));
        fields.push(Field::new("window_end", DataType::Int64, false));
        Ok(Arc::new(Schema::new(fields)))
    }
}

impl OperatorFactory for WindowJoinSpec {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let types = key_types(&self.schemas, &self.keys, &self.names)?;
        Ok(Box::new(WindowJoin {
            interner: KeyInterner::new(&types)?,
            stores: [Store::default(), Store::default()],
            fixed: BTreeMap::new(),
            sessions: HashMap::new(),
            closing: BTreeSet::new(),
            rows: [0, 0],
            peak: [0, 0],
            out_schema: self.output_schema()?,
            spec: self.clone(),
        }))
    }
}

/// A kept row: its time and where it is.
#[derive(Debug, Clone, Copy)]
struct Row {
    ts: i64,
    at: RowRef,
}

/// The rows of one key in one window, per side.
type Rows = [Vec<Row>; 2];

/// An open session of one key.
#[derive(Debug, Default)]
struct Session {
    start: i64,
    /// The last row's time plus the gap.
    end: i64,
    rows: Rows,
}

#[derive(Debug)]
struct WindowJoin {
    spec: WindowJoinSpec,
    interner: KeyInterner,
    stores: [Store; 2],
    /// Tumbling and hopping windows by start, then by key id.
    fixed: BTreeMap<i64, HashMap<u32, Rows>>,
    /// Open sessions per key id, not overlapping.
    sessions: HashMap<u32, Vec<Session>>,
    /// Open sessions by (end, key, start), to close them in order.
    closing: BTreeSet<(i64, u32, i64)>,
    /// Row references kept per side (a row in several windows counts in each).
    rows: [usize; 2],
    peak: [usize; 2],
    out_schema: SchemaRef,
}

impl WindowJoin {
    fn size_slide(&self) -> (i64, i64) {
        self.spec.window.size_slide()
    }

    /// Starts of the windows of `[start, end)` that hold `ts` and have not closed at `wm`.
    fn windows(&self, ts: i64, wm: i64) -> impl Iterator<Item = i64> {
        let (size, slide) = self.size_slide();
        let last_start = ts - ts.rem_euclid(slide);
        let per_row = (size + slide - 1) / slide;
        (0..per_row).map(move |j| last_start - j * slide).filter(move |s| s + size > ts && s + size > wm)
    }

    fn add(&mut self, side: usize, key: u32, row: Row, wm: i64) -> bool {
        if let WindowKind::Session { gap_ms } = self.spec.window {
            if row.ts.saturating_add(gap_ms) <= wm {
                return false;
            }
            self.add_to_session(side, key, row, gap_ms);
            self.stores[side].retain(row.at.0);
            self.rows[side] += 1;
            return true;
        }
        let starts: Vec<i64> = self.windows(row.ts, wm).collect();
        for &s in &starts {
            self.fixed.entry(s).or_default().entry(key).or_default()[side].push(row);
            self.stores[side].retain(row.at.0);
        }
        self.rows[side] += starts.len();
        !starts.is_empty()
    }

    /// Puts a row into its key's session, merging the sessions it bridges.
    fn add_to_session(&mut self, side: usize, key: u32, row: Row, gap: i64) {
        let list = self.sessions.entry(key).or_default();
        let (mut start, mut end) = (row.ts, row.ts.saturating_add(gap));
        let mut merged = Session::default();
        let mut i = 0;
        while i < list.len() {
            let s = &list[i];
            if row.ts < s.end && s.start < row.ts.saturating_add(gap) {
                let s = list.swap_remove(i);
                self.closing.remove(&(s.end, key, s.start));
                start = start.min(s.start);
                end = end.max(s.end);
                for (m, r) in merged.rows.iter_mut().zip(s.rows) {
                    m.extend(r);
                }
            } else {
                i += 1;
            }
        }
        merged.rows[side].push(row);
        merged.start = start;
        merged.end = end;
        self.closing.insert((end, key, start));
        list.push(merged);
    }

    fn process_side(&mut self, side: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows();
        let (ids, null_key) = intern_keys(&mut self.interner, &batch, &self.spec.keys[side])?;
        let wm = cx.watermark.unwrap_or(i64::MIN);
        let times = batch.time.values().clone();
        let slot = self.stores[side].keep(StructArray::from(batch.rows), 1);
        let mut pads = Gather::default();
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        let (mut late, mut no_key) = (0u64, 0u64);
        for (i, &ts) in times.iter().enumerate() {
            let row = Row { ts, at: (slot, i as u32) };
            if null_key.as_ref().is_some_and(|nb| nb.is_null(i)) {
                // A null key equals nothing: an outer side's row is alone in its windows.
                no_key += 1;
                if self.spec.kind.pads(side) {
                    let (size, _) = self.size_slide();
                    let ws: Vec<i64> = match self.spec.window {
                        WindowKind::Session { .. } => vec![ts],
                        _ => self.windows(ts, wm).collect(),
                    };
                    for s in ws {
                        pads.push(ordered(side, Some(row.at), None), s + size - 1);
                        starts.push(s);
                        ends.push(s + size);
                    }
                }
                continue;
            }
            if !self.add(side, ids[i], row, wm) {
                late += 1;
            }
        }
        StepMetrics::add(&cx.metrics.late_dropped, late);
        StepMetrics::add(&cx.metrics.filtered, no_key);
        StepMetrics::add(&cx.metrics.aggregated, n as u64 - late - no_key);
        self.emit(pads, starts, ends, cx)?;
        self.stores[side].release(slot);
        self.peak = [self.peak[0].max(self.rows[0]), self.peak[1].max(self.rows[1])];
        report_state(cx, &self.spec.names, self.rows, self.peak);
        Ok(())
    }

    fn emit(&self, out: Gather, starts: Vec<i64>, ends: Vec<i64>, cx: &mut OpContext<'_>) -> Result<()> {
        let extra: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(starts)), Arc::new(Int64Array::from(ends))];
        out.emit([&self.stores[0], &self.stores[1]], &self.spec.schemas, &self.out_schema, extra, cx)
    }

    /// The output rows of one closed window of one key.
    fn close(&self, rows: &Rows, start: i64, end: i64, out: &mut (Gather, Vec<i64>, Vec<i64>)) {
        let [l, r] = rows;
        let mut push = |pair: [Option<RowRef>; 2]| {
            out.0.push(pair, end - 1);
            out.1.push(start);
            out.2.push(end);
        };
        if !l.is_empty() && !r.is_empty() {
            for a in l {
                for b in r {
                    push([Some(a.at), Some(b.at)]);
                }
            }
        } else {
            for (side, list) in rows.iter().enumerate() {
                if self.spec.kind.pads(side) {
                    for row in list {
                        push(ordered(side, Some(row.at), None));
                    }
                }
            }
        }
    }

    /// Closes every window that ends at or before `wm`.
    fn close_until(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let (size, _) = self.size_slide();
        let mut out = (Gather::default(), Vec::new(), Vec::new());
        let mut done: Vec<Rows> = Vec::new();
        if matches!(self.spec.window, WindowKind::Session { .. }) {
            while let Some(&(end, key, start)) = self.closing.first() {
                if end > wm {
                    break;
                }
                self.closing.pop_first();
                let Some(list) = self.sessions.get_mut(&key) else { continue };
                let Some(i) = list.iter().position(|s| s.start == start) else { continue };
                let s = list.swap_remove(i);
                if list.is_empty() {
                    self.sessions.remove(&key);
                }
                self.close(&s.rows, s.start, s.end, &mut out);
                done.push(s.rows);
            }
        } else {
            while let Some(entry) = self.fixed.first_entry() {
                let start = *entry.key();
                if start.saturating_add(size) > wm {
                    break;
                }
                let mut keys: Vec<(u32, Rows)> = entry.remove().into_iter().collect();
                // Key ids follow arrival, so the output order is the same run to run.
                keys.sort_unstable_by_key(|(k, _)| *k);
                for (_, rows) in keys {
                    self.close(&rows, start, start + size, &mut out);
                    done.push(rows);
                }
            }
        }
        if done.is_empty() {
            return Ok(());
        }
        let (g, starts, ends) = out;
        self.emit(g, starts, ends, cx)?;
        for rows in done {
            for (side, list) in rows.iter().enumerate() {
                self.rows[side] -= list.len();
                for r in list {
                    self.stores[side].release(r.at.0);
                }
            }
        }
        report_state(cx, &self.spec.names, self.rows, self.peak);
        Ok(())
    }

    /// Every kept reference: (key, window start, window end, side, row).
    fn kept(&self) -> Vec<(u32, i64, i64, usize, Row)> {
        let mut out = Vec::with_capacity(self.rows[0] + self.rows[1]);
        let (size, _) = self.size_slide();
        let mut each = |key: u32, start: i64, end: i64, rows: &Rows| {
            for (side, list) in rows.iter().enumerate() {
                out.extend(list.iter().map(|r| (key, start, end, side, *r)));
            }
        };
        for (start, keys) in &self.fixed {
            for (key, rows) in keys {
                each(*key, *start, start + size, rows);
            }
        }
        for (key, list) in &self.sessions {
            for s in list {
                each(*key, s.start, s.end, &s.rows);
            }
        }
        out
    }
}

impl Operator for WindowJoin {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(0, batch, cx)
    }

    fn process_from(&mut self, input: usize, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        self.process_side(side_of(input)?, batch, cx)
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        self.close_until(wm, cx)
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        self.close_until(i64::MAX, cx)
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let kept = self.kept();
        if kept.is_empty() {
            return Ok(None);
        }
        let mut rows = Gather::default();
        for (_, _, _, side, r) in &kept {
            rows.push(ordered(*side, Some(r.at), None), r.ts);
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt8Array::from_iter_values(kept.iter().map(|k| k.3 as u8))),
            Arc::new(Int64Array::from_iter_values(kept.iter().map(|k| k.4.ts))),
            Arc::new(Int64Array::from_iter_values(kept.iter().map(|k| k.1))),
            Arc::new(Int64Array::from_iter_values(kept.iter().map(|k| k.2))),
        ];
        cols.extend(rows.columns([&self.stores[0], &self.stores[1]], &self.spec.schemas)?);
        let own =
            vec![Field::new("window_start", DataType::Int64, false), Field::new("window_end", DataType::Int64, false)];
        let fields = state_fields(own, &self.spec.schemas, &self.spec.names);
        let ids: Vec<u32> = kept.iter().map(|k| k.0).collect();
        crate::snapshot::keyed_table(&self.interner, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let ids = crate::snapshot::read_keys(&mut self.interner, self.spec.keys[0].len(), &state)?;
        let ts = crate::snapshot::i64s(&state, "ts")?.clone();
        let starts = crate::snapshot::i64s(&state, "window_start")?.clone();
        let ends = crate::snapshot::i64s(&state, "window_end")?.clone();
        let rows = restore_rows(&state, &self.spec.schemas, &self.spec.names, &mut self.stores)?;
        for (side, list) in rows.into_iter().enumerate() {
            for (i, at) in list {
                let (key, start, end) = (ids[i], starts.value(i), ends.value(i));
                let row = Row { ts: ts.value(i), at };
                if matches!(self.spec.window, WindowKind::Session { .. }) {
                    let list = self.sessions.entry(key).or_default();
                    match list.iter_mut().find(|s| s.start == start) {
                        Some(s) => s.rows[side].push(row),
                        None => {
                            let mut s = Session { start, end, ..Session::default() };
                            s.rows[side].push(row);
                            list.push(s);
                            self.closing.insert((end, key, start));
                        }
                    }
                } else {
                    self.fixed.entry(start).or_default().entry(key).or_default()[side].push(row);
                }
                self.rows[side] += 1;
            }
        }
        self.peak = self.rows;
        Ok(())
    }
}
