//! Rows as PostgreSQL's binary `COPY` format, column types mapped both ways.
//!
//! Binary `COPY` is the fastest way in (no text parsing on the server), but it is strict: each
//! value must be the exact binary form of its column's type. So the sink reads the table's
//! column types once and picks, per column, how to turn the Arrow values into that type; a
//! value that does not fit (an integer too large for `integer`) refuses its row alone.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use weir_formats::JsonValues;

/// Microseconds from 1970-01-01 (Arrow's epoch) to 2000-01-01 (PostgreSQL's).
const PG_EPOCH_US: i64 = 946_684_800_000_000;
/// Days between the same two dates.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The PostgreSQL column types the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Bytea,
    Timestamptz,
    Timestamp,
    Date,
    Json,
    Jsonb,
}

impl PgType {
    /// The type of a column, by its `pg_type.typname`; `None` for one the sink cannot write.
    pub(crate) fn from_typname(name: &str) -> Option<Self> {
        Some(match name {
            "bool" => Self::Bool,
            "int2" => Self::Int2,
            "int4" => Self::Int4,
            "int8" => Self::Int8,
            "float4" => Self::Float4,
            "float8" => Self::Float8,
            "text" | "varchar" | "bpchar" | "name" => Self::Text,
            "bytea" => Self::Bytea,
            "timestamptz" => Self::Timestamptz,
            "timestamp" => Self::Timestamp,
            "date" => Self::Date,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            _ => return None,
        })
    }

    /// The column type a created table gives an Arrow type.
    pub(crate) fn for_arrow(t: &DataType) -> Option<Self> {
        Some(match t {
            DataType::Boolean => Self::Bool,
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => Self::Int2,
            DataType::Int32 | DataType::UInt16 => Self::Int4,
            DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Self::Int8,
            DataType::Float16 | DataType::Float32 => Self::Float4,
            DataType::Float64 => Self::Float8,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Self::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Self::Bytea,
            DataType::Timestamp(_, _) => Self::Timestamptz,
            DataType::Date32 => Self::Date,
            DataType::Struct(_) | DataType::List(_) | DataType::LargeList(_) | DataType::Map(_, _) => Self::Jsonb,
            _ => return None,
        })
    }

    /// The SQL name, for `CREATE TABLE` and messages.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::Bool => "boolean",
            Self::Int2 => "smallint",
            Self::Int4 => "integer",
            Self::Int8 => "bigint",
            Self::Float4 => "real",
            Self::Float8 => "double precision",
            Self::Text => "text",
            Self::Bytea => "bytea",
            Self::Timestamptz => "timestamp with time zone",
            Self::Timestamp => "timestamp without time zone",
            Self::Date => "date",
            Self::Json => "json",
            Self::Jsonb => "jsonb",
        }
    }

    /// Whether values of Arrow type `t` can be written to a column of this type. Integers
    /// into `timestamp` columns are read as milliseconds since 1970 (Weir's event times).
    pub(crate) fn accepts(self, t: &DataType) -> bool {
        let int = t.is_integer();
        match self {
            Self::Bool => matches!(t, DataType::Boolean),
            Self::Int2 | Self::Int4 | Self::Int8 => int,
            Self::Float4 | Self::Float8 => int || t.is_floating(),
            Self::Text | Self::Json | Self::Jsonb => true,
            Self::Bytea => matches!(t, DataType::Binary | DataType::LargeBinary | DataType::Utf8 | DataType::LargeUtf8),
            Self::Timestamptz | Self::Timestamp => matches!(t, DataType::Timestamp(_, _) | DataType::Int64),
            Self::Date => matches!(t, DataType::Date32),
        }
    }
}

/// A row the encoder left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadValue {
    pub(crate) row: usize,
    pub(crate) reason: String,
}

/// The binary `COPY` stream's header: signature, flags, header extension length.
fn header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
}

/// Encodes every row of `batch` for `COPY ... FROM STDIN (FORMAT binary)`, column `i` of the
/// batch going to a column of type `types[i]`. Rows with a value that does not fit their
/// column are left out and returned.
pub(crate) fn encode(batch: &RecordBatch, types: &[PgType], names: &[String]) -> (Vec<u8>, Vec<BadValue>) {
    let mut out = Vec::with_capacity(16 + batch.num_rows() * (2 + 12 * types.len()));
    header(&mut out);
    let json: Vec<Option<JsonValues<'_>>> = batch
        .columns()
        .iter()
        .zip(types)
        .zip(names)
        .map(|((c, t), n)| {
            let wants = matches!(t, PgType::Json | PgType::Jsonb)
                || (*t == PgType::Text
                    && !matches!(c.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View));
            if wants {
                JsonValues::new(n, c.as_ref()).ok()
            } else {
                None
            }
        })
        .collect();
    let mut bad = Vec::new();
    let fields = (types.len() as i16).to_be_bytes();
    for row in 0..batch.num_rows() {
        let start = out.len();
        out.extend_from_slice(&fields);
        for (i, col) in batch.columns().iter().enumerate() {
            if let Err(reason) = value(&mut out, col.as_ref(), row, types[i], json[i].as_ref()) {
                out.truncate(start);
                bad.push(BadValue { row, reason: format!("column `{}` ({}): {reason}", names[i], types[i].sql()) });
                break;
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    (out, bad)
}

/// A value's length-prefixed field.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An integer column's value at `row` as i128 (every Arrow integer fits).
fn int_at(a: &dyn Array, row: usize) -> Option<i128> {
    Some(match a.data_type() {
        DataType::Int8 => i128::from(a.as_primitive::<Int8Type>().value(row)),
        DataType::Int16 => i128::from(a.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => i128::from(a.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => i128::from(a.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => i128::from(a.as_primitive::<UInt8Type>().value(row)),
        DataType::UInt16 => i128::from(a.as_primitive::<UInt16Type>().value(row)),
        DataType::UInt32 => i128::from(a.as_primitive::<UInt32Type>().value(row)),
        DataType::UInt64 => i128::from(a.as_primitive::<UInt64Type>().value(row)),
        _ => return None,
    })
}

fn float_at(a: &dyn Array, row: usize) -> Option<f64> {
    match a.data_type() {
        DataType::Float32 => Some(f64::from(a.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => Some(a.as_primitive::<Float64Type>().value(row)),
        _ => int_at(a, row).map(|v| v as f64),
    }
}

/// Microseconds since 1970 of a timestamp (or milliseconds-integer) value.
fn micros_at(a: &dyn Array, row: usize) -> Option<i128> {
    let v = |x: i64, mul: i128, div: i128| Some(i128::from(x) * mul / div);
    match a.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => v(a.as_primitive::<TimestampSecondType>().value(row), 1_000_000, 1),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            v(a.as_primitive::<TimestampMillisecondType>().value(row), 1000, 1)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            v(a.as_primitive::<TimestampMicrosecondType>().value(row), 1, 1)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            v(a.as_primitive::<TimestampNanosecondType>().value(row), 1, 1000)
        }
        DataType::Int64 => v(a.as_primitive::<Int64Type>().value(row), 1000, 1),
        _ => None,
    }
}

fn str_at(a: &dyn Array, row: usize) -> Option<&str> {
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(a.as_string_view().value(row)),
        _ => None,
    }
}

/// Appends one field: the value of `a` at `row` as PostgreSQL type `t`.
fn value(out: &mut Vec<u8>, a: &dyn Array, row: usize, t: PgType, json: Option<&JsonValues<'_>>) -> Result<(), String> {
    if a.is_null(row) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return Ok(());
    }
    let unsupported = || format!("cannot write a value of type {} here", a.data_type());
    let int = |lo: i128, hi: i128| -> Result<i128, String> {
        let v = int_at(a, row).ok_or_else(unsupported)?;
        if v < lo || v > hi {
            return Err(format!("{v} is out of range"));
        }
        Ok(v)
    };
    match t {
        PgType::Bool => {
            if !matches!(a.data_type(), DataType::Boolean) {
                return Err(unsupported());
            }
            field(out, &[u8::from(a.as_boolean().value(row))]);
        }
        PgType::Int2 => field(out, &(int(i16::MIN.into(), i16::MAX.into())? as i16).to_be_bytes()),
        PgType::Int4 => field(out, &(int(i32::MIN.into(), i32::MAX.into())? as i32).to_be_bytes()),
        PgType::Int8 => field(out, &(int(i64::MIN.into(), i64::MAX.into())? as i64).to_be_bytes()),
        PgType::Float4 => field(out, &(float_at(a, row).ok_or_else(unsupported)? as f32).to_be_bytes()),
        PgType::Float8 => field(out, &float_at(a, row).ok_or_else(unsupported)?.to_be_bytes()),
        PgType::Text => match str_at(a, row) {
            Some(s) => field(out, s.as_bytes()),
            None => json_field(out, json, row, false).ok_or_else(unsupported)?,
        },
        PgType::Json | PgType::Jsonb => match str_at(a, row) {
            // Text already holding JSON goes as it is; the server checks it.
            Some(s) => {
                let jsonb = t == PgType::Jsonb;
                out.extend_from_slice(&((s.len() + usize::from(jsonb)) as i32).to_be_bytes());
                if jsonb {
                    out.push(1);
                }
                out.extend_from_slice(s.as_bytes());
            }
            None => json_field(out, json, row, t == PgType::Jsonb).ok_or_else(unsupported)?,
        },
        PgType::Bytea => match a.data_type() {
            DataType::Binary => field(out, a.as_binary::<i32>().value(row)),
            DataType::LargeBinary => field(out, a.as_binary::<i64>().value(row)),
            _ => field(out, str_at(a, row).ok_or_else(unsupported)?.as_bytes()),
        },
        PgType::Timestamptz | PgType::Timestamp => {
            let us = micros_at(a, row).ok_or_else(unsupported)? - i128::from(PG_EPOCH_US);
            let us = i64::try_from(us).map_err(|_| "the time is out of range".to_string())?;
            field(out, &us.to_be_bytes());
        }
        PgType::Date => {
            if !matches!(a.data_type(), DataType::Date32) {
                return Err(unsupported());
            }
            let d = a.as_primitive::<Date32Type>().value(row).checked_sub(PG_EPOCH_DAYS);
            field(out, &d.ok_or_else(|| "the date is out of range".to_string())?.to_be_bytes());
        }
    }
    Ok(())
}

/// Appends a value rendered as JSON text (`jsonb`'s binary form is a version byte, 1, and the
/// text). `None` when the column has no JSON view.
fn json_field(out: &mut Vec<u8>, json: Option<&JsonValues<'_>>, row: usize, jsonb: bool) -> Option<()> {
    let json = json?;
    let len_at = out.len();
    out.extend_from_slice(&0i32.to_be_bytes());
    if jsonb {
        out.push(1);
    }
    let start = out.len();
    json.write(row, out);
    let len = out.len() - start + usize::from(jsonb);
    out[len_at..len_at + 4].copy_from_slice(&(len as i32).to_be_bytes());
    Some(())
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table name as written in the settings (`readings`, `metrics.readings`, `"Mixed Case"`)
/// split into its parts, unquoted; unquoted parts fold to lower case, as PostgreSQL folds them.
pub(crate) fn parse_table(name: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = name.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("table name `{name}`: unterminated quote")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("table name `{name}`: an empty part"));
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(c) => return Err(format!("table name `{name}`: `{c}` after a quoted part")),
        }
    }
    if parts.len() > 2 {
        return Err(format!("table name `{name}`: at most `schema.table`"));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    #[test]
    fn table_names_fold_and_quote_like_postgres() {
        assert_eq!(parse_table("Readings").unwrap(), ["readings"]);
        assert_eq!(parse_table("metrics.Readings").unwrap(), ["metrics", "readings"]);
        assert_eq!(parse_table("\"Mixed \"\"Case\"\"\".t").unwrap(), ["Mixed \"Case\"", "t"]);
        assert!(parse_table("a.b.c").unwrap_err().contains("at most"));
        assert!(parse_table("a..b").unwrap_err().contains("empty"));
        assert!(parse_table("\"open").unwrap_err().contains("unterminated"));
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn rows_encode_to_the_binary_copy_format() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("x", DataType::Float64, false),
            Field::new("ok", DataType::Boolean, false),
            Field::new("at", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("a"), None])),
            Arc::new(Int64Array::from(vec![Some(7), Some(70_000)])),
            Arc::new(Float64Array::from(vec![1.5, 2.0])),
            Arc::new(BooleanArray::from(vec![true, false])),
            Arc::new(TimestampMillisecondArray::from(vec![946_684_800_001, 0])),
        ];
        let batch = RecordBatch::try_new(schema, cols).unwrap();
        let names: Vec<String> = ["id", "n", "x", "ok", "at"].map(String::from).to_vec();
        let types = [PgType::Text, PgType::Int2, PgType::Float8, PgType::Bool, PgType::Timestamptz];
        let (out, bad) = encode(&batch, &types, &names);
        // Row 1's 70,000 does not fit a smallint: that row alone is left out.
        assert_eq!(bad, [BadValue { row: 1, reason: "column `n` (smallint): 70000 is out of range".into() }]);
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        want.extend_from_slice(&5i16.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 1, b'a']);
        want.extend_from_slice(&[0, 0, 0, 2, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&1.5f64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 1, 1]);
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&1000i64.to_be_bytes());
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(out, want);
    }

    #[test]
    fn nested_values_become_json_and_types_map_both_ways() {
        let s = Arc::new(arrow_array::StructArray::from(vec![(
            Arc::new(Field::new("t", DataType::Float64, false)),
            Arc::new(Float64Array::from(vec![20.5])) as ArrayRef,
        )]));
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("r", s.data_type().clone(), false)])),
            vec![s as ArrayRef],
        )
        .unwrap();
        let (out, bad) = encode(&batch, &[PgType::Jsonb], &["r".into()]);
        assert!(bad.is_empty());
        let body = br#"{"t":20.5}"#;
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\x01".to_vec();
        want.extend_from_slice(&((body.len() + 1) as i32).to_be_bytes());
        want.push(1);
        want.extend_from_slice(body);
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(out, want);
        for (t, pg) in [
            (DataType::Int64, PgType::Int8),
            (DataType::Utf8, PgType::Text),
            (DataType::Timestamp(TimeUnit::Millisecond, None), PgType::Timestamptz),
            (DataType::Float64, PgType::Float8),
        ] {
            assert_eq!(PgType::for_arrow(&t), Some(pg));
            assert!(pg.accepts(&t));
            assert_eq!(PgType::from_typname(&format!("{pg:?}").to_lowercase()), Some(pg));
        }
        assert!(!PgType::Bool.accepts(&DataType::Int64));
        assert!(PgType::Timestamptz.accepts(&DataType::Int64), "event times in ms");
        assert_eq!(PgType::from_typname("numeric"), None);
    }
}
