//! The native module of the `weir` Python package (`weir._weir`): pipelines built in Python,
//! planned and run by the engine with the GIL released, and Python functions as steps that
//! take the GIL once per batch.
//!
//! The Python side (`python/weir`) builds the pipeline in its YAML form and hands it over as
//! JSON, with the Python steps, a test source and a collecting sink when it has them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{Int64Array, RecordBatch};
use arrow_pyarrow::{FromPyArrow, ToPyArrow};
use arrow_schema::{Schema, SchemaRef};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use weir::config::PipelineConfig;
use weir::{Pipeline, RunOptions};
use weir_core::runtime::{Job, RunSummary, ShutdownHandle};
use weir_core::testing::{CollectSink, VecSourceFactory};
use weir_core::{Batch, Blame, CoreError};

mod bridge;
mod rows;
mod sinks;
mod sources;
mod steps;

/// When an error happened: a user's mistake found while planning is in the pipeline, one
/// found while running is in the data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Plan,
    Run,
}

/// Raises the `weir.errors` class that fits the engine error, with the chain kept.
fn raise(py: Python<'_>, e: &CoreError, cause: Option<PyErr>) -> PyErr {
    raise_in(py, Phase::Plan, e, cause)
}

fn raise_in(py: Python<'_>, phase: Phase, e: &CoreError, cause: Option<PyErr>) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let errors = py.import("weir.errors")?;
        let class = match (e.blame(), cause.is_some()) {
            (_, true) => "FunctionError",
            (Blame::User, _) if phase == Phase::Plan || matches!(root(e), CoreError::Config(_)) => "ConfigError",
            (Blame::User, _) => "DataError",
            (Blame::External, _) => "ExternalError",
            (Blame::Internal, _) => "InternalError",
        };
        let step = match e {
            CoreError::Step { step, .. } => Some(step.to_string()),
            _ => None,
        };
        let mut chain = Vec::new();
        let mut cur: Option<&dyn std::error::Error> = Some(e);
        while let Some(c) = cur {
            chain.push(c.to_string());
            cur = c.source();
        }
        let innermost = chain.last().cloned().unwrap_or_default();
        let err = PyErr::from_value(errors.getattr(class)?.call1((e.to_string(), step, chain))?);
        let cause = match cause {
            Some(c) => c,
            None => PyErr::from_value(errors.getattr("EngineCause")?.call1((innermost,))?),
        };
        err.set_cause(py, Some(cause));
        Ok(err)
    };
    build().unwrap_or_else(|err| err)
}

fn root(e: &CoreError) -> &CoreError {
    match e {
        CoreError::Step { source, .. } => root(source),
        other => other,
    }
}

fn config_err(py: Python<'_>, message: String) -> PyErr {
    raise(py, &CoreError::Config(message), None)
}

/// A pipeline handed over from Python.
#[pyclass(module = "weir._weir")]
struct NativePipeline {
    pipeline: Pipeline,
    sink: Option<(CollectSink, Py<PyAny>)>,
    failure: steps::Failure,
    running: Arc<Mutex<Option<Running>>>,
    /// The `table` steps of the current run, or of the last one after it ended.
    tables: Arc<Mutex<Option<weir_ops::Tables>>>,
}

/// A run in progress: how to stop it and where its live counters are.
struct Running {
    stop: ShutdownHandle,
    registry: Arc<weir_core::metrics::Registry>,
}

/// How often `run(progress=...)` prints: `None` never.
fn progress_every(progress: Option<f64>) -> Option<Duration> {
    progress.filter(|s| *s > 0.0).map(Duration::from_secs_f64)
}

#[pymethods]
impl NativePipeline {
    #[new]
    fn new(
        py: Python<'_>,
        config_json: &str,
        functions: &Bound<'_, PyDict>,
        code_source: Option<Bound<'_, PyAny>>,
        code_sink: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cfg: PipelineConfig = serde_json::from_str(config_json).map_err(|e| {
            let mut message = e.to_string();
            if let Some(i) = message.find(" at line ") {
                message.truncate(i);
            }
            config_err(py, format!("pipeline settings: {message}"))
        })?;
        let failure = steps::Failure::default();
        // The source written in code is the one whose connector is `code` (the first, when the
        // settings name none: a test source set as the only one).
        let code_src = cfg
            .sources
            .iter()
            .find(|s| matches!(s.connector, weir::config::SourceConnector::Code(_)))
            .unwrap_or_else(|| cfg.source());
        let source_id = code_src.id.clone();
        let cfg_time = code_src.event_time.clone();
        let sink_id = cfg.sink.id.clone();
        let mut p = Pipeline::from_config(cfg);
        for (id, f) in functions.iter() {
            let id: String = id.extract()?;
            let step = steps::PyStep::from_py(&id, &f, failure.clone())?;
            p.register_function(&id, Arc::new(step));
        }
        if let Some(src) = code_source {
            if src.hasattr("_weir_user_source")? {
                // A `weir.Source` subclass: read by the user's code, times from its column.
                let time = cfg_time.as_ref().map(weir::config::EventTimeConfig::spec);
                p.source_code(&source_id, Arc::new(sources::PySourceFactory::new(&src, time)?));
            } else {
                p.source_code(&source_id, Arc::new(memory_source(&src)?));
            }
        }
        let sink = match code_sink {
            // A `weir.Sink` subclass: written by the user's code.
            Some(s) if s.hasattr("_weir_user_sink")? => {
                p.sink_code(&sink_id, Arc::new(sinks::PySinkFactory::new(s.unbind())));
                None
            }
            Some(s) => {
                let collect = CollectSink::default();
                p.sink_code(&sink_id, Arc::new(collect.clone()));
                Some((collect, s.unbind()))
            }
            None => None,
        };
        Ok(Self { pipeline: p, sink, failure, running: Arc::default(), tables: Arc::default() })
    }

    /// Checks the pipeline without reading input.
    fn validate(&self, py: Python<'_>) -> PyResult<()> {
        let built = self.pipeline.build().map_err(|e| raise(py, &e, None))?;
        built.check(&RunOptions { workers: Some(1), fresh: false }).map(|_| ()).map_err(|e| raise(py, &e, None))
    }

    /// The schema of the rows reaching the sink.
    #[pyo3(signature = (workers=None))]
    fn output_schema<'py>(&self, py: Python<'py>, workers: Option<usize>) -> PyResult<Bound<'py, PyAny>> {
        let built = self.pipeline.build().map_err(|e| raise(py, &e, None))?;
        let schema = built.check(&RunOptions { workers, fresh: false }).map_err(|e| raise(py, &e, None))?;
        schema.as_ref().clone().to_pyarrow(py)
    }

    /// Runs to the end; Ctrl-C on the main thread stops the run cleanly, then raises.
    /// `progress`: seconds between progress lines on stderr (the command's line), or `None`.
    #[pyo3(signature = (workers=None, fresh=false, metrics_addr=None, progress=None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        workers: Option<usize>,
        fresh: bool,
        metrics_addr: Option<String>,
        progress: Option<f64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let built = self.pipeline.build().map_err(|e| raise(py, &e, None))?;
        let (spec, out_schema) =
            built.plan_with_schema(&RunOptions { workers, fresh }).map_err(|e| raise(py, &e, self.take_failure()))?;
        let workers = spec.workers;
        *self.tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(built.tables());
        let job = Job::new(spec).map_err(|e| raise(py, &e, None))?;
        let stop = job.shutdown_handle();
        let registry = job.registry();
        *self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Running { stop: stop.clone(), registry: registry.clone() });
        let progress = progress_every(progress);
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let live = registry.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .enable_all()
            .build()
            .map_err(|e| raise(py, &CoreError::io("cannot start the runtime", e), None))?;
        let (result, interrupted) = py
            .detach(|| {
                rt.block_on(async move {
                    let mut traces = built.start_traces()?;
                    let _server = match built.http_addr(metrics_addr.as_deref()) {
                        Some(a) => Some(weir::http::MetricsServer::start(&a, built.http_state(&job)).await?),
                        None => None,
                    };
                    let mut run = std::pin::pin!(job.run());
                    let mut interrupted: Option<PyErr> = None;
                    let mut every = tokio::time::interval(Duration::from_millis(50));
                    let mut report = tokio::time::interval(progress.unwrap_or(Duration::from_secs(3600)));
                    report.tick().await;
                    let mut last = 0;
                    loop {
                        tokio::select! {
                            r = &mut run => {
                                if progress.is_some() && terminal {
                                    eprint!("\r\x1b[2K");
                                }
                                if let Some(t) = traces.take() {
                                    t.finish().await;
                                }
                                return Ok::<_, CoreError>((r, interrupted));
                            }
                            _ = report.tick(), if progress.is_some() => {
                                let every = progress.unwrap_or_default();
                                let line = weir::report::progress_line(&live, &mut last, every);
                                // On a terminal the line is rewritten in place; elsewhere (a
                                // log) each one is kept.
                                if terminal { eprint!("\r\x1b[2K{line}") } else { eprintln!("{line}") }
                            }
                            _ = every.tick(), if interrupted.is_none() => {
                                // Python's handler only sets a flag; ask it whether Ctrl-C came.
                                if let Err(e) = Python::attach(|py| py.check_signals()) {
                                    stop.stop();
                                    interrupted = Some(e);
                                }
                            }
                        }
                    }
                })
            })
            .map_err(|e| raise(py, &e, None))?;
        *self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let summary = result.map_err(|e| raise_in(py, Phase::Run, &e, self.take_failure()))?;
        if let Some((collect, sink)) = &self.sink {
            let sink = sink.bind(py);
            let batches: Vec<Bound<'_, PyAny>> =
                collect.batches().iter().map(|b| b.to_pyarrow(py)).collect::<PyResult<_>>()?;
            sink.setattr("_batches", PyList::new(py, batches)?)?;
            sink.setattr("_schema", out_schema.as_ref().clone().to_pyarrow(py)?)?;
        }
        if let Some(e) = interrupted {
            return Err(e);
        }
        summary_dict(py, &summary)
    }

    /// Asks a running pipeline to stop reading and finish.
    fn stop(&self) {
        if let Some(r) = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            r.stop.stop();
        }
    }

    /// Table `id`'s rows (as a pyarrow table) for key `key` (a list: one value per key
    /// column), or those whose first key starts with `prefix`, up to `limit`.
    #[pyo3(signature = (id, key=None, prefix=None, limit=1000))]
    fn table_rows<'py>(
        &self,
        py: Python<'py>,
        id: &str,
        key: Option<Vec<String>>,
        prefix: Option<String>,
        limit: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tables = self.tables(py)?;
        let answer = match &key {
            Some(k) => tables.get(id, &k.iter().map(String::as_str).collect::<Vec<_>>()),
            None => tables.scan(id, prefix.as_deref().unwrap_or(""), limit),
        }
        .map_err(|e| raise(py, &e, None))?;
        match answer {
            weir_ops::TableAnswer::Rows(rows, _) => rows.to_pyarrow(py),
            weir_ops::TableAnswer::NoTable => {
                Err(config_err(py, format!("no table `{id}` in this pipeline (tables: {})", tables.ids().join(", "))))
            }
        }
    }

    /// The live counters of a run in progress (`None` when not running): records read, rows
    /// written, the watermark (ms) and each step's counters.
    fn progress<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let registry = match self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            Some(r) => r.registry.clone(),
            None => return Ok(None),
        };
        let d = PyDict::new(py);
        d.set_item("source_records", registry.source_records.load(std::sync::atomic::Ordering::Relaxed))?;
        d.set_item("sink_rows", registry.sink_rows.load(std::sync::atomic::Ordering::Relaxed))?;
        d.set_item("watermark_ms", registry.watermark().filter(|w| *w != weir_core::batch::END_OF_TIME))?;
        d.set_item("steps", steps_dict(py, &registry.steps())?)?;
        Ok(Some(d))
    }
}

impl NativePipeline {
    /// The current (or last) run's tables; an error before any run.
    fn tables(&self, py: Python<'_>) -> PyResult<weir_ops::Tables> {
        self.tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone().ok_or_else(|| {
            config_err(py, "the pipeline has not run: its tables are read while it runs and after".into())
        })
    }

    fn take_failure(&self) -> Option<PyErr> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

fn summary_dict<'py>(py: Python<'py>, s: &RunSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("elapsed_s", s.elapsed.as_secs_f64())?;
    d.set_item("source_records", s.source_records)?;
    d.set_item("sink_rows", s.sink_rows)?;
    d.set_item("steps", steps_dict(py, &s.steps)?)?;
    if let Some(l) = s.latency_us {
        d.set_item("latency_us", l)?;
    }
    if let Some(l) = s.latency_to_sink_entry_us {
        d.set_item("latency_to_sink_entry_us", l)?;
    }
    Ok(d)
}

/// Per step, its counters, in pipeline order.
fn steps_dict<'py>(
    py: Python<'py>,
    steps: &[(weir_core::StepId, weir_core::metrics::StepSnapshot)],
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (id, snap) in steps {
        let c = PyDict::new(py);
        c.set_item("rows_in", snap.rows_in)?;
        c.set_item("rows_out", snap.rows_out)?;
        c.set_item("results_out", snap.results_out)?;
        c.set_item("filtered", snap.filtered)?;
        c.set_item("aggregated", snap.aggregated)?;
        c.set_item("dead_lettered", snap.dead_lettered)?;
        c.set_item("late_dropped", snap.late_dropped)?;
        c.set_item("late_side", snap.late_side)?;
        c.set_item("quarantined", snap.quarantined)?;
        c.set_item("shed", snap.shed)?;
        out.set_item(id.as_str(), c)?;
    }
    Ok(out)
}

/// The test source: `weir.testing.MemorySource`'s partitions of (batch, times).
fn memory_source(src: &Bound<'_, PyAny>) -> PyResult<VecSourceFactory> {
    let schema: SchemaRef = Arc::new(Schema::from_pyarrow_bound(&src.getattr("_schema")?)?);
    let mut partitions = Vec::new();
    for part in src.getattr("_partitions")?.try_iter()? {
        let mut batches = Vec::new();
        for item in part?.try_iter()? {
            let (batch, times): (Bound<'_, PyAny>, Vec<i64>) = item?.extract()?;
            let rows = RecordBatch::from_pyarrow_bound(&batch)?;
            let batch = Batch::new(rows, Int64Array::from(times)).map_err(|e| raise(src.py(), &e, None))?;
            batches.push(batch);
        }
        partitions.push(batches);
    }
    Ok(VecSourceFactory::new(schema, partitions))
}

/// Reads a YAML pipeline file (with `${VAR}` expansion) into its JSON form.
#[pyfunction]
fn load_yaml(py: Python<'_>, path: &str) -> PyResult<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| raise(py, &CoreError::Config(format!("cannot read pipeline file `{path}`: {e}")), None))?;
    let cfg = weir::yaml::parse(path, &text).map_err(|e| config_err(py, e.to_string()))?;
    serde_json::to_string(&cfg).map_err(|e| config_err(py, format!("{path}: {e}")))
}

/// Imports a batch into Rust and exports it back, for tests of the zero-copy path.
#[pyfunction]
fn roundtrip<'py>(py: Python<'py>, batch: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    RecordBatch::from_pyarrow_bound(batch)?.to_pyarrow(py)
}

#[pymodule]
fn _weir(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativePipeline>()?;
    m.add_function(wrap_pyfunction!(load_yaml, m)?)?;
    m.add_function(wrap_pyfunction!(roundtrip, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
