//! The JSON Lines encoder and [`row_to_json`].

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::encode::{check_type, display_value, Scalar, Support, View};
use crate::{Encoder, Result};

/// Writes one JSON object per row, each ending in '\n'.
///
/// Structs become nested objects, lists arrays, nulls `null`; floats use the shortest
/// representation that reads back exactly (`25.0` for integral ones), and NaN or infinities,
/// which JSON cannot hold, become `null`; timestamps of any unit are written as integer
/// milliseconds since the epoch.
#[derive(Debug)]
pub struct JsonEncoder {
    schema: SchemaRef,
}

impl JsonEncoder {
    /// An encoder for batches of `schema`; fails on types it cannot write (such as binary,
    /// decimals, dates, maps).
    pub fn new(schema: SchemaRef) -> Result<Self> {
        for f in schema.fields().iter() {
            check_type(f.name(), f.data_type(), Support::Nested, "json")?;
        }
        Ok(Self { schema })
    }

    /// The schema given at construction.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

impl Encoder for JsonEncoder {
    fn encode(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()> {
        let cols = columns(batch, Support::Nested)?;
        for row in 0..batch.num_rows() {
            write_row(out, &cols, row);
            out.push(b'\n');
        }
        Ok(())
    }
}

/// Each column's `"name":` prefix and its view.
fn columns(batch: &RecordBatch, support: Support) -> Result<Vec<(Vec<u8>, View<'_>)>> {
    let schema = batch.schema_ref();
    schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| {
            let mut key = Vec::with_capacity(f.name().len() + 3);
            write_json_str(&mut key, f.name());
            key.push(b':');
            Ok((key, View::new(f.name(), c.as_ref(), support, "json")?))
        })
        .collect()
}

fn write_row(out: &mut Vec<u8>, cols: &[(Vec<u8>, View<'_>)], row: usize) {
    out.push(b'{');
    for (i, (key, view)) in cols.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(key);
        write_value(out, view.get(row));
    }
    out.push(b'}');
}

fn write_value(out: &mut Vec<u8>, value: Scalar<'_>) {
    match value {
        Scalar::Null => out.extend_from_slice(b"null"),
        Scalar::Bool(true) => out.extend_from_slice(b"true"),
        Scalar::Bool(false) => out.extend_from_slice(b"false"),
        Scalar::I64(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        Scalar::U64(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        Scalar::F64(v) => {
            if v.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
            } else {
                out.extend_from_slice(b"null");
            }
        }
        Scalar::F32(v) => {
            if v.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
            } else {
                out.extend_from_slice(b"null");
            }
        }
        Scalar::Str(s) => write_json_str(out, s),
        Scalar::Struct(children, row) => {
            out.push(b'{');
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(out, child.name);
                out.push(b':');
                write_value(out, child.view.get(row));
            }
            out.push(b'}');
        }
        Scalar::List(values, start, end) => {
            out.push(b'[');
            for i in start..end {
                if i > start {
                    out.push(b',');
                }
                write_value(out, values.get(i));
            }
            out.push(b']');
        }
        Scalar::Other(array, row) => write_json_str(out, &display_value(array, row)),
    }
}

/// Bytes that need an escape in a JSON string.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Writes `s` as a quoted, escaped JSON string.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[b as usize] {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]),
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// One column's values as JSON texts, one row at a time: for a sink that stores a nested
/// value (a struct, a list) in a JSON column of its own (PostgreSQL `jsonb`). Types the JSON
/// encoder does not support are written as strings of their display form.
#[derive(Debug)]
pub struct JsonValues<'a> {
    view: View<'a>,
}

impl<'a> JsonValues<'a> {
    /// Views `array` (named `name` in errors).
    pub fn new(name: &str, array: &'a dyn arrow_array::Array) -> Result<Self> {
        Ok(Self { view: View::new(name, array, Support::Lenient, "json")? })
    }

    /// Appends row `row`'s value (`null` for a null) to `out`.
    pub fn write(&self, row: usize, out: &mut Vec<u8>) {
        write_value(out, self.view.get(row));
    }
}

/// Encodes one row as a JSON object (used for dead-letter payloads of rows that were already
/// decoded). Values of types the JSON encoder does not support are written as strings of their
/// Arrow display form. A row out of range gives `{}`.
pub fn row_to_json(batch: &RecordBatch, row: usize) -> String {
    if row >= batch.num_rows() {
        return "{}".to_owned();
    }
    let mut out = Vec::new();
    match columns(batch, Support::Lenient) {
        Ok(cols) => write_row(&mut out, &cols, row),
        // Lenient views accept every type, so this does not happen; stay total anyway.
        Err(e) => {
            out.extend_from_slice(b"{\"error\":");
            write_json_str(&mut out, &e.to_string());
            out.push(b'}');
        }
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{Int32Builder, ListBuilder};
    use arrow_array::{
        ArrayRef, BooleanArray, Decimal128Array, Float32Array, Float64Array, Int64Array, StringArray, StructArray,
        TimestampMillisecondArray, TimestampSecondArray, UInt64Array,
    };
    use arrow_schema::{DataType, Field, Fields, Schema};

    use super::*;
    use crate::{Decoder, JsonDecoder};

    fn sample() -> RecordBatch {
        let readings = StructArray::from(vec![
            (
                Arc::new(Field::new("temp", DataType::Float64, false)),
                Arc::new(Float64Array::from(vec![25.0, 22.51, f64::NAN])) as ArrayRef,
            ),
            (
                Arc::new(Field::new("vibration", DataType::Float64, true)),
                Arc::new(Float64Array::from(vec![Some(0.021), None, Some(f64::INFINITY)])) as ArrayRef,
            ),
        ]);
        RecordBatch::try_from_iter(vec![
            ("device_id", Arc::new(StringArray::from(vec!["a\"b", "line\nbreak\u{1}", "é😀"])) as ArrayRef),
            ("ts", Arc::new(Int64Array::from(vec![1, -2, i64::MAX])) as ArrayRef),
            ("readings", Arc::new(readings) as ArrayRef),
            ("ok", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn encodes_json_lines() {
        let batch = sample();
        let mut enc = JsonEncoder::new(batch.schema()).unwrap();
        let mut out = Vec::new();
        enc.encode(&batch, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"device_id":"a\"b","ts":1,"readings":{"temp":25.0,"vibration":0.021},"ok":true}"#,
                "\n",
                r#"{"device_id":"line\nbreak\u0001","ts":-2,"readings":{"temp":22.51,"vibration":null},"ok":null}"#,
                "\n",
                r#"{"device_id":"é😀","ts":9223372036854775807,"readings":{"temp":null,"vibration":null},"ok":false}"#,
                "\n"
            )
        );
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }

    #[test]
    fn round_trips_through_the_decoder() {
        let batch = sample();
        let mut out = Vec::new();
        JsonEncoder::new(batch.schema()).unwrap().encode(&batch, &mut out).unwrap();
        // NaN and inf became null, so the decoding schema has them nullable.
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new(
                "readings",
                DataType::Struct(Fields::from(vec![
                    Field::new("temp", DataType::Float64, true),
                    Field::new("vibration", DataType::Float64, true),
                ])),
                false,
            ),
            Field::new("ok", DataType::Boolean, true),
        ]));
        let mut ranges = Vec::new();
        crate::split_records(&crate::FormatSpec::Json, &out, true, &mut ranges).unwrap();
        let d = JsonDecoder::new(schema.clone()).unwrap().decode(&out, &ranges).unwrap();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let mut again = Vec::new();
        JsonEncoder::new(schema).unwrap().encode(&d.batch, &mut again).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn other_types() {
        let mut list = ListBuilder::new(Int32Builder::new());
        list.values().append_value(1);
        list.values().append_null();
        list.append(true);
        list.append(false);
        let batch = RecordBatch::try_from_iter(vec![
            ("u", Arc::new(UInt64Array::from(vec![u64::MAX, 0])) as ArrayRef),
            ("f", Arc::new(Float32Array::from(vec![0.1f32, 1e30])) as ArrayRef),
            ("t", Arc::new(TimestampMillisecondArray::from(vec![1700000000123, -1])) as ArrayRef),
            ("s", Arc::new(TimestampSecondArray::from(vec![1, 2])) as ArrayRef),
            ("l", Arc::new(list.finish()) as ArrayRef),
        ])
        .unwrap();
        let mut out = Vec::new();
        JsonEncoder::new(batch.schema()).unwrap().encode(&batch, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"u\":18446744073709551615,\"f\":0.1,\"t\":1700000000123,\"s\":1000,\"l\":[1,null]}\n{\"u\":0,\"f\":1e30,\"t\":-1,\"s\":2000,\"l\":null}\n"
        );
    }

    #[test]
    fn unsupported_types_and_row_to_json() {
        let dec = Decimal128Array::from(vec![12345]).with_precision_and_scale(10, 2).unwrap();
        let batch = RecordBatch::try_from_iter(vec![
            ("d", Arc::new(dec) as ArrayRef),
            ("x", Arc::new(StringArray::from(vec!["q\""])) as ArrayRef),
        ])
        .unwrap();
        let err = JsonEncoder::new(batch.schema()).unwrap_err().to_string();
        assert_eq!(err, "field `d`: type Decimal128(10, 2) is not supported by the json format");
        assert_eq!(row_to_json(&batch, 0), r#"{"d":"123.45","x":"q\""}"#);
        assert_eq!(row_to_json(&batch, 5), "{}");
        assert_eq!(
            row_to_json(&sample(), 1),
            r#"{"device_id":"line\nbreak\u0001","ts":-2,"readings":{"temp":22.51,"vibration":null},"ok":null}"#
        );
    }
}
