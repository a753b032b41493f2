//! Quarantine: a key (say, a device) that keeps producing dead letters is taken out of the
//! pipeline for a cool-down, so one broken device cannot flood the dead-letter output or
//! starve the rest.
//!
//! Failures are noted as dead letters are written ([`QuarantiningDeadLetters`]); a key with
//! more than `max_failures` within `window` is quarantined until `cool_down` has passed. While
//! any key is quarantined, sources divert that key's rows to the quarantine output before they
//! enter the pipeline (counted as `quarantined`). Keys are read from decoded rows, or from a
//! failed record's payload when it is a JSON object.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Array, BooleanArray, RecordBatch};

use crate::batch::Batch;
use crate::deadletter::{now_ms, DeadLetter, DeadLetterSink, ErrorKind, Payload};
use crate::error::Result;
use crate::ids::StepId;
use crate::time::column_by_path;

/// The step name the quarantine's bookkeeping is stored under in a checkpoint.
pub const STATE_STEP: &str = "__quarantine";

/// Quarantine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineSpec {
    /// Key column paths (e.g. `device_id`).
    pub keys: Vec<String>,
    /// Dead letters a key may produce within `window` before it is quarantined.
    pub max_failures: u32,
    /// The sliding window over which failures are counted.
    pub window: Duration,
    /// How long a quarantined key stays out.
    pub cool_down: Duration,
}

/// When a key is quarantined, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Dead letters a key may produce within `window` before it is quarantined.
    pub max_failures: u32,
    /// The sliding window over which failures are counted.
    pub window: Duration,
    /// How long a quarantined key stays out.
    pub cool_down: Duration,
}

#[derive(Debug, Default)]
struct KeyState {
    failures: VecDeque<Instant>,
    until: Option<Instant>,
}

/// The keys the quarantine knows, and when it last swept them.
#[derive(Debug, Default)]
struct Book {
    keys: HashMap<String, KeyState>,
    swept: Option<Instant>,
}

/// How often the book is swept: released keys leave the quarantine at most this late, and
/// keys with no failure left inside the window are forgotten at most this late.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A quarantined key, as the HTTP API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedKey {
    /// The key (several key columns joined by U+001F).
    pub key: String,
    /// When the cool-down ends, ms since the epoch.
    pub until_ms: i64,
}

/// A change the quarantine tells its listener of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineChange {
    /// The key was taken out until `until_ms` (wall clock) after `failures` dead letters.
    Quarantined {
        /// The key.
        key: String,
        /// Dead letters within the window that tipped it over.
        failures: u32,
        /// End of the cool-down, ms since the epoch.
        until_ms: i64,
    },
    /// The key is back in: its cool-down ended, or someone released it early.
    Released {
        /// The key.
        key: String,
        /// Released through the API rather than by its cool-down.
        early: bool,
    },
}

/// Hears of keys going in and out of quarantine (the pipeline turns them into alert events,
/// so someone learns of a broken device without reading logs). Called outside the
/// quarantine's lock; it must not block.
pub type QuarantineListener = Arc<dyn Fn(&QuarantineChange) + Send + Sync>;

/// The quarantine of one job, shared by all workers.
pub struct Quarantine {
    spec: QuarantineSpec,
    /// `max_failures`, `window` and `cool_down` as they are now: they can change while the
    /// job runs ([`Quarantine::set_limits`]).
    limits: std::sync::RwLock<Limits>,
    listener: std::sync::OnceLock<QuarantineListener>,
    book: Mutex<Book>,
    active: AtomicUsize,
    output: Arc<dyn DeadLetterSink>,
    /// Keys quarantined so far.
    pub quarantined_keys: AtomicU64,
    /// Keys released after their cool-down.
    pub released_keys: AtomicU64,
}

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl Quarantine {
    /// Sets who hears of keys going in and out (once; later calls are ignored).
    pub fn listen(&self, listener: QuarantineListener) {
        let _ = self.listener.set(listener);
    }

    fn tell(&self, change: &QuarantineChange) {
        if let Some(l) = self.listener.get() {
            l(change);
        }
    }

    /// A quarantine writing diverted rows to `output`.
    pub fn new(spec: QuarantineSpec, output: Arc<dyn DeadLetterSink>) -> Self {
        let limits = Limits { max_failures: spec.max_failures, window: spec.window, cool_down: spec.cool_down };
        Self {
            spec,
            limits: std::sync::RwLock::new(limits),
            listener: std::sync::OnceLock::new(),
            book: Mutex::new(Book::default()),
            active: AtomicUsize::new(0),
            output,
            quarantined_keys: AtomicU64::new(0),
            released_keys: AtomicU64::new(0),
        }
    }

    /// The limits now.
    pub fn limits(&self) -> Limits {
        *self.limits.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the limits while the job runs: the next failure is judged by them; keys in
    /// quarantine keep the cool-down they were given.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Releases keys whose cool-down has ended and forgets keys with nothing left to remember,
    /// at most once per [`SWEEP_EVERY`]: without it a stream of ever-new failing keys would
    /// grow the book without end, and a released key that never shows up again would keep
    /// every batch paying for the key lookup.
    fn sweep(&self, book: &mut Book, now: Instant) -> Vec<QuarantineChange> {
        let mut released = Vec::new();
        if book.swept.is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY) {
            return released;
        }
        book.swept = Some(now);
        let window = self.limits().window;
        book.keys.retain(|key, st| {
            if st.until.is_some_and(|u| u <= now) {
                st.until = None;
                self.active.fetch_sub(1, Ordering::Relaxed);
                self.released_keys.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key, "Key released from quarantine.");
                released.push(QuarantineChange::Released { key: key.clone(), early: false });
            }
            while st.failures.front().is_some_and(|t| now.saturating_duration_since(*t) > window) {
                st.failures.pop_front();
            }
            st.until.is_some() || !st.failures.is_empty()
        });
        released
    }

    /// Keys the quarantine remembers (quarantined, or with failures inside the window).
    pub fn tracked_keys(&self) -> usize {
        self.lock().keys.len()
    }

    /// The keys quarantined at `now`, with the end of their cool-down, by key.
    pub fn list(&self, now: Instant, now_ms: i64) -> Vec<QuarantinedKey> {
        let mut book = self.lock();
        let released = self.sweep(&mut book, now);
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut out: Vec<QuarantinedKey> = book
            .keys
            .iter()
            .filter_map(|(k, st)| {
                let u = st.until.filter(|u| *u > now)?;
                Some(QuarantinedKey { key: k.clone(), until_ms: now_ms.saturating_add(ms(u.duration_since(now))) })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        drop(book);
        released.iter().for_each(|c| self.tell(c));
        out
    }

    /// Ends `key`'s cool-down now (an operator fixed the device); its earlier failures are
    /// forgotten. Returns false when the key was not quarantined.
    pub fn release(&self, key: &str, now: Instant) -> bool {
        let mut book = self.lock();
        let Some(st) = book.keys.get_mut(key) else { return false };
        if st.until.is_none_or(|u| u <= now) {
            return false;
        }
        book.keys.remove(key);
        drop(book);
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.released_keys.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key, "Key released from quarantine early, through the API.");
        self.tell(&QuarantineChange::Released { key: key.to_string(), early: true });
        true
    }

    /// Notes a failure of `key` at `now`; returns true when this failure quarantines it.
    pub fn note_failure(&self, key: &str, now: Instant) -> bool {
        let mut book = self.lock();
        let mut changes = self.sweep(&mut book, now);
        let st = book.keys.entry(key.to_string()).or_default();
        let mut quarantined = false;
        let Limits { max_failures, window, cool_down } = self.limits();
        if st.until.is_none_or(|u| u <= now) {
            st.failures.push_back(now);
            while st.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
                st.failures.pop_front();
            }
            if st.failures.len() > max_failures as usize {
                st.failures.clear();
                st.until = Some(now + cool_down);
                self.active.fetch_add(1, Ordering::Relaxed);
                self.quarantined_keys.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    key,
                    failures = max_failures + 1,
                    cool_down_s = cool_down.as_secs_f64(),
                    "Key quarantined: its rows go to the quarantine output."
                );
                let cool = i64::try_from(cool_down.as_millis()).unwrap_or(i64::MAX);
                changes.push(QuarantineChange::Quarantined {
                    key: key.to_string(),
                    failures: max_failures + 1,
                    until_ms: now_ms().saturating_add(cool),
                });
                quarantined = true;
            }
        }
        drop(book);
        changes.iter().for_each(|c| self.tell(c));
        quarantined
    }

    /// Whether `key` is quarantined at `now`; releases it when its cool-down has passed.
    pub fn is_quarantined(&self, key: &str, now: Instant) -> bool {
        if self.active.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut told = Vec::new();
        let out = self.check(&mut self.lock().keys, key, now, &mut told);
        told.iter().for_each(|c| self.tell(c));
        out
    }

    /// Whether `key` is out at `now`; a key whose cool-down ended is released here, and the
    /// release noted in `told` for the listener.
    fn check(
        &self,
        keys: &mut HashMap<String, KeyState>,
        key: &str,
        now: Instant,
        told: &mut Vec<QuarantineChange>,
    ) -> bool {
        let Some(st) = keys.get_mut(key) else { return false };
        match st.until {
            Some(u) if u > now => true,
            Some(_) => {
                st.until = None;
                self.active.fetch_sub(1, Ordering::Relaxed);
                self.released_keys.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key, "Key released from quarantine.");
                told.push(QuarantineChange::Released { key: key.to_string(), early: false });
                false
            }
            None => false,
        }
    }

    /// Number of keys quarantined right now (a key whose cool-down ended is released on its
    /// next row, or by the next sweep, at most [`SWEEP_EVERY`] later).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Removes the rows of quarantined keys from a batch, writes them to the quarantine output
    /// and returns the rest with the number diverted.
    ///
    /// # Errors
    /// A key column missing from the batch, or the output failing.
    pub fn divert(&self, batch: Batch, step: &StepId, origin: &str) -> Result<(Batch, u64)> {
        if self.active() == 0 {
            return Ok((batch, 0));
        }
        let now = Instant::now();
        let released = {
            let mut book = self.lock();
            self.sweep(&mut book, now)
        };
        released.iter().for_each(|c| self.tell(c));
        if self.active() == 0 {
            return Ok((batch, 0));
        }
        let keys = key_texts(&batch.rows, &self.spec.keys)?;
        let mut told = Vec::new();
        let mask: Vec<bool> = {
            let mut book = self.lock();
            keys.iter().map(|k| !k.as_deref().is_some_and(|k| self.check(&mut book.keys, k, now, &mut told))).collect()
        };
        told.iter().for_each(|c| self.tell(c));
        let diverted = mask.iter().filter(|k| !**k).count();
        if diverted == 0 {
            return Ok((batch, 0));
        }
        let time = now_ms();
        let letters = mask
            .iter()
            .enumerate()
            .filter(|(_, keep)| !**keep)
            .map(|(i, _)| DeadLetter {
                payload: Payload::Row(batch.rows.slice(i, 1)),
                kind: ErrorKind::Quarantined,
                reason: format!("key `{}` is quarantined", keys[i].as_deref().unwrap_or_default()),
                step: step.clone(),
                origin: origin.to_string(),
                position: None,
                time_ms: time,
                attempts: 1,
                first_failure_ms: None,
            })
            .collect();
        self.output.write(letters)?;
        Ok((batch.filter(&BooleanArray::from(mask))?, diverted as u64))
    }

    /// The quarantine's bookkeeping for a checkpoint: per key, the failures still inside the
    /// window and the end of a running cool-down, as wall-clock ms (instants do not survive
    /// a restart). Columns `key` (utf8), `kind` (`failure` or `until`), `at_ms` (int64).
    /// `None` when there is nothing to keep.
    ///
    /// # Errors
    /// Only if the table cannot be built.
    pub fn snapshot(&self, now: Instant, now_ms: i64) -> Result<Option<RecordBatch>> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let (mut keys, mut kinds, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for (k, st) in &self.lock().keys {
            for f in &st.failures {
                if now.duration_since(*f) <= self.limits().window {
                    keys.push(k.clone());
                    kinds.push("failure");
                    at.push(now_ms - ms(now.duration_since(*f)));
                }
            }
            if let Some(u) = st.until.filter(|u| *u > now) {
                keys.push(k.clone());
                kinds.push("until");
                at.push(now_ms + ms(u.duration_since(now)));
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        let schema = Arc::new(arrow_schema::Schema::new(vec![
            arrow_schema::Field::new("key", arrow_schema::DataType::Utf8, false),
            arrow_schema::Field::new("kind", arrow_schema::DataType::Utf8, false),
            arrow_schema::Field::new("at_ms", arrow_schema::DataType::Int64, false),
        ]));
        let cols: Vec<arrow_array::ArrayRef> = vec![
            Arc::new(arrow_array::StringArray::from(keys)),
            Arc::new(arrow_array::StringArray::from(kinds)),
            Arc::new(arrow_array::Int64Array::from(at)),
        ];
        Ok(Some(RecordBatch::try_new(schema, cols)?))
    }

    /// Takes back what [`Quarantine::snapshot`] wrote: failures still inside the window count
    /// again, and keys whose cool-down has not ended stay quarantined for the rest of it.
    ///
    /// # Errors
    /// A table of another shape.
    pub fn restore(&self, tables: &[RecordBatch], now: Instant, now_ms: i64) -> Result<()> {
        use arrow_array::cast::AsArray as _;
        let bad = || crate::CoreError::Config("the checkpoint's quarantine table has an unexpected shape".into());
        let mut book = self.lock();
        let map = &mut book.keys;
        for t in tables {
            let col = |name: &str| t.column_by_name(name).ok_or_else(bad);
            let (keys, kinds) = (col("key")?.as_string_opt::<i32>().ok_or_else(bad)?, col("kind")?);
            let kinds = kinds.as_string_opt::<i32>().ok_or_else(bad)?;
            let at = col("at_ms")?.as_primitive_opt::<arrow_array::types::Int64Type>().ok_or_else(bad)?;
            for i in 0..t.num_rows() {
                let offset = at.value(i) - now_ms;
                let instant = if offset >= 0 {
                    now + Duration::from_millis(offset.unsigned_abs())
                } else {
                    now.checked_sub(Duration::from_millis(offset.unsigned_abs())).unwrap_or(now)
                };
                let st = map.entry(keys.value(i).to_string()).or_default();
                match kinds.value(i) {
                    "failure" if offset.unsigned_abs() <= self.limits().window.as_millis() as u64 => {
                        st.failures.push_back(instant);
                    }
                    "until" if offset > 0 && st.until.is_none() => {
                        st.until = Some(instant);
                        self.active.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        for st in map.values_mut() {
            st.failures.make_contiguous().sort();
        }
        Ok(())
    }

    /// The key of a dead letter, if it can be read: from a decoded row, or from a payload that
    /// is a JSON object.
    pub fn key_of(&self, letter: &DeadLetter) -> Option<String> {
        match &letter.payload {
            Payload::Row(b) => key_texts(b, &self.spec.keys).ok()?.into_iter().next().flatten(),
            Payload::Raw(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                let parts: Vec<String> = self
                    .spec
                    .keys
                    .iter()
                    .map(|k| {
                        let f = k.split('.').fold(&v, |acc, p| &acc[p]);
                        match f {
                            serde_json::Value::String(s) => Some(s.clone()),
                            serde_json::Value::Null => None,
                            other => Some(other.to_string()),
                        }
                    })
                    .collect::<Option<_>>()?;
                Some(parts.join("\u{1f}"))
            }
        }
    }
}

/// The key of each row as text (columns joined by a unit separator, U+001F); `None` where
/// null.
///
/// # Errors
/// Unknown columns, or types without a text form.
pub fn key_texts(rows: &RecordBatch, paths: &[String]) -> Result<Vec<Option<String>>> {
    let cols = paths.iter().map(|p| column_by_path(rows, p)).collect::<Result<Vec<_>>>()?;
    let mut out = vec![Some(String::new()); rows.num_rows()];
    for (ci, c) in cols.iter().enumerate() {
        let fmt = arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &Default::default())?;
        for (i, slot) in out.iter_mut().enumerate() {
            if c.is_null(i) {
                *slot = None;
            } else if let Some(s) = slot.as_mut() {
                if ci > 0 {
                    s.push('\u{1f}');
                }
                s.push_str(&fmt.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// Writes dead letters on, noting each one's key with the quarantine.
#[derive(Debug)]
pub struct QuarantiningDeadLetters {
    /// Where the dead letters go.
    pub inner: Arc<dyn DeadLetterSink>,
    /// The quarantine told about them.
    pub quarantine: Arc<Quarantine>,
}

impl DeadLetterSink for QuarantiningDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        let now = Instant::now();
        for l in &letters {
            if let Some(k) = self.quarantine.key_of(l) {
                self.quarantine.note_failure(&k, now);
            }
        }
        self.inner.write(letters)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()?;
        self.quarantine.output.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryDeadLetters;

    //  failures of key a (K = 2, window 10 s, cool-down 60 s):
    //  t=0 x   t=5 x   t=20 x   t=21 x   t=22 x  -> quarantined at 22 (3 within 10 s)
    //  t=50: still out;  t=83: released
    #[test]
    fn quarantines_after_k_failures_in_the_window_and_releases() {
        let q = Quarantine::new(
            QuarantineSpec {
                keys: vec!["k".into()],
                max_failures: 2,
                window: Duration::from_secs(10),
                cool_down: Duration::from_secs(60),
            },
            Arc::new(MemoryDeadLetters::default()),
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!q.note_failure("a", at(0)));
        assert!(!q.note_failure("a", at(5)));
        assert!(!q.note_failure("a", at(20)), "the first two fell out of the window");
        assert!(!q.note_failure("a", at(21)));
        assert!(q.note_failure("a", at(22)));
        assert!(q.is_quarantined("a", at(50)));
        assert!(!q.is_quarantined("b", at(50)));
        assert_eq!(q.active(), 1);
        assert!(!q.is_quarantined("a", at(83)));
        assert_eq!((q.active(), q.released_keys.load(Ordering::Relaxed)), (0, 1));
    }

    /// Limits changed while running judge the next failure; a key already out keeps the
    /// cool-down it was given.
    #[test]
    fn changed_limits_judge_the_next_failure() {
        let q = Quarantine::new(spec(5), Arc::new(MemoryDeadLetters::default()));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in 0..3 {
            assert!(!q.note_failure("a", at(s)), "5 allowed");
        }
        q.set_limits(Limits { max_failures: 3, window: Duration::from_secs(10), cool_down: Duration::from_secs(5) });
        assert!(q.note_failure("a", at(3)), "the fourth failure is past the new limit of 3");
        assert!(q.is_quarantined("a", at(7)) && !q.is_quarantined("a", at(9)), "for the new cool-down");
        assert_eq!(q.limits().max_failures, 3);
    }

    fn spec(max_failures: u32) -> QuarantineSpec {
        QuarantineSpec {
            keys: vec!["k".into()],
            max_failures,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(60),
        }
    }

    #[test]
    fn keys_without_failures_in_the_window_are_forgotten() {
        let q = Quarantine::new(spec(5), Arc::new(MemoryDeadLetters::default()));
        let t0 = Instant::now();
        // Ever-new keys failing once each: the book holds only those of the last window.
        for s in 0..100u64 {
            for k in 0..100u64 {
                q.note_failure(&format!("dev-{s}-{k}"), t0 + Duration::from_secs(s));
            }
        }
        assert!(q.tracked_keys() <= 1200, "{} keys remembered", q.tracked_keys());
        q.note_failure("late", t0 + Duration::from_secs(200));
        assert_eq!(q.tracked_keys(), 1);
    }

    #[test]
    fn a_released_key_stops_costing_work_without_another_row() {
        let q = Quarantine::new(spec(0), Arc::new(MemoryDeadLetters::default()));
        let t0 = Instant::now();
        assert!(q.note_failure("a", t0));
        assert_eq!(q.active(), 1);
        assert_eq!(q.list(t0, 1_000).len(), 1);
        // Key `a` never shows up again; the next sweep after its cool-down releases it.
        assert!(q.list(t0 + Duration::from_secs(61), 61_000).is_empty());
        assert_eq!(q.active(), 0, "divert skips every batch again");
        assert_eq!(q.tracked_keys(), 0);
    }

    #[test]
    fn the_listener_hears_keys_go_out_and_come_back() {
        let q = Quarantine::new(spec(0), Arc::new(MemoryDeadLetters::default()));
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        q.listen(Arc::new(move |c: &QuarantineChange| h.lock().unwrap().push(c.clone())));
        let t0 = Instant::now();
        q.note_failure("a", t0);
        q.note_failure("b", t0);
        assert!(q.release("b", t0 + Duration::from_secs(1)));
        assert!(!q.is_quarantined("a", t0 + Duration::from_secs(61)));
        let heard = heard.lock().unwrap().clone();
        assert!(matches!(&heard[0], QuarantineChange::Quarantined { key, failures: 1, .. } if key == "a"), "{heard:?}");
        assert!(matches!(&heard[1], QuarantineChange::Quarantined { key, .. } if key == "b"));
        assert_eq!(heard[2], QuarantineChange::Released { key: "b".into(), early: true });
        assert_eq!(heard[3], QuarantineChange::Released { key: "a".into(), early: false });
        assert_eq!(heard.len(), 4);
    }

    #[test]
    fn keys_are_listed_and_released_early() {
        let q = Quarantine::new(spec(0), Arc::new(MemoryDeadLetters::default()));
        let t0 = Instant::now();
        q.note_failure("b", t0);
        q.note_failure("a", t0);
        let listed = q.list(t0 + Duration::from_secs(1), 1_000_000);
        assert_eq!(
            listed,
            vec![
                QuarantinedKey { key: "a".into(), until_ms: 1_059_000 },
                QuarantinedKey { key: "b".into(), until_ms: 1_059_000 }
            ]
        );
        assert!(q.release("a", t0 + Duration::from_secs(2)));
        assert!(!q.release("a", t0 + Duration::from_secs(2)), "not quarantined any more");
        assert!(!q.release("zzz", t0));
        assert!(!q.is_quarantined("a", t0 + Duration::from_secs(3)));
        assert!(q.is_quarantined("b", t0 + Duration::from_secs(3)));
        assert_eq!(q.active(), 1);
    }

    #[test]
    fn bookkeeping_survives_a_snapshot_and_restore() {
        let spec = QuarantineSpec {
            keys: vec!["k".into()],
            max_failures: 2,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(60),
        };
        let q = Quarantine::new(spec.clone(), Arc::new(MemoryDeadLetters::default()));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in [0, 1, 2] {
            q.note_failure("out", at(s));
        }
        q.note_failure("flaky", at(1));
        q.note_failure("flaky", at(2));
        // Snapshot at t=3 (wall clock 1,000,000 ms), restore in a new process 1 s later.
        let table = q.snapshot(at(3), 1_000_000).unwrap().unwrap();
        let r = Quarantine::new(spec, Arc::new(MemoryDeadLetters::default()));
        let t1 = Instant::now();
        r.restore(&[table], t1, 1_001_000).unwrap();
        assert_eq!(r.active(), 1);
        assert!(r.is_quarantined("out", t1 + Duration::from_secs(50)), "the cool-down goes on");
        assert!(!r.is_quarantined("out", t1 + Duration::from_secs(60)), "and ends when it would have");
        assert!(r.note_failure("flaky", t1), "its two earlier failures still count");
        assert!(Quarantine::new(q.spec.clone(), Arc::new(MemoryDeadLetters::default()))
            .snapshot(t0, 0)
            .unwrap()
            .is_none());
    }

    #[test]
    fn reads_keys_from_json_payloads() {
        let q = Quarantine::new(
            QuarantineSpec {
                keys: vec!["m.dev".into()],
                max_failures: 1,
                window: Duration::from_secs(1),
                cool_down: Duration::from_secs(1),
            },
            Arc::new(MemoryDeadLetters::default()),
        );
        let letter = |p: &[u8]| DeadLetter {
            payload: Payload::Raw(p.to_vec()),
            kind: ErrorKind::Schema,
            reason: String::new(),
            step: StepId::new("s"),
            origin: String::new(),
            position: None,
            time_ms: 0,
            attempts: 1,
            first_failure_ms: None,
        };
        assert_eq!(q.key_of(&letter(br#"{"m":{"dev":"d7"},"ts":"x"}"#)).as_deref(), Some("d7"));
        assert_eq!(q.key_of(&letter(br#"{"m":{"dev":1"#)), None);
    }
}
