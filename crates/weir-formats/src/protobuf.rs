//! Protobuf records in the Confluent wire format: a zero byte, the writer schema's id in a
//! schema registry (4 bytes, big-endian), the message indexes (which message of the schema's
//! `.proto` file: a zigzag varint count then that many zigzag varints, a lone 0 for the first
//! message), then the message's bytes.
//!
//! The `.proto` text the registry holds is compiled here (pure Rust, `protox`), with the
//! well-known `google/protobuf/*.proto` files at hand. A message's fields fill the columns of
//! the same names: bool; int32/64, uint32/64, sint, fixed and sfixed to int64 (or float64);
//! float and double to float64; string to string; an enum to its value's name;
//! `google.protobuf.Timestamp` to timestamp or int64 milliseconds; other messages to structs.
//! A field with presence (`optional`, a message) that is unset is null; a proto3 scalar without
//! presence is its default when unset, as Protobuf defines it. Repeated and map fields have no
//! column type here: one a column asks for fails the record, naming it.

use std::ops::Range;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use prost_reflect::{DescriptorPool, DynamicMessage, FileDescriptor, MessageDescriptor, ReflectMessage as _, Value};

use crate::columns::{decode_each, end_struct, Builders, Column, Data, Kind, Plan, ROOT};
use crate::{Decoded, Decoder, RecordErrorKind, Result};

/// The name the schema's own file gets when compiled.
const MAIN: &str = "registry-schema.proto";

/// A compiled `.proto` schema.
#[derive(Debug)]
pub struct ProtoSchema {
    file: FileDescriptor,
}

impl ProtoSchema {
    /// Compiles `text`; `imports` are the files it imports by name (a registry's references),
    /// besides the well-known types.
    ///
    /// # Errors
    /// The text is not a `.proto` file that compiles, with the compiler's message.
    pub fn parse(text: &str, imports: &[(String, String)]) -> std::result::Result<Self, String> {
        let mut files = vec![(MAIN.to_string(), text.to_string())];
        files.extend(imports.iter().cloned());
        let mut chain = protox::file::ChainFileResolver::new();
        chain.add(Sources(files));
        chain.add(protox::file::GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(chain);
        compiler.open_file(MAIN).map_err(|e| e.to_string())?;
        let pool: DescriptorPool = compiler.descriptor_pool();
        let file = pool.get_file_by_name(MAIN).ok_or("the compiled schema has no file")?;
        Ok(Self { file })
    }

    /// The message the indexes name: the first into the file's messages, each next one into
    /// the nested messages of the one before.
    pub fn message(&self, indexes: &[usize]) -> Option<MessageDescriptor> {
        let (first, rest) = indexes.split_first()?;
        let mut m = self.file.messages().nth(*first)?;
        for i in rest {
            let next = m.child_messages().nth(*i)?;
            m = next;
        }
        Some(m)
    }
}

/// Files given by name and text.
struct Sources(Vec<(String, String)>);

impl protox::file::FileResolver for Sources {
    fn open_file(&self, name: &str) -> std::result::Result<protox::file::File, protox::Error> {
        match self.0.iter().find(|(n, _)| n == name) {
            Some((n, text)) => protox::file::File::from_source(n, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Compiled writer schemas by registry id, already at hand.
pub trait ProtoSchemas: Send + Sync + std::fmt::Debug {
    /// The schema of `id`, or why there is none: the reason its records are dead-lettered with.
    fn get(&self, id: u32) -> std::result::Result<Arc<ProtoSchema>, String>;
}

/// Reads a zigzag varint at `*pos`.
fn zigzag(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    None
}

/// The schema id, the message indexes and where the message starts, or why the record is not
/// in the wire format.
pub fn header(rec: &[u8]) -> std::result::Result<(u32, Vec<usize>, usize), String> {
    let id = crate::avro::schema_id(rec)?;
    let mut pos = 5;
    let bad = || format!("the message indexes after schema id {id} are not valid");
    let n = zigzag(rec, &mut pos).ok_or_else(bad)?;
    if n == 0 {
        return Ok((id, vec![0], pos));
    }
    if !(1..=64).contains(&n) {
        return Err(bad());
    }
    let indexes = (0..n)
        .map(|_| zigzag(rec, &mut pos).and_then(|i| usize::try_from(i).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    Ok((id, indexes, pos))
}

/// Decodes Confluent-framed Protobuf records into the columns of a schema.
#[derive(Debug)]
pub struct ProtobufDecoder {
    schema: SchemaRef,
    plan: Plan,
    builders: Builders,
    schemas: Arc<dyn ProtoSchemas>,
}

impl ProtobufDecoder {
    /// A decoder into `schema`'s columns, with writer schemas from `schemas`.
    ///
    /// # Errors
    /// A column type the decoders do not support.
    pub fn new(schema: SchemaRef, schemas: Arc<dyn ProtoSchemas>) -> Result<Self> {
        let plan = Plan::new(&schema, "protobuf")?;
        let builders = Builders::new(&plan);
        Ok(Self { schema, plan, builders, schemas })
    }
}

/// Row `n` from one record.
fn record(
    schemas: &dyn ProtoSchemas,
    plan: &Plan,
    cols: &mut [Column],
    rec: &[u8],
    n: usize,
) -> std::result::Result<(), (RecordErrorKind, String)> {
    let (id, indexes, at) = header(rec).map_err(|m| (RecordErrorKind::Decode, m))?;
    let schema = schemas.get(id).map_err(|why| (RecordErrorKind::Schema, why))?;
    let desc = schema
        .message(&indexes)
        .ok_or_else(|| (RecordErrorKind::Schema, format!("schema id {id} has no message at indexes {indexes:?}")))?;
    let msg = DynamicMessage::decode(desc.clone(), &rec[at..]).map_err(|e| {
        (RecordErrorKind::Decode, format!("invalid Protobuf for {} (schema id {id}): {e}", desc.full_name()))
    })?;
    let mut w = Writer { plan, cols };
    w.message(ROOT, n, &msg).map_err(|m| (RecordErrorKind::Schema, m))
}

impl Decoder for ProtobufDecoder {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let Self { schema, plan, builders, schemas } = self;
        decode_each(plan, schema, builders, buf, records, |rec, n, cols| record(schemas.as_ref(), plan, cols, rec, n))
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

struct Writer<'a> {
    plan: &'a Plan,
    cols: &'a mut [Column],
}

impl Writer<'_> {
    /// The fields of `msg` into struct node `s`, row `n`: each column from the field of its name.
    fn message(&mut self, s: usize, n: usize, msg: &DynamicMessage) -> std::result::Result<(), String> {
        let plan = self.plan;
        let desc = msg.descriptor();
        for &c in plan.nodes[s].children.iter() {
            let Some(fd) = desc.get_field_by_name(&plan.nodes[c].name) else { continue };
            if fd.is_list() || fd.is_map() {
                return Err(format!(
                    "field `{}` is repeated or a map, which has no column type here",
                    plan.nodes[c].path
                ));
            }
            if fd.supports_presence() && !msg.has_field(&fd) {
                continue;
            }
            self.value(c, n, &msg.get_field(&fd), &fd)?;
        }
        end_struct(plan, self.cols, s, n)
    }

    fn value(
        &mut self,
        c: usize,
        n: usize,
        v: &Value,
        fd: &prost_reflect::FieldDescriptor,
    ) -> std::result::Result<(), String> {
        let plan = self.plan;
        let node = &plan.nodes[c];
        if let Value::Message(m) = v {
            let name = m.descriptor().full_name().to_string();
            if name == "google.protobuf.Timestamp" {
                let secs = m.get_field_by_name("seconds").and_then(|v| v.as_i64()).unwrap_or(0);
                let nanos = m.get_field_by_name("nanos").and_then(|v| v.as_i32()).unwrap_or(0);
                let ms = secs.saturating_mul(1000).saturating_add(i64::from(nanos).div_euclid(1_000_000));
                return self.push_i64(c, ms, "google.protobuf.Timestamp");
            }
            if matches!(node.kind, Kind::Struct(_)) {
                return self.message(c, n, m);
            }
            return Err(format!("field `{}`: expected {}, found Protobuf message {name}", node.path, node.kind.name()));
        }
        let col = &mut self.cols[c];
        let mismatch =
            |found: &str| format!("field `{}`: expected {}, found Protobuf {found}", node.path, node.kind.name());
        match (v, &node.kind, &mut col.data) {
            (Value::Bool(b), Kind::Bool, Data::Bool(d)) => d.push(*b),
            (Value::I32(i), Kind::Int64, Data::I64(d)) => d.push((*i).into()),
            (Value::I64(i), Kind::Int64, Data::I64(d)) => d.push(*i),
            (Value::U32(i), Kind::Int64, Data::I64(d)) => d.push((*i).into()),
            (Value::U64(i), Kind::Int64, Data::I64(d)) => {
                d.push(i64::try_from(*i).map_err(|_| format!("field `{}`: {i} does not fit int64", node.path))?)
            }
            (Value::I32(i), Kind::Float64, Data::F64(d)) => d.push((*i).into()),
            (Value::I64(i), Kind::Float64, Data::F64(d)) => d.push(*i as f64),
            (Value::U32(i), Kind::Float64, Data::F64(d)) => d.push((*i).into()),
            (Value::U64(i), Kind::Float64, Data::F64(d)) => d.push(*i as f64),
            (Value::F32(f), Kind::Float64, Data::F64(d)) => d.push((*f).into()),
            (Value::F64(f), Kind::Float64, Data::F64(d)) => d.push(*f),
            (Value::I64(t), Kind::Timestamp(_), Data::I64(d)) => d.push(*t),
            (Value::String(s), Kind::Utf8, Data::Str { offsets, bytes }) => {
                bytes.extend_from_slice(s.as_bytes());
                offsets.push(bytes.len() as i32);
            }
            (Value::EnumNumber(e), Kind::Utf8, Data::Str { offsets, bytes }) => {
                let name = fd.kind().as_enum().and_then(|en| en.get_value(*e)).map(|v| v.name().to_string());
                bytes.extend_from_slice(name.unwrap_or_else(|| e.to_string()).as_bytes());
                offsets.push(bytes.len() as i32);
            }
            (other, _, _) => return Err(mismatch(proto_type(other))),
        }
        col.valid.push(true);
        Ok(())
    }

    fn push_i64(&mut self, c: usize, v: i64, found: &str) -> std::result::Result<(), String> {
        let node = &self.plan.nodes[c];
        match (&node.kind, &mut self.cols[c].data) {
            (Kind::Timestamp(_) | Kind::Int64, Data::I64(d)) => d.push(v),
            _ => return Err(format!("field `{}`: expected {}, found Protobuf {found}", node.path, node.kind.name())),
        }
        self.cols[c].valid.push(true);
        Ok(())
    }
}

fn proto_type(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "bool",
        Value::I32(_) => "int32",
        Value::I64(_) => "int64",
        Value::U32(_) => "uint32",
        Value::U64(_) => "uint64",
        Value::F32(_) => "float",
        Value::F64(_) => "double",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::EnumNumber(_) => "enum",
        Value::Message(_) => "message",
        Value::List(_) => "repeated field",
        Value::Map(_) => "map",
    }
}

/// The `.proto` file rows of `columns` are written with: one message `name` (in `package`),
/// a field per column numbered in column order. Nullable scalars are `optional` (they have
/// presence, so a null stays null), structs nested messages, lists `repeated`, timestamps
/// `google.protobuf.Timestamp`.
///
/// # Errors
/// A column whose name is not a Protobuf name, or of a type with no counterpart here.
pub fn proto_for(columns: &arrow_schema::Schema, name: &str, package: Option<&str>) -> Result<String> {
    let mut body = String::new();
    let mut timestamps = false;
    message_text(columns.fields(), name, "", 0, &mut body, &mut timestamps)?;
    let mut text = String::from("syntax = \"proto3\";\n");
    if let Some(p) = package {
        text.push_str(&format!("package {p};\n"));
    }
    if timestamps {
        text.push_str("import \"google/protobuf/timestamp.proto\";\n");
    }
    text.push_str(&body);
    Ok(text)
}

fn message_text(
    fields: &arrow_schema::Fields,
    name: &str,
    prefix: &str,
    depth: usize,
    out: &mut String,
    timestamps: &mut bool,
) -> Result<()> {
    use arrow_schema::DataType as D;
    let pad = "  ".repeat(depth);
    out.push_str(&format!("{pad}message {name} {{\n"));
    for (i, f) in fields.iter().enumerate() {
        let path = crate::schema::join_path(prefix, f.name());
        let bad_name = !f.name().starts_with(|c: char| c.is_ascii_alphabetic())
            || !f.name().chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if bad_name {
            return Err(crate::FormatError::InvalidSchema {
                field: path,
                reason: "is not a Protobuf field name (letters, digits and `_`, starting with a letter): rename it with a `select`".into(),
            });
        }
        let scalar = |dt: &D| -> Result<String> {
            Ok(match dt {
                D::Boolean => "bool".into(),
                D::Int8 | D::Int16 | D::Int32 => "int32".into(),
                D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 => "int64".into(),
                D::UInt64 => "uint64".into(),
                D::Float32 => "float".into(),
                D::Float64 => "double".into(),
                D::Utf8 | D::LargeUtf8 | D::Utf8View => "string".into(),
                D::Timestamp(..) => "google.protobuf.Timestamp".into(),
                other => {
                    return Err(crate::FormatError::UnsupportedType {
                        field: path.clone(),
                        data_type: other.clone(),
                        format: "protobuf",
                    })
                }
            })
        };
        let (label, ty) = match f.data_type() {
            D::Struct(children) => {
                let nested = format!("{}_{}", name, f.name());
                message_text(children, &nested, &path, depth + 1, out, timestamps)?;
                ("", nested)
            }
            D::List(item) | D::LargeList(item) => ("repeated ", scalar(item.data_type())?),
            dt => (if f.is_nullable() && !matches!(dt, D::Timestamp(..)) { "optional " } else { "" }, scalar(dt)?),
        };
        *timestamps |= ty == "google.protobuf.Timestamp";
        out.push_str(&format!("{pad}  {label}{ty} {} = {};\n", f.name(), i + 1));
    }
    out.push_str(&format!("{pad}}}\n"));
    Ok(())
}

/// Writes rows as Confluent-framed Protobuf records of the file's first message, with a
/// registered schema's id (see [`proto_for`]).
#[derive(Debug)]
pub struct ProtobufEncoder {
    message: MessageDescriptor,
    id: Arc<std::sync::OnceLock<u32>>,
}

impl ProtobufEncoder {
    /// An encoder of `schema`'s first message, framing records with the id `id` holds when it
    /// writes.
    ///
    /// # Errors
    /// The schema has no message.
    pub fn new(schema: &ProtoSchema, id: Arc<std::sync::OnceLock<u32>>) -> Result<Self> {
        let message = schema.message(&[0]).ok_or_else(|| crate::FormatError::InvalidSchema {
            field: String::new(),
            reason: "the Protobuf schema has no message".into(),
        })?;
        Ok(Self { message, id })
    }
}

impl crate::Encoder for ProtobufEncoder {
    fn encode(&mut self, batch: &arrow_array::RecordBatch, out: &mut Vec<u8>) -> Result<()> {
        use crate::encode::{Support, View};
        use prost::Message as _;
        let Some(&id) = self.id.get() else {
            return Err(crate::FormatError::InvalidSchema {
                field: String::new(),
                reason: "the Protobuf schema is not registered yet".into(),
            });
        };
        let schema = batch.schema_ref();
        let cols = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| Ok((f.name().as_str(), View::new(f.name(), c.as_ref(), Support::Nested, "protobuf")?)))
            .collect::<Result<Vec<_>>>()?;
        for row in 0..batch.num_rows() {
            let mut m = DynamicMessage::new(self.message.clone());
            for (name, view) in &cols {
                set(&mut m, name, view.get(row))?;
            }
            frame(id, &[0], &m.encode_to_vec(), out);
        }
        Ok(())
    }
}

/// Sets field `name` of `m` from a column's value (a null leaves it unset).
fn set(m: &mut DynamicMessage, name: &str, s: crate::encode::Scalar<'_>) -> Result<()> {
    let Some(fd) = m.descriptor().get_field_by_name(name) else { return Ok(()) };
    if let Some(v) = proto_value(&fd.kind(), s, name)? {
        m.set_field(&fd, v);
    }
    Ok(())
}

fn proto_value(kind: &prost_reflect::Kind, s: crate::encode::Scalar<'_>, name: &str) -> Result<Option<Value>> {
    use crate::encode::Scalar as S;
    use prost_reflect::Kind as K;
    let wrong = || crate::FormatError::InvalidSchema {
        field: name.to_string(),
        reason: "does not fit its Protobuf field".into(),
    };
    Ok(Some(match (s, kind) {
        (S::Null, _) => return Ok(None),
        (S::Bool(b), K::Bool) => Value::Bool(b),
        (S::I64(i), K::Int32) => Value::I32(i32::try_from(i).map_err(|_| wrong())?),
        (S::I64(i), K::Int64) => Value::I64(i),
        (S::I64(i), K::Uint64) => Value::U64(u64::try_from(i).map_err(|_| wrong())?),
        (S::U64(u), K::Uint64) => Value::U64(u),
        (S::F32(f), K::Float) => Value::F32(f),
        (S::F64(f), K::Double) => Value::F64(f),
        (S::Str(t), K::String) => Value::String(t.to_string()),
        (S::I64(ms), K::Message(d)) if d.full_name() == "google.protobuf.Timestamp" => {
            let mut t = DynamicMessage::new(d.clone());
            t.set_field_by_name("seconds", Value::I64(ms.div_euclid(1000)));
            t.set_field_by_name("nanos", Value::I32((ms.rem_euclid(1000) * 1_000_000) as i32));
            Value::Message(t)
        }
        (S::Struct(children, row), K::Message(d)) => {
            let mut nested = DynamicMessage::new(d.clone());
            for c in children {
                set(&mut nested, c.name, c.view.get(row))?;
            }
            Value::Message(nested)
        }
        (S::List(view, start, end), k) => Value::List(
            (start..end)
                .map(|i| proto_value(k, view.get(i), name).map(|v| v.unwrap_or_else(|| k.default_value())))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => return Err(wrong()),
    }))
}

/// Frames a message in the Confluent wire format, naming it by `indexes` (the first message of
/// the file is `[0]`, written as a lone 0).
pub fn frame(id: u32, indexes: &[usize], message: &[u8], out: &mut Vec<u8>) {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let zz = |v: i64| ((v << 1) ^ (v >> 63)) as u64;
    out.push(crate::avro::MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    if indexes == [0] {
        out.push(0);
    } else {
        varint(zz(indexes.len() as i64), out);
        for i in indexes {
            varint(zz(*i as i64), out);
        }
    }
    out.extend_from_slice(message);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow_array::{Array, Float64Array, Int64Array, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    use prost::Message as _;

    use super::*;

    const PROTO: &str = r#"
        syntax = "proto3";
        package lab;
        import "google/protobuf/timestamp.proto";
        message Other { int32 x = 1; }
        message Reading {
          string device = 1;
          double temp = 2;
          google.protobuf.Timestamp at = 3;
          enum Level { LOW = 0; HIGH = 1; }
          Level level = 4;
          optional string note = 5;
          message Pos { double lat = 1; }
          Pos pos = 6;
          repeated int32 tags = 7;
        }"#;

    #[derive(Debug)]
    struct Known(HashMap<u32, Arc<ProtoSchema>>);

    impl ProtoSchemas for Known {
        fn get(&self, id: u32) -> std::result::Result<Arc<ProtoSchema>, String> {
            self.0.get(&id).cloned().ok_or_else(|| format!("schema id {id} is not in the schema registry"))
        }
    }

    fn columns(with_tags: bool) -> SchemaRef {
        let mut f = vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("temp", DataType::Float64, false),
            Field::new("at", DataType::Int64, true),
            Field::new("level", DataType::Utf8, false),
            Field::new("note", DataType::Utf8, true),
            Field::new("pos", DataType::Struct(Fields::from(vec![Field::new("lat", DataType::Float64, false)])), true),
        ];
        if with_tags {
            f.push(Field::new("tags", DataType::Int64, true));
        }
        Arc::new(Schema::new(f))
    }

    #[test]
    fn messages_fill_columns_by_field_name_and_bad_records_say_why() {
        let schema = Arc::new(ProtoSchema::parse(PROTO, &[]).unwrap());
        let reading = schema.message(&[1]).unwrap();
        assert_eq!(reading.full_name(), "lab.Reading");
        assert_eq!(schema.message(&[1, 0]).unwrap().full_name(), "lab.Reading.Pos");
        let mut m = DynamicMessage::new(reading.clone());
        m.set_field_by_name("device", Value::String("d-1".into()));
        m.set_field_by_name("temp", Value::F64(21.5));
        let ts = reading.get_field_by_name("at").unwrap().kind();
        let mut at = DynamicMessage::new(ts.as_message().unwrap().clone());
        at.set_field_by_name("seconds", Value::I64(1_796_000_000));
        at.set_field_by_name("nanos", Value::I32(250_000_000));
        m.set_field_by_name("at", Value::Message(at));
        m.set_field_by_name("level", Value::EnumNumber(1));
        let mut first = Vec::new();
        frame(5, &[1], &m.encode_to_vec(), &mut first);
        // Unset: proto3 defaults for `temp` and `level`, null for the optional and the message.
        let mut bare = DynamicMessage::new(reading);
        bare.set_field_by_name("device", Value::String("d-2".into()));
        let mut second = Vec::new();
        frame(5, &[1], &bare.encode_to_vec(), &mut second);
        let mut unknown = second.clone();
        unknown[4] = 6;
        let mut wrong_index = Vec::new();
        frame(5, &[3], &bare.encode_to_vec(), &mut wrong_index);
        let mut truncated = first.clone();
        truncated.truncate(first.len() - 3);
        let recs = [first, second, unknown, wrong_index, truncated, b"{}".to_vec()];
        let (mut buf, mut ranges) = (Vec::new(), Vec::new());
        for r in &recs {
            ranges.push(buf.len()..buf.len() + r.len());
            buf.extend_from_slice(r);
        }
        let known = Known(HashMap::from([(5, schema)]));
        let mut d = ProtobufDecoder::new(columns(false), Arc::new(known)).unwrap();
        let out = d.decode(&buf, &ranges).unwrap();
        let b = &out.batch;
        assert_eq!(b.num_rows(), 2, "{:?}", out.errors);
        let s = |i: usize| b.column(i).as_any().downcast_ref::<StringArray>().unwrap().clone();
        assert_eq!((s(0).value(0), s(0).value(1)), ("d-1", "d-2"));
        assert_eq!(b.column(1).as_any().downcast_ref::<Float64Array>().unwrap().values(), &[21.5, 0.0]);
        let at = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        assert_eq!(at.value(0), 1_796_000_000_250);
        assert!(at.is_null(1));
        assert_eq!((s(3).value(0), s(3).value(1)), ("HIGH", "LOW"));
        assert!(s(4).is_null(0) && s(4).is_null(1));
        assert!(b.column(5).as_any().downcast_ref::<StructArray>().unwrap().is_null(0));
        let why: Vec<&str> = out.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(why[0].contains("schema id 6 is not in the schema registry"), "{why:?}");
        assert!(why[1].contains("no message at indexes [3]"), "{why:?}");
        assert!(why[2].contains("invalid Protobuf for lab.Reading"), "{why:?}");
        assert!(why[3].contains("first byte is 0x7b"), "{why:?}");
        // A column that asks for a repeated field fails the record, naming it.
        let known = Known(HashMap::from([(5, Arc::new(ProtoSchema::parse(PROTO, &[]).unwrap()))]));
        let mut d = ProtobufDecoder::new(columns(true), Arc::new(known)).unwrap();
        let out = d.decode(&buf, &ranges[..1]).unwrap();
        assert!(out.errors[0].message.contains("field `tags` is repeated"), "{:?}", out.errors);
    }

    #[test]
    fn rows_written_with_the_derived_proto_read_back_equal() {
        use arrow_array::{ArrayRef, Int32Array, RecordBatch, TimestampMillisecondArray};
        use arrow_schema::TimeUnit;
        let inner = Fields::from(vec![Field::new("lat", DataType::Float64, false)]);
        let cols = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("n", DataType::Int32, true),
            Field::new("at", DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new("pos", DataType::Struct(inner.clone()), true),
        ]));
        let text = proto_for(&cols, "Row", Some("weir")).unwrap();
        assert!(text.contains("optional int32 n = 2;") && text.contains("google.protobuf.Timestamp at = 3;"), "{text}");
        let schema = ProtoSchema::parse(&text, &[]).unwrap();
        let rows = RecordBatch::try_new(
            cols,
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
                Arc::new(Int32Array::from(vec![Some(0), None])),
                Arc::new(TimestampMillisecondArray::from(vec![1_796_000_000_123, -1])),
                Arc::new(StructArray::new(
                    inner,
                    vec![Arc::new(Float64Array::from(vec![1.5, 0.0])) as ArrayRef],
                    Some(vec![true, false].into()),
                )),
            ],
        )
        .unwrap();
        let id = Arc::new(std::sync::OnceLock::new());
        let mut enc = ProtobufEncoder::new(&schema, id.clone()).unwrap();
        let mut out = Vec::new();
        assert!(crate::Encoder::encode(&mut enc, &rows, &mut out).is_err(), "no id yet");
        id.set(3).unwrap();
        crate::Encoder::encode(&mut enc, &rows.slice(0, 1), &mut out).unwrap();
        let first = out.len();
        crate::Encoder::encode(&mut enc, &rows.slice(1, 1), &mut out).unwrap();
        let back = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("at", DataType::Int64, false),
            Field::new("pos", DataType::Struct(Fields::from(vec![Field::new("lat", DataType::Float64, false)])), true),
        ]));
        let mut dec = ProtobufDecoder::new(back, Arc::new(Known(HashMap::from([(3, Arc::new(schema))])))).unwrap();
        let d = dec.decode(&out, &[0..first, first..out.len()]).unwrap();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let n = d.batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        assert_eq!((n.value(0), n.is_null(1)), (0, true), "an optional 0 stays 0, a null stays null");
        let at = d.batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        assert_eq!(at.values(), &[1_796_000_000_123, -1]);
        let pos = d.batch.column(3).as_any().downcast_ref::<StructArray>().unwrap().clone();
        assert!(pos.is_valid(0) && pos.is_null(1));
        let bad = Schema::new(vec![Field::new("avg-temp", DataType::Float64, false)]);
        assert!(proto_for(&bad, "Row", None).unwrap_err().to_string().contains("not a Protobuf field name"));
    }

    #[test]
    fn the_wire_header_reads_indexes_and_refuses_what_is_not_one() {
        let mut r = Vec::new();
        frame(7, &[2, 1], b"", &mut r);
        assert_eq!(header(&r).unwrap(), (7, vec![2, 1], r.len()));
        let mut first = Vec::new();
        frame(7, &[0], b"x", &mut first);
        assert_eq!(header(&first).unwrap(), (7, vec![0], 6));
        assert!(header(&[0, 0, 0, 0, 7, 0x80]).unwrap_err().contains("message indexes"));
        assert!(ProtoSchema::parse("message {", &[]).is_err());
    }
}
