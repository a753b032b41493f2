//! A lookup table read from a file (CSV with a header, or JSON Lines) and held in memory,
//! indexed by its key; read again when the file changes (its modification time or size), while
//! the join goes on with the old rows until the new ones are in.
//!
//! A file that cannot be read or has a bad row is refused as a whole, naming the file and
//! the line: at the start that stops the pipeline before it reads anything; on a reload it is
//! logged and counted, and the rows read before stay in use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use arrow_array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::lookup::{keys_of, LookupKeys, LookupTable};
use weir_core::{CoreError, Result};
use weir_formats::{csv_header, split_records, FormatSpec};

/// What the file table was told.
#[derive(Debug, Clone)]
pub struct FileTableSpec {
    /// The file.
    pub path: PathBuf,
    /// `json` (JSON Lines) or `csv` (with a header).
    pub format: FormatSpec,
    /// The table's columns and types; `None` to infer them from the file (CSV: a column is
    /// int64 when every value is an integer, float64 when every value is a number, boolean
    /// when every value is true/false, else string; JSON: as `weir infer` does).
    pub schema: Option<SchemaRef>,
    /// The key column(s).
    pub key: Vec<String>,
    /// The columns a found row brings; `None` for every column but the key.
    pub columns: Option<Vec<String>>,
}

/// The rows held, and where they are by key.
#[derive(Debug)]
struct Snapshot {
    rows: RecordBatch,
    index: HashMap<Box<str>, u32>,
}

/// A file held in memory ([module docs](self)).
#[derive(Debug)]
pub struct FileTable {
    spec: FileTableSpec,
    /// The file's schema (every column).
    file_schema: SchemaRef,
    /// What a found row brings.
    out: SchemaRef,
    current: RwLock<Arc<Snapshot>>,
    /// The file's modification time and size when it was read.
    seen: Mutex<Option<(SystemTime, u64)>>,
}

fn file_error(path: &Path, what: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("lookup table `{}`: {what}", path.display()))
}

impl FileTable {
    /// Reads the table.
    ///
    /// # Errors
    /// The file cannot be read, a row does not fit the schema (named by line), the key or a
    /// column is not in the file.
    pub fn open(spec: FileTableSpec) -> Result<Self> {
        let stamp = stamp(&spec.path);
        let text = std::fs::read(&spec.path).map_err(|e| file_error(&spec.path, format!("cannot read it: {e}")))?;
        let file_schema = match &spec.schema {
            Some(s) => s.clone(),
            None => infer(&spec, &text)?,
        };
        for k in &spec.key {
            if file_schema.field_with_name(k).is_err() {
                return Err(file_error(&spec.path, format!("no key column `{k}`; it has {}", names(&file_schema))));
            }
        }
        let out_names: Vec<String> = match &spec.columns {
            Some(c) => c.clone(),
            None => file_schema.fields().iter().map(|f| f.name().clone()).filter(|n| !spec.key.contains(n)).collect(),
        };
        let mut out_fields = Vec::with_capacity(out_names.len());
        for n in &out_names {
            let f = file_schema
                .field_with_name(n)
                .map_err(|_| file_error(&spec.path, format!("no column `{n}`; it has {}", names(&file_schema))))?;
            // A key that is not in the table gets nulls here.
            out_fields.push(f.as_ref().clone().with_nullable(true));
        }
        let out = Arc::new(Schema::new(out_fields));
        let snapshot = load(&spec, &file_schema, &out, &text)?;
        tracing::info!(path = %spec.path.display(), rows = snapshot.index.len(), "Lookup table read.");
        Ok(Self { spec, file_schema, out, current: RwLock::new(Arc::new(snapshot)), seen: Mutex::new(stamp) })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn names(schema: &Schema) -> String {
    schema.fields().iter().map(|f| format!("`{}`", f.name())).collect::<Vec<_>>().join(", ")
}

/// Decodes the whole file and indexes it by key; the last row of a key wins.
fn load(spec: &FileTableSpec, file_schema: &SchemaRef, out: &SchemaRef, text: &[u8]) -> Result<Snapshot> {
    let mut records = Vec::new();
    split_records(&spec.format, text, true, &mut records).map_err(|e| file_error(&spec.path, e))?;
    let mut header = None;
    if let FormatSpec::Csv(o) = &spec.format {
        if o.header && !records.is_empty() {
            let first = records.remove(0);
            header = Some(csv_header(&text[first], o.delimiter));
        }
    }
    let mut decoder = spec
        .format
        .decoder_with_header(file_schema.clone(), header.as_deref())
        .map_err(|e| file_error(&spec.path, e))?;
    let decoded = decoder.decode(text, &records).map_err(|e| file_error(&spec.path, e))?;
    if let Some(e) = decoded.errors.first() {
        let line = text[..records[e.index].start].iter().filter(|b| **b == b'\n').count() + 1;
        return Err(file_error(&spec.path, format!("line {line}: {}", e.message)));
    }
    let all = decoded.batch;
    let keys = keys_of(&all, &spec.key)?;
    let mut index = HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        if let Some(k) = k {
            index.insert(k.into(), i as u32);
        }
    }
    let columns = out
        .fields()
        .iter()
        .map(|f| {
            all.column_by_name(f.name())
                .cloned()
                .ok_or_else(|| file_error(&spec.path, format!("no column `{}`", f.name())))
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = RecordBatch::try_new(out.clone(), columns)?;
    Ok(Snapshot { rows, index })
}

/// The schema of a file given none.
fn infer(spec: &FileTableSpec, text: &[u8]) -> Result<SchemaRef> {
    match &spec.format {
        FormatSpec::Csv(o) => {
            let mut records = Vec::new();
            split_records(&spec.format, text, true, &mut records).map_err(|e| file_error(&spec.path, e))?;
            let Some(first) = records.first() else {
                return Err(file_error(&spec.path, "it is empty; give the table a `schema:`"));
            };
            if !o.header {
                return Err(file_error(&spec.path, "a CSV table without a header needs a `schema:`"));
            }
            let header = csv_header(&text[first.clone()], o.delimiter);
            // Everything as text first, then each column as the narrowest type all its values take.
            let as_text =
                Arc::new(Schema::new(header.iter().map(|h| Field::new(h, DataType::Utf8, true)).collect::<Vec<_>>()));
            let mut decoder = spec
                .format
                .decoder_with_header(as_text.clone(), Some(&header))
                .map_err(|e| file_error(&spec.path, e))?;
            let decoded = decoder.decode(text, &records[1..]).map_err(|e| file_error(&spec.path, e))?;
            let fields = as_text
                .fields()
                .iter()
                .zip(decoded.batch.columns())
                .map(|(f, c)| Field::new(f.name(), narrowest(c), true))
                .collect::<Vec<_>>();
            Ok(Arc::new(Schema::new(fields)))
        }
        _ => {
            let mut records = Vec::new();
            split_records(&spec.format, text, true, &mut records).map_err(|e| file_error(&spec.path, e))?;
            let samples: Vec<&[u8]> = records.iter().take(1000).map(|r| &text[r.clone()]).collect();
            let s = weir_formats::infer_json_schema(&samples).map_err(|e| file_error(&spec.path, e))?;
            Ok(s.to_arrow())
        }
    }
}

/// The narrowest of int64, float64, boolean and string that every value of a text column is.
fn narrowest(col: &ArrayRef) -> DataType {
    use arrow_array::cast::AsArray;
    let values: Vec<&str> = col.as_string::<i32>().iter().flatten().map(str::trim).filter(|v| !v.is_empty()).collect();
    if values.is_empty() {
        DataType::Utf8
    } else if values.iter().all(|v| v.parse::<i64>().is_ok()) {
        DataType::Int64
    } else if values.iter().all(|v| v.parse::<f64>().is_ok()) {
        DataType::Float64
    } else if values.iter().all(|v| v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false")) {
        DataType::Boolean
    } else {
        DataType::Utf8
    }
}

impl LookupTable for FileTable {
    fn schema(&self) -> SchemaRef {
        self.out.clone()
    }

    fn lookup(&self, keys: &LookupKeys) -> Result<(RecordBatch, Vec<bool>)> {
        let snap = self.snapshot();
        let idx: UInt32Array = keys.iter().map(|k| k.and_then(|k| snap.index.get(k).copied())).collect();
        let found = (0..idx.len()).map(|i| idx.is_valid(i)).collect();
        let columns = snap
            .rows
            .columns()
            .iter()
            .map(|c| arrow_select::take::take(c.as_ref(), &idx, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(idx.len()));
        Ok((RecordBatch::try_new_with_options(self.out.clone(), columns, &options)?, found))
    }

    fn refresh(&self) {
        let now = stamp(&self.spec.path);
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.is_none() || now == *seen {
            return;
        }
        // Marked as seen whatever happens: a bad file is reported once, not at every tick.
        *seen = now;
        let read = std::fs::read(&self.spec.path)
            .map_err(|e| file_error(&self.spec.path, format!("cannot read it: {e}")))
            .and_then(|text| load(&self.spec, &self.file_schema, &self.out, &text));
        match read {
            Ok(s) => {
                tracing::info!(path = %self.spec.path.display(), rows = s.index.len(), "Lookup table read again: the file changed.");
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(s);
            }
            Err(e) => {
                tracing::error!(error = %e, "Lookup table not read again; the rows read before stay in use.");
            }
        }
    }

    fn len(&self) -> usize {
        self.snapshot().index.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::cast::AsArray;
    use arrow_array::StringArray;

    use super::*;

    fn spec(path: &Path) -> FileTableSpec {
        FileTableSpec {
            path: path.to_path_buf(),
            format: FormatSpec::Csv(Default::default()),
            schema: None,
            key: vec!["device_id".into()],
            columns: None,
        }
    }

    fn keys(k: &[Option<&str>]) -> LookupKeys {
        let mut keys = LookupKeys::default();
        keys.fill(&[Arc::new(StringArray::from(k.to_vec())) as ArrayRef]).unwrap();
        keys
    }

    #[test]
    fn rows_are_found_by_key_with_types_inferred_and_the_file_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.csv");
        std::fs::write(&path, "device_id,site,temp_limit,count\nd1,s1,24.5,3\nd2,s2,25,4\n").unwrap();
        let t = FileTable::open(spec(&path)).unwrap();
        let types: Vec<_> = t.schema().fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();
        assert_eq!(
            types,
            [
                ("site".into(), DataType::Utf8),
                ("temp_limit".into(), DataType::Float64),
                ("count".into(), DataType::Int64)
            ]
        );
        let (rows, found) = t.lookup(&keys(&[Some("d2"), Some("d9"), None, Some("d1")])).unwrap();
        assert_eq!(found, [true, false, false, true]);
        let sites: Vec<_> = rows.column(0).as_string::<i32>().iter().collect();
        assert_eq!(sites, [Some("s2"), None, None, Some("s1")]);
        // Rewritten (a different size): read again; a bad file keeps the old rows.
        std::fs::write(&path, "device_id,site,temp_limit,count\nd9,s9,20.0,1\n").unwrap();
        t.refresh();
        assert_eq!(t.lookup(&keys(&[Some("d9"), Some("d1")])).unwrap().1, [true, false]);
        std::fs::write(&path, "device_id,site,temp_limit,count\nd7,s7,hot,1\nd8,s8,1.0,1\n").unwrap();
        t.refresh();
        assert_eq!(t.lookup(&keys(&[Some("d9")])).unwrap().1, [true], "the bad file was not taken");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_line_and_missing_columns_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.csv");
        std::fs::write(&path, "device_id,temp_limit\nd1,24.5\nd2,warm\n").unwrap();
        let mut s = spec(&path);
        s.schema = Some(Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("temp_limit", DataType::Float64, true),
        ])));
        let e = FileTable::open(s).unwrap_err().to_string();
        assert!(e.contains("devices.csv") && e.contains("line 3"), "{e}");
        let mut s = spec(&path);
        s.key = vec!["id".into()];
        let e = FileTable::open(s).unwrap_err().to_string();
        assert!(e.contains("no key column `id`; it has `device_id`, `temp_limit`"), "{e}");
        let e = FileTable::open(spec(&dir.path().join("absent.csv"))).unwrap_err().to_string();
        assert!(e.contains("absent.csv") && e.contains("cannot read it"), "{e}");
        // Declared required, a column still takes nulls for keys the table lacks.
        std::fs::write(&path, "device_id,temp_limit\nd1,24.5\n").unwrap();
        let mut s = spec(&path);
        s.schema = Some(Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("temp_limit", DataType::Float64, false),
        ])));
        let (rows, found) = FileTable::open(s).unwrap().lookup(&keys(&[Some("d2"), Some("d1")])).unwrap();
        assert_eq!((found, rows.column(0).null_count()), (vec![false, true], 1));
    }
}
