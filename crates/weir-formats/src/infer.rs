//! Inferring a [`SchemaSpec`] from sample JSON records.

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::schema::join_path;
use crate::{FieldSpec, FieldType, FormatError, Result, SchemaSpec};

/// What has been seen of one field.
#[derive(Debug, Default)]
struct Seen {
    name: String,
    /// The type so far; `None` while only nulls (or lists, which are skipped) were seen.
    ty: Option<Ty>,
    /// In how many of its parent's objects the field had a non-null value.
    present: usize,
    /// Whether a list value was seen (such fields are left out).
    list: bool,
    /// Members, for objects.
    fields: Vec<Seen>,
    /// How many objects were seen for this field (for its members' optionality).
    objects: usize,
}

/// A JSON value that keeps object keys in their order (serde_json's map sorts them unless a
/// crate-wide feature is on). Arrays are not kept: inference leaves them out.
#[derive(Debug)]
enum Value {
    Null,
    Bool,
    Int,
    Float,
    String,
    Array,
    Object(Vec<(String, Value)>),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> std::result::Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Value, E> {
                Ok(Value::Bool)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Value, E> {
                Ok(Value::Int)
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
                Ok(if i64::try_from(v).is_ok() { Value::Int } else { Value::Float })
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Value, E> {
                Ok(Value::Float)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Value, E> {
                Ok(Value::String)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Value::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
                let mut entries: Vec<(String, Value)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    // A duplicate key's last value wins, as in the decoder.
                    match entries.iter_mut().find(|(name, _)| *name == k) {
                        Some(entry) => entry.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(Value::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Int,
    Float,
    String,
    Object,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int64",
            Ty::Float => "float64",
            Ty::String => "string",
            Ty::Object => "struct",
        }
    }
}

fn merge_object(fields: &mut Vec<Seen>, obj: &[(String, Value)], prefix: &str) -> Result<()> {
    for (key, value) in obj {
        let i = match fields.iter().position(|f| f.name == *key) {
            Some(i) => i,
            None => {
                fields.push(Seen { name: key.clone(), ..Seen::default() });
                fields.len() - 1
            }
        };
        let seen = &mut fields[i];
        let path = join_path(prefix, key);
        let ty = match value {
            Value::Null => continue,
            Value::Array => {
                seen.list = true;
                continue;
            }
            Value::Bool => Ty::Bool,
            Value::Int => Ty::Int,
            Value::Float => Ty::Float,
            Value::String => Ty::String,
            Value::Object(_) => Ty::Object,
        };
        seen.ty = Some(match (seen.ty, ty) {
            (None, t) => t,
            (Some(a), b) if a == b => a,
            (Some(Ty::Int), Ty::Float) | (Some(Ty::Float), Ty::Int) => Ty::Float,
            (Some(a), b) => {
                return Err(FormatError::ConflictingTypes { field: path, first: a.name(), second: b.name() })
            }
        });
        seen.present += 1;
        if let Value::Object(inner) = value {
            seen.objects += 1;
            merge_object(&mut seen.fields, inner, &path)?;
        }
    }
    Ok(())
}

fn to_specs(fields: Vec<Seen>, parent_count: usize) -> Vec<FieldSpec> {
    fields
        .into_iter()
        .filter(|f| !(f.list || (f.ty == Some(Ty::Object) && f.fields.is_empty())))
        .map(|f| {
            let required = f.present == parent_count;
            let ty = match f.ty {
                Some(Ty::Bool) => FieldType::Bool,
                Some(Ty::Int) => FieldType::Int64,
                Some(Ty::Float) => FieldType::Float64,
                Some(Ty::String) | None => FieldType::String,
                Some(Ty::Object) => FieldType::Struct,
            };
            let fields = if ty == FieldType::Struct { to_specs(f.fields, f.objects) } else { Vec::new() };
            FieldSpec { name: f.name, ty, required, fields }
        })
        .filter(|f| f.ty != FieldType::Struct || !f.fields.is_empty())
        .collect()
}

/// Infers a schema from sample JSON records (objects): the union of their keys in order of first
/// appearance; integers widen to `float64` when mixed with floats; nested objects become structs;
/// a field missing or null in some samples is optional; a field only ever null is an optional
/// string. Fields holding arrays, and objects that are always empty, are left out (the decoder
/// skips them). Non-object or unparsable samples are skipped; it is an error if none is usable,
/// or if a field has incompatible types (a string in one sample and a number in another).
pub fn infer_json_schema(samples: &[&[u8]]) -> Result<SchemaSpec> {
    let mut fields = Vec::new();
    let mut used = 0;
    for sample in samples {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(sample) else {
            continue;
        };
        used += 1;
        merge_object(&mut fields, &obj, "")?;
    }
    if used == 0 {
        return Err(FormatError::NoUsableSamples { samples: samples.len() });
    }
    let spec = SchemaSpec { fields: to_specs(fields, used) };
    if spec.fields.is_empty() {
        return Err(FormatError::NoUsableSamples { samples: samples.len() });
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_types_optionality_and_structs() {
        let samples: [&[u8]; 6] = [
            br#"{"device_id":"a","ts":1,"readings":{"temp":22,"vibration":0.5},"tags":["x"],"n":null}"#,
            br#"{"device_id":"b","ts":2,"readings":{"temp":22.5},"flag":true,"n":null}"#,
            b"not json",
            b"[1,2]",
            br#"{"device_id":"c","ts":3,"readings":{"temp":1,"vibration":null},"flag":false}"#,
            br#"{"ts":4,"device_id":"d","readings":{"temp":1},"empty":{}}"#,
        ];
        let spec = infer_json_schema(&samples).unwrap();
        let expected = SchemaSpec::from_yaml(
            r#"
fields:
  - { name: device_id, type: string }
  - { name: ts, type: int64 }
  - name: readings
    type: struct
    fields: [ { name: temp, type: float64 }, { name: vibration, type: float64, required: false } ]
  - { name: n, type: string, required: false }
  - { name: flag, type: bool, required: false }
"#,
        )
        .unwrap();
        assert_eq!(spec, expected);
    }

    #[test]
    fn errors() {
        let err = infer_json_schema(&[b"x", b"[]"]).unwrap_err().to_string();
        assert_eq!(err, "cannot infer a schema: none of the 2 samples is a JSON object");
        let err = infer_json_schema(&[br#"{"a":{"b":1}}"#, br#"{"a":{"b":"x"}}"#]).unwrap_err().to_string();
        assert_eq!(err, "cannot infer a schema: field `a.b` is int64 in one sample and string in another");
    }
}
