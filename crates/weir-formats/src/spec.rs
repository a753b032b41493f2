//! Which format a step reads or writes, its YAML form, and cutting bytes into records.

use std::fmt;
use std::ops::Range;

use arrow_schema::SchemaRef;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    CsvDecoder, CsvEncoder, Decoder, Encoder, JsonDecoder, JsonEncoder, MsgPackDecoder, MsgPackEncoder, Result,
};

/// Which record format. In YAML, a name or a one-key map with the format's options:
///
/// ```yaml
/// format: json                                   # JSON Lines (also: jsonl, ndjson)
/// format: msgpack                                # MessagePack (also: messagepack)
/// format: csv                                    # CSV with default options
/// format: { csv: { delimiter: ";", header: false } }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSpec {
    /// JSON Lines: one JSON object per line.
    Json,
    /// CSV: one record per line.
    Csv(CsvOptions),
    /// MessagePack: consecutive top-level maps.
    MsgPack,
}

/// CSV options. In YAML: `{ delimiter: ",", header: true }`, both optional (these are the
/// defaults); unknown keys are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsvOptions {
    /// The field separator: one ASCII character other than `"`, CR and LF.
    #[serde(with = "delimiter_serde")]
    pub delimiter: u8,
    /// Whether the first line is a header naming the columns. Reading it is the source's job
    /// (see [`crate::csv_header`] and [`FormatSpec::decoder_with_header`]); the encoder writes
    /// one when this is set.
    pub header: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self { delimiter: b',', header: true }
    }
}

impl CsvOptions {
    /// Checks the delimiter.
    pub fn validate(&self) -> Result<()> {
        if !self.delimiter.is_ascii() || matches!(self.delimiter, b'"' | b'\n' | b'\r') {
            return Err(crate::FormatError::InvalidOptions {
                format: "csv",
                reason: format!(
                    "delimiter {:?} must be one ASCII character other than '\"', CR and LF",
                    self.delimiter as char
                ),
            });
        }
        Ok(())
    }
}

mod delimiter_serde {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &u8, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&(*d as char).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        let s = String::deserialize(d)?;
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if c.is_ascii() && !matches!(c, '"' | '\n' | '\r') => Ok(c as u8),
            _ => {
                Err(D::Error::custom(format!("delimiter {s:?} must be one ASCII character other than '\"', CR and LF")))
            }
        }
    }
}

const NAMES: &[&str] = &["json", "csv", "msgpack"];

impl FormatSpec {
    /// The format's name: `json`, `csv` or `msgpack`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Csv(_) => "csv",
            Self::MsgPack => "msgpack",
        }
    }

    /// The format called `name` (with default options), accepting the YAML aliases.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "json" | "jsonl" | "ndjson" | "json_lines" => Some(Self::Json),
            "csv" => Some(Self::Csv(CsvOptions::default())),
            "msgpack" | "messagepack" => Some(Self::MsgPack),
            _ => None,
        }
    }

    /// A decoder of records of this format into batches of `schema`. A CSV decoder made here
    /// maps columns to the schema's leaf fields by position; use
    /// [`FormatSpec::decoder_with_header`] to map them by header name.
    pub fn decoder(&self, schema: SchemaRef) -> Result<Box<dyn Decoder>> {
        self.decoder_with_header(schema, None)
    }

    /// Like [`FormatSpec::decoder`], with the CSV header's column names (from
    /// [`crate::csv_header`]) when there is one; other formats ignore `header`.
    pub fn decoder_with_header(&self, schema: SchemaRef, header: Option<&[String]>) -> Result<Box<dyn Decoder>> {
        Ok(match self {
            Self::Json => Box::new(JsonDecoder::new(schema)?),
            Self::Csv(options) => Box::new(CsvDecoder::new(schema, options, header)?),
            Self::MsgPack => Box::new(MsgPackDecoder::new(schema)?),
        })
    }

    /// An encoder of batches of `schema` into this format.
    pub fn encoder(&self, schema: SchemaRef) -> Result<Box<dyn Encoder>> {
        Ok(match self {
            Self::Json => Box::new(JsonEncoder::new(schema)?),
            Self::Csv(options) => Box::new(CsvEncoder::new(schema, options)?),
            Self::MsgPack => Box::new(MsgPackEncoder::new(schema)?),
        })
    }
}

impl fmt::Display for FormatSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for FormatSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Csv(options) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("csv", options)?;
                map.end()
            }
            other => s.serialize_str(other.name()),
        }
    }
}

/// `{}` or nothing: the options of formats that have none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

impl<'de> Deserialize<'de> for FormatSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FormatVisitor;

        impl<'de> Visitor<'de> for FormatVisitor {
            type Value = FormatSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a format name (json, csv, msgpack) or a one-key map such as {csv: {delimiter: \",\"}}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<FormatSpec, E> {
                FormatSpec::from_name(v).ok_or_else(|| E::unknown_variant(v, NAMES))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FormatSpec, A::Error> {
                let Some(name) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                let spec = match FormatSpec::from_name(&name) {
                    Some(FormatSpec::Csv(_)) => {
                        FormatSpec::Csv(map.next_value::<Option<CsvOptions>>()?.unwrap_or_default())
                    }
                    Some(other) => {
                        map.next_value::<Option<NoOptions>>()?;
                        other
                    }
                    None => return Err(de::Error::unknown_variant(&name, NAMES)),
                };
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a format map has exactly one key, the format's name"));
                }
                if let FormatSpec::Csv(options) = &spec {
                    options.validate().map_err(de::Error::custom)?;
                }
                Ok(spec)
            }
        }

        d.deserialize_any(FormatVisitor)
    }
}

/// Splits a byte buffer into records. For JSON and CSV: lines ('\n', a trailing '\r' stripped;
/// empty and whitespace-only lines skipped). For MessagePack: consecutive top-level values (a map
/// per record).
///
/// Appends the complete records found in `buf` to `out` and returns the number of bytes consumed
/// (the start of the first incomplete record). If `eof`, a final record without terminator is
/// complete (for MessagePack, a truncated last value is still handed out, for the decoder to
/// report). The caller bounds how long a record may grow: this function only waits for more
/// bytes.
pub fn split_records(format: &FormatSpec, buf: &[u8], eof: bool, out: &mut Vec<Range<usize>>) -> Result<usize> {
    match format {
        FormatSpec::Json | FormatSpec::Csv(_) => Ok(split_lines(buf, eof, out)),
        FormatSpec::MsgPack => Ok(crate::msgpack::split(buf, eof, out)),
    }
}

fn split_lines(buf: &[u8], eof: bool, out: &mut Vec<Range<usize>>) -> usize {
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', buf) {
        push_line(buf, start, nl, out);
        start = nl + 1;
    }
    if eof && start < buf.len() {
        push_line(buf, start, buf.len(), out);
        start = buf.len();
    }
    start
}

#[inline]
fn push_line(buf: &[u8], start: usize, mut end: usize, out: &mut Vec<Range<usize>>) {
    if end > start && buf[end - 1] == b'\r' {
        end -= 1;
    }
    if buf[start..end].iter().all(|b| b.is_ascii_whitespace()) {
        return;
    }
    out.push(start..end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Step {
        format: FormatSpec,
    }

    fn parse(yaml: &str) -> Result<FormatSpec, String> {
        serde_yaml::from_str::<Step>(yaml).map(|s| s.format).map_err(|e| e.to_string())
    }

    #[test]
    fn yaml_forms() {
        assert_eq!(parse("format: json"), Ok(FormatSpec::Json));
        assert_eq!(parse("format: ndjson"), Ok(FormatSpec::Json));
        assert_eq!(parse("format: msgpack"), Ok(FormatSpec::MsgPack));
        assert_eq!(parse("format: {msgpack: {}}"), Ok(FormatSpec::MsgPack));
        assert_eq!(parse("format: csv"), Ok(FormatSpec::Csv(CsvOptions::default())));
        assert_eq!(
            parse("format: {csv: {delimiter: \";\", header: false}}"),
            Ok(FormatSpec::Csv(CsvOptions { delimiter: b';', header: false }))
        );
        assert_eq!(
            parse("format:\n  csv:\n    delimiter: \"\\t\"\n"),
            Ok(FormatSpec::Csv(CsvOptions { delimiter: b'\t', header: true }))
        );
        assert_eq!(parse("format: {csv: }"), Ok(FormatSpec::Csv(CsvOptions::default())));
        for spec in
            [FormatSpec::Json, FormatSpec::MsgPack, FormatSpec::Csv(CsvOptions { delimiter: b'|', header: false })]
        {
            let text = serde_yaml::to_string(&Step { format: spec }).unwrap();
            assert_eq!(parse(&text), Ok(spec), "{text}");
        }
    }

    #[test]
    fn yaml_errors() {
        let err = parse("format: xml").unwrap_err();
        assert!(err.contains("unknown variant `xml`, expected one of `json`, `csv`, `msgpack`"), "{err}");
        let err = parse("format: {csv: {delimiter: \",\", quote: \"'\"}}").unwrap_err();
        assert!(err.contains("unknown field `quote`"), "{err}");
        let err = parse("format: {csv: {delimiter: \",,\"}}").unwrap_err();
        assert!(err.contains("delimiter \",,\" must be one ASCII character"), "{err}");
        let err = parse("format: {csv: {}, json: {}}").unwrap_err();
        assert!(err.contains("exactly one key"), "{err}");
        let err = parse("format: {json: {pretty: true}}").unwrap_err();
        assert!(err.contains("unknown field `pretty`"), "{err}");
    }

    fn lines(buf: &[u8], eof: bool) -> (Vec<&str>, usize) {
        let mut out = Vec::new();
        let used = split_records(&FormatSpec::Json, buf, eof, &mut out).unwrap();
        (out.into_iter().map(|r| std::str::from_utf8(&buf[r]).unwrap()).collect(), used)
    }

    #[test]
    fn splits_lines() {
        assert_eq!(lines(b"a\nb\r\n\n  \r\n\tc\npartial", false), (vec!["a", "b", "\tc"], 13));
        assert_eq!(lines(b"a\nb\r\n\n  \r\n\tc\npartial", true), (vec!["a", "b", "\tc", "partial"], 20));
        assert_eq!(lines(b"last\r", true), (vec!["last"], 5));
        assert_eq!(lines(b"", true), (vec![], 0));
        assert_eq!(lines(b"   ", true), (vec![], 3));
        assert_eq!(lines(b"no newline", false), (vec![], 0));
    }
}
