//! The declared schema of a step's records, as written in YAML.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::{FormatError, Result};

/// A declared record schema, read from YAML:
///
/// ```yaml
/// fields:
///   - { name: device_id, type: string }
///   - { name: ts, type: int64 }
///   - name: readings
///     type: struct
///     fields: [ { name: temp, type: float64 }, { name: vibration, type: float64, required: false } ]
/// ```
///
/// Unknown keys are rejected. Use [`SchemaSpec::from_yaml`] to parse and validate in one step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// The top-level fields, in column order.
    pub fields: Vec<FieldSpec>,
}

/// One field of a [`SchemaSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The field's name: the JSON or MessagePack key, the CSV header (dotted for nested fields).
    pub name: String,
    /// The field's type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Whether every record must have a non-null value; default true. A required field is a
    /// non-nullable Arrow field.
    #[serde(default = "default_required", skip_serializing_if = "is_true")]
    pub required: bool,
    /// The child fields, only for `type: struct`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldSpec>,
}

fn default_required() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The type of a [`FieldSpec`]. YAML names (aliases after the first):
/// `bool`|`boolean`, `int64`|`int`|`integer`|`long`, `float64`|`float`|`double`,
/// `string`|`str`|`utf8`, `struct`|`object`, `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FieldType {
    /// Arrow `Boolean`.
    #[serde(alias = "boolean")]
    Bool,
    /// Arrow `Int64`.
    #[serde(alias = "int", alias = "integer", alias = "long")]
    Int64,
    /// Arrow `Float64`.
    #[serde(alias = "float", alias = "double")]
    Float64,
    /// Arrow `Utf8`.
    #[serde(alias = "str", alias = "utf8")]
    String,
    /// Arrow `Struct` of the field's `fields`.
    #[serde(alias = "object")]
    Struct,
    /// Arrow `Timestamp(Millisecond, None)`: integer milliseconds since the epoch, or an
    /// RFC 3339 string in text formats.
    Timestamp,
}

impl FieldType {
    /// The type's YAML name, as used in error messages (`int64`, `float64`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::Int64 => "int64",
            Self::Float64 => "float64",
            Self::String => "string",
            Self::Struct => "struct",
            Self::Timestamp => "timestamp",
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FieldSpec {
    /// A required field without children.
    pub fn new(name: impl Into<String>, ty: FieldType) -> Self {
        Self { name: name.into(), ty, required: true, fields: Vec::new() }
    }

    /// Builder-style: sets whether the field is required.
    pub fn with_required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// A required struct field with the given children.
    pub fn new_struct(name: impl Into<String>, fields: Vec<FieldSpec>) -> Self {
        Self { name: name.into(), ty: FieldType::Struct, required: true, fields }
    }

    /// The Arrow field: required fields are non-nullable.
    pub fn to_arrow(&self) -> Field {
        Field::new(&self.name, self.data_type(), !self.required)
    }

    fn data_type(&self) -> DataType {
        match self.ty {
            FieldType::Bool => DataType::Boolean,
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::String => DataType::Utf8,
            FieldType::Timestamp => DataType::Timestamp(TimeUnit::Millisecond, None),
            FieldType::Struct => DataType::Struct(self.fields.iter().map(FieldSpec::to_arrow).collect::<Fields>()),
        }
    }

    fn from_arrow(field: &Field, prefix: &str) -> Result<Self> {
        let path = join_path(prefix, field.name());
        let (ty, fields) = match field.data_type() {
            DataType::Boolean => (FieldType::Bool, Vec::new()),
            DataType::Int64 => (FieldType::Int64, Vec::new()),
            DataType::Float64 => (FieldType::Float64, Vec::new()),
            DataType::Utf8 => (FieldType::String, Vec::new()),
            DataType::Timestamp(TimeUnit::Millisecond, _) => (FieldType::Timestamp, Vec::new()),
            DataType::Struct(children) => {
                let fields = children.iter().map(|c| FieldSpec::from_arrow(c, &path)).collect::<Result<Vec<_>>>()?;
                (FieldType::Struct, fields)
            }
            other => {
                return Err(FormatError::UnsupportedType { field: path, data_type: other.clone(), format: "schema" })
            }
        };
        Ok(Self { name: field.name().clone(), ty, required: !field.is_nullable(), fields })
    }

    fn validate(&self, prefix: &str) -> Result<()> {
        let path = join_path(prefix, &self.name);
        if self.name.is_empty() {
            return Err(invalid(prefix, "a field has an empty name"));
        }
        match self.ty {
            FieldType::Struct => {
                if self.fields.is_empty() {
                    return Err(invalid(&path, "a struct needs at least one field in `fields`"));
                }
                validate_fields(&self.fields, &path)
            }
            ty => {
                if self.fields.is_empty() {
                    Ok(())
                } else {
                    Err(invalid(&path, &format!("only struct fields have `fields`, this one is {ty}")))
                }
            }
        }
    }
}

fn invalid(field: &str, reason: &str) -> FormatError {
    FormatError::InvalidSchema { field: field.to_owned(), reason: reason.to_owned() }
}

fn validate_fields(fields: &[FieldSpec], prefix: &str) -> Result<()> {
    let mut seen = HashSet::new();
    for f in fields {
        f.validate(prefix)?;
        if !seen.insert(f.name.as_str()) {
            return Err(invalid(&join_path(prefix, &f.name), "the name appears twice"));
        }
    }
    Ok(())
}

/// `prefix.name`, or `name` at the top level.
pub(crate) fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

impl SchemaSpec {
    /// A schema of the given top-level fields.
    pub fn new(fields: Vec<FieldSpec>) -> Self {
        Self { fields }
    }

    /// Parses a schema from YAML (the form shown on [`SchemaSpec`]) and validates it.
    pub fn from_yaml(yaml: &str) -> Result<Self> {
        let spec: SchemaSpec = serde_yaml::from_str(yaml)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks names (non-empty, unique among siblings) and that `fields` appear on structs, and
    /// only there, with at least one child.
    pub fn validate(&self) -> Result<()> {
        if self.fields.is_empty() {
            return Err(invalid("", "the schema has no fields"));
        }
        validate_fields(&self.fields, "")
    }

    /// The Arrow schema: required fields are non-nullable, optional ones nullable, structs are
    /// `DataType::Struct`, timestamps `Timestamp(Millisecond, None)`.
    pub fn to_arrow(&self) -> SchemaRef {
        Arc::new(Schema::new(self.fields.iter().map(FieldSpec::to_arrow).collect::<Fields>()))
    }

    /// The spec of an Arrow schema of supported types (`Boolean`, `Int64`, `Float64`, `Utf8`,
    /// `Timestamp(Millisecond, _)`, `Struct` of those). Other types are an error naming the
    /// field.
    pub fn from_arrow(schema: &Schema) -> Result<SchemaSpec> {
        let fields = schema.fields().iter().map(|f| FieldSpec::from_arrow(f, "")).collect::<Result<Vec<_>>>()?;
        Ok(SchemaSpec { fields })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = crate::SENSOR_SCHEMA_YAML;

    #[test]
    fn parses_the_documented_yaml() {
        let spec = SchemaSpec::from_yaml(YAML).unwrap();
        assert_eq!(
            spec,
            SchemaSpec::new(vec![
                FieldSpec::new("device_id", FieldType::String),
                FieldSpec::new("ts", FieldType::Int64),
                FieldSpec::new_struct(
                    "readings",
                    vec![
                        FieldSpec::new("temp", FieldType::Float64),
                        FieldSpec::new("vibration", FieldType::Float64).with_required(false),
                    ]
                ),
            ])
        );
        let arrow = spec.to_arrow();
        assert_eq!(arrow.field(0), &Field::new("device_id", DataType::Utf8, false));
        assert_eq!(
            arrow.field(2).data_type(),
            &DataType::Struct(Fields::from(vec![
                Field::new("temp", DataType::Float64, false),
                Field::new("vibration", DataType::Float64, true),
            ]))
        );
        assert_eq!(SchemaSpec::from_arrow(&arrow).unwrap(), spec);
        // Serialising and reading back gives the same spec.
        let text = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(SchemaSpec::from_yaml(&text).unwrap(), spec);
    }

    #[test]
    fn type_aliases() {
        let spec = SchemaSpec::from_yaml(
            "fields:\n - {name: a, type: boolean}\n - {name: b, type: int}\n - {name: c, type: integer}\n - {name: d, type: long}\n - {name: e, type: double}\n - {name: f, type: float}\n - {name: g, type: str}\n - {name: h, type: utf8}\n - {name: i, type: object, fields: [{name: x, type: bool}]}\n - {name: j, type: timestamp, required: false}\n",
        )
        .unwrap();
        let types: Vec<_> = spec.fields.iter().map(|f| f.ty).collect();
        use FieldType::*;
        assert_eq!(types, vec![Bool, Int64, Int64, Int64, Float64, Float64, String, String, Struct, Timestamp]);
        assert_eq!(spec.to_arrow().field(9), &Field::new("j", DataType::Timestamp(TimeUnit::Millisecond, None), true));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err =
            SchemaSpec::from_yaml("fields:\n - {name: a, type: int64, nullable: true}\n").unwrap_err().to_string();
        assert!(err.starts_with("invalid schema YAML: fields[0]: unknown field `nullable`"), "{err}");
        let err = SchemaSpec::from_yaml("fields: []\nextra: 1\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
        let err = SchemaSpec::from_yaml("fields:\n - {name: a, type: decimal}\n").unwrap_err().to_string();
        assert!(err.contains("unknown variant `decimal`"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let err = SchemaSpec::from_yaml("fields:\n - {name: a, type: int64, fields: [{name: b, type: bool}]}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid schema: field `a`: only struct fields have `fields`, this one is int64");
        let err = SchemaSpec::from_yaml(
            "fields:\n - {name: r, type: struct, fields: [{name: b, type: bool}, {name: b, type: bool}]}\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "invalid schema: field `r.b`: the name appears twice");
        let err = SchemaSpec::from_yaml("fields:\n - {name: r, type: struct}\n").unwrap_err().to_string();
        assert_eq!(err, "invalid schema: field `r`: a struct needs at least one field in `fields`");
        let err = SchemaSpec::from_yaml("fields: []\n").unwrap_err().to_string();
        assert_eq!(err, "invalid schema: field ``: the schema has no fields");
    }

    #[test]
    fn from_arrow_rejects_unsupported_types() {
        let schema = Schema::new(vec![Field::new(
            "r",
            DataType::Struct(Fields::from(vec![Field::new("x", DataType::Int32, true)])),
            true,
        )]);
        let err = SchemaSpec::from_arrow(&schema).unwrap_err().to_string();
        assert_eq!(err, "field `r.x`: type Int32 is not supported by the schema format");
    }
}
