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
        let mut missing: Vec<String> =
            keys.iter().flatten().filter(|k| !cache.by_key.get(*k).is_some_and(fresh)).map(str::to_string).collect();
        missing.sort_unstable();
        missing.dedup();
        let present = keys.iter().flatten().count();
        self.counts[2].fetch_add(present.saturating_sub(missing.len()) as u64, Ordering::Relaxed);
        if !missing.is_empty() {
            self.counts[0].fetch_add(1, Ordering::Relaxed);
            self.counts[1].fetch_add(missing.len() as u64, Ordering::Relaxed);
            let found = self.fetch.fetch(&missing)?;
            if cache.by_key.len() + missing.len() > self.limits.size.max(1) {
                // Full: start over (simple, and a hot key is back after one question).
                cache.by_key.clear();
                cache.rows.clear();
            }
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
