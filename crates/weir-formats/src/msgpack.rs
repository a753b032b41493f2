//! MessagePack: each record is one top-level map with string keys.
//!
//! Integers of any width go to `int64` (and `float64`), `float 32`/`float 64` to `float64`, `str`
//! to `string`, `bool`, `nil` (null), nested maps to structs; timestamps take integer
//! milliseconds, RFC 3339 strings or the timestamp extension (type -1). Unknown keys are skipped
//! whatever their value (arrays, binary, extensions included).

use std::convert::Infallible;
use std::ops::Range;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use rmp::encode::{self as enc, ByteBuf, ValueWriteError};
use rmp::Marker;

use crate::columns::{
    end_struct, null_subtree, parse_timestamp_ms, truncate_subtree, Builders, Column, Data, Kind, Outcomes, Plan, ROOT,
};
use crate::encode::{check_type, display_value, Scalar, Support, View};
use crate::{record_bytes, truncate_for_message, Decoded, Decoder, Encoder, RecordError, RecordErrorKind, Result};

const EOF: &str = "unexpected end of input";
const INVALID_UTF8: &str = "invalid UTF-8";

/// Why a record failed, before it is rendered.
#[derive(Debug)]
enum PErr {
    Decode { pos: usize, reason: &'static str },
    Schema(String),
}

/// The head of a value: its type and, for containers and strings, its length.
#[derive(Debug, Clone, Copy)]
enum Head {
    Nil,
    Bool(bool),
    Int(i64),
    /// Above `i64::MAX`.
    UInt(u64),
    F32(f32),
    F64(f64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    Ext(usize, i8),
}

/// A cursor over one record.
#[derive(Debug)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], PErr> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(PErr::Decode { pos: self.buf.len(), reason: EOF }),
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], PErr> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PErr> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, PErr> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, PErr> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, PErr> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a value's head (its marker and length or scalar).
    fn head(&mut self) -> Result<Head, PErr> {
        let at = self.pos;
        let marker = Marker::from_u8(self.u8()?);
        Ok(match marker {
            Marker::FixPos(v) => Head::Int(v.into()),
            Marker::FixNeg(v) => Head::Int(v.into()),
            Marker::FixMap(n) => Head::Map(n.into()),
            Marker::FixArray(n) => Head::Array(n.into()),
            Marker::FixStr(n) => Head::Str(n.into()),
            Marker::Null => Head::Nil,
            Marker::False => Head::Bool(false),
            Marker::True => Head::Bool(true),
            Marker::Bin8 => Head::Bin(self.u8()?.into()),
            Marker::Bin16 => Head::Bin(self.u16()?.into()),
            Marker::Bin32 => Head::Bin(self.u32()? as usize),
            Marker::Ext8 => {
                let n = self.u8()?.into();
                Head::Ext(n, self.u8()? as i8)
            }
            Marker::Ext16 => {
                let n = self.u16()?.into();
                Head::Ext(n, self.u8()? as i8)
            }
            Marker::Ext32 => {
                let n = self.u32()? as usize;
                Head::Ext(n, self.u8()? as i8)
            }
            Marker::FixExt1 => Head::Ext(1, self.u8()? as i8),
            Marker::FixExt2 => Head::Ext(2, self.u8()? as i8),
            Marker::FixExt4 => Head::Ext(4, self.u8()? as i8),
            Marker::FixExt8 => Head::Ext(8, self.u8()? as i8),
            Marker::FixExt16 => Head::Ext(16, self.u8()? as i8),
            Marker::F32 => Head::F32(f32::from_bits(self.u32()?)),
            Marker::F64 => Head::F64(f64::from_bits(self.u64()?)),
            Marker::U8 => Head::Int(self.u8()?.into()),
            Marker::U16 => Head::Int(self.u16()?.into()),
            Marker::U32 => Head::Int(self.u32()?.into()),
            Marker::U64 => {
                let v = self.u64()?;
                i64::try_from(v).map_or(Head::UInt(v), Head::Int)
            }
            Marker::I8 => Head::Int((self.u8()? as i8).into()),
            Marker::I16 => Head::Int((self.u16()? as i16).into()),
            Marker::I32 => Head::Int((self.u32()? as i32).into()),
            Marker::I64 => Head::Int(self.u64()? as i64),
            Marker::Str8 => Head::Str(self.u8()?.into()),
            Marker::Str16 => Head::Str(self.u16()?.into()),
            Marker::Str32 => Head::Str(self.u32()? as usize),
            Marker::Array16 => Head::Array(self.u16()?.into()),
            Marker::Array32 => Head::Array(self.u32()? as usize),
            Marker::Map16 => Head::Map(self.u16()?.into()),
            Marker::Map32 => Head::Map(self.u32()? as usize),
            Marker::Reserved => return Err(PErr::Decode { pos: at, reason: "invalid marker 0xc1" }),
        })
    }

    /// Skips the rest of a value whose head was read, checking that strings are UTF-8 when
    /// `check` is set; containers are skipped without recursion.
    fn skip_after(&mut self, head: Head, check: bool) -> Result<(), PErr> {
        let mut pending: u64 = 0;
        let mut head = head;
        loop {
            match head {
                Head::Str(n) if check => {
                    self.str(n)?;
                }
                Head::Str(n) | Head::Bin(n) | Head::Ext(n, _) => {
                    self.take(n)?;
                }
                Head::Array(n) => pending += n as u64,
                Head::Map(n) => pending += 2 * n as u64,
                _ => {}
            }
            if pending == 0 {
                return Ok(());
            }
            pending -= 1;
            head = self.head()?;
        }
    }

    fn skip(&mut self, check: bool) -> Result<(), PErr> {
        let head = self.head()?;
        self.skip_after(head, check)
    }

    /// Reads a string's bytes, checking UTF-8.
    fn str(&mut self, n: usize) -> Result<&'a [u8], PErr> {
        let start = self.pos;
        let s = self.take(n)?;
        if !s.is_ascii() {
            if let Err(e) = std::str::from_utf8(s) {
                return Err(PErr::Decode { pos: start + e.valid_up_to(), reason: INVALID_UTF8 });
            }
        }
        Ok(s)
    }
}

/// Splits a buffer into top-level values (see [`crate::split_records`]).
pub(crate) fn split(buf: &[u8], eof: bool, out: &mut Vec<Range<usize>>) -> usize {
    let mut start = 0;
    while start < buf.len() {
        let mut r = Reader { buf, pos: start };
        match r.skip(false) {
            Ok(()) => {
                out.push(start..r.pos);
                start = r.pos;
            }
            Err(PErr::Decode { reason: EOF, .. }) => {
                if eof {
                    out.push(start..buf.len());
                    start = buf.len();
                }
                break;
            }
            Err(PErr::Decode { pos, .. }) => {
                // An invalid byte: hand out what is before it and it as one bad record, and go
                // on after it.
                out.push(start..pos + 1);
                start = pos + 1;
            }
            Err(PErr::Schema(_)) => break,
        }
    }
    start
}

/// Describes a value for messages: `string "abc"`, `integer 5`, `array of 3`.
fn describe(head: Head, bytes: &[u8]) -> String {
    match head {
        Head::Nil => "nil".to_owned(),
        Head::Bool(b) => format!("bool {b}"),
        Head::Int(v) => format!("integer {v}"),
        Head::UInt(v) => format!("integer {v}"),
        Head::F32(v) => format!("float {v}"),
        Head::F64(v) => format!("float {v}"),
        Head::Str(n) => {
            let s = bytes.get(bytes.len().saturating_sub(n)..).unwrap_or_default();
            format!("string {:?}", truncate_for_message(&String::from_utf8_lossy(s), 40))
        }
        Head::Bin(n) => format!("binary of {n} bytes"),
        Head::Array(n) => format!("array of {n}"),
        Head::Map(n) => format!("map of {n}"),
        Head::Ext(n, t) => format!("extension type {t} of {n} bytes"),
    }
}

/// Milliseconds of a MessagePack timestamp extension (type -1).
fn ext_timestamp_ms(data: &[u8]) -> Option<i64> {
    let (secs, nanos): (i64, i64) = match data.len() {
        4 => (u32::from_be_bytes(data.try_into().ok()?).into(), 0),
        8 => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as i64)
        }
        12 => {
            let nanos = u32::from_be_bytes(data[..4].try_into().ok()?);
            let secs = i64::from_be_bytes(data[4..].try_into().ok()?);
            (secs, nanos.into())
        }
        _ => return None,
    };
    secs.checked_mul(1000)?.checked_add(nanos / 1_000_000)
}

/// Decodes MessagePack maps, one per record, into batches of a fixed schema (types: `Boolean`,
/// `Int64`, `Float64`, `Utf8`, `Timestamp(Millisecond, _)`, `Struct` of those).
#[derive(Debug)]
pub struct MsgPackDecoder {
    schema: SchemaRef,
    plan: Plan,
    builders: Builders,
}

impl MsgPackDecoder {
    /// A decoder for `schema`.
    pub fn new(schema: SchemaRef) -> Result<Self> {
        let plan = Plan::new(&schema, "msgpack")?;
        let builders = Builders::new(&plan);
        Ok(Self { schema, plan, builders })
    }
}

impl Decoder for MsgPackDecoder {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        self.builders.reserve(records.len());
        let mut outcomes = Outcomes::default();
        for (index, range) in records.iter().enumerate() {
            let rec = record_bytes(buf, index, range)?;
            let n = self.builders.rows;
            let mut p = Parser { r: Reader { buf: rec, pos: 0 }, plan: &self.plan, cols: &mut self.builders.cols };
            match p.record(n) {
                Ok(()) => {
                    self.builders.rows += 1;
                    outcomes.ok(index);
                }
                Err(e) => {
                    self.builders.rollback(n);
                    let (kind, message) = match e {
                        PErr::Decode { pos, reason: INVALID_UTF8 } => {
                            (RecordErrorKind::Decode, format!("invalid UTF-8 at byte {pos}"))
                        }
                        PErr::Decode { pos, reason } => {
                            (RecordErrorKind::Decode, format!("invalid MessagePack at byte {pos}: {reason}"))
                        }
                        PErr::Schema(m) => (RecordErrorKind::Schema, m),
                    };
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

struct Parser<'a, 'b> {
    r: Reader<'a>,
    plan: &'b Plan,
    cols: &'b mut [Column],
}

impl Parser<'_, '_> {
    fn record(&mut self, n: usize) -> Result<(), PErr> {
        let head = self.r.head()?;
        let result = match head {
            Head::Map(len) => self.map(ROOT, n, len),
            other => {
                self.r.skip_after(other, true)?;
                Err(PErr::Schema(format!("expected a map, found {}", describe(other, &self.r.buf[..self.r.pos]))))
            }
        };
        match result {
            Ok(()) => {}
            Err(PErr::Schema(m)) => {
                // A syntax error anywhere in the record takes precedence.
                let mut again = Reader { buf: self.r.buf, pos: 0 };
                again.skip(true)?;
                self.r.pos = again.pos;
                self.trailing()?;
                return Err(PErr::Schema(m));
            }
            Err(e) => return Err(e),
        }
        self.trailing()
    }

    fn trailing(&self) -> Result<(), PErr> {
        if self.r.pos < self.r.buf.len() {
            return Err(PErr::Decode { pos: self.r.pos, reason: "trailing bytes after the value" });
        }
        Ok(())
    }

    fn map(&mut self, s: usize, n: usize, len: usize) -> Result<(), PErr> {
        for _ in 0..len {
            let key_at = self.r.pos;
            let key = match self.r.head()? {
                Head::Str(l) => self.r.str(l)?,
                other => {
                    self.r.skip_after(other, true)?;
                    let what = describe(other, &self.r.buf[key_at..self.r.pos]);
                    return Err(PErr::Schema(format!("map key at byte {key_at} is not a string: found {what}")));
                }
            };
            match self.plan.find_child(s, key) {
                Some(c) => self.value(c, n)?,
                None => self.r.skip(true)?,
            }
        }
        end_struct(self.plan, self.cols, s, n).map_err(PErr::Schema)
    }

    fn value(&mut self, c: usize, n: usize) -> Result<(), PErr> {
        let plan = self.plan;
        let node = &plan.nodes[c];
        if self.cols[c].len() > n {
            truncate_subtree(plan, self.cols, c, n);
        }
        let start = self.r.pos;
        let head = self.r.head()?;
        if let Head::Nil = head {
            if node.required {
                return Err(PErr::Schema(format!("required field `{}` is null", node.path)));
            }
            null_subtree(plan, self.cols, c);
            return Ok(());
        }
        let col = &mut self.cols[c];
        let ok = match (&mut col.data, head) {
            (Data::F64(v), Head::Int(x)) => {
                v.push(x as f64);
                true
            }
            (Data::F64(v), Head::UInt(x)) => {
                v.push(x as f64);
                true
            }
            (Data::F64(v), Head::F32(x)) => {
                v.push(x.into());
                true
            }
            (Data::F64(v), Head::F64(x)) => {
                v.push(x);
                true
            }
            (Data::I64(v), Head::Int(x)) => {
                v.push(x);
                true
            }
            (Data::I64(_), Head::UInt(x)) => {
                return Err(PErr::Schema(format!("field `{}`: integer {x} is out of range for int64", node.path)))
            }
            (Data::I64(v), Head::Str(len)) if matches!(node.kind, Kind::Timestamp(_)) => {
                let s = self.r.str(len)?;
                match std::str::from_utf8(s).ok().and_then(parse_timestamp_ms) {
                    Some(ms) => {
                        v.push(ms);
                        true
                    }
                    None => {
                        return Err(PErr::Schema(format!(
                            "field `{}`: invalid timestamp {:?} (expected RFC 3339 or integer milliseconds)",
                            node.path,
                            truncate_for_message(&String::from_utf8_lossy(s), 40)
                        )))
                    }
                }
            }
            (Data::I64(v), Head::Ext(len, -1)) if matches!(node.kind, Kind::Timestamp(_)) => {
                let data = self.r.take(len)?;
                match ext_timestamp_ms(data) {
                    Some(ms) => {
                        v.push(ms);
                        true
                    }
                    None => {
                        return Err(PErr::Schema(format!(
                            "field `{}`: invalid timestamp extension of {len} bytes",
                            node.path
                        )))
                    }
                }
            }
            (Data::Str { offsets, bytes }, Head::Str(len)) => {
                let s = self.r.str(len)?;
                bytes.extend_from_slice(s);
                offsets.push(bytes.len() as i32);
                true
            }
            (Data::Bool(v), Head::Bool(b)) => {
                v.push(b);
                true
            }
            (Data::Struct, Head::Map(len)) => return self.map(c, n, len),
            _ => false,
        };
        if ok {
            col.valid.push(true);
            return Ok(());
        }
        self.r.skip_after(head, true)?;
        Err(PErr::Schema(format!(
            "field `{}`: expected {}, found {}",
            node.path,
            node.kind.name(),
            describe(head, &self.r.buf[start..self.r.pos])
        )))
    }
}

/// Writes one MessagePack map per row: column names as keys, nulls as `nil`, structs as nested
/// maps, lists as arrays, integers in their smallest form, timestamps as integer milliseconds.
#[derive(Debug)]
pub struct MsgPackEncoder {
    schema: SchemaRef,
}

impl MsgPackEncoder {
    /// An encoder for batches of `schema`.
    pub fn new(schema: SchemaRef) -> Result<Self> {
        for f in schema.fields().iter() {
            check_type(f.name(), f.data_type(), Support::Nested, "msgpack")?;
        }
        Ok(Self { schema })
    }

    /// The schema given at construction.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// The value of a write to a `ByteBuf`, which cannot fail.
fn done<T>(r: std::result::Result<T, ValueWriteError<Infallible>>) -> T {
    match r {
        Ok(v) => v,
        Err(ValueWriteError::InvalidMarkerWrite(e) | ValueWriteError::InvalidDataWrite(e)) => match e {},
    }
}

fn done_plain(r: std::result::Result<(), Infallible>) {
    match r {
        Ok(()) => {}
        Err(e) => match e {},
    }
}

fn write_value(out: &mut ByteBuf, value: Scalar<'_>) {
    match value {
        Scalar::Null => done_plain(enc::write_nil(out)),
        Scalar::Bool(b) => done_plain(enc::write_bool(out, b)),
        Scalar::I64(v) => {
            done(enc::write_sint(out, v));
        }
        Scalar::U64(v) => {
            done(enc::write_uint(out, v));
        }
        Scalar::F32(v) => done(enc::write_f32(out, v)),
        Scalar::F64(v) => done(enc::write_f64(out, v)),
        Scalar::Str(s) => write_str(out, s),
        Scalar::Struct(children, row) => {
            done(enc::write_map_len(out, children.len() as u32));
            for child in children {
                write_str(out, child.name);
                write_value(out, child.view.get(row));
            }
        }
        Scalar::List(values, start, end) => {
            done(enc::write_array_len(out, (end - start) as u32));
            for i in start..end {
                write_value(out, values.get(i));
            }
        }
        Scalar::Other(array, row) => write_str(out, &display_value(array, row)),
    }
}

fn write_str(out: &mut ByteBuf, s: &str) {
    done(enc::write_str(out, s));
}

impl Encoder for MsgPackEncoder {
    fn encode(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()> {
        let schema = batch.schema_ref();
        let cols = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| Ok((f.name().as_str(), View::new(f.name(), c.as_ref(), Support::Nested, "msgpack")?)))
            .collect::<Result<Vec<_>>>()?;
        let mut buf = ByteBuf::from(std::mem::take(out));
        for row in 0..batch.num_rows() {
            done(enc::write_map_len(&mut buf, cols.len() as u32));
            for (name, view) in &cols {
                write_str(&mut buf, name);
                write_value(&mut buf, view.get(row));
            }
        }
        *out = buf.into_vec();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::sync::Arc;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
    use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

    use super::*;
    use crate::{split_records, FormatSpec};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new(
                "readings",
                DataType::Struct(Fields::from(vec![
                    Field::new("temp", DataType::Float64, false),
                    Field::new("vibration", DataType::Float64, true),
                ])),
                true,
            ),
        ]))
    }

    type Entry<'a> = (&'a str, &'a dyn Fn(&mut ByteBuf));

    fn map(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut b = ByteBuf::new();
        done(enc::write_map_len(&mut b, entries.len() as u32));
        for (k, v) in entries {
            write_str(&mut b, k);
            v(&mut b);
        }
        b.into_vec()
    }

    fn decode(records: &[Vec<u8>]) -> Decoded {
        let buf: Vec<u8> = records.concat();
        let mut ranges = Vec::new();
        assert_eq!(split_records(&FormatSpec::MsgPack, &buf, false, &mut ranges).unwrap(), buf.len());
        MsgPackDecoder::new(schema()).unwrap().decode(&buf, &ranges).unwrap()
    }

    #[test]
    fn decodes_maps_with_unknown_keys_of_every_kind() {
        let readings = |b: &mut ByteBuf| {
            done(enc::write_map_len(b, 2));
            write_str(b, "temp");
            done(enc::write_f32(b, 1.5));
            write_str(b, "extra");
            done(enc::write_bin(b, &[1, 2, 3]));
        };
        let rec = map(&[
            ("skip_array", &|b| {
                done(enc::write_array_len(b, 3));
                done_plain(enc::write_nil(b));
                done(enc::write_map_len(b, 1));
                write_str(b, "k");
                done(enc::write_array_len(b, 0));
                done(enc::write_ext_meta(b, 2, 5));
                b.as_mut_vec().extend_from_slice(&[9, 9]);
            }),
            ("ts", &|b| {
                done(enc::write_uint(b, 1_700_000_000_123));
            }),
            ("device_id", &|b| write_str(b, "dév")),
            ("readings", &readings),
        ]);
        let rec2 = map(&[
            ("device_id", &|b| write_str(b, "x")),
            ("ts", &|b| {
                done(enc::write_sint(b, -5));
            }),
            ("readings", &|b| done_plain(enc::write_nil(b))),
        ]);
        let d = decode(&[rec, rec2]);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let b = &d.batch;
        assert_eq!(b.column(0).as_string::<i32>().value(0), "dév");
        assert_eq!(b.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![1_700_000_000_123, -5]);
        let r = b.column(2).as_struct();
        assert_eq!(r.column(0).as_primitive::<Float64Type>().value(0), 1.5);
        assert!(r.is_null(1));
    }

    #[test]
    fn errors_have_exact_messages() {
        let ok = |b: &mut ByteBuf| write_str(b, "a");
        let ts = |b: &mut ByteBuf| {
            done(enc::write_sint(b, 1));
        };
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (map(&[("device_id", &ok)]), "schema", "missing required field `ts`"),
            (
                map(&[("device_id", &ok), ("ts", &|b| write_str(b, "yesterday"))]),
                "schema",
                "field `ts`: expected int64, found string \"yesterday\"",
            ),
            (
                map(&[("device_id", &ok), ("ts", &|b| done(enc::write_f64(b, 1.5)))]),
                "schema",
                "field `ts`: expected int64, found float 1.5",
            ),
            (
                map(&[
                    ("device_id", &ok),
                    ("ts", &|b| {
                        done(enc::write_uint(b, u64::MAX));
                    }),
                ]),
                "schema",
                "field `ts`: integer 18446744073709551615 is out of range for int64",
            ),
            (
                map(&[
                    ("device_id", &ok),
                    ("ts", &ts),
                    ("readings", &|b| {
                        done(enc::write_map_len(b, 1));
                        write_str(b, "vibration");
                        done(enc::write_f64(b, 1.0));
                    }),
                ]),
                "schema",
                "missing required field `readings.temp`",
            ),
            (
                map(&[("device_id", &|b| done_plain(enc::write_nil(b))), ("ts", &ts)]),
                "schema",
                "required field `device_id` is null",
            ),
            (
                map(&[
                    ("device_id", &|b| {
                        done(enc::write_array_len(b, 2));
                        done_plain(enc::write_bool(b, true));
                        done_plain(enc::write_bool(b, true));
                    }),
                    ("ts", &ts),
                ]),
                "schema",
                "field `device_id`: expected string, found array of 2",
            ),
            (
                {
                    let mut b = ByteBuf::new();
                    done(enc::write_array_len(&mut b, 1));
                    done(enc::write_sint(&mut b, 1));
                    b.into_vec()
                },
                "schema",
                "expected a map, found array of 1",
            ),
            (
                {
                    let mut b = ByteBuf::new();
                    done(enc::write_map_len(&mut b, 1));
                    done(enc::write_sint(&mut b, 7));
                    done(enc::write_sint(&mut b, 1));
                    b.into_vec()
                },
                "schema",
                "map key at byte 1 is not a string: found integer 7",
            ),
            (vec![0xc1], "decode", "invalid MessagePack at byte 0: invalid marker 0xc1"),
            (vec![0x82, 0xa1, b'x'], "decode", "invalid MessagePack at byte 3: unexpected end of input"),
            (vec![0x81, 0xa1, b'x', 0xa2, 0xff, 0xfe], "decode", "invalid UTF-8 at byte 4"),
            (
                vec![0x81, 0xa9, b'd', b'e', b'v', b'i', b'c', b'e', b'_', b'i', b'd', 0xa2, 0xc3, 0x28],
                "decode",
                "invalid UTF-8 at byte 12",
            ),
            // A schema error followed by garbage is a decode error.
            (
                vec![0x82, 0xa2, b't', b's', 0xa1, b'x', 0xa1],
                "decode",
                "invalid MessagePack at byte 7: unexpected end of input",
            ),
            (vec![0x80, 0x01], "decode", "invalid MessagePack at byte 1: trailing bytes after the value"),
        ];
        for (rec, kind, msg) in cases {
            let d = MsgPackDecoder::new(schema()).unwrap().decode(&rec, &[0..rec.len()]).unwrap();
            assert_eq!(d.errors.len(), 1, "{msg}");
            assert_eq!((d.errors[0].kind.as_str(), d.errors[0].message.as_str()), (kind, msg));
        }
    }

    #[test]
    fn timestamps() {
        let schema =
            Arc::new(Schema::new(vec![Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false)]));
        let mut recs = Vec::new();
        let mut b = ByteBuf::new();
        done(enc::write_map_len(&mut b, 1));
        write_str(&mut b, "t");
        done(enc::write_ext_meta(&mut b, 8, -1));
        let v: u64 = (123_000_000u64 << 34) | 1_700_000_000;
        b.as_mut_vec().extend_from_slice(&v.to_be_bytes());
        recs.push(b.into_vec());
        let mut b = ByteBuf::new();
        done(enc::write_map_len(&mut b, 1));
        write_str(&mut b, "t");
        write_str(&mut b, "2023-11-14T22:13:20.123Z");
        recs.push(b.into_vec());
        let buf = recs.concat();
        let mut ranges = Vec::new();
        split_records(&FormatSpec::MsgPack, &buf, true, &mut ranges).unwrap();
        let d = MsgPackDecoder::new(schema).unwrap().decode(&buf, &ranges).unwrap();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let t = d.batch.column(0).as_primitive::<TimestampMillisecondType>();
        assert_eq!(t.values().to_vec(), vec![1_700_000_000_123, 1_700_000_000_123]);
    }

    #[test]
    fn splitting() {
        let rec = map(&[("a", &|b| write_str(b, "xyz"))]);
        let mut buf = rec.clone();
        buf.extend_from_slice(&rec);
        buf.push(0xc1);
        buf.extend_from_slice(&rec[..4]);
        let mut out = Vec::new();
        let used = split_records(&FormatSpec::MsgPack, &buf, false, &mut out).unwrap();
        let n = rec.len();
        assert_eq!(out, vec![0..n, n..2 * n, 2 * n..2 * n + 1]);
        assert_eq!(used, 2 * n + 1);
        out.clear();
        let used = split_records(&FormatSpec::MsgPack, &buf, true, &mut out).unwrap();
        assert_eq!(out.last(), Some(&(2 * n + 1..buf.len())));
        assert_eq!(used, buf.len());
        // A huge declared length just waits for more bytes.
        out.clear();
        assert_eq!(
            split_records(&FormatSpec::MsgPack, &[0xdf, 0xff, 0xff, 0xff, 0xff, 0xa0], false, &mut out).unwrap(),
            0
        );
        assert!(out.is_empty());
    }

    #[test]
    fn round_trip() {
        let readings = StructArray::new(
            Fields::from(vec![
                Field::new("temp", DataType::Float64, false),
                Field::new("vibration", DataType::Float64, true),
            ]),
            vec![
                Arc::new(Float64Array::from(vec![22.51, 0.0, -1e300])) as ArrayRef,
                Arc::new(Float64Array::from(vec![Some(0.021), None, None])) as ArrayRef,
            ],
            Some(vec![true, false, true].into()),
        );
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(vec!["a", "", "ünïcode \"q\""])) as ArrayRef,
                Arc::new(Int64Array::from(vec![i64::MIN, 0, 300])) as ArrayRef,
                Arc::new(readings) as ArrayRef,
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut encoder = FormatSpec::MsgPack.encoder(schema()).unwrap();
        encoder.encode(&batch, &mut out).unwrap();
        let mut ranges = Vec::new();
        split_records(&FormatSpec::MsgPack, &out, false, &mut ranges).unwrap();
        assert_eq!(ranges.len(), 3);
        let d = FormatSpec::MsgPack.decoder(schema()).unwrap().decode(&out, &ranges).unwrap();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.batch, batch);
    }
}
