//! Keyed anomaly detectors.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::keys::{key_columns, KeyInterner};
use weir_core::metrics::StepMetrics;
use weir_core::time::column_by_path;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

use crate::field_by_path;

/// Exponentially weighted z-score per key, in arrival order.
///
/// Per key it keeps an exponentially weighted mean and variance of `value`. For each row, before
/// updating, it computes `z = (x - mean) / sqrt(var)`; once the key has seen `warmup` rows, a
/// row with `|x - mean| > threshold * sqrt(var)` is an anomaly. Then
/// `d = x - mean; mean += alpha * d; var = (1 - alpha) * (var + alpha * d * d)`. The first row
/// of a key sets `mean = x, var = 0`.
///
/// Output: one row per anomaly, the input row plus `mean`, `std` and `z` (Float64). Rows with
/// a null value neither update state nor alert (counted as `filtered`); all others count as
/// `aggregated`, and anomalies as `results_out`.
#[derive(Debug, Clone)]
pub struct EwmaZscoreSpec {
    /// Key column paths.
    pub keys: Vec<String>,
    /// The watched numeric column path.
    pub value: String,
    /// Smoothing factor in (0, 1].
    pub alpha: f64,
    /// Alert when |z| exceeds this.
    pub threshold: f64,
    /// Rows a key must have seen before it can alert.
    pub warmup: u64,
    /// Keys not seen for this long (event time) are forgotten; one that comes back starts over.
    pub state_ttl: Option<std::time::Duration>,
}

impl EwmaZscoreSpec {
    /// Validates against the input schema; returns the factory and output schema.
    ///
    /// # Errors
    /// Unknown or non-numeric columns, alpha outside (0, 1], a non-positive threshold, or
    /// input columns already named `mean`, `std` or `z`.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        weir_core::ensure_config!(
            self.alpha > 0.0 && self.alpha <= 1.0,
            "ewma_zscore: alpha must be in (0, 1], got {}",
            self.alpha
        );
        weir_core::ensure_config!(
            self.threshold > 0.0,
            "ewma_zscore: threshold must be positive, got {}",
            self.threshold
        );
        weir_core::ensure_config!(!self.keys.is_empty(), "ewma_zscore needs at least one key column");
        let mut key_types = Vec::new();
        for k in &self.keys {
            key_types.push(field_by_path(input, k)?.data_type().clone());
        }
        let v = field_by_path(input, &self.value)?;
        weir_core::ensure_config!(
            v.data_type().is_numeric(),
            "ewma_zscore: value `{}` must be numeric, but it is {}",
            self.value,
            v.data_type()
        );
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        for name in ["mean", "std", "z"] {
            weir_core::ensure_config!(
                input.field_with_name(name).is_err(),
                "ewma_zscore: the input already has a column `{name}`; rename it first"
            );
            fields.push(Field::new(name, DataType::Float64, true));
        }
        let out = Arc::new(Schema::new(fields));
        Ok((Arc::new(EwmaFactory { spec: self.clone(), out: out.clone(), key_types }), out))
    }
}

#[derive(Debug)]
struct EwmaFactory {
    spec: EwmaZscoreSpec,
    out: SchemaRef,
    key_types: Vec<DataType>,
}

impl OperatorFactory for EwmaFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(EwmaOp {
            spec: self.spec.clone(),
            out: self.out.clone(),
            keys: KeyInterner::new(&self.key_types)?.with_ttl(self.spec.state_ttl),
            state: Vec::new(),
        }))
    }
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    mean: f64,
    var: f64,
    n: u64,
}

#[derive(Debug)]
struct EwmaOp {
    spec: EwmaZscoreSpec,
    out: SchemaRef,
    keys: KeyInterner,
    state: Vec<Ewma>,
}

impl Operator for EwmaOp {
    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if wm != weir_core::batch::END_OF_TIME {
            let gone = self.keys.expire(wm, |_| false);
            for id in &gone {
                if let Some(s) = self.state.get_mut(*id as usize) {
                    *s = Ewma { mean: 0.0, var: 0.0, n: 0 };
                }
            }
            crate::note_expired(cx, gone.len(), self.keys.len());
        }
        Ok(())
    }

    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let kc = key_columns(&batch.rows, &self.spec.keys)?;
        let ids = self.keys.intern_at(&kc, Some(&batch.time))?;
        let col = arrow_cast::cast(&column_by_path(&batch.rows, &self.spec.value)?, &DataType::Float64)?;
        let vals = col
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or_else(|| CoreError::Internal("cast to f64 gave another type".into()))?;
        let (alpha, thr, warm) = (self.spec.alpha, self.spec.threshold, self.spec.warmup);
        let (mut idx, mut means, mut stds, mut zs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut nulls = 0u64;
        for (i, &k) in ids.iter().enumerate() {
            if vals.is_null(i) {
                nulls += 1;
                continue;
            }
            let x = vals.value(i);
            let k = k as usize;
            if k >= self.state.len() {
                self.state.resize(k + 1, Ewma { mean: 0.0, var: 0.0, n: 0 });
            }
            let s = &mut self.state[k];
            if s.n == 0 {
                *s = Ewma { mean: x, var: 0.0, n: 1 };
                continue;
            }
            let std = s.var.sqrt();
            if s.n >= warm && (x - s.mean).abs() > thr * std {
                idx.push(i as u32);
                means.push(s.mean);
                stds.push(std);
                zs.push((x - s.mean) / std);
            }
            let d = x - s.mean;
            s.mean += alpha * d;
            s.var = (1.0 - alpha) * (s.var + alpha * d * d);
            s.n += 1;
        }
        StepMetrics::add(&cx.metrics.filtered, nulls);
        StepMetrics::add(&cx.metrics.aggregated, batch.num_rows() as u64 - nulls);
        if idx.is_empty() {
            return Ok(());
        }
        let picked = batch.take(&UInt32Array::from(idx))?;
        let mut cols: Vec<ArrayRef> = picked.rows.columns().to_vec();
        for v in [means, stds, zs] {
            cols.push(Arc::new(Float64Array::from(v)));
        }
        let rows = RecordBatch::try_new(self.out.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rows.num_rows() as u64);
        cx.emit(picked.with_rows(rows)?);
        Ok(())
    }

    /// One row per key seen: its mean, variance and count.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let ids: Vec<u32> = (0..self.state.len() as u32).filter(|k| self.state[*k as usize].n > 0).collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let pick =
            |f: fn(&Ewma) -> f64| crate::snapshot::floats(ids.iter().map(|k| f(&self.state[*k as usize])).collect());
        let n: ArrayRef =
            Arc::new(arrow_array::UInt64Array::from_iter_values(ids.iter().map(|k| self.state[*k as usize].n)));
        let fields = vec![
            Field::new("mean", DataType::Float64, false),
            Field::new("var", DataType::Float64, false),
            Field::new("n", DataType::UInt64, false),
        ];
        crate::snapshot::keyed_table(&self.keys, true, &ids, fields, vec![pick(|e| e.mean), pick(|e| e.var), n])
            .map(Some)
    }

    fn restore(&mut self, t: RecordBatch) -> Result<()> {
        use crate::snapshot::{f64s, read_keys, u64s};
        let ids = read_keys(&mut self.keys, self.spec.keys.len(), &t)?;
        let (mean, var, n) = (f64s(&t, "mean")?, f64s(&t, "var")?, u64s(&t, "n")?);
        for (i, &k) in ids.iter().enumerate() {
            let k = k as usize;
            if k >= self.state.len() {
                self.state.resize(k + 1, Ewma { mean: 0.0, var: 0.0, n: 0 });
            }
            self.state[k] = Ewma { mean: mean.value(i), var: var.value(i), n: n.value(i) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;
    use arrow_array::{Int64Array, StringArray};
    use weir_core::testing::OpHarness;

    use super::*;

    fn spec(value: &str) -> EwmaZscoreSpec {
        EwmaZscoreSpec {
            keys: vec!["k".into()],
            value: value.into(),
            alpha: 0.1,
            threshold: 3.0,
            warmup: 5,
            state_ttl: None,
        }
    }

    #[test]
    fn matches_the_reference_definition() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("x", DataType::Float64, true),
        ]));
        let spec = spec("x");
        let (f, out_schema) = spec.plan(&schema).unwrap();
        assert_eq!(out_schema.fields().len(), 5);
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        // Deterministic wiggle with a spike at 40 for key a, and nulls that must be skipped.
        let n = 60;
        let keys: Vec<&str> = (0..n).map(|i| if i % 3 == 0 { "b" } else { "a" }).collect();
        let xs: Vec<Option<f64>> = (0..n)
            .map(|i| {
                if i == 13 {
                    None
                } else if i == 40 {
                    Some(50.0)
                } else {
                    Some(10.0 + ((i * 7) % 5) as f64)
                }
            })
            .collect();
        let rows = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(keys.clone())), Arc::new(Float64Array::from(xs.clone()))],
        )
        .unwrap();
        let all = Batch::new(rows, Int64Array::from((0..n as i64).collect::<Vec<_>>())).unwrap();
        let out = h.process(all.clone()).unwrap();
        // The same through a snapshot and restore half-way, as a recovery would.
        let mut first = OpHarness::new(f.as_ref()).unwrap();
        let mut resumed_out = first.process(all.slice(0, 30)).unwrap();
        let mut resumed = OpHarness::restored(f.as_ref(), first.snapshot().unwrap(), None).unwrap();
        resumed_out.extend(resumed.process(all.slice(30, n - 30)).unwrap());
        // Reference.
        let mut st: std::collections::HashMap<&str, (f64, f64, u64)> = Default::default();
        let mut want = Vec::new();
        for (i, (k, x)) in keys.iter().zip(&xs).enumerate() {
            let Some(x) = *x else { continue };
            match st.get_mut(k) {
                None => {
                    st.insert(k, (x, 0.0, 1));
                }
                Some((m, v, c)) => {
                    if *c >= 5 && (x - *m).abs() > 3.0 * v.sqrt() {
                        want.push((i as i64, (x - *m) / v.sqrt()));
                    }
                    let d = x - *m;
                    *m += 0.1 * d;
                    *v = 0.9 * (*v + 0.1 * d * d);
                    *c += 1;
                }
            }
        }
        let got: Vec<(i64, f64)> = out
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(|i| (b.time.value(i), b.rows.column(4).as_primitive::<Float64Type>().value(i)))
            })
            .collect();
        assert!(!want.is_empty());
        assert_eq!(got, want);
        let got_resumed: Vec<i64> = resumed_out.iter().flat_map(|b| b.time.values().to_vec()).collect();
        assert_eq!(got_resumed, want.iter().map(|w| w.0).collect::<Vec<_>>());
        let m = h.metrics();
        assert_eq!((m.filtered, m.results_out as usize), (1, want.len()));
        assert!(m.balanced());
    }

    #[test]
    fn rejects_bad_settings() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        let spec = spec("k");
        assert!(spec.plan(&schema).unwrap_err().to_string().contains("must be numeric"));
        let spec = EwmaZscoreSpec { alpha: 1.5, ..spec };
        assert!(spec.plan(&schema).unwrap_err().to_string().contains("alpha must be in (0, 1]"));
    }
}
