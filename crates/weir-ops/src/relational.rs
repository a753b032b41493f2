//! Stateless steps: `filter` and `select`, with SQL expressions evaluated by DataFusion's
//! expression layer (see `weir-expr`).
//!
//! An expression that fails on a batch (say a cast of a bad string) does not stop the job:
//! the batch is re-evaluated row by row, the failing rows go to the dead-letter output with
//! the error, and the rest go on.

use std::sync::Arc;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::SchemaRef;
use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};
use weir_expr::{compile_projections, project, Predicate, Projection};

/// Keeps the rows for which a boolean SQL expression is true (NULL counts as false).
#[derive(Debug, Clone)]
pub struct FilterSpec {
    /// The predicate, e.g. `readings.temp > 25.0`.
    pub predicate: String,
}

impl FilterSpec {
    /// Compiles the predicate against the input schema. The schema does not change.
    ///
    /// # Errors
    /// Parse errors, unknown columns, a non-boolean expression.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        let pred = Predicate::compile(&self.predicate, input).map_err(CoreError::user)?;
        Ok((Arc::new(FilterOp { pred }), input.clone()))
    }
}

#[derive(Debug, Clone)]
struct FilterOp {
    pred: Predicate,
}

impl OperatorFactory for FilterOp {
    fn create(&self, _: usize, _: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(self.clone()))
    }
}

impl Operator for FilterOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows() as u64;
        let (batch, mask) = match self.pred.evaluate(&batch.rows) {
            Ok(m) => (batch, m),
            Err(_) => {
                let pred = &self.pred;
                let good = row_by_row(batch, cx, |b| pred.evaluate(b).map(|_| ()).map_err(|e| e.to_string()))?;
                let m = self.pred.evaluate(&good.rows).map_err(CoreError::user)?;
                (good, m)
            }
        };
        let kept = mask.true_count() as u64;
        let dead = n - batch.num_rows() as u64;
        StepMetrics::add(&cx.metrics.filtered, n - kept - dead);
        StepMetrics::add(&cx.metrics.rows_out, kept);
        if kept == batch.num_rows() as u64 {
            cx.emit(batch);
        } else {
            cx.emit(batch.filter(&mask)?);
        }
        Ok(())
    }
}

/// Chooses, renames and computes columns: `["device_id", "readings.temp AS temp",
/// "readings.temp * 1.8 + 32 AS temp_f"]`; `*` stands for all input columns.
#[derive(Debug, Clone)]
pub struct SelectSpec {
    /// Projection items.
    pub columns: Vec<String>,
}

impl SelectSpec {
    /// Compiles the projections; returns the factory and the output schema.
    ///
    /// # Errors
    /// Parse errors, unknown columns, duplicate output names.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        let (projs, out) = compile_projections(&self.columns, input).map_err(CoreError::user)?;
        Ok((Arc::new(SelectOp { projs: Arc::new(projs), out: out.clone() }), out))
    }
}

#[derive(Debug, Clone)]
struct SelectOp {
    projs: Arc<Vec<Projection>>,
    out: SchemaRef,
}

impl OperatorFactory for SelectOp {
    fn create(&self, _: usize, _: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(self.clone()))
    }
}

impl Operator for SelectOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let rows = match project(&batch.rows, &self.projs, &self.out) {
            Ok(r) => batch.with_rows(r)?,
            Err(_) => {
                let (projs, out) = (&self.projs, &self.out);
                let good = row_by_row(batch, cx, |b| project(b, projs, out).map(|_| ()).map_err(|e| e.to_string()))?;
                good.with_rows(project(&good.rows, &self.projs, &self.out).map_err(CoreError::user)?)?
            }
        };
        StepMetrics::add(&cx.metrics.rows_out, rows.num_rows() as u64);
        cx.emit(rows);
        Ok(())
    }
}

/// Finds the rows on which `eval` fails, dead-letters them, and returns the others.
fn row_by_row(
    batch: Batch,
    cx: &mut OpContext<'_>,
    eval: impl Fn(&RecordBatch) -> std::result::Result<(), String>,
) -> Result<Batch> {
    let mut keep = Vec::with_capacity(batch.num_rows());
    let mut letters = Vec::new();
    for i in 0..batch.num_rows() {
        let one = batch.rows.slice(i, 1);
        match eval(&one) {
            Ok(()) => keep.push(true),
            Err(e) => {
                keep.push(false);
                letters.push(DeadLetter {
                    payload: Payload::Row(one),
                    kind: ErrorKind::Expression,
                    reason: e,
                    step: cx.step.clone(),
                    origin: "row".into(),
                    position: None,
                    time_ms: now_ms(),
                    attempts: 1,
                    first_failure_ms: None,
                });
            }
        }
    }
    cx.dead_letter(letters)?;
    batch.filter(&BooleanArray::from(keep))
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use weir_core::testing::OpHarness;

    use super::*;

    fn input() -> Batch {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
        let rows = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec![Some("5"), Some("x"), None, Some("1")]))],
        )
        .unwrap();
        Batch::new(rows, Int64Array::from(vec![1, 2, 3, 4])).unwrap()
    }

    #[test]
    fn filter_dead_letters_rows_the_expression_fails_on() {
        let (f, _) = FilterSpec { predicate: "CAST(s AS BIGINT) > 2".into() }.plan(&input().schema()).unwrap();
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        let out = h.process(input()).unwrap();
        assert_eq!(out[0].rows.column(0).as_string::<i32>().value(0), "5");
        assert_eq!(out[0].time.values().to_vec(), vec![1]);
        let m = h.metrics();
        assert_eq!((m.rows_out, m.filtered, m.dead_lettered), (1, 2, 1));
        assert!(m.balanced());
        let dl = h.dead_letters();
        assert_eq!(dl[0].kind, ErrorKind::Expression);
    }

    #[test]
    fn select_computes_and_renames() {
        let (f, out) = SelectSpec { columns: vec!["s AS label".into(), "length(s) * 2 AS twice".into()] }
            .plan(&input().schema())
            .unwrap();
        assert_eq!(out.field(0).name(), "label");
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        let b = h.process(input()).unwrap().remove(0);
        assert_eq!(b.num_rows(), 4);
        assert_eq!(b.rows.column(1).as_primitive::<arrow_array::types::Int64Type>().value(0), 2);
    }
}
