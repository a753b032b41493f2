//! Steps, sources and sinks written in Rust code and placed in a pipeline.

use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir::prelude::*;
use weir_core::metrics::StepMetrics;
use weir_core::testing::{CollectSink, VecSourceFactory};
use weir_core::{Batch, OpContext, Operator, OperatorFactory, Result};

/// Doubles column `v`.
#[derive(Debug)]
struct Double;

#[derive(Debug)]
struct DoubleOp(SchemaRef);

impl Operator for DoubleOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let v = batch.rows.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
        let doubled: Float64Array = v.iter().map(|x| x.map(|x| x * 2.0)).collect();
        let rows = RecordBatch::try_new(self.0.clone(), vec![batch.rows.column(0).clone(), Arc::new(doubled)])?;
        StepMetrics::add(&cx.metrics.rows_out, rows.num_rows() as u64);
        cx.emit(batch.with_rows(rows)?);
        Ok(())
    }
}

impl OperatorFactory for DoubleOp {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(DoubleOp(self.0.clone())))
    }
}

impl CustomStep for Double {
    fn plan(&self, input: &SchemaRef, _keys: &[String]) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        weir_core::ensure_config!(
            input.field_with_name("v").is_ok_and(|f| f.data_type() == &DataType::Float64),
            "double needs a float64 column `v`"
        );
        Ok((Arc::new(DoubleOp(input.clone())), input.clone()))
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Float64, false)]))
}

fn source() -> Arc<VecSourceFactory> {
    let rows = RecordBatch::try_new(
        schema(),
        vec![Arc::new(StringArray::from(vec!["a", "b", "a"])), Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0]))],
    )
    .unwrap();
    let batch = Batch::new(rows, Int64Array::from(vec![0, 1000, 2000])).unwrap();
    Arc::new(VecSourceFactory::new(schema(), vec![vec![batch]]))
}

#[tokio::test]
async fn a_rust_step_runs_between_configured_steps() {
    let out = CollectSink::default();
    let mut p = Pipeline::new("code");
    p.source_code("in", source())
        .function("double", Arc::new(Double))
        .filter("big", "v > 2.5")
        .sink_code("out", Arc::new(out.clone()));
    let built = p.build().unwrap();
    let summary = built.run(&RunOptions { workers: Some(1), fresh: true }).await.unwrap();
    assert_eq!(summary.sink_rows, 2);
    let got: Vec<f64> = out
        .batches()
        .iter()
        .flat_map(|b| b.column(1).as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec())
        .collect();
    assert_eq!(got, vec![4.0, 6.0]);
}

#[test]
fn a_function_step_needs_its_code_and_code_needs_its_step() {
    let yaml = r#"
name: yaml-code
source: { id: in, code: {} }
steps:
  - function: { id: double }
sink: { id: out, code: {} }
"#;
    let cfg = weir::yaml::parse("p.yaml", yaml).unwrap();
    let err = Pipeline::from_config(cfg.clone()).build().unwrap_err().to_string();
    assert!(err.contains("no code is registered for function `double`"), "{err}");

    let mut p = Pipeline::from_config(cfg);
    p.register_function("double", Arc::new(Double));
    let err = p.build().unwrap_err().to_string();
    assert!(err.contains("source `in` is `code`, but no source was registered"), "{err}");

    p.source_code("in", source()).sink_code("out", Arc::new(CollectSink::default()));
    assert!(p.build().is_ok());
    p.register_function("unused", Arc::new(Double));
    let err = p.build().unwrap_err().to_string();
    assert!(err.contains("function `unused` is registered but no `function` step"), "{err}");
}

#[test]
fn a_rust_step_checks_its_input_when_the_pipeline_is_built() {
    let mut p = Pipeline::new("bad");
    p.source_code("in", source()).select("cols", ["k"]).function("double", Arc::new(Double));
    p.sink_code("out", Arc::new(CollectSink::default()));
    let err = p.build().unwrap_err().to_string();
    assert_eq!(err, "step `double`: double needs a float64 column `v`");
}
