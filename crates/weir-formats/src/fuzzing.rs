//! Entry points for the fuzz targets (`fuzz/`), shared with the tests that replay the inputs
//! fuzzing found (`fuzz-regressions/` beside this crate), so a crash once found stays a test.
//!
//! Each function must not panic on any input; what it checks beyond that is written beside it.

use crate::{split_records, CsvOptions, FormatSpec, SchemaSpec};

/// The schema the decoders are fuzzed with: every field type, nested, required and not.
const SCHEMA: &str = r#"
fields:
  - { name: device_id, type: string }
  - { name: ts, type: int64 }
  - { name: ok, type: bool, required: false }
  - { name: at, type: timestamp, required: false }
  - name: readings
    type: struct
    required: false
    fields:
      - { name: temp, type: float64 }
      - { name: vibration, type: float64, required: false }
      - name: inner
        type: struct
        required: false
        fields: [ { name: n, type: int64, required: false }, { name: s, type: string, required: false } ]
"#;

/// Splits `data` into records and decodes them with `format`: every record is either a row or
/// an error, in order, and the batch has the schema's columns.
///
/// # Panics
/// When an invariant breaks (that is what a fuzzer looks for).
pub fn decode(format: &FormatSpec, data: &[u8]) {
    let schema = SchemaSpec::from_yaml(SCHEMA).expect("the fuzz schema parses").to_arrow();
    let mut ranges = Vec::new();
    let Ok(used) = split_records(format, data, true, &mut ranges) else { return };
    assert!(used <= data.len());
    let header: Vec<String> = ["device_id", "ts", "ok", "at", "readings"].iter().map(|s| (*s).to_string()).collect();
    let header = matches!(format, FormatSpec::Csv(_)).then_some(&header[..]);
    let mut dec = format.decoder_with_header(schema.clone(), header).expect("a decoder for the fuzz schema");
    let Ok(d) = dec.decode(data, &ranges) else { return };
    assert_eq!(d.batch.num_rows() + d.errors.len(), ranges.len(), "every record is a row or an error");
    assert_eq!(d.batch.schema().fields().len(), schema.fields().len());
    for row in 0..d.batch.num_rows() {
        assert!(d.record_of_row(row) < ranges.len());
    }
    // What decoded encodes again.
    let mut out = Vec::new();
    if let Ok(mut enc) = format.encoder(d.batch.schema()) {
        let _ = enc.encode(&d.batch, &mut out);
    }
}

/// Decodes `data` as JSON Lines.
pub fn json(data: &[u8]) {
    decode(&FormatSpec::Json, data);
}

/// Decodes `data` as CSV with a header row given.
pub fn csv(data: &[u8]) {
    decode(&FormatSpec::Csv(CsvOptions::default()), data);
}

/// Decodes `data` as a stream of MessagePack maps.
pub fn msgpack(data: &[u8]) {
    decode(&FormatSpec::MsgPack, data);
}

/// Reads `data` as a schema in YAML; one that reads converts to Arrow and back.
pub fn schema_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = SchemaSpec::from_yaml(text) {
        let arrow = spec.to_arrow();
        let _ = SchemaSpec::from_arrow(&arrow);
    }
}

#[cfg(test)]
mod tests {
    /// Replays every input kept under `fuzz-regressions/<target>/` (crashes fuzzing found once,
    /// and seeds), so none of them can come back.
    #[test]
    fn inputs_fuzzing_found_stay_fixed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 4] = [
            ("json", super::json),
            ("csv", super::csv),
            ("msgpack", super::msgpack),
            ("schema_yaml", super::schema_yaml),
        ];
        let mut seen = 0;
        for (name, f) in targets {
            let dir = root.join(name);
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let run = std::panic::catch_unwind(|| f(&data));
                assert!(run.is_ok(), "{} panics again", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 4, "the regression inputs are there");
    }
}
