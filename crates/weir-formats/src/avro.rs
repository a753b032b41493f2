//! Avro records in the Confluent wire format: a zero byte, the writer schema's id in a schema
//! registry (4 bytes, big-endian), then the Avro binary encoding of one datum.
//!
//! The writer schemas come from an [`AvroSchemas`] (a registry client that fetched them before
//! the records are decoded, so decoding never waits on the network). With a reader schema,
//! Avro's schema resolution applies: a field the reader has and the writer lacks takes the
//! reader's default, a field only the writer has is skipped. The datum's fields then fill the
//! columns of the same names; a column no field fills is null (an error if it is not nullable).
//!
//! Types: `boolean`; `int`, `long` to int64 (or float64); `float`, `double` to float64;
//! `string`, `enum`, `uuid` to string; `timestamp-millis`/`-micros`/`-nanos` (local ones too)
//! to timestamp or int64 milliseconds; records to structs; a union with `null` is the nullable
//! value. Bytes, fixed, arrays, maps and decimals have no column type here: a field of those
//! types is skipped unless a column asks for it (then the record fails with the field's name).

use std::ops::Range;
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use arrow_schema::SchemaRef;

use crate::columns::{decode_each, end_struct, null_subtree, Builders, Column, Data, Kind, Plan, ROOT};
use crate::{Decoded, Decoder, RecordErrorKind, Result};

/// The first byte of a record in the Confluent wire format.
pub const MAGIC: u8 = 0;

/// Writer schemas by registry id, already at hand.
pub trait AvroSchemas: Send + Sync + std::fmt::Debug {
    /// The schema of `id`, or why there is none (the registry does not have it, it is not
    /// Avro, ...): the reason its records are dead-lettered with.
    fn get(&self, id: u32) -> std::result::Result<Arc<Schema>, String>;
}

/// The Avro library, for the schemas' and values' types.
pub use apache_avro;
/// An Avro schema.
pub use apache_avro::Schema;

/// The schema id of a record in the Confluent wire format, or why it is not one.
pub fn schema_id(rec: &[u8]) -> std::result::Result<u32, String> {
    match rec {
        [MAGIC, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        [] => Err("empty record: expected the Confluent wire format (a zero byte, a schema id, the datum)".into()),
        [first, ..] if *first != MAGIC => Err(format!(
            "not in the Confluent wire format: the first byte is 0x{first:02x}, not 0x00 (a payload written without a schema registry?)"
        )),
        _ => Err(format!("a {}-byte record is too short for the Confluent wire format's header", rec.len())),
    }
}

/// Decodes Confluent-framed Avro records into the columns of a schema.
#[derive(Debug)]
pub struct AvroDecoder {
    schema: SchemaRef,
    plan: Plan,
    builders: Builders,
    schemas: Arc<dyn AvroSchemas>,
    reader: Option<Schema>,
}

impl AvroDecoder {
    /// A decoder into `schema`'s columns, with writer schemas from `schemas` and, if given, the
    /// reader schema the writers' data is resolved to.
    ///
    /// # Errors
    /// A column type the decoders do not support.
    pub fn new(schema: SchemaRef, schemas: Arc<dyn AvroSchemas>, reader: Option<Schema>) -> Result<Self> {
        let plan = Plan::new(&schema, "avro")?;
        let builders = Builders::new(&plan);
        Ok(Self { schema, plan, builders, schemas, reader })
    }
}

/// A datum reader per writer schema id of a batch (or why its records cannot be read): made
/// once per batch and id rather than per record, as making one resolves the schemas (names,
/// and with a reader schema the resolution), which cost more than reading a datum.
type Readers<'s> =
    std::collections::HashMap<u32, std::result::Result<GenericDatumReader<'s>, (RecordErrorKind, String)>>;

/// The writer schemas of the records of a batch (each id asked for once).
fn writers(
    schemas: &dyn AvroSchemas,
    buf: &[u8],
    records: &[Range<usize>],
) -> std::collections::HashMap<u32, std::result::Result<Arc<Schema>, String>> {
    let mut out = std::collections::HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Some(id) = crate::record_bytes(buf, i, r).ok().and_then(|rec| schema_id(rec).ok()) {
            out.entry(id).or_insert_with(|| schemas.get(id));
        }
    }
    out
}

fn readers<'s>(
    writers: &'s std::collections::HashMap<u32, std::result::Result<Arc<Schema>, String>>,
    reader: Option<&'s Schema>,
) -> Readers<'s> {
    writers
        .iter()
        .map(|(&id, w)| {
            let r = match w {
                Ok(w) => GenericDatumReader::builder(w)
                    .maybe_reader_schema(reader)
                    .build()
                    .map_err(|e| (RecordErrorKind::Decode, format!("invalid Avro for schema id {id}: {e}"))),
                Err(why) => Err((RecordErrorKind::Schema, why.clone())),
            };
            (id, r)
        })
        .collect()
}

/// Row `n` from one record.
fn record(
    readers: &Readers<'_>,
    plan: &Plan,
    cols: &mut [Column],
    rec: &[u8],
    n: usize,
) -> std::result::Result<(), (RecordErrorKind, String)> {
    let id = schema_id(rec).map_err(|m| (RecordErrorKind::Decode, m))?;
    let reader = match readers.get(&id) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(e.clone()),
        None => return Err((RecordErrorKind::Schema, format!("schema id {id} was not looked up"))),
    };
    let mut body = &rec[5..];
    let value = reader
        .read_value(&mut body)
        .map_err(|e| (RecordErrorKind::Decode, format!("invalid Avro for schema id {id}: {e}")))?;
    if !body.is_empty() {
        return Err((RecordErrorKind::Decode, format!("{} bytes after the datum of schema id {id}", body.len())));
    }
    let Value::Record(fields) = value else {
        return Err((RecordErrorKind::Schema, format!("schema id {id} is not a record schema")));
    };
    let mut w = Writer { plan, cols };
    w.fields(ROOT, n, fields).map_err(|m| (RecordErrorKind::Schema, m))
}

impl Decoder for AvroDecoder {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let Self { schema, plan, builders, schemas, reader } = self;
        let writers = writers(schemas.as_ref(), buf, records);
        let readers = readers(&writers, reader.as_ref());
        decode_each(plan, schema, builders, buf, records, |rec, n, cols| record(&readers, plan, cols, rec, n))
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// Puts one datum's values into the columns.
struct Writer<'a> {
    plan: &'a Plan,
    cols: &'a mut [Column],
}

impl Writer<'_> {
    /// The fields of a record into struct node `s`, row `n`.
    fn fields(&mut self, s: usize, n: usize, fields: Vec<(String, Value)>) -> std::result::Result<(), String> {
        for (name, v) in fields {
            if let Some(c) = self.plan.find_child(s, name.as_bytes()) {
                // A field given twice keeps its first value (Avro records cannot do this).
                if self.cols[c].len() == n {
                    self.value(c, n, v)?;
                }
            }
        }
        end_struct(self.plan, self.cols, s, n)
    }

    fn value(&mut self, c: usize, n: usize, v: Value) -> std::result::Result<(), String> {
        let plan = self.plan;
        let node = &plan.nodes[c];
        let v = match v {
            Value::Union(_, inner) => return self.value(c, n, *inner),
            Value::Null if node.required => {
                return Err(format!("field `{}` is null but the column is not nullable", node.path))
            }
            Value::Null => {
                null_subtree(plan, self.cols, c);
                return Ok(());
            }
            Value::Record(fields) if matches!(node.kind, Kind::Struct(_)) => return self.fields(c, n, fields),
            v => v,
        };
        let mismatch =
            |found: &str| format!("field `{}`: expected {}, found Avro {found}", node.path, node.kind.name());
        let col = &mut self.cols[c];
        match (v, &node.kind, &mut col.data) {
            (Value::Boolean(b), Kind::Bool, Data::Bool(d)) => d.push(b),
            (Value::Int(i), Kind::Int64, Data::I64(d)) => d.push(i.into()),
            (Value::Long(i), Kind::Int64, Data::I64(d)) => d.push(i),
            (Value::Int(i), Kind::Float64, Data::F64(d)) => d.push(i.into()),
            (Value::Long(i), Kind::Float64, Data::F64(d)) => d.push(i as f64),
            (Value::Float(f), Kind::Float64, Data::F64(d)) => d.push(f.into()),
            (Value::Double(f), Kind::Float64, Data::F64(d)) => d.push(f),
            (Value::String(s) | Value::Enum(_, s), Kind::Utf8, Data::Str { offsets, bytes }) => {
                bytes.extend_from_slice(s.as_bytes());
                offsets.push(bytes.len() as i32);
            }
            (Value::Uuid(u), Kind::Utf8, Data::Str { offsets, bytes }) => {
                bytes.extend_from_slice(u.to_string().as_bytes());
                offsets.push(bytes.len() as i32);
            }
            (
                Value::TimestampMillis(t) | Value::LocalTimestampMillis(t),
                Kind::Timestamp(_) | Kind::Int64,
                Data::I64(d),
            ) => d.push(t),
            (
                Value::TimestampMicros(t) | Value::LocalTimestampMicros(t),
                Kind::Timestamp(_) | Kind::Int64,
                Data::I64(d),
            ) => d.push(t.div_euclid(1_000)),
            (
                Value::TimestampNanos(t) | Value::LocalTimestampNanos(t),
                Kind::Timestamp(_) | Kind::Int64,
                Data::I64(d),
            ) => d.push(t.div_euclid(1_000_000)),
            (Value::Long(t), Kind::Timestamp(_), Data::I64(d)) => d.push(t),
            (other, _, _) => return Err(mismatch(avro_type(&other))),
        }
        col.valid.push(true);
        Ok(())
    }
}

fn avro_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Long(_) => "long",
        Value::Float(_) => "float",
        Value::Double(_) => "double",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "string",
        Value::Fixed(..) => "fixed",
        Value::Enum(..) => "enum",
        Value::Union(..) => "union",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Record(_) => "record",
        Value::Date(_) => "date",
        Value::Decimal(_) | Value::BigDecimal(_) => "decimal",
        Value::TimeMillis(_) | Value::TimeMicros(_) => "time",
        Value::TimestampMillis(_)
        | Value::TimestampMicros(_)
        | Value::TimestampNanos(_)
        | Value::LocalTimestampMillis(_)
        | Value::LocalTimestampMicros(_)
        | Value::LocalTimestampNanos(_) => "timestamp",
        Value::Duration(_) => "duration",
        Value::Uuid(_) => "uuid",
    }
}

/// The Avro schema rows of `columns` are written with: a record `name` (in `namespace`), a field
/// per column, nullable columns as unions with null (default null), structs as nested records,
/// lists as arrays, timestamps as `timestamp-millis`.
///
/// # Errors
/// A column whose name is not an Avro name, or of a type with no Avro counterpart here.
pub fn schema_for(columns: &arrow_schema::Schema, name: &str, namespace: Option<&str>) -> Result<Schema> {
    let fields = avro_fields(columns.fields(), "", name)?;
    let mut record = serde_json::json!({ "type": "record", "name": name, "fields": fields });
    if let Some(ns) = namespace {
        record["namespace"] = ns.into();
    }
    Schema::parse(&record).map_err(|e| crate::FormatError::InvalidSchema {
        field: name.to_string(),
        reason: format!("not an Avro record schema: {e}"),
    })
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn avro_fields(fields: &arrow_schema::Fields, prefix: &str, record: &str) -> Result<Vec<serde_json::Value>> {
    fields
        .iter()
        .map(|f| {
            let path = crate::schema::join_path(prefix, f.name());
            if !valid_name(f.name()) {
                return Err(crate::FormatError::InvalidSchema {
                    field: path,
                    reason: "is not an Avro field name (letters, digits and `_`, not starting with a digit): rename it with a `select`".into(),
                });
            }
            let ty = avro_type_of(f.data_type(), &path, &format!("{record}_{}", f.name()))?;
            Ok(if f.is_nullable() {
                serde_json::json!({ "name": f.name(), "type": ["null", ty], "default": null })
            } else {
                serde_json::json!({ "name": f.name(), "type": ty })
            })
        })
        .collect()
}

fn avro_type_of(dt: &arrow_schema::DataType, path: &str, record: &str) -> Result<serde_json::Value> {
    use arrow_schema::DataType as D;
    Ok(match dt {
        D::Null => "null".into(),
        D::Boolean => "boolean".into(),
        D::Int8 | D::Int16 | D::Int32 => "int".into(),
        D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64 => "long".into(),
        D::Float32 => "float".into(),
        D::Float64 => "double".into(),
        D::Utf8 | D::LargeUtf8 | D::Utf8View => "string".into(),
        D::Timestamp(..) => serde_json::json!({ "type": "long", "logicalType": "timestamp-millis" }),
        D::Struct(f) => {
            serde_json::json!({ "type": "record", "name": record, "fields": avro_fields(f, path, record)? })
        }
        D::List(f) | D::LargeList(f) => {
            let items = avro_type_of(f.data_type(), path, record)?;
            let items = if f.is_nullable() { serde_json::json!(["null", items]) } else { items };
            serde_json::json!({ "type": "array", "items": items })
        }
        other => {
            return Err(crate::FormatError::UnsupportedType {
                field: path.to_string(),
                data_type: other.clone(),
                format: "avro",
            })
        }
    })
}

/// Writes rows as Confluent-framed Avro records with a registered schema's id, one record per
/// row (the schema of [`schema_for`] the same columns).
#[derive(Debug)]
pub struct AvroEncoder {
    schema: Schema,
    /// Set once the schema is registered (before the first write).
    id: Arc<std::sync::OnceLock<u32>>,
}

impl AvroEncoder {
    /// An encoder with `schema`, framing records with the id `id` holds when it writes.
    pub fn new(schema: Schema, id: Arc<std::sync::OnceLock<u32>>) -> Self {
        Self { schema, id }
    }
}

impl crate::Encoder for AvroEncoder {
    fn encode(&mut self, batch: &arrow_array::RecordBatch, out: &mut Vec<u8>) -> Result<()> {
        use crate::encode::{Support, View};
        let Some(&id) = self.id.get() else {
            return Err(crate::FormatError::InvalidSchema {
                field: String::new(),
                reason: "the Avro schema is not registered yet".into(),
            });
        };
        let schema = batch.schema_ref();
        let cols = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| Ok((f, View::new(f.name(), c.as_ref(), Support::Nested, "avro")?)))
            .collect::<Result<Vec<_>>>()?;
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema).build().map_err(avro_err)?;
        for row in 0..batch.num_rows() {
            let fields = cols
                .iter()
                .map(|(f, v)| Ok((f.name().clone(), field_value(f, v.get(row))?)))
                .collect::<Result<Vec<_>>>()?;
            let datum = writer.write_value_to_vec(Value::Record(fields)).map_err(avro_err)?;
            frame(id, &datum, out);
        }
        Ok(())
    }
}

fn avro_err(e: apache_avro::Error) -> crate::FormatError {
    crate::FormatError::InvalidSchema { field: String::new(), reason: format!("Avro: {e}") }
}

/// A column's value as its field holds it: nullable ones as the union's branch.
fn field_value(f: &arrow_schema::Field, s: crate::encode::Scalar<'_>) -> Result<Value> {
    Ok(in_union(f.is_nullable(), scalar_value(f.data_type(), s, f.name())?))
}

/// A value of a nullable type is a branch of its `["null", T]` union.
fn in_union(nullable: bool, v: Value) -> Value {
    match (nullable, v) {
        (false, v) => v,
        (true, Value::Null) => Value::Union(0, Box::new(Value::Null)),
        (true, v) => Value::Union(1, Box::new(v)),
    }
}

fn scalar_value(dt: &arrow_schema::DataType, s: crate::encode::Scalar<'_>, name: &str) -> Result<Value> {
    use crate::encode::Scalar as S;
    use arrow_schema::DataType as D;
    Ok(match (s, dt) {
        (S::Null, _) => Value::Null,
        (S::Bool(b), _) => Value::Boolean(b),
        (S::I64(i), D::Int8 | D::Int16 | D::Int32) => Value::Int(i as i32),
        (S::I64(i), D::Timestamp(..)) => Value::TimestampMillis(i),
        (S::I64(i), _) => Value::Long(i),
        (S::U64(u), _) => Value::Long(i64::try_from(u).map_err(|_| crate::FormatError::InvalidSchema {
            field: name.to_string(),
            reason: format!("{u} does not fit an Avro long"),
        })?),
        (S::F32(f), _) => Value::Float(f),
        (S::F64(f), _) => Value::Double(f),
        (S::Str(t), _) => Value::String(t.to_string()),
        (S::Struct(children, row), D::Struct(fields)) => Value::Record(
            children
                .iter()
                .zip(fields.iter())
                .map(|(c, f)| Ok((c.name.to_string(), field_value(f, c.view.get(row))?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        (S::List(view, start, end), D::List(f) | D::LargeList(f)) => Value::Array(
            (start..end)
                .map(|i| Ok(in_union(f.is_nullable(), scalar_value(f.data_type(), view.get(i), name)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        (_, other) => {
            return Err(crate::FormatError::UnsupportedType {
                field: name.to_string(),
                data_type: other.clone(),
                format: "avro",
            })
        }
    })
}

/// The Avro binary encoding of `value` under `schema`.
///
/// # Panics
/// If the value does not fit the schema (for tests and tools that build both).
pub fn datum(schema: &Schema, value: Value) -> Vec<u8> {
    #[allow(clippy::unwrap_used)]
    apache_avro::writer::datum::GenericDatumWriter::builder(schema).build().unwrap().write_value_to_vec(value).unwrap()
}

/// Frames a datum in the Confluent wire format.
pub fn frame(id: u32, datum: &[u8], out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow_array::{Array, Float64Array, Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema as ArrowSchema};

    use super::*;

    #[derive(Debug, Default)]
    struct Known(HashMap<u32, Arc<Schema>>);

    impl AvroSchemas for Known {
        fn get(&self, id: u32) -> std::result::Result<Arc<Schema>, String> {
            self.0.get(&id).cloned().ok_or_else(|| format!("schema id {id} is not in the schema registry"))
        }
    }

    const V1: &str = r#"{"type":"record","name":"Reading","fields":[
        {"name":"device","type":"string"},{"name":"temp","type":"double"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"note","type":["null","string"],"default":null}]}"#;
    // v2 drops `note` and adds `site` with a default.
    const V2: &str = r#"{"type":"record","name":"Reading","fields":[
        {"name":"device","type":"string"},{"name":"temp","type":"double"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"site","type":"string","default":"hq"}]}"#;

    fn encode(schema: &str, id: u32, fields: Vec<(&str, Value)>) -> Vec<u8> {
        let s = Schema::parse_str(schema).unwrap();
        let v = Value::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let mut out = Vec::new();
        frame(id, &datum(&s, v), &mut out);
        out
    }

    fn columns() -> SchemaRef {
        Arc::new(ArrowSchema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("temp", DataType::Float64, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
            Field::new("site", DataType::Utf8, true),
        ]))
    }

    #[test]
    fn two_writer_versions_resolve_to_the_reader_schema_and_bad_records_say_why() {
        let known = Known(HashMap::from([
            (1, Arc::new(Schema::parse_str(V1).unwrap())),
            (2, Arc::new(Schema::parse_str(V2).unwrap())),
        ]));
        let reader_text = r#"{"type":"record","name":"Reading","fields":[
            {"name":"device","type":"string"},{"name":"temp","type":"double"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"site","type":"string","default":"hq"}]}"#;
        let reader = Schema::parse_str(reader_text).unwrap();
        let mut d = AvroDecoder::new(columns(), Arc::new(known), Some(reader)).unwrap();
        let recs = [
            encode(
                V1,
                1,
                vec![
                    ("device", Value::String("d-1".into())),
                    ("temp", Value::Double(21.5)),
                    ("ts", Value::TimestampMillis(1_000)),
                    ("note", Value::Union(1, Box::new(Value::String("x".into())))),
                ],
            ),
            encode(
                V2,
                2,
                vec![
                    ("device", Value::String("d-2".into())),
                    ("temp", Value::Double(30.0)),
                    ("ts", Value::TimestampMillis(2_000)),
                    ("site", Value::String("lab".into())),
                ],
            ),
            b"{\"device\":\"d-3\"}".to_vec(),
            {
                let mut r = encode(
                    V2,
                    2,
                    vec![
                        ("device", Value::String("d-9".into())),
                        ("temp", Value::Double(1.0)),
                        ("ts", Value::TimestampMillis(9)),
                        ("site", Value::String("x".into())),
                    ],
                );
                r[4] = 9;
                r
            },
            vec![0, 0, 0, 0, 2, 0xff],
        ];
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for r in &recs {
            ranges.push(buf.len()..buf.len() + r.len());
            buf.extend_from_slice(r);
        }
        let out = d.decode(&buf, &ranges).unwrap();
        let b = &out.batch;
        assert_eq!(b.num_rows(), 2);
        let s = |i: usize| b.column(i).as_any().downcast_ref::<StringArray>().unwrap().clone();
        assert_eq!(s(0).value(0), "d-1");
        assert_eq!(b.column(1).as_any().downcast_ref::<Float64Array>().unwrap().value(1), 30.0);
        assert_eq!(b.column(2).as_any().downcast_ref::<Int64Array>().unwrap().values(), &[1_000, 2_000]);
        // The reader has no `note`: the writer's is skipped, the column null. `site`: v1 has
        // none, so the reader's default.
        assert!(s(3).is_null(0) && s(3).is_null(1));
        assert_eq!((s(4).value(0), s(4).value(1)), ("hq", "lab"));
        let why: Vec<(usize, String)> = out.errors.iter().map(|e| (e.index, e.message.clone())).collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].1.contains("first byte is 0x7b"), "{why:?}");
        assert!(why[1].1.contains("schema id 9 is not in the schema registry"), "{why:?}");
        assert!(why[2].1.contains("invalid Avro for schema id 2"), "{why:?}");
    }

    #[test]
    fn rows_written_with_the_derived_schema_read_back_equal() {
        use arrow_array::{ArrayRef, Int32Array, RecordBatch, StructArray};
        use arrow_schema::Fields;
        let inner = Fields::from(vec![Field::new("x", DataType::Float64, true)]);
        let cols = Arc::new(ArrowSchema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("n", DataType::Int32, true),
            Field::new("pos", DataType::Struct(inner.clone()), false),
        ]));
        let avro = schema_for(&cols, "Row", Some("weir")).unwrap();
        let text = avro.canonical_form();
        assert!(text.contains(r#"{"name":"n","type":["null","int"]}"#), "{text}");
        let rows = RecordBatch::try_new(
            cols.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
                Arc::new(Int32Array::from(vec![Some(1), None])),
                Arc::new(StructArray::new(
                    inner,
                    vec![Arc::new(Float64Array::from(vec![Some(0.5), None])) as ArrayRef],
                    None,
                )),
            ],
        )
        .unwrap();
        let id = Arc::new(std::sync::OnceLock::new());
        let mut enc = AvroEncoder::new(avro.clone(), id.clone());
        let mut out = Vec::new();
        assert!(crate::Encoder::encode(&mut enc, &rows, &mut out).is_err(), "no id yet");
        id.set(42).unwrap();
        crate::Encoder::encode(&mut enc, &rows.slice(0, 1), &mut out).unwrap();
        let first = out.len();
        crate::Encoder::encode(&mut enc, &rows.slice(1, 1), &mut out).unwrap();
        assert_eq!(schema_id(&out).unwrap(), 42);
        // Read back into int64 columns (the decoders' integer type).
        let back = Arc::new(ArrowSchema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("pos", DataType::Struct(Fields::from(vec![Field::new("x", DataType::Float64, true)])), false),
        ]));
        let mut dec = AvroDecoder::new(back, Arc::new(Known(HashMap::from([(42, Arc::new(avro))]))), None).unwrap();
        let d = dec.decode(&out, &[Range { start: 0, end: first }, Range { start: first, end: out.len() }]).unwrap();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let n = d.batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        assert_eq!((n.value(0), n.is_null(1)), (1, true));
        let bad = ArrowSchema::new(vec![Field::new("avg-temp", DataType::Float64, false)]);
        let e = schema_for(&bad, "Row", None).unwrap_err().to_string();
        assert!(e.contains("avg-temp") && e.contains("not an Avro field name"), "{e}");
    }

    #[test]
    fn without_a_reader_schema_fields_fill_columns_by_name() {
        let known = Known(HashMap::from([(1, Arc::new(Schema::parse_str(V1).unwrap()))]));
        let mut d = AvroDecoder::new(columns(), Arc::new(known), None).unwrap();
        let rec = encode(
            V1,
            1,
            vec![
                ("device", Value::String("d-1".into())),
                ("temp", Value::Double(1.0)),
                ("ts", Value::TimestampMillis(5)),
                ("note", Value::Union(0, Box::new(Value::Null))),
            ],
        );
        let whole = vec![Range { start: 0, end: rec.len() }];
        let out = d.decode(&rec, &whole).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let site = out.batch.column(4).as_any().downcast_ref::<StringArray>().unwrap().clone();
        assert!(site.is_null(0), "a column no field fills is null");
        // A column that is not nullable and has no field fails the record, naming it.
        let strict = Arc::new(ArrowSchema::new(vec![Field::new("missing", DataType::Int64, false)]));
        let known = Known(HashMap::from([(1, Arc::new(Schema::parse_str(V1).unwrap()))]));
        let mut d = AvroDecoder::new(strict, Arc::new(known), None).unwrap();
        let whole = vec![Range { start: 0, end: rec.len() }];
        let out = d.decode(&rec, &whole).unwrap();
        assert!(out.errors[0].message.contains("missing required field `missing`"), "{:?}", out.errors);
        assert_eq!(
            schema_id(&[0, 0, 0, 1]).unwrap_err(),
            "a 4-byte record is too short for the Confluent wire format's header"
        );
    }
}
