//! What the lookup tables served by a server (PostgreSQL, Redis) share: a cache of the answers
//! by key (a row, or that there is none), kept for a while and up to a number of keys, and the
//! turning of cached rows into the join's columns. The server is asked once per batch, for
//! every key the cache lacks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use weir_core::lookup::{LookupKeys, LookupStats, LookupTable};
use weir_core::Result;

/// One value of a found row, as the Arrow column it goes into takes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

/// Asks a server for rows by key.
pub(crate) trait Fetch: Send + Sync + std::fmt::Debug {
    /// The rows of `keys` that exist, each with its key (as text) and its values in the
    /// table's column order; keys without a row are left out.
    fn fetch(&self, keys: &[String]) -> Result<Vec<(String, Vec<Value>)>>;
}

/// How many keys, for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheLimits {
    pub(crate) size: usize,
    pub(crate) ttl: Duration,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<Box<str>, (Option<usize>, Instant)>,
    rows: Vec<Vec<Value>>,
}

/// A server's table behind a cache ([module docs](self)).
#[derive(Debug)]
pub(crate) struct CachedTable<F> {
    fetch: F,
    out: SchemaRef,
    limits: CacheLimits,
    entries: Mutex<Entries>,
    /// Questions sent, keys asked, keys answered from the cache.
    counts: [AtomicU64; 3],
}

impl<F: Fetch> CachedTable<F> {
    pub(crate) fn new(fetch: F, out: SchemaRef, limits: CacheLimits) -> Arc<Self> {
        Arc::new(Self { fetch, out, limits, entries: Mutex::default(), counts: Default::default() })
    }
}

impl<F: Fetch> LookupTable for CachedTable<F> {
    fn schema(&self) -> SchemaRef {
        self.out.clone()
    }

    fn lookup(&self, keys: &LookupKeys) -> Result<(RecordBatch, Vec<bool>)> {
        let mut cache = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let ttl = self.limits.ttl;
        let fresh = |e: &(Option<usize>, Instant)| now.duration_since(e.1) < ttl;
        let lacking = |cache: &Entries| {
            let mut missing: Vec<String> = keys
                .iter()
                .flatten()
                .filter(|k| !cache.by_key.get(*k).is_some_and(fresh))
                .map(str::to_string)
                .collect();
            missing.sort_unstable();
            missing.dedup();
            missing
        };
        let mut missing = lacking(&cache);
        let size = self.limits.size.max(1);
        if !missing.is_empty() && cache.by_key.len() + missing.len() > size {
            // Room is made before the question, and what it took of this batch's keys is asked
            // again with the rest, so the batch's answers are all there afterwards.
            // (Regression: room made after the question lost the batch's cached keys.)
            evict(&mut cache, now, ttl, size.saturating_sub(missing.len()));
            missing = lacking(&cache);
        }
        let present = keys.iter().flatten().count();
        self.counts[2].fetch_add(present.saturating_sub(missing.len()) as u64, Ordering::Relaxed);
        if !missing.is_empty() {
            self.counts[0].fetch_add(1, Ordering::Relaxed);
            self.counts[1].fetch_add(missing.len() as u64, Ordering::Relaxed);
            let found = self.fetch.fetch(&missing)?;
            let mut found: HashMap<String, Vec<Value>> = found.into_iter().collect();
            for k in missing {
                let row = found.remove(&k).map(|v| {
                    cache.rows.push(v);
                    cache.rows.len() - 1
                });
                cache.by_key.insert(k.into(), (row, now));
            }
        }
        let rows: Vec<Option<usize>> =
            keys.iter().map(|k| k.and_then(|k| cache.by_key.get(k).and_then(|e| e.0))).collect();
        let found = rows.iter().map(Option::is_some).collect();
        let columns = self
            .out
            .fields()
            .iter()
            .enumerate()
            .map(|(c, f)| {
                column(f.data_type(), rows.iter().map(|r| r.and_then(|r| cache.rows[r].get(c)).unwrap_or(&Value::Null)))
            })
            .collect::<Vec<_>>();
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(rows.len()));
        Ok((RecordBatch::try_new_with_options(self.out.clone(), columns, &options)?, found))
    }

    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).by_key.len()
    }

    fn stats(&self) -> LookupStats {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        LookupStats { queries: c(0), keys_asked: c(1), cache_hits: c(2) }
    }
}

/// Makes room: the answers that have expired go first; if that is not enough, every answer
/// goes (simple, and a hot key is back after one question). Rows no answer points at are
/// dropped and the rest renumbered, so the cache's memory follows its keys.
fn evict(cache: &mut Entries, now: Instant, ttl: Duration, room_for: usize) {
    cache.by_key.retain(|_, e| now.duration_since(e.1) < ttl);
    if cache.by_key.len() > room_for {
        cache.by_key.clear();
    }
    let mut renumber = vec![usize::MAX; cache.rows.len()];
    let mut kept = Vec::with_capacity(cache.by_key.len());
    for e in cache.by_key.values_mut() {
        if let Some(r) = e.0 {
            if renumber[r] == usize::MAX {
                renumber[r] = kept.len();
                kept.push(std::mem::take(&mut cache.rows[r]));
            }
            e.0 = Some(renumber[r]);
        }
    }
    cache.rows = kept;
}

/// A column of `t` from values (nulls where a value is missing or of another kind).
fn column<'a>(t: &DataType, values: impl Iterator<Item = &'a Value>) -> ArrayRef {
    match t {
        DataType::Int64 => {
            let mut b = Int64Builder::new();
            values.for_each(|v| b.append_option(if let Value::Int(i) = v { Some(*i) } else { None }));
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::new();
            values.for_each(|v| b.append_option(if let Value::Float(f) = v { Some(*f) } else { None }));
            Arc::new(b.finish())
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::new();
            values.for_each(|v| b.append_option(if let Value::Bool(x) = v { Some(*x) } else { None }));
            Arc::new(b.finish())
        }
        _ => {
            let mut b = StringBuilder::new();
            values.for_each(|v| b.append_option(if let Value::Text(s) = v { Some(s.as_str()) } else { None }));
            Arc::new(b.finish())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use arrow_array::cast::AsArray;
    use arrow_array::StringArray;
    use arrow_schema::{Field, Schema};

    use super::*;

    /// Keys `k<n>` exist for even n, with the value `v<n>`; each question counted.
    #[derive(Debug, Default)]
    struct Even(AtomicU64);

    impl Fetch for Even {
        fn fetch(&self, keys: &[String]) -> Result<Vec<(String, Vec<Value>)>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(keys
                .iter()
                .filter(|k| k[1..].parse::<u32>().is_ok_and(|n| n % 2 == 0))
                .map(|k| (k.clone(), vec![Value::Text(format!("v{}", &k[1..]))]))
                .collect())
        }
    }

    fn keys(k: &[&str]) -> LookupKeys {
        let mut keys = LookupKeys::default();
        keys.fill(&[Arc::new(StringArray::from(k.to_vec())) as ArrayRef]).unwrap();
        keys
    }

    fn values(b: &RecordBatch) -> Vec<Option<String>> {
        b.column(0).as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn one_question_per_batch_answers_kept_for_their_ttl_and_a_full_cache_makes_room() {
        let out = Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8, true)]));
        let t = CachedTable::new(Even::default(), out, CacheLimits { size: 4, ttl: Duration::from_secs(3600) });
        let (rows, found) = t.lookup(&keys(&["k2", "k3", "k2", "k4"])).unwrap();
        assert_eq!(found, [true, false, true, true]);
        assert_eq!(values(&rows), [Some("v2".into()), None, Some("v2".into()), Some("v4".into())]);
        assert_eq!(t.fetch.0.load(Ordering::Relaxed), 1, "one question for the batch");
        assert_eq!(t.lookup(&keys(&["k3", "k4"])).unwrap().1, [false, true]);
        assert_eq!(t.fetch.0.load(Ordering::Relaxed), 1, "answered from the cache, misses too");
        // Three keys held, two new ones: nothing has expired, so the cache starts over, and
        // the answers stay right.
        let (rows, found) = t.lookup(&keys(&["k6", "k7", "k2"])).unwrap();
        assert_eq!(found, [true, false, true]);
        assert_eq!(values(&rows), [Some("v6".into()), None, Some("v2".into())]);
        assert!(t.len() <= 4, "{}", t.len());
        assert_eq!(t.stats().queries, 2);
    }

    #[test]
    fn expired_answers_make_room_first_and_rows_are_renumbered() {
        let out = Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8, true)]));
        let t = CachedTable::new(Even::default(), out, CacheLimits { size: 3, ttl: Duration::from_millis(30) });
        t.lookup(&keys(&["k2", "k4"])).unwrap();
        weir_core::testing::poll(|| {
            // Once k2 and k4 have expired they are asked again, and the rows are right.
            let (rows, _) = t.lookup(&keys(&["k8", "k4"])).unwrap();
            assert_eq!(values(&rows), [Some("v8".into()), Some("v4".into())]);
            (t.stats().queries >= 2).then_some(())
        });
        let (rows, _) = t.lookup(&keys(&["k2", "k8", "k4"])).unwrap();
        assert_eq!(values(&rows), [Some("v2".into()), Some("v8".into()), Some("v4".into())]);
    }
}
