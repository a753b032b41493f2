//! JSON Lines decoding into Arrow: the sensor events of the benchmark workloads.
#![allow(missing_docs, clippy::unwrap_used)]

use std::ops::Range;

use weir_formats::{split_records, Decoder as _, FormatSpec, JsonDecoder, SchemaSpec};

const SCHEMA: &str = r#"
fields:
  - { name: device_id, type: string }
  - { name: ts, type: int64 }
  - name: readings
    type: struct
    fields:
      - { name: temp, type: float64 }
      - { name: humidity, type: float64 }
      - { name: pressure, type: float64 }
      - { name: vibration, type: float64 }
"#;

const LINES: usize = 8192;

/// 8192 lines shaped like `gen_sensors.py`'s, from a fixed pattern.
fn input() -> (Vec<u8>, Vec<Range<usize>>) {
    let (mut buf, mut ranges) = (Vec::new(), Vec::new());
    for i in 0..LINES as u64 {
        let line = format!(
            r#"{{"device_id":"dev-{:05}","ts":{},"readings":{{"temp":{:.2},"humidity":{:.1},"pressure":{:.1},"vibration":{:.3}}}}}"#,
            i % 1000,
            1_700_000_000_123 + i,
            20.0 + (i % 700) as f64 / 100.0,
            40.0 + (i % 200) as f64 / 10.0,
            1000.0 + (i % 300) as f64 / 10.0,
            (i % 50) as f64 / 1000.0
        );
        let start = buf.len();
        buf.extend_from_slice(line.as_bytes());
        ranges.push(start..buf.len());
        buf.push(b'\n');
    }
    (buf, ranges)
}

fn main() {
    divan::main();
}

#[divan::bench]
fn json_decode(b: divan::Bencher<'_, '_>) {
    let (buf, ranges) = input();
    let mut dec = JsonDecoder::new(SchemaSpec::from_yaml(SCHEMA).unwrap().to_arrow()).unwrap();
    b.counter(divan::counter::ItemsCount::new(LINES))
        .bench_local(|| dec.decode(divan::black_box(&buf), &ranges).unwrap().batch.num_rows());
}

#[divan::bench]
fn json_split_and_decode(b: divan::Bencher<'_, '_>) {
    let (buf, _) = input();
    let mut dec = JsonDecoder::new(SchemaSpec::from_yaml(SCHEMA).unwrap().to_arrow()).unwrap();
    let mut split = Vec::with_capacity(LINES);
    b.counter(divan::counter::ItemsCount::new(LINES)).bench_local(|| {
        split.clear();
        split_records(&FormatSpec::Json, divan::black_box(&buf), true, &mut split).unwrap();
        dec.decode(&buf, &split).unwrap().batch.num_rows()
    });
}

/// Avro in the Confluent wire format: the same events as one writer schema's datums.
mod avro {
    use std::sync::Arc;

    use weir_formats::avro::apache_avro::types::Value;
    use weir_formats::avro::{AvroDecoder, AvroSchemas, Schema};
    use weir_formats::Decoder as _;

    use super::{LINES, SCHEMA};

    const WRITER: &str = r#"{"type":"record","name":"Event","fields":[
        {"name":"device_id","type":"string"},{"name":"ts","type":"long"},
        {"name":"readings","type":{"type":"record","name":"Readings","fields":[
            {"name":"temp","type":"double"},{"name":"humidity","type":"double"},
            {"name":"pressure","type":"double"},{"name":"vibration","type":"double"}]}}]}"#;

    #[derive(Debug)]
    struct One(Arc<Schema>);

    impl AvroSchemas for One {
        fn get(&self, _id: u32) -> Result<Arc<Schema>, String> {
            Ok(self.0.clone())
        }
    }

    fn input(schema: &Schema) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let (mut buf, mut ranges) = (Vec::new(), Vec::new());
        for i in 0..LINES as u64 {
            let f = |x: f64| Value::Double(x);
            let readings = Value::Record(vec![
                ("temp".into(), f(20.0 + (i % 700) as f64 / 100.0)),
                ("humidity".into(), f(40.0 + (i % 200) as f64 / 10.0)),
                ("pressure".into(), f(1000.0 + (i % 300) as f64 / 10.0)),
                ("vibration".into(), f((i % 50) as f64 / 1000.0)),
            ]);
            let v = Value::Record(vec![
                ("device_id".into(), Value::String(format!("dev-{:05}", i % 1000))),
                ("ts".into(), Value::Long(1_700_000_000_123 + i as i64)),
                ("readings".into(), readings),
            ]);
            let start = buf.len();
            weir_formats::avro::frame(7, &weir_formats::avro::datum(schema, v), &mut buf);
            ranges.push(start..buf.len());
        }
        (buf, ranges)
    }

    fn bench(b: divan::Bencher<'_, '_>, reader: bool) {
        let writer = Arc::new(Schema::parse_str(WRITER).unwrap());
        let (buf, ranges) = input(&writer);
        let columns = weir_formats::SchemaSpec::from_yaml(SCHEMA).unwrap().to_arrow();
        let reader = reader.then(|| writer.as_ref().clone());
        let mut dec = AvroDecoder::new(columns, Arc::new(One(writer)), reader).unwrap();
        b.counter(divan::counter::ItemsCount::new(LINES))
            .bench_local(|| dec.decode(divan::black_box(&buf), &ranges).unwrap().batch.num_rows());
    }

    #[divan::bench]
    fn avro_decode(b: divan::Bencher<'_, '_>) {
        bench(b, false);
    }

    #[divan::bench]
    fn avro_decode_with_a_reader_schema(b: divan::Bencher<'_, '_>) {
        bench(b, true);
    }
}
