//! The hash exchange: splitting a batch by the worker that owns each row's key.

use arrow_array::UInt32Array;

use crate::batch::Batch;
use crate::error::Result;
use crate::keys::{hash_rows, key_columns, key_group, worker_for_group};

/// Splits batches by key for `workers` downstream tasks. Rows keep their relative order
/// within each output, so per-key order is preserved across the exchange.
#[derive(Debug)]
pub struct Partitioner {
    keys: Vec<String>,
    workers: usize,
    hashes: Vec<u64>,
    indices: Vec<Vec<u32>>,
}

impl Partitioner {
    /// A partitioner on the given key column paths.
    pub fn new(keys: Vec<String>, workers: usize) -> Self {
        Self { keys, workers, hashes: Vec::new(), indices: vec![Vec::new(); workers] }
    }

    /// Returns one (possibly empty) batch per worker.
    pub fn split(&mut self, batch: &Batch) -> Result<Vec<Option<Batch>>> {
        if self.workers == 1 {
            return Ok(vec![Some(batch.clone())]);
        }
        if self.keys.is_empty() {
            // No key: one global group, owned by worker 0.
            let mut out = vec![None; self.workers];
            out[0] = Some(batch.clone());
            return Ok(out);
        }
        let cols = key_columns(&batch.rows, &self.keys)?;
        hash_rows(&cols, &mut self.hashes)?;
        for v in &mut self.indices {
            v.clear();
        }
        for (i, h) in self.hashes.iter().enumerate() {
            let w = worker_for_group(key_group(*h), self.workers);
            self.indices[w].push(i as u32);
        }
        let mut out = Vec::with_capacity(self.workers);
        for idx in &mut self.indices {
            if idx.is_empty() {
                out.push(None);
            } else if idx.len() == batch.num_rows() {
                out.push(Some(batch.clone()));
            } else {
                let arr = UInt32Array::from(std::mem::take(idx));
                out.push(Some(batch.take(&arr)?));
            }
        }
        Ok(out)
    }
}
