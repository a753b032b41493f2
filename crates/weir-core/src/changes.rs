//! Changes of a keyed table as rows: the table's columns plus [`CHANGE_COLUMN`], which says
//! whether the row inserts, updates or deletes its key. A `table` step emits them; sinks that
//! keep one row per key (PostgreSQL upserts, Redis hashes, compacted Kafka topics) apply a
//! `delete` by removing the key, and write the others without the column.

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;

use crate::Result;

/// The column of a change that says what changed: `insert`, `update` or `delete`.
pub const CHANGE_COLUMN: &str = "_op";

/// The value of [`CHANGE_COLUMN`] for a key that is gone.
pub const DELETE: &str = "delete";

/// A batch of changes split for a sink that keeps one row per key: the rows without the
/// change column (same rows, same order), and which of them delete their key. A batch without
/// the column is returned as it is, deleting nothing.
///
/// # Errors
/// A change column that is not text.
pub fn split(rows: &RecordBatch) -> Result<(RecordBatch, Vec<bool>)> {
    let Some((i, f)) = rows.schema().column_with_name(CHANGE_COLUMN).map(|(i, f)| (i, f.clone())) else {
        return Ok((rows.clone(), vec![false; rows.num_rows()]));
    };
    if f.data_type() != &DataType::Utf8 {
        return Err(crate::CoreError::Config(format!(
            "column `{CHANGE_COLUMN}` says what a change does (insert, update, delete) and must be text, not {}",
            f.data_type()
        )));
    }
    let op = rows.column(i).as_string::<i32>();
    let deletes = (0..rows.num_rows()).map(|r| op.is_valid(r) && op.value(r) == DELETE).collect();
    let keep: Vec<usize> = (0..rows.num_columns()).filter(|&c| c != i).collect();
    Ok((rows.project(&keep)?, deletes))
}

/// A schema without the change column (what a sink that keeps one row per key writes).
pub fn without_change_column(schema: &arrow_schema::SchemaRef) -> arrow_schema::SchemaRef {
    match schema.index_of(CHANGE_COLUMN) {
        Ok(i) => {
            let keep: Vec<usize> = (0..schema.fields().len()).filter(|&c| c != i).collect();
            std::sync::Arc::new(schema.project(&keep).unwrap_or_else(|_| schema.as_ref().clone()))
        }
        Err(_) => schema.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    #[test]
    fn splits_off_the_change_column_and_finds_the_deletes() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(CHANGE_COLUMN, DataType::Utf8, true),
        ]));
        let rows = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("insert"), Some("delete"), None])),
            ],
        )
        .unwrap();
        let (values, deletes) = split(&rows).unwrap();
        assert_eq!(values.num_columns(), 1);
        assert_eq!(deletes, vec![false, true, false]);
        assert_eq!(without_change_column(&schema).fields().len(), 1);
        let plain = values.clone();
        assert_eq!(split(&plain).unwrap().1, vec![false; 3]);
    }
}
