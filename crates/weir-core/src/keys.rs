//! Keys: hashing key columns to key groups (which decide the worker owning a key), and
//! interning keys to dense ids for keyed state.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_row::{OwnedRow, RowConverter, SortField};
use arrow_schema::DataType;
use hashbrown::HashMap;

use crate::error::Result;
use crate::time::column_by_path;

/// Number of key groups. State is split by key group, not by worker, so a job can be restored
/// at another worker count; a worker owns a contiguous range of groups.
pub const KEY_GROUPS: u32 = 256;

/// The key group of a key hash.
pub fn key_group(hash: u64) -> u32 {
    // Multiply-shift maps the high bits uniformly onto 0..KEY_GROUPS.
    (((hash >> 32) * u64::from(KEY_GROUPS)) >> 32) as u32
}

/// The worker owning a key group.
pub fn worker_for_group(group: u32, workers: usize) -> usize {
    (group as usize * workers) / KEY_GROUPS as usize
}

/// Kafka's default partitioner hash: 32-bit MurmurHash2 with Kafka's seed, as the Java
/// client's `Utils.murmur2` and librdkafka's `murmur2_random` compute it for a non-null key.
/// Weir needs it to tell, without asking a broker, which partition a key's records are in.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]).wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The partition, of `partitions`, that Kafka's default partitioner gives a record with
/// this (non-null) key.
///
/// # Panics
/// `partitions` is zero.
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Reads the key columns named by dotted paths.
pub fn key_columns(batch: &RecordBatch, paths: &[String]) -> Result<Vec<ArrayRef>> {
    paths.iter().map(|p| column_by_path(batch, p)).collect()
}

const NULL_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// Hashes each row's key to `out` (cleared first). The hash is xxh3 with a fixed seed over the
/// values' bytes, so it is the same in every process and on every run: key placement is part
/// of the state layout.
pub fn hash_rows(cols: &[ArrayRef], out: &mut Vec<u64>) -> Result<()> {
    let n = cols.first().map_or(0, |c| c.len());
    out.clear();
    out.resize(n, 0);
    for (ci, col) in cols.iter().enumerate() {
        let seed = ci as u64;
        let combine =
            |h: &mut u64, v: u64| *h = if ci == 0 { v } else { (h.rotate_left(5) ^ v).wrapping_mul(0x100_0000_01b3) };
        macro_rules! each {
            ($f:expr) => {
                for (i, h) in out.iter_mut().enumerate() {
                    let v = if col.is_null(i) { NULL_HASH } else { $f(i) };
                    combine(h, v);
                }
            };
        }
        match col.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(a.value(i).as_bytes(), seed));
            }
            DataType::LargeUtf8 => {
                let a = col.as_string::<i64>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(a.value(i).as_bytes(), seed));
            }
            DataType::Int64 => {
                let a = col.as_primitive::<Int64Type>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(&a.value(i).to_le_bytes(), seed));
            }
            DataType::Int32 => {
                let a = col.as_primitive::<Int32Type>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(&i64::from(a.value(i)).to_le_bytes(), seed));
            }
            DataType::UInt64 => {
                let a = col.as_primitive::<UInt64Type>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(&a.value(i).to_le_bytes(), seed));
            }
            DataType::Float64 => {
                let a = col.as_primitive::<Float64Type>();
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(&a.value(i).to_bits().to_le_bytes(), seed));
            }
            _ => {
                let conv = RowConverter::new(vec![SortField::new(col.data_type().clone())])?;
                let rows = conv.convert_columns(std::slice::from_ref(col))?;
                each!(|i| xxhash_rust::xxh3::xxh3_64_with_seed(rows.row(i).as_ref(), seed));
            }
        }
    }
    Ok(())
}

/// Maps keys to dense `u32` ids and back, so keyed state can live in vectors and maps of
/// small integers. Keys are kept in Arrow's row format, which covers every key type and
/// converts back to columns for output.
///
/// With a time-to-live, the interner also remembers when (in event time) each key was last
/// seen, and [`KeyInterner::expire`] forgets keys older than that: their ids are handed to new
/// keys, so memory follows the keys alive within the TTL, not every key ever seen. The
/// operator owning the interner drops its state of the ids `expire` returns.
#[derive(Debug)]
pub struct KeyInterner {
    converter: RowConverter,
    ids: HashMap<Box<[u8]>, u32>,
    keys: Vec<OwnedRow>,
    scratch: Vec<u32>,
    /// Per id, the newest event time it was seen at (`UNKNOWN` after a restore); only kept
    /// with a TTL.
    last_seen: Vec<i64>,
    /// Ids of forgotten keys, for new keys to take.
    free: Vec<u32>,
    ttl_ms: Option<i64>,
    /// The watermark of the last sweep: sweeps cost a pass over every key, so they happen
    /// once per eighth of the TTL of event time.
    swept_at: i64,
}

/// When a key restored from a checkpoint was last seen is not recorded: it counts as seen at
/// the first expiry check after the restore.
const UNKNOWN: i64 = i64::MIN;

impl KeyInterner {
    /// An interner for keys of the given column types.
    pub fn new(types: &[DataType]) -> Result<Self> {
        let converter = RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())?;
        Ok(Self {
            converter,
            ids: HashMap::new(),
            keys: Vec::new(),
            scratch: Vec::new(),
            last_seen: Vec::new(),
            free: Vec::new(),
            ttl_ms: None,
            swept_at: i64::MIN,
        })
    }

    /// Keys not seen for `ttl` of event time may be forgotten (see [`KeyInterner::expire`]).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Option<std::time::Duration>) -> Self {
        self.ttl_ms = ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        self
    }

    /// The id of each row's key, assigning new ids to new keys. The returned slice is valid
    /// until the next call. With a TTL, `times` (the rows' event times) mark the keys seen.
    pub fn intern_at(&mut self, cols: &[ArrayRef], times: Option<&arrow_array::Int64Array>) -> Result<&[u32]> {
        let rows = self.converter.convert_columns(cols)?;
        self.scratch.clear();
        self.scratch.reserve(rows.num_rows());
        let tracking = self.ttl_ms.is_some();
        for (i, row) in rows.iter().enumerate() {
            let bytes = row.as_ref();
            let id = match self.ids.get(bytes) {
                Some(id) => *id,
                None => {
                    let id = match self.free.pop() {
                        Some(id) => {
                            self.keys[id as usize] = row.owned();
                            id
                        }
                        None => {
                            let id = u32::try_from(self.keys.len())
                                .map_err(|_| crate::CoreError::Config("more than 4 billion distinct keys".into()))?;
                            self.keys.push(row.owned());
                            id
                        }
                    };
                    self.ids.insert(bytes.into(), id);
                    if tracking && self.last_seen.len() <= id as usize {
                        self.last_seen.resize(id as usize + 1, UNKNOWN);
                    }
                    if tracking {
                        self.last_seen[id as usize] = UNKNOWN;
                    }
                    id
                }
            };
            if tracking {
                if let Some(t) = times.filter(|t| !t.is_null(i)) {
                    let seen = &mut self.last_seen[id as usize];
                    *seen = (*seen).max(t.value(i));
                }
            }
            self.scratch.push(id);
        }
        Ok(&self.scratch)
    }

    /// [`KeyInterner::intern_at`] without times (keys restored from a checkpoint, or no TTL).
    pub fn intern(&mut self, cols: &[ArrayRef]) -> Result<&[u32]> {
        self.intern_at(cols, None)
    }

    /// With a TTL, forgets the keys last seen more than the TTL before `watermark` and returns
    /// their ids (now free for new keys); the caller drops its state of them. `keep` vetoes an
    /// id (a key with an open window). Keys restored from a checkpoint count as seen now.
    pub fn expire(&mut self, watermark: i64, mut keep: impl FnMut(u32) -> bool) -> Vec<u32> {
        let Some(ttl) = self.ttl_ms else { return Vec::new() };
        if watermark < self.swept_at.saturating_add((ttl / 8).max(1)) {
            return Vec::new();
        }
        self.swept_at = watermark;
        let cutoff = watermark.saturating_sub(ttl);
        let mut gone = Vec::new();
        for (id, seen) in self.last_seen.iter_mut().enumerate() {
            let id = id as u32;
            if *seen == UNKNOWN {
                // Unused slot, or a restored key: restored keys start their TTL now.
                let held = self.keys.get(id as usize).is_some_and(|k| self.ids.get(k.row().as_ref()) == Some(&id));
                if held {
                    *seen = watermark;
                }
                continue;
            }
            if *seen < cutoff && !keep(id) {
                self.ids.remove(self.keys[id as usize].row().as_ref());
                *seen = UNKNOWN;
                gone.push(id);
            }
        }
        self.free.extend_from_slice(&gone);
        gone
    }

    /// The id of each row's key where the key is known; assigns nothing (for lookups from
    /// outside the stream, such as queries).
    pub fn find(&self, cols: &[ArrayRef]) -> Result<Vec<Option<u32>>> {
        let rows = self.converter.convert_columns(cols)?;
        Ok(rows.iter().map(|r| self.ids.get(r.as_ref()).copied()).collect())
    }

    /// Rebuilds key columns for the given ids, in order.
    pub fn columns(&self, ids: &[u32]) -> Result<Vec<ArrayRef>> {
        let rows = ids.iter().map(|&i| self.keys[i as usize].row());
        Ok(self.converter.convert_rows(rows)?)
    }

    /// Number of keys known now (seen, and not forgotten).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// One past the largest id handed out: the size of vectors indexed by id.
    pub fn capacity(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, StringArray};

    use super::*;

    #[test]
    fn hashes_are_stable_and_groups_cover_workers() {
        let col: ArrayRef = Arc::new(StringArray::from(vec!["dev-1", "dev-2", "dev-1"]));
        let mut h = Vec::new();
        hash_rows(&[col], &mut h).unwrap();
        assert_eq!(h[0], h[2]);
        assert_ne!(h[0], h[1]);
        // Fixed seed: this value is part of the state layout and must never change.
        assert_eq!(h[0], xxhash_rust::xxh3::xxh3_64_with_seed(b"dev-1", 0));
        for g in 0..KEY_GROUPS {
            assert!(worker_for_group(g, 3) < 3);
        }
        assert_eq!(worker_for_group(0, 2), 0);
        assert_eq!(worker_for_group(KEY_GROUPS - 1, 2), 1);
    }

    #[test]
    fn interner_round_trips_keys() {
        let mut k = KeyInterner::new(&[DataType::Utf8, DataType::Int64]).unwrap();
        let a: ArrayRef = Arc::new(StringArray::from(vec!["x", "y", "x"]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![1, 1, 1]));
        let ids = k.intern(&[a, b]).unwrap().to_vec();
        assert_eq!(ids, vec![0, 1, 0]);
        let cols = k.columns(&[1, 0]).unwrap();
        assert_eq!(cols[0].as_string::<i32>().value(0), "y");
        assert_eq!(cols[1].as_primitive::<Int64Type>().value(1), 1);
        assert_eq!(k.len(), 2);
    }

    //  event time:  k0@0  k1@5  k2@50   watermark 60, TTL 20: k0 and k1 are forgotten.
    #[test]
    fn keys_older_than_the_ttl_are_forgotten_and_their_ids_reused() {
        let mut k = KeyInterner::new(&[DataType::Utf8]).unwrap().with_ttl(Some(std::time::Duration::from_millis(20)));
        let keys: ArrayRef = Arc::new(StringArray::from(vec!["k0", "k1", "k2"]));
        let ids = k.intern_at(&[keys], Some(&Int64Array::from(vec![0, 5, 50]))).unwrap().to_vec();
        assert_eq!(ids, [0, 1, 2]);
        let mut gone = k.expire(60, |id| id == 1);
        assert_eq!(gone, [0], "the caller kept k1");
        assert!(k.expire(61, |_| false).is_empty(), "swept at 60, next sweep after 60 + 20/8");
        gone = k.expire(63, |_| false);
        assert_eq!(gone, [1]);
        assert_eq!(k.len(), 1);
        // New keys take the freed ids; the survivor keeps its id.
        let more: ArrayRef = Arc::new(StringArray::from(vec!["k3", "k2", "k4", "k5"]));
        let ids = k.intern_at(&[more], Some(&Int64Array::from(vec![61, 61, 61, 61]))).unwrap().to_vec();
        assert_eq!(ids, [1, 2, 0, 3]);
        assert_eq!(k.columns(&[1, 0]).unwrap()[0].as_string::<i32>().value(1), "k4");
        assert_eq!((k.len(), k.capacity()), (4, 4));
    }
}
