//! End to end through the runtime: an in-memory source, a keyed tumbling window, an in-memory
//! sink; 1 and 2 workers.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::runtime::{Job, JobSpec, RetryPolicy, StageSpec, WatermarkSpec};
use weir_core::testing::{CollectSink, MemoryDeadLetters, VecSourceFactory};
use weir_core::{Batch, StepId};
use weir_ops::{AggFunc, AggSpec, LatePolicy, TimeDomain, WindowKind, WindowSpec};

const ROWS: usize = 200_000;
const BATCH: usize = 4096;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Float64, false)]))
}

/// `ROWS` rows over 1000 keys, 1 ms apart, in batches, split over `parts` partitions.
fn input(parts: usize) -> Vec<Vec<Batch>> {
    let mut out = vec![Vec::new(); parts];
    for (n, start) in (0..ROWS).step_by(BATCH).enumerate() {
        let end = (start + BATCH).min(ROWS);
        let k = StringArray::from_iter_values((start..end).map(|i| format!("k{}", i % 1000)));
        let v = Float64Array::from_iter_values((start..end).map(|i| (i % 97) as f64));
        let rb = RecordBatch::try_new(schema(), vec![Arc::new(k), Arc::new(v)]).unwrap();
        let t = Int64Array::from_iter_values((start..end).map(|i| i as i64));
        out[n % parts].push(Batch::new(rb, t).unwrap());
    }
    out
}

fn job(workers: usize) -> Job {
    let window = WindowSpec {
        keys: vec!["k".into()],
        kind: WindowKind::Tumbling { size_ms: 1000 },
        domain: TimeDomain::Event,
        aggs: vec![
            AggSpec { name: "n".into(), func: AggFunc::Count, column: None },
            AggSpec { name: "mean".into(), func: AggFunc::Mean, column: Some("v".into()) },
        ],
        late: LatePolicy::Drop,
        state_ttl: None,
    };
    let (w, _) = window.plan(&schema()).unwrap();
    Job::new(JobSpec {
        upstream: None,
        counts_input: true,
        counts_output: true,
        name: "bench".into(),
        workers,
        source_step: StepId::new("src"),
        source: Arc::new(VecSourceFactory::new(schema(), input(workers))),
        stages: vec![
            StageSpec { key: None, ops: vec![] },
            StageSpec { key: Some(vec!["k".into()]), ops: vec![(StepId::new("w"), w)] },
        ],
        sink_step: StepId::new("sink"),
        sink: Arc::new(CollectSink::default()),
        dead_letters: Arc::new(MemoryDeadLetters::default()),
        watermark: WatermarkSpec { bound: Duration::from_millis(100), idle_timeout: None },
        channel_capacity: 4,
        latency_column: None,
        sink_retry: RetryPolicy::default(),
        quarantine: None,
        shedding: None,
        checkpoint: None,
    })
    .unwrap()
}

fn main() {
    divan::main();
}

#[divan::bench(args = [1, 2], sample_count = 10)]
fn window_per_key(b: divan::Bencher<'_, '_>, workers: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
    b.counter(divan::counter::ItemsCount::new(ROWS))
        .with_inputs(|| job(workers))
        .bench_local_values(|j| rt.block_on(j.run()).unwrap().sink_rows);
}
