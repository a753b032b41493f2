//! Keyed windows: tumbling, hopping and session, on event time or processing time.
//!
//! State is per (window, key): one accumulator slot per pair (see [`crate::aggregate`]).
//! Tumbling and hopping windows are grouped in buckets by window start, so closing windows on a
//! watermark pops whole buckets off the front of an ordered map; sessions are kept per key and
//! indexed by end time.
//!
//! A window `[start, end)` closes when the watermark reaches `end`; its result row carries the
//! key, `window_start`, `window_end` (ms) and one column per aggregate, with event time
//! `end - 1`. A row whose window has closed is late and follows the [`LatePolicy`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use hashbrown::HashMap;
use weir_core::keys::{key_columns, KeyInterner};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

use crate::aggregate::{Accumulators, AggSpec};
use crate::{field_by_path, leaf_name};

/// Shape of the windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size_ms`, aligned to the epoch.
    Tumbling {
        /// Window length, ms.
        size_ms: i64,
    },
    /// Windows of `size_ms` starting every `slide_ms`; a row falls in `size/slide` of them.
    Hopping {
        /// Window length, ms.
        size_ms: i64,
        /// Distance between window starts, ms.
        slide_ms: i64,
    },
    /// Per key, rows closer than `gap_ms` to each other form one window.
    Session {
        /// Inactivity gap that closes a session, ms.
        gap_ms: i64,
    },
}

impl WindowKind {
    /// Checks the sizes: positive, a hopping slide in `(0, size]`.
    ///
    /// # Errors
    /// A size, slide or gap out of range.
    pub fn check(&self) -> Result<()> {
        match *self {
            Self::Tumbling { size_ms } | Self::Hopping { size_ms, .. } if size_ms <= 0 => {
                Err(CoreError::Config("window size must be positive".into()))
            }
            Self::Hopping { size_ms, slide_ms } if slide_ms <= 0 || slide_ms > size_ms => Err(CoreError::Config(
                format!("hopping window slide must be in (0, size]; got slide {slide_ms} ms for size {size_ms} ms"),
            )),
            Self::Session { gap_ms } if gap_ms <= 0 => Err(CoreError::Config("session gap must be positive".into())),
            _ => Ok(()),
        }
    }

    /// Window length and distance between starts, ms (a session: its gap twice).
    pub fn size_slide(&self) -> (i64, i64) {
        match *self {
            Self::Tumbling { size_ms } => (size_ms, size_ms),
            Self::Hopping { size_ms, slide_ms } => (size_ms, slide_ms),
            Self::Session { gap_ms } => (gap_ms, gap_ms),
        }
    }
}

/// Which clock assigns rows to windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeDomain {
    /// The row's event time; windows close on watermarks.
    #[default]
    Event,
    /// The wall clock when the row is processed; windows close on the wall clock.
    Processing,
}

pub use weir_core::notify::SideWriter;

/// What happens to a row whose window has already closed.
#[derive(Debug, Clone)]
pub enum LatePolicy {
    /// Drop it and count it (`late_dropped`). The default.
    Drop,
    /// Write it to a side output and count it (`late_side`).
    Side(Arc<dyn SideWriter>),
    /// Keep windows `allowed_ms` past their end; a late row within that updates the window and
    /// its result is emitted again (same key and window, new values). Later rows are dropped.
    Update {
        /// Allowed lateness, ms.
        allowed_ms: i64,
    },
}

/// Settings of a window step.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    /// Key column paths; empty for one global window per period.
    pub keys: Vec<String>,
    /// Window shape.
    pub kind: WindowKind,
    /// Which clock.
    pub domain: TimeDomain,
    /// Aggregates, in output order.
    pub aggs: Vec<AggSpec>,
    /// Late-row handling.
    pub late: LatePolicy,
    /// Keys not seen for this long (event time) are forgotten; must cover the window size and
    /// allowed lateness, so only keys without an open window go.
    pub state_ttl: Option<std::time::Duration>,
}

impl WindowSpec {
    /// Checks the spec against the input schema and returns the factory and output schema.
    ///
    /// # Errors
    /// Unknown or non-numeric columns, non-positive sizes, duplicate output names.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        self.kind.check()?;
        if let LatePolicy::Update { allowed_ms } = self.late {
            weir_core::ensure_config!(allowed_ms >= 0, "allowed lateness must not be negative");
        }
        weir_core::ensure_config!(!self.aggs.is_empty(), "a window needs at least one aggregate");
        if let Some(ttl) = self.state_ttl {
            let (size, _) = self.kind.size_slide();
            let allowed = if let LatePolicy::Update { allowed_ms } = self.late { allowed_ms } else { 0 };
            weir_core::ensure_config!(
                i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX) >= size + allowed,
                "state_ttl ({} ms) must be at least the window's size (or session gap) plus its allowed lateness ({} ms)",
                ttl.as_millis(),
                size + allowed
            );
        }
        let mut fields = Vec::new();
        let mut key_types = Vec::new();
        for k in &self.keys {
            let f = field_by_path(input, k)?;
            key_types.push(f.data_type().clone());
            fields.push(Field::new(leaf_name(k), f.data_type().clone(), f.is_nullable()));
        }
        fields.push(Field::new("window_start", DataType::Int64, false));
        fields.push(Field::new("window_end", DataType::Int64, false));
        let agg_inputs = crate::aggregate::input_types(&self.aggs, input)?;
        fields.extend(Accumulators::fields(&self.aggs, &agg_inputs));
        let mut seen = std::collections::HashSet::new();
        for f in &fields {
            if !seen.insert(f.name().clone()) {
                return Err(CoreError::Config(format!(
                    "window output has two columns named `{}`; rename an aggregate",
                    f.name()
                )));
            }
        }
        let out = Arc::new(Schema::new(fields));
        let factory = WindowFactory { spec: Arc::new(self.clone()), out: out.clone(), key_types };
        Ok((Arc::new(factory), out))
    }
}

#[derive(Debug)]
struct WindowFactory {
    spec: Arc<WindowSpec>,
    out: SchemaRef,
    key_types: Vec<DataType>,
}

impl OperatorFactory for WindowFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let funcs: Vec<_> = self.spec.aggs.iter().map(|a| a.func).collect();
        Ok(Box::new(WindowOp {
            spec: self.spec.clone(),
            out: self.out.clone(),
            keys: KeyInterner::new(&self.key_types)?.with_ttl(self.spec.state_ttl),
            acc: Accumulators::new(&funcs),
            buckets: BTreeMap::new(),
            sessions: HashMap::new(),
            session_ends: BTreeSet::new(),
            slots: Vec::new(),
            processing_clock: i64::MIN,
        }))
    }
}

/// The windows sharing one start.
#[derive(Debug, Default)]
struct Bucket {
    slots: HashMap<u32, u32>,
    /// Keys in first-seen order, so output order is deterministic.
    order: Vec<u32>,
    fired: bool,
    dirty: Vec<u32>,
    /// Keys whose window already fired on another worker before a restore merged state from
    /// workers whose watermarks differed: skipped when this bucket fires.
    fired_keys: hashbrown::HashSet<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    start: i64,
    /// Exclusive end: last row's time + gap.
    end: i64,
    slot: u32,
}

#[derive(Debug)]
struct WindowOp {
    spec: Arc<WindowSpec>,
    out: SchemaRef,
    keys: KeyInterner,
    acc: Accumulators,
    buckets: BTreeMap<i64, Bucket>,
    sessions: HashMap<u32, Vec<Session>>,
    session_ends: BTreeSet<(i64, u32, i64)>,
    slots: Vec<u32>,
    processing_clock: i64,
}

const SKIP: u32 = u32::MAX;

impl WindowOp {
    fn size_slide(&self) -> (i64, i64) {
        self.spec.kind.size_slide()
    }

    fn allowed(&self) -> i64 {
        match self.spec.late {
            LatePolicy::Update { allowed_ms } => allowed_ms,
            _ => 0,
        }
    }

    /// Input values of each aggregate as f64.
    fn values(&self, rows: &RecordBatch) -> Result<Vec<Option<Float64Array>>> {
        crate::aggregate::input_values(&self.spec.aggs, rows)
    }

    fn bucket_slot(&mut self, start: i64, key: u32) -> (u32, bool) {
        let b = self.buckets.entry(start).or_default();
        match b.slots.get(&key) {
            Some(s) => (*s, b.fired),
            None => {
                let s = self.acc.alloc();
                b.slots.insert(key, s);
                b.order.push(key);
                (s, b.fired)
            }
        }
    }

    fn process_fixed(
        &mut self,
        batch: &Batch,
        times: &Int64Array,
        key_ids: &[u32],
        values: &[Option<Float64Array>],
        wm: Option<i64>,
        late: &mut Vec<u32>,
    ) -> u64 {
        let (size, slide) = self.size_slide();
        let allowed = self.allowed();
        let per_row = (size + slide - 1) / slide;
        let mut folded = vec![false; batch.num_rows()];
        for j in 0..per_row {
            self.slots.clear();
            for (i, &t) in times.values().iter().enumerate() {
                // Starts of windows containing t: last_start, last_start - slide, ...
                let last_start = t - t.rem_euclid(slide);
                let start = last_start - j * slide;
                let end = start + size;
                if end <= t {
                    self.slots.push(SKIP);
                    continue;
                }
                let closed = wm.is_some_and(|w| end <= w);
                if closed && (allowed == 0 || wm.is_some_and(|w| end + allowed <= w)) {
                    self.slots.push(SKIP);
                    continue;
                }
                let (slot, fired) = self.bucket_slot(start, key_ids[i]);
                if fired {
                    if let Some(b) = self.buckets.get_mut(&start) {
                        b.dirty.push(key_ids[i]);
                    }
                }
                folded[i] = true;
                self.slots.push(slot);
            }
            let slots = std::mem::take(&mut self.slots);
            self.acc.update(&slots, values, times);
            self.slots = slots;
        }
        let mut n = 0;
        for (i, f) in folded.iter().enumerate() {
            if *f {
                n += 1;
            } else {
                late.push(i as u32);
            }
        }
        n
    }

    fn process_session(
        &mut self,
        times: &Int64Array,
        key_ids: &[u32],
        values: &[Option<Float64Array>],
        wm: Option<i64>,
        late: &mut Vec<u32>,
    ) -> u64 {
        let WindowKind::Session { gap_ms } = self.spec.kind else {
            return 0;
        };
        let mut n = 0;
        let one_time = |i: usize| Int64Array::from(vec![times.value(i)]);
        for (i, &t) in times.values().iter().enumerate() {
            if wm.is_some_and(|w| t + gap_ms <= w) {
                late.push(i as u32);
                continue;
            }
            let key = key_ids[i];
            let list = self.sessions.entry(key).or_default();
            let (mut start, mut end) = (t, t + gap_ms);
            let mut slot = None;
            let mut merged: Vec<Session> = Vec::new();
            list.retain(|s| {
                if t < s.end && s.start < t + gap_ms {
                    merged.push(*s);
                    false
                } else {
                    true
                }
            });
            for s in &merged {
                start = start.min(s.start);
                end = end.max(s.end);
                self.session_ends.remove(&(s.end, key, s.start));
                match slot {
                    None => slot = Some(s.slot),
                    Some(into) => self.acc.merge(into, s.slot),
                }
            }
            let slot = match slot {
                Some(s) => s,
                None => self.acc.alloc(),
            };
            // Fold the row into the (possibly merged) session.
            let row_vals: Vec<Option<Float64Array>> =
                values.iter().map(|v| v.as_ref().map(|c| c.slice(i, 1))).collect();
            self.acc.update(&[slot], &row_vals, &one_time(i));
            let list = self.sessions.entry(key).or_default();
            list.push(Session { start, end, slot });
            self.session_ends.insert((end, key, start));
            n += 1;
        }
        n
    }

    fn emit(
        &mut self,
        key_ids: Vec<u32>,
        starts: Vec<i64>,
        ends: Vec<i64>,
        slots: &[u32],
        cx: &mut OpContext<'_>,
    ) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        // Without keys there is one global window per period, and no key columns.
        let mut cols: Vec<ArrayRef> =
            if self.spec.keys.is_empty() { Vec::new() } else { self.keys.columns(&key_ids)? };
        let time = Int64Array::from(ends.iter().map(|e| e - 1).collect::<Vec<_>>());
        cols.push(Arc::new(Int64Array::from(starts)));
        cols.push(Arc::new(Int64Array::from(ends)));
        // Accumulators are f64; results whose type follows their column go back to it (a sum
        // of integers is exact in f64 up to 2^53).
        let first_agg = cols.len();
        for (i, c) in self.acc.finish(slots).into_iter().enumerate() {
            let want = self.out.field(first_agg + i).data_type();
            cols.push(if c.data_type() == want { c } else { arrow_cast::cast(&c, want)? });
        }
        let rows = RecordBatch::try_new(self.out.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rows.num_rows() as u64);
        cx.emit(Batch::new(rows, time)?);
        Ok(())
    }

    /// Emits every window ending at or before `wm`, and purges those past allowed lateness.
    fn fire(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        let (size, _) = self.size_slide();
        let allowed = self.allowed();
        let (mut keys, mut starts, mut ends, mut slots) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if let WindowKind::Session { .. } = self.spec.kind {
            while let Some(&(end, key, start)) = self.session_ends.first() {
                if end > wm {
                    break;
                }
                self.session_ends.pop_first();
                if let Some(list) = self.sessions.get_mut(&key) {
                    if let Some(pos) = list.iter().position(|s| s.start == start) {
                        let s = list.swap_remove(pos);
                        keys.push(key);
                        starts.push(s.start);
                        ends.push(s.end);
                        slots.push(s.slot);
                    }
                    if list.is_empty() {
                        self.sessions.remove(&key);
                    }
                }
            }
            self.emit(keys, starts, ends, &slots, cx)?;
            for s in slots {
                self.acc.release(s);
            }
            return Ok(());
        }
        let mut purge = Vec::new();
        for (&start, b) in self.buckets.iter_mut() {
            let end = start.saturating_add(size);
            if end > wm {
                break;
            }
            if !b.fired {
                b.fired = true;
                for k in b.order.iter().filter(|k| !b.fired_keys.contains(*k)) {
                    keys.push(*k);
                    starts.push(start);
                    ends.push(end);
                    slots.push(b.slots[k]);
                }
            }
            if end.saturating_add(allowed) <= wm {
                purge.push(start);
            }
        }
        self.emit(keys, starts, ends, &slots, cx)?;
        for start in purge {
            if let Some(b) = self.buckets.remove(&start) {
                for s in b.slots.values() {
                    self.acc.release(*s);
                }
            }
        }
        Ok(())
    }

    /// Re-emits windows updated by late rows (allowed lateness).
    fn emit_updates(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        let (size, _) = self.size_slide();
        let (mut keys, mut starts, mut ends, mut slots) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (&start, b) in self.buckets.iter_mut() {
            if b.dirty.is_empty() {
                continue;
            }
            let mut dirty = std::mem::take(&mut b.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for k in dirty {
                keys.push(k);
                starts.push(start);
                ends.push(start + size);
                slots.push(b.slots[&k]);
            }
        }
        self.emit(keys, starts, ends, &slots, cx)
    }
}

impl Operator for WindowOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let times = match self.spec.domain {
            TimeDomain::Event => batch.time.clone(),
            TimeDomain::Processing => {
                let now = weir_core::deadletter::now_ms().max(self.processing_clock);
                self.processing_clock = now;
                Int64Array::from(vec![now; batch.num_rows()])
            }
        };
        let wm = match self.spec.domain {
            TimeDomain::Event => cx.watermark,
            TimeDomain::Processing => None,
        };
        let key_cols = key_columns(&batch.rows, &self.spec.keys)?;
        let key_ids: Vec<u32> = if key_cols.is_empty() {
            vec![0; batch.num_rows()]
        } else {
            self.keys.intern_at(&key_cols, Some(&times))?.to_vec()
        };
        let values = self.values(&batch.rows)?;
        let mut late = Vec::new();
        let folded = match self.spec.kind {
            WindowKind::Session { .. } => self.process_session(&times, &key_ids, &values, wm, &mut late),
            _ => self.process_fixed(&batch, &times, &key_ids, &values, wm, &mut late),
        };
        StepMetrics::add(&cx.metrics.aggregated, folded);
        if !late.is_empty() {
            let n = late.len() as u64;
            match &self.spec.late {
                LatePolicy::Side(w) => {
                    let rows = batch.take(&UInt32Array::from(late))?;
                    w.write(&rows.rows)?;
                    StepMetrics::add(&cx.metrics.late_side, n);
                }
                _ => StepMetrics::add(&cx.metrics.late_dropped, n),
            }
        }
        if matches!(self.spec.late, LatePolicy::Update { .. }) {
            self.emit_updates(cx)?;
        }
        Ok(())
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if self.spec.domain == TimeDomain::Event || wm == weir_core::batch::END_OF_TIME {
            self.fire(wm, cx)?;
        }
        if self.spec.state_ttl.is_some() && wm != weir_core::batch::END_OF_TIME {
            // A key with a window still open (or kept for allowed lateness) stays.
            let (buckets, sessions) = (&self.buckets, &self.sessions);
            let gone = self
                .keys
                .expire(wm, |id| sessions.contains_key(&id) || buckets.values().any(|b| b.slots.contains_key(&id)));
            crate::note_expired(cx, gone.len(), self.keys.len());
        }
        Ok(())
    }

    fn on_tick(&mut self, now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if self.spec.domain == TimeDomain::Processing {
            self.fire(now_ms, cx)?;
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        (self.spec.domain == TimeDomain::Processing).then(|| std::time::Duration::from_millis(50))
    }

    /// One row per open window and key: start, end, whether it fired, and the raw
    /// accumulator values `acc0..`.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let (size, _) = self.size_slide();
        let (mut ids, mut starts, mut ends, mut fired, mut slots) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (&start, b) in &self.buckets {
            for k in &b.order {
                ids.push(*k);
                starts.push(start);
                ends.push(start.saturating_add(size));
                fired.push(b.fired || b.fired_keys.contains(k));
                slots.push(b.slots[k]);
            }
        }
        let mut keyed: Vec<(&u32, &Vec<Session>)> = self.sessions.iter().collect();
        keyed.sort_by_key(|(k, _)| **k);
        for (k, list) in keyed {
            for sess in list {
                ids.push(*k);
                starts.push(sess.start);
                ends.push(sess.end);
                fired.push(false);
                slots.push(sess.slot);
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let mut fields = vec![
            Field::new("start", DataType::Int64, false),
            Field::new("end", DataType::Int64, false),
            Field::new("fired", DataType::Boolean, false),
        ];
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(starts)),
            Arc::new(Int64Array::from(ends)),
            Arc::new(arrow_array::BooleanArray::from(fired)),
        ];
        for j in 0..self.acc.stride() {
            fields.push(Field::new(format!("acc{j}"), DataType::Float64, false));
            cols.push(crate::snapshot::floats(slots.iter().map(|s| self.acc.raw(*s)[j]).collect()));
        }
        crate::snapshot::keyed_table(&self.keys, !self.spec.keys.is_empty(), &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, t: RecordBatch) -> Result<()> {
        use crate::snapshot::{bools, f64s, i64s, read_keys};
        let ids = read_keys(&mut self.keys, self.spec.keys.len(), &t)?;
        let (starts, ends, fired) = (i64s(&t, "start")?, i64s(&t, "end")?, bools(&t, "fired")?);
        let accs = (0..self.acc.stride()).map(|j| f64s(&t, &format!("acc{j}"))).collect::<Result<Vec<_>>>()?;
        let mut raw = vec![0.0; accs.len()];
        for (i, &key) in ids.iter().enumerate() {
            for (j, a) in accs.iter().enumerate() {
                raw[j] = a.value(i);
            }
            let slot = self.acc.alloc_raw(&raw);
            let (start, end) = (starts.value(i), ends.value(i));
            if let WindowKind::Session { .. } = self.spec.kind {
                self.sessions.entry(key).or_default().push(Session { start, end, slot });
                self.session_ends.insert((end, key, start));
                continue;
            }
            let b = self.buckets.entry(start).or_default();
            b.slots.insert(key, slot);
            b.order.push(key);
            if fired.value(i) {
                b.fired_keys.insert(key);
            }
        }
        // A bucket is fired when every key in it is.
        for b in self.buckets.values_mut() {
            if !b.fired && !b.order.is_empty() && b.order.iter().all(|k| b.fired_keys.contains(k)) {
                b.fired = true;
                b.fired_keys.clear();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
