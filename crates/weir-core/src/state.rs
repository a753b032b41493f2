//! Operator and source state as Arrow tables, so one format serves snapshots, restores at
//! another worker count and inspection.
//!
//! An operator snapshots its state as one [`RecordBatch`] whose first column,
//! [`KEY_GROUP_COLUMN`], holds each row's key group. On restore the runtime gathers the tables
//! every old task wrote for the step and hands each new worker the rows of the key groups it
//! owns ([`rows_for_worker`]), so state follows keys, not workers. Source positions are tables
//! too, but every source instance receives all of them and picks its own share, because which
//! partitions a worker reads is the source's business.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::error::{CoreError, Result};
use crate::keys::{hash_rows, key_group, worker_for_group};

/// Name of the key-group column that leads every operator state table.
pub const KEY_GROUP_COLUMN: &str = "__key_group";

/// Name of the first key column of a keyed state table, right after the key group: the key
/// a handoff between processes tells each row's partition by (see [`crate::handoff`]).
pub const FIRST_KEY_COLUMN: &str = "key0";

/// The key group of each row of `keys` (the same groups the exchange routes by).
///
/// # Errors
/// A key type that cannot be hashed.
pub fn key_groups(keys: &[ArrayRef], rows: usize) -> Result<UInt32Array> {
    if keys.is_empty() {
        // Unkeyed state: one group, owned by worker 0 like rows with no key.
        return Ok(UInt32Array::from(vec![0; rows]));
    }
    let mut hashes = Vec::new();
    hash_rows(keys, &mut hashes)?;
    Ok(hashes.into_iter().map(key_group).collect())
}

/// Builds a state table: the key-group column followed by `columns`.
///
/// # Errors
/// Columns of unequal length.
pub fn state_table(groups: UInt32Array, fields: Vec<Field>, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    let mut all_fields = vec![Field::new(KEY_GROUP_COLUMN, DataType::UInt32, false)];
    all_fields.extend(fields);
    let mut cols: Vec<ArrayRef> = vec![Arc::new(groups)];
    cols.extend(columns);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(all_fields)), cols)?)
}

/// The rows of `tables` whose key group belongs to `worker` of `workers`, as one table;
/// `None` when there are none.
///
/// # Errors
/// Tables without the key-group column, or of different schemas (state written by another
/// version of the step).
pub fn rows_for_worker(tables: &[RecordBatch], worker: usize, workers: usize) -> Result<Option<RecordBatch>> {
    let Some(first) = tables.first() else { return Ok(None) };
    let schema = first.schema();
    let mut parts = Vec::new();
    for t in tables {
        if t.schema().fields() != schema.fields() {
            return Err(CoreError::Config(format!(
                "state tables of one step disagree on their columns ({:?} vs {:?}); the step changed since the checkpoint",
                field_names(&schema),
                field_names(&t.schema())
            )));
        }
        let groups = t
            .column_by_name(KEY_GROUP_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
            .ok_or_else(|| CoreError::Config(format!("state table has no `{KEY_GROUP_COLUMN}` column")))?;
        let mask: BooleanArray = groups.iter().map(|g| g.map(|g| worker_for_group(g, workers) == worker)).collect();
        let kept = arrow_select::filter::filter_record_batch(t, &mask)?;
        if kept.num_rows() > 0 {
            parts.push(kept);
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(arrow_select::concat::concat_batches(&schema, &parts)?))
}

fn field_names(s: &SchemaRef) -> Vec<String> {
    s.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect()
}

/// Encodes a table as an Arrow IPC file.
///
/// # Errors
/// Arrow encoding errors.
pub fn encode(table: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut w = arrow_ipc::writer::FileWriter::try_new(&mut buf, &table.schema())?;
        w.write(table)?;
        w.finish()?;
    }
    Ok(buf)
}

/// Decodes an Arrow IPC file written by [`encode`].
///
/// # Errors
/// Bytes that are not an Arrow IPC file.
pub fn decode(bytes: &[u8]) -> Result<RecordBatch> {
    let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>()?;
    Ok(arrow_select::concat::concat_batches(&schema, &batches)?)
}

/// The checksum stored for state files and manifests (xxh3, fixed seed).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use arrow_array::{Int64Array, StringArray};

    use super::*;

    fn table(keys: &[&str]) -> RecordBatch {
        let k: ArrayRef = Arc::new(StringArray::from(keys.to_vec()));
        let groups = key_groups(std::slice::from_ref(&k), keys.len()).unwrap();
        let v: ArrayRef = Arc::new(Int64Array::from((0..keys.len() as i64).collect::<Vec<_>>()));
        state_table(
            groups,
            vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Int64, false)],
            vec![k, v],
        )
        .unwrap()
    }

    #[test]
    fn rows_follow_key_groups_at_any_worker_count() {
        let keys: Vec<String> = (0..200).map(|i| format!("dev-{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (a, b) = (table(&refs[..120]), table(&refs[120..]));
        for workers in [1, 2, 3, 5] {
            let mut total = 0;
            for w in 0..workers {
                let Some(mine) = rows_for_worker(&[a.clone(), b.clone()], w, workers).unwrap() else { continue };
                let groups = mine.column(0).as_primitive::<arrow_array::types::UInt32Type>();
                assert!(groups.values().iter().all(|g| worker_for_group(*g, workers) == w));
                total += mine.num_rows();
            }
            assert_eq!(total, 200, "{workers} workers");
        }
    }

    #[test]
    fn encodes_and_decodes_and_refuses_changed_schemas() {
        let t = table(&["a", "b"]);
        let back = decode(&encode(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.column(2).as_primitive::<Int64Type>().value(1), 1);
        assert!(decode(b"not arrow").is_err());
        let other = state_table(
            UInt32Array::from(vec![0]),
            vec![Field::new("x", DataType::Int64, false)],
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let err = rows_for_worker(&[t, other], 0, 1).unwrap_err().to_string();
        assert!(err.contains("step changed"), "{err}");
    }
}
