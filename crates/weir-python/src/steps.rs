//! Python functions as pipeline steps: `map_batches`, `map`, `filter`, `stateful_map` and
//! `infer`. Each takes the GIL once per batch; the batch crosses into Python through the Arrow
//! C data interface without copying.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, UInt32Array};
use arrow_pyarrow::{FromPyArrow, ToPyArrow};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::bridge::Bridge;
use crate::rows;
use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::error::{Blame, Retry};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

/// The original exception of a function that stopped the job, for `run()` to chain.
pub(crate) type Failure = Arc<Mutex<Option<PyErr>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    MapBatches,
    Map,
    Filter,
    StatefulMap,
    Infer,
}

/// What the Python `_Function` object says about a step.
struct Spec {
    id: String,
    kind: Kind,
    func: Py<PyAny>,
    schema: Option<SchemaRef>,
    retry: Py<PyAny>,
    fail_job: bool,
    features: Option<Vec<String>>,
    output: String,
    max_batch: usize,
    max_latency: Duration,
    /// `stateful_map`: keys not seen for this long (event time, ms) are forgotten.
    state_ttl_ms: Option<i64>,
    /// `weir._steps`, imported once.
    helpers: Py<PyModule>,
    retryable: Py<PyAny>,
    failure: Failure,
}

/// A Python step, registered with the pipeline as a `function` step.
#[derive(Clone)]
pub(crate) struct PyStep(Arc<Spec>);

impl fmt::Debug for PyStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PyStep({}, {:?})", self.0.id, self.0.kind)
    }
}

fn py_err(e: PyErr) -> CoreError {
    Python::attach(|py| CoreError::Other { message: describe(py, &e), blame: Blame::User, retry: Retry::Never })
}

/// The exception with its traceback, as Python prints it.
pub(crate) fn describe(py: Python<'_>, e: &PyErr) -> String {
    let tb = e.traceback(py).and_then(|t| t.format().ok()).unwrap_or_default();
    format!("{tb}{}", e.value(py).repr().map(|r| r.to_string()).unwrap_or_else(|_| e.to_string()))
}

impl PyStep {
    /// Reads a `weir._Function`.
    pub(crate) fn from_py(id: &str, f: &Bound<'_, PyAny>, failure: Failure) -> PyResult<Self> {
        let py = f.py();
        let kind = match f.getattr("kind")?.extract::<String>()?.as_str() {
            "map_batches" => Kind::MapBatches,
            "map" => Kind::Map,
            "filter" => Kind::Filter,
            "stateful_map" => Kind::StatefulMap,
            "infer" => Kind::Infer,
            other => return Err(pyo3::exceptions::PyValueError::new_err(format!("unknown function kind `{other}`"))),
        };
        let schema = f.getattr("schema")?;
        let schema = if schema.is_none() { None } else { Some(Arc::new(Schema::from_pyarrow_bound(&schema)?)) };
        let max_latency_ms: f64 = f.getattr("max_latency_ms")?.extract()?;
        Ok(Self(Arc::new(Spec {
            id: id.to_string(),
            kind,
            func: f.getattr("fn")?.unbind(),
            schema,
            retry: f.getattr("retry")?.unbind(),
            fail_job: f.getattr("on_error")?.extract::<String>()? == "fail",
            features: f.getattr("features")?.extract()?,
            output: f.getattr("output")?.extract()?,
            max_batch: f.getattr("max_batch")?.extract()?,
            max_latency: Duration::from_secs_f64(max_latency_ms.max(0.0) / 1000.0),
            state_ttl_ms: f.getattr("state_ttl_ms")?.extract()?,
            helpers: py.import("weir._steps")?.unbind(),
            retryable: py.import("weir.errors")?.getattr("Retryable")?.unbind(),
            failure,
        })))
    }
}

impl weir::CustomStep for PyStep {
    fn plan(&self, input: &SchemaRef, keys: &[String]) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        let s = &self.0;
        let out = match s.kind {
            Kind::Filter => input.clone(),
            Kind::Map => s.schema.clone().unwrap_or_else(|| input.clone()),
            Kind::StatefulMap => {
                weir_core::ensure_config!(!keys.is_empty(), "stateful_map is keyed: put a `key_by` step before it");
                s.schema.clone().unwrap_or_else(|| input.clone())
            }
            Kind::Infer => {
                if let Some(features) = &s.features {
                    for f in features {
                        let field = weir_ops::field_by_path(input, f)?;
                        weir_core::ensure_config!(
                            field.data_type().is_numeric() || field.data_type() == &DataType::Boolean,
                            "infer feature `{f}` is {}, not a number",
                            field.data_type()
                        );
                    }
                }
                let mut fields: Vec<Field> =
                    input.fields().iter().filter(|f| f.name() != &s.output).map(|f| f.as_ref().clone()).collect();
                fields.push(Field::new(&s.output, DataType::Float64, false));
                Arc::new(Schema::new(fields))
            }
            Kind::MapBatches => match &s.schema {
                Some(schema) => schema.clone(),
                None => probe(s, input)?,
            },
        };
        let factory = PyOpFactory { step: self.clone(), input: input.clone(), out: out.clone(), keys: keys.to_vec() };
        Ok((Arc::new(factory), out))
    }

    fn order_sensitive(&self) -> bool {
        self.0.kind == Kind::StatefulMap
    }
}

/// Learns a batch function's output schema by calling it on an empty batch.
fn probe(s: &Spec, input: &SchemaRef) -> Result<SchemaRef> {
    Python::attach(|py| -> PyResult<SchemaRef> {
        let empty = RecordBatch::new_empty(input.clone()).to_pyarrow(py)?;
        let result = s.func.bind(py).call1((empty,))?;
        let batch = s.helpers.bind(py).getattr("to_batch")?.call1((result, py.None()))?;
        Ok(Arc::new(Schema::from_pyarrow_bound(&batch.getattr("schema")?)?))
    })
    .map_err(|e| {
        CoreError::Config(format!(
            "could not learn the output schema by calling the function on an empty batch; pass `schema=`: {}",
            py_err(e)
        ))
    })
}

#[derive(Debug)]
struct PyOpFactory {
    step: PyStep,
    input: SchemaRef,
    out: SchemaRef,
    keys: Vec<String>,
}

impl OperatorFactory for PyOpFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Operator>> {
        let state = if self.step.0.kind == Kind::StatefulMap {
            let s = &self.step.0;
            Some(
                Python::attach(|py| -> PyResult<Py<PyAny>> {
                    Ok(s.helpers
                        .bind(py)
                        .getattr("StatefulMap")?
                        .call1((s.func.bind(py), self.keys.clone(), s.retry.bind(py), s.state_ttl_ms))?
                        .unbind())
                })
                .map_err(py_err)?,
            )
        } else {
            None
        };
        Ok(Box::new(PyOp {
            step: self.step.clone(),
            out: self.out.clone(),
            keys: self.keys.clone(),
            state,
            bridge: Bridge::new(self.input.clone(), self.out.clone()),
            buffer: Vec::new(),
            buffered: 0,
            first_buffered: None,
            last_arrival: None,
            gap_ewma_s: None,
        }))
    }
}

/// One worker's instance of a Python step.
struct PyOp {
    step: PyStep,
    out: SchemaRef,
    keys: Vec<String>,
    /// `stateful_map`: the `weir._steps.StatefulMap` holding this worker's states.
    state: Option<Py<PyAny>>,
    /// Batches in and out of Python, with the schemas converted once: converting them per
    /// batch costs more than the rest of a cheap batch function.
    bridge: Bridge,
    /// `infer`: rows waiting to be scored.
    buffer: Vec<Batch>,
    buffered: usize,
    first_buffered: Option<Instant>,
    last_arrival: Option<Instant>,
    /// `infer`: smoothed time between row arrivals, seconds.
    gap_ewma_s: Option<f64>,
}

impl fmt::Debug for PyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PyOp({:?}, buffered {})", self.step, self.buffered)
    }
}

/// Rows that failed in a row function: index, attempts, traceback.
type RowFailures = Vec<(usize, u32, String)>;
/// What a row helper returns: the output rows (none for `filter`), the input rows they came
/// from, and the failures.
type RowResult = (Option<RecordBatch>, Option<Vec<usize>>, RowFailures);
/// A `stateful_map` snapshot from Python: key groups, pickled keys, pickled states.
type PickledStates = (Vec<u32>, Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Option<String>>);

/// The cyclic garbage collector, paused for one batch's row loop: building thousands of dicts
/// otherwise sets off collections that scan every live object, which costs more than the loop
/// itself. Reference counting still frees everything at once.
struct GcPaused<'py> {
    gc: Bound<'py, PyModule>,
    was: bool,
}

impl<'py> GcPaused<'py> {
    fn new(py: Python<'py>) -> PyResult<Self> {
        let gc = py.import(pyo3::intern!(py, "gc"))?;
        let was = gc.call_method0(pyo3::intern!(py, "isenabled"))?.is_truthy()?;
        if was {
            gc.call_method0(pyo3::intern!(py, "disable"))?;
        }
        Ok(Self { gc, was })
    }
}

impl Drop for GcPaused<'_> {
    fn drop(&mut self) {
        if self.was {
            let _ = self.gc.call_method0(pyo3::intern!(self.gc.py(), "enable"));
        }
    }
}

/// How a batch function ended.
enum Outcome<T> {
    Ok(T),
    /// It kept failing: the traceback and the attempts made.
    Failed(String, u32, i64),
}

impl PyOp {
    fn out_schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.bridge.out_schema(py)
    }

    /// Calls a batch function, retrying a `Retryable` with the step's backoff.
    fn call_batch<T>(
        &self,
        py: Python<'_>,
        mut f: impl FnMut(Python<'_>) -> PyResult<T>,
    ) -> std::result::Result<Outcome<T>, CoreError> {
        let s = &self.step.0;
        let retry = s.retry.bind(py);
        let max: u32 = retry.getattr("max_attempts").and_then(|m| m.extract()).unwrap_or(1);
        let first = now_ms();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match f(py) {
                Ok(v) => return Ok(Outcome::Ok(v)),
                Err(e) => {
                    let retryable = e.matches(py, s.retryable.bind(py)).unwrap_or(false);
                    if retryable && attempt < max {
                        let delay: f64 =
                            retry.call_method1("delay", (attempt,)).and_then(|d| d.extract()).unwrap_or(0.1);
                        // Without the GIL, and with the worker's other tasks moved off
                        // this thread while it sleeps.
                        let pause = Duration::from_secs_f64(delay.max(0.0));
                        py.detach(|| weir_core::runtime::blocking(|| std::thread::sleep(pause)));
                        continue;
                    }
                    if s.fail_job {
                        let msg = format!("the Python function raised {}", describe(py, &e));
                        *s.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                        return Err(CoreError::Other { message: msg, blame: Blame::User, retry: Retry::Never });
                    }
                    return Ok(Outcome::Failed(describe(py, &e), attempt, first));
                }
            }
        }
    }

    /// Dead-letters rows `idx` of `batch` with their failures.
    fn dead_letter_rows(
        &self,
        cx: &mut OpContext<'_>,
        batch: &Batch,
        failures: impl IntoIterator<Item = (usize, u32, String, Option<i64>)>,
    ) -> Result<()> {
        let now = now_ms();
        let letters: Vec<DeadLetter> = failures
            .into_iter()
            .map(|(i, attempts, reason, first)| DeadLetter {
                payload: Payload::Row(batch.rows.slice(i, 1)),
                kind: ErrorKind::Function,
                reason,
                step: cx.step.clone(),
                origin: "python".into(),
                position: None,
                time_ms: now,
                attempts,
                first_failure_ms: first.filter(|f| *f < now),
            })
            .collect();
        if letters.is_empty() {
            return Ok(());
        }
        cx.dead_letter(letters)
    }

    fn map_batches(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let s = self.step.0.clone();
        let n = batch.num_rows();
        let outcome = Python::attach(|py| {
            let input = self.bridge.export(py, &batch.rows).map_err(py_err)?;
            let schema = self.out_schema(py).map_err(py_err)?;
            self.call_batch(py, |py| {
                let result = s.func.bind(py).call1((input.clone(),))?;
                let out = s.helpers.bind(py).getattr("to_batch")?.call1((result, schema.clone()))?;
                let rows = self.bridge.import(&out, Some(&batch.rows))?;
                if rows.num_rows() != n {
                    return Err(pyo3::exceptions::PyValueError::new_err(format!(
                        "map_batches functions return as many rows as they get (to keep event times): got {n}, returned {}; drop rows with `filter`",
                        rows.num_rows()
                    )));
                }
                Ok(rows)
            })
        })?;
        match outcome {
            Outcome::Ok(rows) => {
                StepMetrics::add(&cx.metrics.rows_out, n as u64);
                cx.emit(Batch::new(rows, batch.time.clone())?);
                Ok(())
            }
            Outcome::Failed(reason, attempts, first) => {
                self.dead_letter_rows(cx, &batch, (0..n).map(|i| (i, attempts, reason.clone(), Some(first))))
            }
        }
    }

    /// `map`, `filter` and `stateful_map`: the helper loops over rows in Python.
    fn rows(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let s = self.step.0.clone();
        let n = batch.num_rows();
        let groups = if s.kind == Kind::StatefulMap {
            let cols = weir_core::keys::key_columns(&batch.rows, &self.keys)?;
            weir_core::state::key_groups(&cols, n)?.values().to_vec()
        } else {
            Vec::new()
        };
        let first = now_ms();
        let (rows, kept, failures) = Python::attach(|py| -> PyResult<RowResult> {
            let input = rows::to_dicts(py, &batch.rows, || self.bridge.export(py, &batch.rows))?;
            let _gc = GcPaused::new(py)?;
            match s.kind {
                Kind::Filter => self.filter_rows(py, input),
                Kind::Map => {
                    let (out, kept, failures) = self.map_rows(py, input)?;
                    self.build_rows(py, &out, kept, failures, n)
                }
                _ => {
                    let state =
                        self.state.as_ref().ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("no state"))?;
                    let times = PyList::new(py, batch.time.values().iter())?;
                    let r = state
                        .bind(py)
                        .call_method1("apply", (PyList::new(py, input)?, PyList::new(py, &groups)?, times))?;
                    let t = r.cast::<PyTuple>()?;
                    let out: Vec<Bound<'_, PyDict>> = t.get_item(0)?.extract()?;
                    // Emitted rows are never the input's one for one: the times are picked.
                    let (rows, kept, failures) =
                        self.build_rows(py, &out, t.get_item(1)?.extract()?, t.get_item(2)?.extract()?, n)?;
                    Ok((rows, Some(kept.unwrap_or_else(|| (0..n).collect())), failures))
                }
            }
        })
        .map_err(|e| py_err(e).in_step(cx.step))?;
        let failed = failures.len();
        self.dead_letter_rows(cx, &batch, failures.into_iter().map(|(i, a, r)| (i, a, r, Some(first))))?;
        let (out, kept_n) = match (rows, kept) {
            // Every row made it: the times are the input's.
            (Some(rows), None) => (Batch::new(rows, batch.time.clone())?, n),
            (None, None) => (batch, n),
            (rows, Some(kept)) => {
                let idx = UInt32Array::from(kept.iter().map(|&i| i as u32).collect::<Vec<_>>());
                let out = match rows {
                    None => batch.take(&idx)?,
                    Some(rows) => {
                        let time = arrow_select::take::take(&batch.time, &idx, None)?;
                        let time = time
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .cloned()
                            .ok_or_else(|| CoreError::Internal("event times are not int64".into()))?;
                        Batch::new(rows, time)?
                    }
                };
                (out, kept.len())
            }
        };
        StepMetrics::add(&cx.metrics.rows_out, kept_n as u64);
        StepMetrics::add(&cx.metrics.filtered, (n - kept_n - failed) as u64);
        cx.emit(out);
        Ok(())
    }

    /// Calls the row function on one row; a first failure goes to `weir._steps.retry_row`,
    /// which retries a `Retryable` with backoff. `Err` holds the attempts and the traceback.
    fn call_row<'py>(
        &self,
        py: Python<'py>,
        row: &Bound<'py, PyDict>,
    ) -> PyResult<std::result::Result<Bound<'py, PyAny>, (u32, String)>> {
        let s = &self.step.0;
        let f = s.func.bind(py);
        match f.call1((row,)) {
            Ok(r) => Ok(Ok(r)),
            // KeyboardInterrupt, SystemExit: not the row's fault; they stop the step.
            Err(e) if !e.is_instance_of::<pyo3::exceptions::PyException>(py) => Err(e),
            Err(e) => {
                let args = PyTuple::new(py, [row])?;
                let helper = s.helpers.bind(py).getattr(pyo3::intern!(py, "retry_row"))?;
                // Before Python 3.12 a fetched exception does not carry its traceback itself.
                let exc = e.value(py).clone();
                if let Some(tb) = e.traceback(py) {
                    exc.setattr(pyo3::intern!(py, "__traceback__"), tb)?;
                }
                let (ok, r, attempts): (bool, Bound<'py, PyAny>, u32) =
                    helper.call1((f, args, s.retry.bind(py), exc))?.extract()?;
                Ok(if ok { Ok(r) } else { Err((attempts, r.extract()?)) })
            }
        }
    }

    /// `map`: one call per row; a `None` result drops the row. Returns the output dicts, the
    /// input rows they came from, and the failures.
    #[allow(clippy::type_complexity)]
    fn map_rows<'py>(
        &self,
        py: Python<'py>,
        input: Vec<Bound<'py, PyDict>>,
    ) -> PyResult<(Vec<Bound<'py, PyDict>>, Vec<usize>, RowFailures)> {
        let mut out = Vec::with_capacity(input.len());
        let mut kept = Vec::with_capacity(input.len());
        let mut failures = Vec::new();
        for (i, row) in input.iter().enumerate() {
            let r = match self.call_row(py, row)? {
                Ok(r) => r,
                Err((attempts, tb)) => {
                    failures.push((i, attempts, tb));
                    continue;
                }
            };
            if r.is_none() {
                continue;
            }
            match r.cast_into::<PyDict>() {
                Ok(d) => {
                    out.push(d);
                    kept.push(i);
                }
                Err(e) => failures.push((
                    i,
                    1,
                    format!(
                        "map functions return a dict (or None to drop the row), not {}",
                        e.into_inner().get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    ),
                )),
            }
        }
        Ok((out, kept, failures))
    }

    /// `filter`: keeps the rows for which the function returns something true.
    fn filter_rows<'py>(&self, py: Python<'py>, input: Vec<Bound<'py, PyDict>>) -> PyResult<RowResult> {
        let mut kept = Vec::with_capacity(input.len());
        let mut failures = Vec::new();
        for (i, row) in input.iter().enumerate() {
            match self.call_row(py, row)? {
                Ok(r) => match r.is_truthy() {
                    Ok(true) => kept.push(i),
                    Ok(false) => {}
                    Err(e) => failures.push((i, 1, describe(py, &e))),
                },
                Err((attempts, tb)) => failures.push((i, attempts, tb)),
            }
        }
        Ok((None, Some(kept), failures))
    }

    /// The batch of the dicts a row function returned (`kept[j]` is the input row of
    /// `out[j]`); a dict that does not fit the schema fails alone. `kept` comes back `None`
    /// when it is every one of the `n` input rows in order.
    fn build_rows(
        &self,
        py: Python<'_>,
        out: &[Bound<'_, PyDict>],
        mut kept: Vec<usize>,
        mut failures: RowFailures,
        n: usize,
    ) -> PyResult<RowResult> {
        let batch = if rows::plain_schema(&self.out) {
            let (batch, bad) = rows::from_dicts(py, out, &self.out)?;
            if !bad.is_empty() {
                let mut gone = vec![false; kept.len()];
                for (j, reason) in bad {
                    gone[j] = true;
                    failures.push((kept[j], 1, reason));
                }
                let mut g = gone.into_iter();
                kept.retain(|_| !g.next().unwrap_or(false));
            }
            batch
        } else {
            let helper = self.step.0.helpers.bind(py).getattr(pyo3::intern!(py, "rows_to_batch"))?;
            let failed = PyList::empty(py);
            let r = helper.call1((PyList::new(py, out)?, kept, self.out_schema(py)?, &failed))?;
            let t = r.cast::<PyTuple>()?;
            kept = t.get_item(1)?.extract()?;
            failures.extend(failed.extract::<RowFailures>()?);
            self.bridge.import(&t.get_item(0)?, None)?
        };
        let all = kept.len() == n;
        Ok((Some(batch), (!all).then_some(kept), failures))
    }

    /// `infer`: the number of rows worth gathering, from the arrival rate: as many as arrive
    /// within the latency budget, so a quiet stream is scored at once.
    fn target(&self) -> usize {
        let s = &self.step.0;
        match self.gap_ewma_s {
            None => 1,
            Some(gap) if gap <= 0.0 => s.max_batch,
            Some(gap) => ((s.max_latency.as_secs_f64() / gap).floor() as usize).clamp(1, s.max_batch),
        }
    }

    fn observe_arrival(&mut self, rows: usize) {
        let now = Instant::now();
        if let Some(last) = self.last_arrival {
            let gap = now.duration_since(last).as_secs_f64() / rows.max(1) as f64;
            self.gap_ewma_s = Some(match self.gap_ewma_s {
                None => gap,
                Some(g) => 0.8 * g + 0.2 * gap,
            });
        }
        self.last_arrival = Some(now);
    }

    /// Scores everything buffered, in batches of at most `max_batch`.
    fn flush(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let parts = std::mem::take(&mut self.buffer);
        self.buffered = 0;
        self.first_buffered = None;
        let all = concat(&parts)?;
        let max = self.step.0.max_batch;
        let mut start = 0;
        while start < all.num_rows() {
            let len = max.min(all.num_rows() - start);
            self.score(all.slice(start, len), cx)?;
            start += len;
        }
        Ok(())
    }

    fn score(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let s = self.step.0.clone();
        let n = batch.num_rows();
        let t0 = Instant::now();
        let outcome = Python::attach(|py| {
            let input = self.bridge.export(py, &batch.rows).map_err(py_err)?;
            self.call_batch(py, |py| {
                let r = s.helpers.bind(py).getattr("apply_infer")?.call1((
                    s.func.bind(py),
                    input.clone(),
                    s.features.clone(),
                    s.output.clone(),
                ))?;
                RecordBatch::from_pyarrow_bound(&r)
            })
        })?;
        let took = t0.elapsed().as_secs_f64();
        let labels = [("step", cx.step.as_str())];
        let m = &cx.registry.connectors;
        m.add("weir_infer_batches_total", "Model calls made by infer steps.", &labels, 1.0);
        m.add("weir_infer_rows_total", "Rows scored by infer steps.", &labels, n as f64);
        m.add("weir_infer_seconds_total", "Time spent in model calls of infer steps.", &labels, took);
        m.set("weir_infer_batch_size", "Rows in the last model call of an infer step.", &labels, n as f64);
        m.set("weir_infer_latency_seconds", "Duration of the last model call of an infer step.", &labels, took);
        m.set(
            "weir_infer_target_batch",
            "Rows an infer step now gathers before it calls the model.",
            &labels,
            self.target() as f64,
        );
        match outcome {
            Outcome::Ok(rows) => {
                let rows = RecordBatch::try_new(self.out.clone(), rows.columns().to_vec())?;
                StepMetrics::add(&cx.metrics.rows_out, n as u64);
                cx.emit(Batch::new(rows, batch.time.clone())?);
                Ok(())
            }
            Outcome::Failed(reason, attempts, first) => {
                self.dead_letter_rows(cx, &batch, (0..n).map(|i| (i, attempts, reason.clone(), Some(first))))
            }
        }
    }
}

fn concat(parts: &[Batch]) -> Result<Batch> {
    if parts.len() == 1 {
        return Ok(parts[0].clone());
    }
    let schema = parts[0].schema();
    let rows = arrow_select::concat::concat_batches(&schema, parts.iter().map(|b| &b.rows))?;
    let times: Vec<&dyn Array> = parts.iter().map(|b| &b.time as &dyn Array).collect();
    let time = arrow_select::concat::concat(&times)?;
    let time = time
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| CoreError::Internal("event times are not int64".into()))?;
    Batch::new(rows, time)
}

impl Operator for PyOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        match self.step.0.kind {
            Kind::MapBatches => self.map_batches(batch, cx),
            Kind::Infer => {
                self.observe_arrival(batch.num_rows());
                self.buffered += batch.num_rows();
                self.first_buffered.get_or_insert_with(Instant::now);
                self.buffer.push(batch);
                if self.buffered >= self.target() {
                    self.flush(cx)?;
                }
                Ok(())
            }
            _ => self.rows(batch, cx),
        }
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if let (Some(_), Some(state)) = (self.step.0.state_ttl_ms, &self.state) {
            if wm != weir_core::batch::END_OF_TIME {
                let (gone, live): (u64, u64) =
                    Python::attach(|py| state.bind(py).call_method1("expire", (wm,))?.extract()).map_err(py_err)?;
                StepMetrics::add(&cx.metrics.state_evicted, gone);
                cx.metrics.state_keys.store(live, std::sync::atomic::Ordering::Relaxed);
            }
            return Ok(());
        }
        // Rows at or below the watermark must leave before it does, or they would be late
        // downstream; younger rows may wait for their batch.
        let oldest = self.buffer.iter().filter_map(|b| arrow_arith::aggregate::min(&b.time)).min();
        if oldest.is_some_and(|t| t <= wm) {
            self.flush(cx)?;
        }
        Ok(())
    }

    fn on_tick(&mut self, _now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        if self.first_buffered.is_some_and(|t| t.elapsed() >= self.step.0.max_latency) {
            self.flush(cx)?;
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        (self.step.0.kind == Kind::Infer).then(|| (self.step.0.max_latency / 4).max(Duration::from_millis(1)))
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        self.flush(cx)
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        match self.step.0.kind {
            Kind::StatefulMap => {
                let Some(state) = &self.state else { return Ok(None) };
                let (groups, keys, states, firsts) = Python::attach(|py| -> PyResult<PickledStates> {
                    state.bind(py).call_method0("snapshot")?.extract()
                })
                .map_err(py_err)?;
                // The first key as text leads, as in the engine's keyed tables: a handoff
                // between processes tells each key's partition by it.
                let fields = vec![
                    Field::new(weir_core::state::FIRST_KEY_COLUMN, DataType::Utf8, true),
                    Field::new("key", DataType::Binary, false),
                    Field::new("state", DataType::Binary, false),
                ];
                let cols: Vec<ArrayRef> = vec![
                    Arc::new(arrow_array::StringArray::from(firsts)),
                    Arc::new(BinaryArray::from_iter_values(keys.iter())),
                    Arc::new(BinaryArray::from_iter_values(states.iter())),
                ];
                Ok(Some(weir_core::state::state_table(UInt32Array::from(groups), fields, cols)?))
            }
            Kind::Infer if !self.buffer.is_empty() => {
                // Rows waiting for their model call are state: the source positions are past them.
                let all = concat(&self.buffer)?;
                let fields =
                    vec![Field::new("rows", DataType::Binary, false), Field::new("time", DataType::Int64, false)];
                let mut with_time = all.rows.columns().to_vec();
                with_time.push(Arc::new(all.time.clone()));
                let mut schema_fields: Vec<Field> =
                    all.rows.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
                schema_fields.push(Field::new("__weir_time", DataType::Int64, false));
                let packed = RecordBatch::try_new(Arc::new(Schema::new(schema_fields)), with_time)?;
                let bytes = weir_core::state::encode(&packed)?;
                let cols: Vec<ArrayRef> = vec![
                    Arc::new(BinaryArray::from_iter_values([bytes.as_slice()])),
                    Arc::new(Int64Array::from(vec![all.num_rows() as i64])),
                ];
                Ok(Some(weir_core::state::state_table(UInt32Array::from(vec![0]), fields, cols)?))
            }
            _ => Ok(None),
        }
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let col = |name: &str| -> Result<BinaryArray> {
            state.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<BinaryArray>().cloned()).ok_or_else(
                || {
                    CoreError::Config(format!(
                        "the checkpoint's state for this step has no `{name}` column; was the step changed?"
                    ))
                },
            )
        };
        match self.step.0.kind {
            Kind::StatefulMap => {
                let groups = state
                    .column(0)
                    .as_any()
                    .downcast_ref::<UInt32Array>()
                    .map(|g| g.values().to_vec())
                    .ok_or_else(|| CoreError::Internal("key groups are not u32".into()))?;
                let (keys, states) = (col("key")?, col("state")?);
                let keys: Vec<&[u8]> = keys.iter().flatten().collect();
                let states: Vec<&[u8]> = states.iter().flatten().collect();
                let Some(py_state) = &self.state else { return Ok(()) };
                Python::attach(|py| -> PyResult<()> {
                    let k: Vec<Bound<'_, pyo3::types::PyBytes>> =
                        keys.iter().map(|b| pyo3::types::PyBytes::new(py, b)).collect();
                    let v: Vec<Bound<'_, pyo3::types::PyBytes>> =
                        states.iter().map(|b| pyo3::types::PyBytes::new(py, b)).collect();
                    py_state.bind(py).call_method1("restore", (groups, k, v))?;
                    Ok(())
                })
                .map_err(py_err)
            }
            Kind::Infer => {
                for bytes in col("rows")?.iter().flatten() {
                    let packed = weir_core::state::decode(bytes)?;
                    let last = packed.num_columns() - 1;
                    let time = packed
                        .column(last)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .cloned()
                        .ok_or_else(|| CoreError::Internal("buffered times are not int64".into()))?;
                    let mut rows = packed;
                    rows.remove_column(last);
                    self.buffered += rows.num_rows();
                    self.buffer.push(Batch::new(rows, time)?);
                }
                self.first_buffered = (!self.buffer.is_empty()).then(Instant::now);
                Ok(())
            }
            _ => Err(CoreError::Config("this Python step keeps no state, but the checkpoint holds some for it".into())),
        }
    }
}
