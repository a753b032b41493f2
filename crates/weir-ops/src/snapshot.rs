//! Keyed operator state as tables (see `weir_core::state`): the key-group column, then the
//! key columns `key0..`, then the operator's own columns.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field};
use weir_core::keys::KeyInterner;
use weir_core::state::{key_groups, state_table};
use weir_core::{CoreError, Result};

/// Builds a state table for the keys `ids` (one row each) and the operator's `columns`.
/// `keyed` is false for a step without keys (one global group).
pub(crate) fn keyed_table(
    interner: &KeyInterner,
    keyed: bool,
    ids: &[u32],
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
) -> Result<RecordBatch> {
    let key_cols = if keyed { interner.columns(ids)? } else { Vec::new() };
    let groups = key_groups(&key_cols, ids.len())?;
    let mut all_fields: Vec<Field> = key_cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            // The first is `weir_core::state::FIRST_KEY_COLUMN`; the handoff finds keys by it.
            Field::new(format!("key{i}"), c.data_type().clone(), true)
        })
        .collect();
    all_fields.extend(fields);
    let mut all = key_cols;
    all.extend(columns);
    state_table(groups, all_fields, all)
}

/// Reads a state table back: the key ids (interned into `interner`), and a column reader.
pub(crate) fn read_keys(interner: &mut KeyInterner, keys: usize, t: &RecordBatch) -> Result<Vec<u32>> {
    if t.num_columns() < 1 + keys {
        return Err(CoreError::Config(format!("state table has {} columns, fewer than its keys", t.num_columns())));
    }
    if keys == 0 {
        return Ok(vec![0; t.num_rows()]);
    }
    let cols: Vec<ArrayRef> = t.columns()[1..=keys].to_vec();
    Ok(interner.intern(&cols)?.to_vec())
}

/// A named column of a state table, checked for type.
pub(crate) fn col<'a>(t: &'a RecordBatch, name: &str, ty: &DataType) -> Result<&'a ArrayRef> {
    let c = t.column_by_name(name).ok_or_else(|| CoreError::Config(format!("state table has no column `{name}`")))?;
    if c.data_type() != ty {
        return Err(CoreError::Config(format!("state column `{name}` is {}, expected {ty}", c.data_type())));
    }
    Ok(c)
}

pub(crate) fn i64s<'a>(t: &'a RecordBatch, name: &str) -> Result<&'a Int64Array> {
    Ok(col(t, name, &DataType::Int64)?.as_primitive::<Int64Type>())
}

pub(crate) fn f64s<'a>(t: &'a RecordBatch, name: &str) -> Result<&'a Float64Array> {
    Ok(col(t, name, &DataType::Float64)?.as_primitive::<Float64Type>())
}

pub(crate) fn u64s<'a>(t: &'a RecordBatch, name: &str) -> Result<&'a UInt64Array> {
    Ok(col(t, name, &DataType::UInt64)?.as_primitive::<UInt64Type>())
}

pub(crate) fn bools<'a>(t: &'a RecordBatch, name: &str) -> Result<&'a BooleanArray> {
    Ok(col(t, name, &DataType::Boolean)?.as_boolean())
}

/// A float column from values.
pub(crate) fn floats(v: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
