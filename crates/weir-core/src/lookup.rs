//! Tables a lookup (enrichment) join reads by key: the operator is in `weir-ops`, the tables
//! (a file held in memory, a database queried per batch) in `weir-connectors`.

use std::fmt;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};

use crate::error::{CoreError, Result};

/// A table of rows found by key. Keys are rendered as text ([`LookupKeys`]), so a stream's
/// `int64` key finds a table's `"42"` and the other way round.
pub trait LookupTable: Send + Sync + fmt::Debug {
    /// The columns a found row brings (the table's key columns are not among them unless the
    /// table was told to keep them).
    fn schema(&self) -> SchemaRef;

    /// The rows for `keys`, in their order: a batch of [`LookupTable::schema`] with one row
    /// per key (nulls where none was found) and, for each key, whether a row was found. A
    /// `None` key (a null in the stream) finds nothing. One call per batch: a table served
    /// by a server asks it once for all the keys it lacks, never once per row.
    ///
    /// # Errors
    /// The table cannot be read (a server that stays away after its retries).
    fn lookup(&self, keys: &LookupKeys) -> Result<(RecordBatch, Vec<bool>)>;

    /// Brings the table up to date when its origin changed (a file rewritten); called now and
    /// then by the join. A failure keeps the table as it was and is logged by the table.
    fn refresh(&self) {}

    /// Rows held in memory now, for metrics.
    fn len(&self) -> usize;

    /// What a table served by a server did so far (all zero for a table held in memory).
    fn stats(&self) -> LookupStats {
        LookupStats::default()
    }

    /// Whether [`LookupTable::len`] is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of a table served by a server, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Questions sent to the server (one per batch that had keys the cache lacked).
    pub queries: u64,
    /// Keys asked in those questions.
    pub keys_asked: u64,
    /// Keys answered from the cache.
    pub cache_hits: u64,
}

/// The key of each row of a batch, rendered as text: a string column's values as they are,
/// other types through Arrow's display, several columns joined by the unit separator
/// (`\u{1f}`).
#[derive(Debug, Default)]
pub struct LookupKeys {
    text: String,
    /// `(start, end)` in `text`; `None` for a row with a null key part.
    spans: Vec<Option<(usize, usize)>>,
}

/// Separates the parts of a key made of several columns.
pub const KEY_SEPARATOR: char = '\u{1f}';

impl LookupKeys {
    /// Renders the keys of `columns` (equal lengths), replacing what was held.
    ///
    /// # Errors
    /// A column of a type that cannot be shown as text (lists, structs).
    pub fn fill(&mut self, columns: &[ArrayRef]) -> Result<()> {
        self.text.clear();
        self.spans.clear();
        let n = columns.first().map_or(0, |c| c.len());
        let formatters = columns
            .iter()
            .map(|c| {
                if matches!(c.data_type(), DataType::List(_) | DataType::Struct(_) | DataType::Map(_, _)) {
                    return Err(CoreError::Config(format!("a lookup key cannot be a {}", c.data_type())));
                }
                arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &Default::default())
                    .map_err(|e| CoreError::Config(format!("a lookup key of type {}: {e}", c.data_type())))
            })
            .collect::<Result<Vec<_>>>()?;
        use std::fmt::Write;
        for row in 0..n {
            let start = self.text.len();
            let mut null = false;
            for (i, (c, f)) in columns.iter().zip(&formatters).enumerate() {
                if c.is_null(row) {
                    null = true;
                    break;
                }
                if i > 0 {
                    self.text.push(KEY_SEPARATOR);
                }
                match c.data_type() {
                    DataType::Utf8 => self.text.push_str(c.as_string::<i32>().value(row)),
                    _ => {
                        let _ = write!(self.text, "{}", f.value(row));
                    }
                }
            }
            if null {
                self.text.truncate(start);
                self.spans.push(None);
            } else {
                self.spans.push(Some((start, self.text.len())));
            }
        }
        Ok(())
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Row `i`'s key; `None` when a part of it is null.
    pub fn get(&self, i: usize) -> Option<&str> {
        self.spans[i].map(|(s, e)| &self.text[s..e])
    }

    /// The keys in row order.
    pub fn iter(&self) -> impl Iterator<Item = Option<&str>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// The rows of `batch` as [`LookupKeys`] of `columns` (for a table indexing its own rows).
///
/// # Errors
/// As [`LookupKeys::fill`], or a column path missing from the batch.
pub fn keys_of(batch: &RecordBatch, columns: &[String]) -> Result<LookupKeys> {
    let cols = columns.iter().map(|c| crate::time::column_by_path(batch, c)).collect::<Result<Vec<_>>>()?;
    let mut keys = LookupKeys::default();
    keys.fill(&cols)?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, StringArray};

    use super::*;

    #[test]
    fn keys_render_strings_as_they_are_numbers_as_shown_and_nulls_as_none() {
        let mut k = LookupKeys::default();
        let s: ArrayRef = Arc::new(StringArray::from(vec![Some("dev-1"), None, Some("dev-3")]));
        let n: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), Some(8), Some(-9)]));
        k.fill(std::slice::from_ref(&s)).unwrap();
        assert_eq!(k.iter().collect::<Vec<_>>(), [Some("dev-1"), None, Some("dev-3")]);
        k.fill(&[n.clone(), s]).unwrap();
        assert_eq!(k.iter().collect::<Vec<_>>(), [Some("7\u{1f}dev-1"), None, Some("-9\u{1f}dev-3")]);
        k.fill(&[n]).unwrap();
        assert_eq!(k.get(2), Some("-9"));
    }
}
