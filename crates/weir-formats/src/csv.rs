//! CSV: one record per line, RFC 4180 quoting (`"a ""quoted"" field"`), no line breaks inside
//! fields.
//!
//! Columns map to the schema's leaf fields: by header name when the caller gives the header
//! (nested fields by dotted name, `readings.temp`), else by position in depth-first order. An
//! unquoted empty cell is null; a quoted empty cell (`""`) is the empty string for a string
//! field. An optional struct whose cells are all empty is null.

use std::ops::Range;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::columns::{null_subtree, parse_timestamp_ms, Builders, Column, Data, Kind, Outcomes, Plan, ROOT};
use crate::encode::{check_type, Scalar, Support, View};
use crate::{
    record_bytes, truncate_for_message, CsvOptions, Decoded, Decoder, Encoder, FormatError, RecordError,
    RecordErrorKind, Result,
};

/// Longest line text quoted in an error message.
const LINE_MAX: usize = 100;

/// One cell of a line: its text in the unescaped data buffer, and whether it was quoted.
#[derive(Debug, Clone, Copy)]
struct Cell {
    start: usize,
    end: usize,
    quoted: bool,
}

/// Splits a line into cells, unescaping quoted ones into `data`. On malformed quoting, the byte
/// position and the reason.
fn split_cells(
    rec: &[u8],
    delimiter: u8,
    cells: &mut Vec<Cell>,
    data: &mut Vec<u8>,
) -> std::result::Result<(), (usize, &'static str)> {
    cells.clear();
    data.clear();
    let mut p = 0;
    loop {
        let start = data.len();
        if rec.get(p) == Some(&b'"') {
            p += 1;
            loop {
                let Some(i) = memchr::memchr(b'"', &rec[p..]) else {
                    return Err((rec.len(), "unterminated quoted field"));
                };
                data.extend_from_slice(&rec[p..p + i]);
                p += i + 1;
                if rec.get(p) == Some(&b'"') {
                    data.push(b'"');
                    p += 1;
                } else {
                    break;
                }
            }
            cells.push(Cell { start, end: data.len(), quoted: true });
            match rec.get(p) {
                None => return Ok(()),
                Some(&d) if d == delimiter => p += 1,
                Some(_) => return Err((p, "unexpected character after a closing quote")),
            }
        } else {
            let end = memchr::memchr(delimiter, &rec[p..]).map_or(rec.len(), |i| p + i);
            data.extend_from_slice(&rec[p..end]);
            cells.push(Cell { start, end: data.len(), quoted: false });
            if end == rec.len() {
                return Ok(());
            }
            p = end + 1;
        }
    }
}

/// The column names of a CSV header line (a leading UTF-8 byte-order mark and a trailing '\r'
/// are dropped, names are trimmed of surrounding whitespace, invalid UTF-8 is replaced).
pub fn csv_header(line: &[u8], delimiter: u8) -> Vec<String> {
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut cells = Vec::new();
    let mut data = Vec::new();
    if split_cells(line, delimiter, &mut cells, &mut data).is_err() {
        // Malformed quoting: fall back to plain splitting.
        return line.split(|&b| b == delimiter).map(|c| String::from_utf8_lossy(c).trim().to_owned()).collect();
    }
    cells.iter().map(|c| String::from_utf8_lossy(&data[c.start..c.end]).trim().to_owned()).collect()
}

/// Decodes CSV lines into batches of a fixed schema (types: `Boolean`, `Int64`, `Float64`,
/// `Utf8`, `Timestamp(Millisecond, _)`, `Struct` of those).
///
/// Numbers, booleans (`true`/`false` in any case, `1`/`0`) and timestamps (integer milliseconds
/// or RFC 3339) may have surrounding spaces; strings are taken as they are.
#[derive(Debug)]
pub struct CsvDecoder {
    schema: SchemaRef,
    plan: Plan,
    builders: Builders,
    delimiter: u8,
    /// CSV column of each node (leaves only).
    column_of: Vec<Option<usize>>,
    /// How many columns a line may have.
    width: usize,
    cells: Vec<Cell>,
    data: Vec<u8>,
}

impl CsvDecoder {
    /// A decoder for `schema`. With `header` (the names from [`csv_header`]), columns map to
    /// leaf fields by (dotted) name, unknown columns are ignored, and a required field without a
    /// column is an error; without, columns map to the leaf fields by position.
    pub fn new(schema: SchemaRef, options: &CsvOptions, header: Option<&[String]>) -> Result<Self> {
        options.validate()?;
        let plan = Plan::new(&schema, "csv")?;
        let leaves = plan.leaves();
        let mut column_of = vec![None; plan.nodes.len()];
        let width = match header {
            None => {
                for (i, &leaf) in leaves.iter().enumerate() {
                    column_of[leaf] = Some(i);
                }
                leaves.len()
            }
            Some(names) => {
                for (i, name) in names.iter().enumerate() {
                    if let Some(&leaf) = leaves.iter().find(|&&l| *plan.nodes[l].path == **name) {
                        if column_of[leaf].is_some() {
                            return Err(FormatError::CsvHeader(format!("column `{name}` appears twice")));
                        }
                        column_of[leaf] = Some(i);
                    }
                }
                for &leaf in &leaves {
                    if column_of[leaf].is_none() && always_required(&plan, leaf) {
                        return Err(FormatError::CsvHeader(format!(
                            "no column for required field `{}`",
                            plan.nodes[leaf].path
                        )));
                    }
                }
                names.len()
            }
        };
        let builders = Builders::new(&plan);
        Ok(Self {
            schema,
            plan,
            builders,
            delimiter: options.delimiter,
            column_of,
            width,
            cells: Vec::new(),
            data: Vec::new(),
        })
    }

    fn record(&mut self, rec: &[u8]) -> std::result::Result<(), (RecordErrorKind, String)> {
        if let Err(e) = std::str::from_utf8(rec) {
            return Err((RecordErrorKind::Decode, format!("invalid UTF-8 at byte {}", e.valid_up_to())));
        }
        if let Err((pos, reason)) = split_cells(rec, self.delimiter, &mut self.cells, &mut self.data) {
            return Err((RecordErrorKind::Decode, format!("invalid CSV at byte {pos}: {reason}")));
        }
        let line = || truncate_for_message(&String::from_utf8_lossy(rec), LINE_MAX);
        if self.cells.len() > self.width {
            return Err((
                RecordErrorKind::Schema,
                format!("line has {} columns, expected {} (line: {})", self.cells.len(), self.width, line()),
            ));
        }
        let mut fill = Fill {
            plan: &self.plan,
            cols: &mut self.builders.cols,
            column_of: &self.column_of,
            cells: &self.cells,
            data: &self.data,
        };
        for &c in self.plan.nodes[ROOT].children.iter() {
            fill.emit(c).map_err(|m| (RecordErrorKind::Schema, format!("{m} (line: {})", line())))?;
        }
        Ok(())
    }
}

/// Whether a node and all its ancestors are required (so every record must have it).
fn always_required(plan: &Plan, leaf: usize) -> bool {
    let path = &plan.nodes[leaf].path;
    // Ancestors are the nodes whose path is a dotted prefix of this one.
    plan.nodes[1..]
        .iter()
        .filter(|n| path.starts_with(&*n.path) && (n.path.len() == path.len() || path.as_bytes()[n.path.len()] == b'.'))
        .all(|n| n.required)
}

/// Filling one row from the cells of a line.
struct Fill<'b> {
    plan: &'b Plan,
    cols: &'b mut [Column],
    column_of: &'b [Option<usize>],
    cells: &'b [Cell],
    data: &'b [u8],
}

impl<'b> Fill<'b> {
    /// The text of leaf `id`, or `None` when it is null (no cell, or an unquoted empty cell; a
    /// quoted empty cell is null except for strings).
    fn text(&self, id: usize) -> Option<&'b [u8]> {
        let cell = self.cells.get(self.column_of[id]?)?;
        let data: &'b [u8] = self.data;
        let text = &data[cell.start..cell.end];
        let is_string = matches!(self.plan.nodes[id].kind, Kind::Utf8);
        if text.is_empty() && !(cell.quoted && is_string) {
            None
        } else {
            Some(text)
        }
    }

    fn present(&self, id: usize) -> bool {
        let node = &self.plan.nodes[id];
        match node.kind {
            Kind::Struct(_) => node.children.iter().any(|&c| self.present(c)),
            _ => self.text(id).is_some(),
        }
    }

    fn emit(&mut self, id: usize) -> std::result::Result<(), String> {
        let plan = self.plan;
        let node = &plan.nodes[id];
        if let Kind::Struct(_) = node.kind {
            if !node.required && !self.present(id) {
                null_subtree(plan, self.cols, id);
            } else {
                for &c in node.children.iter() {
                    self.emit(c)?;
                }
                self.cols[id].valid.push(true);
            }
            return Ok(());
        }
        let Some(raw) = self.text(id) else {
            if node.required {
                return Err(format!("column `{}`: required value is empty or missing", node.path));
            }
            self.cols[id].push_null();
            return Ok(());
        };
        // The line was checked to be UTF-8 and cells split at ASCII bytes.
        let text = std::str::from_utf8(raw).unwrap_or_default();
        let trimmed = text.trim();
        let col = &mut self.cols[id];
        let ok = match (&mut col.data, &node.kind) {
            (Data::Str { offsets, bytes }, _) => {
                bytes.extend_from_slice(raw);
                offsets.push(bytes.len() as i32);
                true
            }
            (Data::I64(v), Kind::Timestamp(_)) => {
                match trimmed.parse::<i64>().ok().or_else(|| parse_timestamp_ms(trimmed)) {
                    Some(x) => {
                        v.push(x);
                        true
                    }
                    None => false,
                }
            }
            (Data::I64(v), _) => match trimmed.parse::<i64>() {
                Ok(x) => {
                    v.push(x);
                    true
                }
                Err(e) => {
                    if matches!(e.kind(), std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow) {
                        return Err(format!("column `{}`: integer {trimmed} is out of range for int64", node.path));
                    }
                    false
                }
            },
            (Data::F64(v), _) => match trimmed.parse::<f64>() {
                Ok(x) => {
                    v.push(x);
                    true
                }
                Err(_) => false,
            },
            (Data::Bool(v), _) => {
                let b = if trimmed.eq_ignore_ascii_case("true") || trimmed == "1" {
                    Some(true)
                } else if trimmed.eq_ignore_ascii_case("false") || trimmed == "0" {
                    Some(false)
                } else {
                    None
                };
                match b {
                    Some(b) => {
                        v.push(b);
                        true
                    }
                    None => false,
                }
            }
            (Data::Struct, _) => false,
        };
        if !ok {
            return Err(format!(
                "column `{}`: expected {}, found {:?}",
                node.path,
                node.kind.name(),
                truncate_for_message(text, 40)
            ));
        }
        col.valid.push(true);
        Ok(())
    }
}

impl Decoder for CsvDecoder {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        self.builders.reserve(records.len());
        let mut outcomes = Outcomes::default();
        for (index, range) in records.iter().enumerate() {
            let rec = record_bytes(buf, index, range)?;
            let n = self.builders.rows;
            match self.record(rec) {
                Ok(()) => {
                    self.builders.rows += 1;
                    outcomes.ok(index);
                }
                Err((kind, message)) => {
                    self.builders.rollback(n);
                    outcomes.failed(n, RecordError { index, kind, message });
                }
            }
        }
        let batch = self.builders.finish(&self.plan, &self.schema)?;
        Ok(outcomes.into_decoded(batch))
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// Writes CSV: a header line once per encoder (when the options ask for one) with dotted names
/// for struct members, then one line per row ending in '\n'.
///
/// Nulls are empty cells and empty strings `""`; cells holding the delimiter, a quote, CR or LF
/// are quoted with `""` escapes; floats use the shortest exact representation (`NaN`, `inf`,
/// `-inf` for non-finite ones); timestamps are integer milliseconds. Lists are not supported.
#[derive(Debug)]
pub struct CsvEncoder {
    schema: SchemaRef,
    options: CsvOptions,
    /// The column names of the first batch, once written.
    names: Option<Vec<String>>,
}

impl CsvEncoder {
    /// An encoder for batches of `schema`.
    pub fn new(schema: SchemaRef, options: &CsvOptions) -> Result<Self> {
        options.validate()?;
        for f in schema.fields().iter() {
            check_type(f.name(), f.data_type(), Support::Flat, "csv")?;
        }
        Ok(Self { schema, options: *options, names: None })
    }

    /// The schema given at construction.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// A leaf column with the structs above it.
struct Leaf<'v, 'a> {
    ancestors: Vec<&'v View<'a>>,
    view: &'v View<'a>,
}

fn flatten<'v, 'a>(
    view: &'v View<'a>,
    path: String,
    ancestors: &[&'v View<'a>],
    names: &mut Vec<String>,
    out: &mut Vec<Leaf<'v, 'a>>,
) {
    if let View::Struct(_, children) = view {
        let mut up = ancestors.to_vec();
        up.push(view);
        for child in children {
            flatten(&child.view, format!("{path}.{}", child.name), &up, names, out);
        }
    } else {
        names.push(path);
        out.push(Leaf { ancestors: ancestors.to_vec(), view });
    }
}

impl Encoder for CsvEncoder {
    fn encode(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()> {
        let schema = batch.schema_ref();
        let views = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| View::new(f.name(), c.as_ref(), Support::Flat, "csv"))
            .collect::<Result<Vec<_>>>()?;
        let mut names = Vec::new();
        let mut leaves = Vec::new();
        for (f, v) in schema.fields().iter().zip(&views) {
            flatten(v, f.name().clone(), &[], &mut names, &mut leaves);
        }
        match &self.names {
            Some(first) if *first != names => {
                return Err(FormatError::SchemaMismatch(format!(
                    "CSV columns {names:?} differ from the columns already written {first:?}"
                )))
            }
            Some(_) => {}
            None => {
                if self.options.header {
                    for (i, name) in names.iter().enumerate() {
                        if i > 0 {
                            out.push(self.options.delimiter);
                        }
                        write_cell(out, name, self.options.delimiter, false);
                    }
                    out.push(b'\n');
                }
                self.names = Some(names);
            }
        }
        let delimiter = self.options.delimiter;
        for row in 0..batch.num_rows() {
            for (i, leaf) in leaves.iter().enumerate() {
                if i > 0 {
                    out.push(delimiter);
                }
                if leaf.ancestors.iter().any(|a| a.is_null(row)) {
                    continue;
                }
                match leaf.view.get(row) {
                    Scalar::Null | Scalar::Struct(..) | Scalar::List(..) | Scalar::Other(..) => {}
                    Scalar::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
                    Scalar::I64(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
                    Scalar::U64(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
                    Scalar::F64(v) => write_float(out, v),
                    Scalar::F32(v) => {
                        if v.is_finite() {
                            out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
                        } else {
                            write_float(out, f64::from(v));
                        }
                    }
                    Scalar::Str(s) => write_cell(out, s, delimiter, true),
                }
            }
            out.push(b'\n');
        }
        Ok(())
    }
}

fn write_float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    } else if v.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if v > 0.0 {
        out.extend_from_slice(b"inf");
    } else {
        out.extend_from_slice(b"-inf");
    }
}

/// Writes a text cell, quoted when needed (and when empty, if `quote_empty`, to tell it from a
/// null).
fn write_cell(out: &mut Vec<u8>, s: &str, delimiter: u8, quote_empty: bool) {
    let needs =
        (s.is_empty() && quote_empty) || s.bytes().any(|b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r');
    if !needs {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    for part in s.as_bytes().split_inclusive(|&b| b == b'"') {
        out.extend_from_slice(part);
        if part.last() == Some(&b'"') {
            out.push(b'"');
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    use arrow_array::Array;

    use super::*;
    use crate::{split_records, FieldSpec, FieldType, FormatSpec, SchemaSpec};

    fn nested_schema() -> SchemaRef {
        SchemaSpec::new(vec![
            FieldSpec::new("device_id", FieldType::String),
            FieldSpec::new("ts", FieldType::Int64),
            FieldSpec::new_struct(
                "readings",
                vec![
                    FieldSpec::new("temp", FieldType::Float64),
                    FieldSpec::new("vibration", FieldType::Float64).with_required(false),
                ],
            )
            .with_required(false),
            FieldSpec::new("ok", FieldType::Bool).with_required(false),
        ])
        .to_arrow()
    }

    fn decode(dec: &mut CsvDecoder, text: &str) -> Decoded {
        let mut ranges = Vec::new();
        split_records(&FormatSpec::Csv(CsvOptions::default()), text.as_bytes(), true, &mut ranges).unwrap();
        dec.decode(text.as_bytes(), &ranges).unwrap()
    }

    #[test]
    fn header_parsing() {
        assert_eq!(csv_header(b"\xEF\xBB\xBFa, b ,\"c,d\",\"e\"\"f\"\r", b','), vec!["a", "b", "c,d", "e\"f"]);
        assert_eq!(csv_header(b"a;b", b';'), vec!["a", "b"]);
        assert_eq!(csv_header(b"a,\"b", b','), vec!["a", "\"b"]);
    }

    #[test]
    fn decodes_by_position_and_by_header() {
        let schema = nested_schema();
        let mut dec = CsvDecoder::new(schema.clone(), &CsvOptions::default(), None).unwrap();
        let d = decode(&mut dec, "a,1,22.5,0.1,true\n\"b,\"\"q\"\"\",2,,,\nc, 3 ,1e2,,FALSE\n\"\",4,5,,\n");
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let b = &d.batch;
        let ids: Vec<_> = b.column(0).as_string::<i32>().iter().collect();
        assert_eq!(ids, vec![Some("a"), Some("b,\"q\""), Some("c"), Some("")]);
        assert_eq!(b.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![1, 2, 3, 4]);
        let r = b.column(2).as_struct();
        assert_eq!(r.nulls().map(|n| n.iter().collect::<Vec<_>>()), Some(vec![true, false, true, true]));
        assert_eq!(r.column(0).as_primitive::<Float64Type>().value(2), 100.0);
        let ok: Vec<_> = b.column(3).as_boolean().iter().collect();
        assert_eq!(ok, vec![Some(true), None, Some(false), None]);

        let header = csv_header(b"ok,readings.temp,extra,ts,device_id", b',');
        let mut dec = CsvDecoder::new(schema.clone(), &CsvOptions::default(), Some(&header)).unwrap();
        let d = decode(&mut dec, "1,2.5,ignored,7,x\n,,,8,y\n");
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let b = &d.batch;
        assert_eq!(b.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![7, 8]);
        assert!(b.column(2).is_valid(0) && b.column(2).is_null(1));
        assert!(b.column(2).as_struct().column(1).is_null(0));

        let err = CsvDecoder::new(schema.clone(), &CsvOptions::default(), Some(&["device_id".to_owned()]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "CSV header: no column for required field `ts`");
        let dup = vec!["ts".to_owned(), "device_id".to_owned(), "ts".to_owned()];
        let err = CsvDecoder::new(schema, &CsvOptions::default(), Some(&dup)).unwrap_err().to_string();
        assert_eq!(err, "CSV header: column `ts` appears twice");
    }

    #[test]
    fn errors_have_exact_messages() {
        let mut dec = CsvDecoder::new(nested_schema(), &CsvOptions::default(), None).unwrap();
        let text = concat!(
            "good,1,1.5,,\n",
            "a,yesterday,1.5,,\n",
            "a,,1.5,,\n",
            "a,1,,0.5,\n",
            "a,1,x,,\n",
            "a,1,1,,maybe\n",
            "a,99999999999999999999,1,,\n",
            "a,1,1,,,extra\n",
            "\"a,1,1,,\n",
            "\"a\"b,1,1,,\n",
            "good2,2,,,\n",
        );
        let mut buf = text.as_bytes().to_vec();
        buf.extend_from_slice(b"a\xff,1,1,,\n");
        let mut ranges = Vec::new();
        split_records(&FormatSpec::Csv(CsvOptions::default()), &buf, true, &mut ranges).unwrap();
        let d = dec.decode(&buf, &ranges).unwrap();
        let errs: Vec<_> = d.errors.iter().map(|e| (e.index, e.kind.as_str(), e.message.as_str())).collect();
        assert_eq!(
            errs,
            vec![
                (1, "schema", "column `ts`: expected int64, found \"yesterday\" (line: a,yesterday,1.5,,)"),
                (2, "schema", "column `ts`: required value is empty or missing (line: a,,1.5,,)"),
                (3, "schema", "column `readings.temp`: required value is empty or missing (line: a,1,,0.5,)"),
                (4, "schema", "column `readings.temp`: expected float64, found \"x\" (line: a,1,x,,)"),
                (5, "schema", "column `ok`: expected bool, found \"maybe\" (line: a,1,1,,maybe)"),
                (
                    6,
                    "schema",
                    "column `ts`: integer 99999999999999999999 is out of range for int64 (line: a,99999999999999999999,1,,)"
                ),
                (7, "schema", "line has 6 columns, expected 5 (line: a,1,1,,,extra)"),
                (8, "decode", "invalid CSV at byte 8: unterminated quoted field"),
                (9, "decode", "invalid CSV at byte 3: unexpected character after a closing quote"),
                (11, "decode", "invalid UTF-8 at byte 1"),
            ]
        );
        assert_eq!(d.row_records, Some(vec![0, 10]));
        let ids: Vec<_> = d.batch.column(0).as_string::<i32>().iter().flatten().collect();
        assert_eq!(ids, vec!["good", "good2"]);
    }

    #[test]
    fn round_trip() {
        let schema = nested_schema();
        let mut dec = CsvDecoder::new(schema.clone(), &CsvOptions::default(), None).unwrap();
        let d = decode(&mut dec, "a,1,22.5,0.1,true\n\"b,\"\"q\"\"\",2,,,\nc,3,1e2,,false\n\"\",-4,NaN,,\n");
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let batch = d.batch;
        for options in [CsvOptions::default(), CsvOptions { delimiter: b';', header: false }] {
            let mut out = Vec::new();
            let mut enc = CsvEncoder::new(schema.clone(), &options).unwrap();
            enc.encode(&batch, &mut out).unwrap();
            enc.encode(&batch, &mut out).unwrap();
            let text = String::from_utf8(out.clone()).unwrap();
            let mut lines = text.lines();
            let header = if options.header {
                let h = lines.next().unwrap();
                assert_eq!(h, "device_id,ts,readings.temp,readings.vibration,ok");
                Some(csv_header(h.as_bytes(), options.delimiter))
            } else {
                None
            };
            let mut dec = CsvDecoder::new(schema.clone(), &options, header.as_deref()).unwrap();
            let body: String = lines.map(|l| format!("{l}\n")).collect();
            let mut ranges = Vec::new();
            split_records(&FormatSpec::Csv(options), body.as_bytes(), true, &mut ranges).unwrap();
            let back = dec.decode(body.as_bytes(), &ranges).unwrap();
            assert!(back.errors.is_empty(), "{:?}", back.errors);
            assert_eq!(back.batch.num_rows(), 2 * batch.num_rows());
            let again = back.batch.slice(0, batch.num_rows());
            for c in 0..batch.num_columns() {
                if c == 2 {
                    // NaN != NaN: compare the encoded text instead.
                    continue;
                }
                assert_eq!(again.column(c).as_ref(), batch.column(c).as_ref(), "column {c}");
            }
            let mut out2 = Vec::new();
            CsvEncoder::new(schema.clone(), &options).unwrap().encode(&again, &mut out2).unwrap();
            let first_part = &out[..out2.len()];
            assert_eq!(String::from_utf8_lossy(&out2), String::from_utf8_lossy(first_part));
        }
        let mut out = Vec::new();
        CsvEncoder::new(schema, &CsvOptions::default()).unwrap().encode(&batch, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "device_id,ts,readings.temp,readings.vibration,ok\na,1,22.5,0.1,true\n\"b,\"\"q\"\"\",2,,,\nc,3,100.0,,false\n\"\",-4,NaN,,\n"
        );
    }

    #[test]
    fn encoder_rejects_lists_and_changed_columns() {
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "l",
            arrow_schema::DataType::List(Arc::new(arrow_schema::Field::new(
                "item",
                arrow_schema::DataType::Int64,
                true,
            ))),
            true,
        )]));
        let err = CsvEncoder::new(schema, &CsvOptions::default()).unwrap_err().to_string();
        assert_eq!(err, "field `l`: type List(Int64) is not supported by the csv format");
        let batch = RecordBatch::try_from_iter(vec![(
            "a",
            Arc::new(arrow_array::Int64Array::from(vec![1])) as arrow_array::ArrayRef,
        )])
        .unwrap();
        let other = RecordBatch::try_from_iter(vec![(
            "b",
            Arc::new(arrow_array::Int64Array::from(vec![1])) as arrow_array::ArrayRef,
        )])
        .unwrap();
        let mut enc = CsvEncoder::new(batch.schema(), &CsvOptions::default()).unwrap();
        let mut out = Vec::new();
        enc.encode(&batch, &mut out).unwrap();
        let err = enc.encode(&other, &mut out).unwrap_err().to_string();
        assert_eq!(
            err,
            "batch does not match the encoder's schema: CSV columns [\"b\"] differ from the columns already written [\"a\"]"
        );
    }
}
