//! Record formats for Weir: raw records (bytes) in, Arrow [`RecordBatch`]es out, and back.
//!
//! The three formats are JSON Lines ([`FormatSpec::Json`]), CSV ([`FormatSpec::Csv`]) and
//! MessagePack ([`FormatSpec::MsgPack`]). A source reads bytes, cuts them into records with
//! [`split_records`], and hands the record ranges to a [`Decoder`] made by
//! [`FormatSpec::decoder`] for the step's declared schema ([`SchemaSpec::to_arrow`]).
//!
//! Decoding never fails a batch because of one bad record: each record either becomes a row of
//! [`Decoded::batch`] or a [`RecordError`] carrying its index and the reason, and the good rows
//! stay in input order ([`Decoded::row_records`] maps rows back to records). Two kinds of record
//! failure are told apart ([`RecordErrorKind`]): the bytes do not parse at all (`decode`), or
//! they parse but do not fit the schema (`schema`). A record with both problems is reported as
//! `decode`.
//!
//! Type rules shared by the decoders:
//! - `int64` takes integers only (a float such as `1.5` or `1.0` is a schema error, so is an
//!   integer out of the `i64` range);
//! - `float64` takes integers and floats;
//! - `string` takes strings only; `bool` takes booleans only;
//! - `timestamp` (Arrow `Timestamp(Millisecond)`) takes integer milliseconds since the epoch or an
//!   RFC 3339 string;
//! - `struct` takes a nested object (JSON) or map (MessagePack), or dotted column names (CSV);
//! - a missing optional field or a null becomes an Arrow null; a missing or null required field is
//!   a schema error naming its dotted path (`missing required field `readings.temp``).
//!
//! Encoders ([`FormatSpec::encoder`]) write JSON Lines, CSV or MessagePack from a batch;
//! [`row_to_json`] renders one row for dead-letter payloads.
//!
//! The JSON decoder is a schema-directed single-pass parser writing straight into column
//! buffers; it is the hot path of the engine's benchmarks (run
//! `cargo test --release -p weir-formats -- --ignored --nocapture json_decode_throughput`).
#![warn(missing_docs)]

use std::fmt;
use std::ops::Range;

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, DataType, SchemaRef};

#[cfg(feature = "avro")]
pub mod avro;
mod columns;
mod csv;
mod encode;
#[doc(hidden)]
pub mod fuzzing;
mod infer;
mod json;
#[cfg(feature = "json-schema")]
pub mod json_schema;
mod msgpack;
#[cfg(test)]
mod proptests;
#[cfg(feature = "protobuf")]
pub mod protobuf;
/// The sensor schema of the examples, as documented YAML, shared by the tests.
#[cfg(test)]
pub(crate) const SENSOR_SCHEMA_YAML: &str = r#"
fields:
  - { name: device_id, type: string }
  - { name: ts, type: int64 }
  - name: readings
    type: struct
    fields: [ { name: temp, type: float64 }, { name: vibration, type: float64, required: false } ]
"#;
mod schema;
mod spec;

pub use crate::csv::{csv_header, CsvDecoder, CsvEncoder};
pub use crate::infer::infer_json_schema;
pub use crate::json::{row_to_json, JsonDecoder, JsonEncoder, JsonValues};
pub use crate::msgpack::{MsgPackDecoder, MsgPackEncoder};
pub use crate::schema::{FieldSpec, FieldType, SchemaSpec};
pub use crate::spec::{split_records, CsvOptions, FormatSpec};

/// The result type of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// An error that is not about one record: a bad schema or format configuration, a batch that
/// cannot be built or encoded, a caller mistake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The declared schema is not valid.
    #[error("invalid schema: field `{field}`: {reason}")]
    InvalidSchema {
        /// Dotted path of the offending field (empty for the schema as a whole).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The schema could not be read from YAML.
    #[error("invalid schema YAML: {0}")]
    SchemaYaml(#[from] serde_yaml::Error),
    /// A field has an Arrow type that the format cannot decode or encode.
    #[error("field `{field}`: type {data_type} is not supported by the {format} format")]
    UnsupportedType {
        /// Dotted path of the field.
        field: String,
        /// Its Arrow type.
        data_type: DataType,
        /// `json`, `csv`, `msgpack` or `schema`.
        format: &'static str,
    },
    /// The format options are not valid.
    #[error("invalid {format} options: {reason}")]
    InvalidOptions {
        /// The format.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A CSV header does not fit the schema.
    #[error("CSV header: {0}")]
    CsvHeader(String),
    /// Schema inference found nothing to infer from.
    #[error("cannot infer a schema: none of the {samples} samples is a JSON object")]
    NoUsableSamples {
        /// How many samples were given.
        samples: usize,
    },
    /// Schema inference found one field with incompatible types.
    #[error("cannot infer a schema: field `{field}` is {first} in one sample and {second} in another")]
    ConflictingTypes {
        /// Dotted path of the field.
        field: String,
        /// The type seen first.
        first: &'static str,
        /// The incompatible type seen later.
        second: &'static str,
    },
    /// A record range given to a decoder lies outside the buffer.
    #[error("record {index}: range {start}..{end} is outside the buffer of {len} bytes")]
    RecordOutOfBounds {
        /// Index of the record in the slice.
        index: usize,
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// A batch given to an encoder does not match the encoder's schema.
    #[error("batch does not match the encoder's schema: {0}")]
    SchemaMismatch(String),
    /// Too much data for one batch (for example over 2 GiB of string data in one column).
    #[error("batch too large: {0}")]
    BatchTooLarge(String),
    /// Building or reading Arrow data failed.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
}

/// Why one record failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordErrorKind {
    /// Not parseable: truncated JSON, binary garbage, bad UTF-8.
    Decode,
    /// Parsed but does not fit the schema: missing required field, wrong type.
    Schema,
}

impl RecordErrorKind {
    /// `"decode"` or `"schema"`, as written in dead-letter entries and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Schema => "schema",
        }
    }
}

impl fmt::Display for RecordErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Index of the record in the `records` slice given to [`Decoder::decode`].
    pub index: usize,
    /// Decode or schema failure.
    pub kind: RecordErrorKind,
    /// Human-readable reason, e.g. ``missing required field `readings.temp` ``.
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {} error: {}", self.index, self.kind, self.message)
    }
}

/// The outcome of decoding a set of records.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The good records, in input order, with the decoder's schema.
    pub batch: RecordBatch,
    /// The bad records, in input order.
    pub errors: Vec<RecordError>,
    /// For each row of `batch`, the index of its record; `None` when there were no errors (row
    /// `i` is record `i`).
    pub row_records: Option<Vec<u32>>,
}

impl Decoded {
    /// The index of the record that row `row` of [`Decoded::batch`] came from.
    pub fn record_of_row(&self, row: usize) -> usize {
        match &self.row_records {
            Some(map) => map.get(row).map_or(row, |&r| r as usize),
            None => row,
        }
    }
}

/// Turns records into a [`RecordBatch`] of a fixed schema.
pub trait Decoder: Send + fmt::Debug {
    /// Decodes the records `buf[r.clone()]` for each r in `records`.
    ///
    /// Fails only as a whole for caller mistakes (a range outside `buf`) or a batch that cannot
    /// be built; a bad record becomes a [`RecordError`].
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded>;
    /// The schema of the batches this decoder builds.
    fn schema(&self) -> &SchemaRef;
}

/// Turns [`RecordBatch`]es into bytes.
pub trait Encoder: Send + fmt::Debug {
    /// Appends the encoded rows of `batch` to `out` (JSON Lines: one object per line ending in
    /// '\n'; CSV: header once per encoder then rows; MessagePack: one map per row).
    fn encode(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()>;
}

/// Looks up one record's bytes, or says which range is out of bounds.
pub(crate) fn record_bytes<'a>(buf: &'a [u8], index: usize, r: &Range<usize>) -> Result<&'a [u8]> {
    buf.get(r.clone()).ok_or(FormatError::RecordOutOfBounds { index, start: r.start, end: r.end, len: buf.len() })
}

/// Shortens a rendering of a value for an error message: at most `max` bytes (cut at a char
/// boundary), followed by `...` when cut.
pub(crate) fn truncate_for_message(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
