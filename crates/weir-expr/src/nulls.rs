//! SQL semantics for fields of NULL structs.
//!
//! Arrow allows a struct child to hold any value in a row where the struct
//! itself is NULL. In SQL, `s.f` is NULL whenever `s` is, so before reading a
//! child we fold the ancestors' null masks into it. When the producer already
//! did this (arrow-json does) it costs one bitmap comparison and no copy.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, StructArray};
use arrow_buffer::NullBuffer;
use arrow_schema::{ArrowError, DataType};

/// Applies `inherited` (the union of the ancestors' null masks) to `array`,
/// recursively through struct children. Returns `None` when nothing changes.
pub(crate) fn push_down(array: &ArrayRef, inherited: Option<&NullBuffer>) -> Result<Option<ArrayRef>, ArrowError> {
    let inherited = inherited.filter(|n| n.null_count() > 0);
    if let DataType::Struct(_) = array.data_type() {
        let s = array.as_struct();
        let merged = NullBuffer::union(inherited, s.nulls());
        let mut changed = inherited.is_some_and(|n| !covers(s.nulls(), n));
        let mut children = Vec::with_capacity(s.num_columns());
        for child in s.columns() {
            match push_down(child, merged.as_ref())? {
                Some(new) => {
                    changed = true;
                    children.push(new);
                }
                None => children.push(Arc::clone(child)),
            }
        }
        if !changed {
            return Ok(None);
        }
        return Ok(Some(Arc::new(StructArray::try_new(s.fields().clone(), children, merged)?)));
    }
    match inherited {
        Some(n) if !covers(array.nulls(), n) => {
            let is_null = BooleanArray::new(!n.inner(), None);
            Ok(Some(arrow_select::nullif::nullif(array.as_ref(), &is_null)?))
        }
        _ => Ok(None),
    }
}

/// Whether `nulls` already has every null of `required`.
fn covers(nulls: Option<&NullBuffer>, required: &NullBuffer) -> bool {
    nulls.is_some_and(|n| n.contains(required))
}

/// Reads the field at `indices` (top-level column, then struct children)
/// from `columns`, with SQL null semantics. A cheap `Arc` clone unless an
/// ancestor struct has NULL rows its child does not.
pub(crate) fn read_path(columns: &[ArrayRef], indices: &[usize]) -> Result<ArrayRef, ArrowError> {
    let (first, rest) =
        indices.split_first().ok_or_else(|| ArrowError::InvalidArgumentError("empty column path".into()))?;
    let mut current =
        columns.get(*first).ok_or_else(|| ArrowError::InvalidArgumentError(format!("no column {first}")))?;
    let mut inherited: Option<NullBuffer> = None;
    for idx in rest {
        let s = current.as_struct_opt().ok_or_else(|| {
            ArrowError::InvalidArgumentError(format!("expected a struct, found {}", current.data_type()))
        })?;
        inherited = NullBuffer::union(inherited.as_ref(), s.nulls());
        current = s
            .columns()
            .get(*idx)
            .ok_or_else(|| ArrowError::InvalidArgumentError(format!("struct has no child {idx}")))?;
    }
    Ok(push_down(current, inherited.as_ref())?.unwrap_or_else(|| Arc::clone(current)))
}
