//! SQL filters and projections on 8192-row batches (DataFusion physical expressions).
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use weir_expr::{compile_projections, project, Predicate};

const ROWS: usize = 8192;

fn readings() -> Fields {
    Fields::from(vec![Field::new("temp", DataType::Float64, true), Field::new("humidity", DataType::Float64, true)])
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("readings", DataType::Struct(readings()), true),
        Field::new("status", DataType::Utf8, true),
    ]))
}

/// A batch with a null `readings` in one row of 97 and a null temperature in one of 10.
fn batch() -> RecordBatch {
    let temps: Float64Array = (0..ROWS).map(|i| (i % 10 != 0).then_some((i % 50) as f64)).collect();
    let hums: Float64Array = (0..ROWS).map(|i| Some((i % 100) as f64 / 100.0)).collect();
    let parent = NullBuffer::from_iter((0..ROWS).map(|i| i % 97 != 0));
    let readings = StructArray::new(readings(), vec![Arc::new(temps), Arc::new(hums)], Some(parent));
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values((0..ROWS).map(|i| format!("dev-{}", i % 64)))),
            Arc::new(Int64Array::from_iter_values(0..ROWS as i64)),
            Arc::new(readings),
            Arc::new(StringArray::from_iter((0..ROWS).map(|i| (i % 3 != 0).then_some("on")))),
        ],
    )
    .unwrap()
}

fn main() {
    divan::main();
}

#[divan::bench(args = ["readings.temp > 25.0", "readings.temp > 25.0 AND status = 'on'", "device_id IN ('dev-1', 'dev-2', 'dev-3')"])]
fn filter(b: divan::Bencher<'_, '_>, sql: &str) {
    let rows = batch();
    let p = Predicate::compile(sql, &schema()).unwrap();
    b.counter(divan::counter::ItemsCount::new(ROWS))
        .bench_local(|| p.evaluate(divan::black_box(&rows)).unwrap().true_count());
}

#[divan::bench(args = ["device_id, ts, readings.temp", "*, readings.temp * 1.8 + 32 AS temp_f", "device_id, upper(status) AS s"])]
fn select(b: divan::Bencher<'_, '_>, items: &str) {
    let rows = batch();
    let items: Vec<String> = items.split(", ").map(str::to_string).collect();
    let (projs, out) = compile_projections(&items, &schema()).unwrap();
    b.counter(divan::counter::ItemsCount::new(ROWS))
        .bench_local(|| project(divan::black_box(&rows), &projs, &out).unwrap().num_columns());
}
