//! JSON payloads checked against a JSON Schema before they are decoded: a record that does not
//! match fails with the places and rules it broke (`at '/temp': want number, but got string`)
//! and goes to the dead-letter output; the others are decoded as usual. Drafts 4 to 2020-12
//! (`boon`); the schema's `$schema` says which, else 2020-12. A record that is not JSON at all
//! is left to the decoder, which says where its syntax breaks.
//!
//! It parses each record a second time (into a tree the validator walks) on top of the
//! decoder's own pass: an option for inputs that need it, not measured yet.

use std::ops::Range;
use std::sync::Arc;

use arrow_schema::SchemaRef;

use crate::{record_bytes, Decoded, Decoder, RecordError, RecordErrorKind, Result};

/// A compiled JSON Schema.
pub struct JsonSchema {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonSchema").finish_non_exhaustive()
    }
}

impl JsonSchema {
    /// Compiles a schema (references to other documents are not fetched).
    ///
    /// # Errors
    /// The text is not JSON, or not a valid JSON Schema: the compiler's message.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        let loc = "urn:weir:json-schema";
        compiler.add_resource(loc, value).map_err(|e| e.to_string())?;
        let index = compiler.compile(loc, &mut schemas).map_err(|e| e.to_string())?;
        Ok(Self { schemas, index })
    }

    /// Whether the record matches; `None` if it is not JSON (the decoder will say why), else
    /// the broken rules on one line.
    pub fn check(&self, rec: &[u8]) -> Option<std::result::Result<(), String>> {
        let value: serde_json::Value = serde_json::from_slice(rec).ok()?;
        Some(self.schemas.validate(&value, self.index).map_err(|e| {
            let mut leaves = Vec::new();
            collect(&e, &mut leaves);
            leaves.join("; ")
        }))
    }
}

/// The innermost causes, each `at '<location>': <what>`.
fn collect(e: &boon::ValidationError<'_, '_>, out: &mut Vec<String>) {
    if e.causes.is_empty() {
        let at = e.instance_location.to_string();
        out.push(format!("at '{}': {}", if at.is_empty() { "/" } else { &at }, e.kind));
    }
    for c in &e.causes {
        collect(c, out);
    }
}

/// A decoder whose records are first checked against a JSON Schema.
#[derive(Debug)]
pub struct Validating {
    inner: Box<dyn Decoder>,
    schema: Arc<JsonSchema>,
}

impl Validating {
    /// Checks records with `schema`, then decodes those that match with `inner`.
    pub fn new(inner: Box<dyn Decoder>, schema: Arc<JsonSchema>) -> Self {
        Self { inner, schema }
    }
}

impl Decoder for Validating {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let mut keep = Vec::with_capacity(records.len());
        let mut refused = Vec::new();
        for (index, r) in records.iter().enumerate() {
            match self.schema.check(record_bytes(buf, index, r)?) {
                Some(Err(why)) => refused.push(RecordError {
                    index,
                    kind: RecordErrorKind::Schema,
                    message: format!("does not match the JSON schema: {why}"),
                }),
                Some(Ok(())) | None => keep.push(index),
            }
        }
        if refused.is_empty() {
            return self.inner.decode(buf, records);
        }
        let ranges: Vec<Range<usize>> = keep.iter().map(|&i| records[i].clone()).collect();
        let mut d = self.inner.decode(buf, &ranges)?;
        let rows: Vec<u32> = (0..d.batch.num_rows()).map(|r| keep[d.record_of_row(r)] as u32).collect();
        for e in &mut d.errors {
            e.index = keep[e.index];
        }
        d.errors.extend(refused);
        d.errors.sort_by_key(|e| e.index);
        d.row_records = Some(rows);
        Ok(d)
    }

    fn schema(&self) -> &SchemaRef {
        self.inner.schema()
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Int64Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::FormatSpec;

    #[test]
    fn records_that_break_the_schema_are_refused_naming_the_rule_and_the_rest_decoded() {
        let schema = JsonSchema::parse(
            r#"{"type": "object", "required": ["seq"],
                "properties": {"seq": {"type": "integer", "minimum": 0}, "temp": {"type": "number", "maximum": 100}}}"#,
        )
        .unwrap();
        let cols = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, true)]));
        let inner = FormatSpec::Json.decoder(cols).unwrap();
        let mut d = Validating::new(inner, Arc::new(schema));
        let lines = [
            "{\"seq\": 1}",
            "{\"seq\": -2}",
            "{\"seq\": 3, \"temp\": 400}",
            "{\"seq\": 4",
            "{\"temp\": 1}",
            "{\"seq\": 5}",
        ];
        let (mut buf, mut ranges) = (Vec::new(), Vec::new());
        for l in lines {
            ranges.push(buf.len()..buf.len() + l.len());
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        let out = d.decode(&buf, &ranges).unwrap();
        let seqs = out.batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        assert_eq!(seqs.values(), &[1, 5]);
        assert_eq!((out.record_of_row(0), out.record_of_row(1)), (0, 5));
        let why: Vec<(usize, &str)> = out.errors.iter().map(|e| (e.index, e.message.as_str())).collect();
        assert_eq!(why.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{why:?}");
        assert!(why[0].1.ends_with("at '/seq': must be >=0, but got -2"), "{why:?}");
        assert!(why[1].1.contains("at '/temp'"), "{why:?}");
        assert!(!why[2].1.contains("JSON schema"), "a record that is not JSON is the decoder's: {why:?}");
        assert!(why[3].1.ends_with("at '/': missing properties 'seq'"), "{why:?}");
        assert!(JsonSchema::parse(r#"{"type": 12}"#).is_err());
        assert!(JsonSchema::parse("{").unwrap_err().starts_with("not JSON"));
    }
}
