//! Sources written in Python: a `weir.Source` subclass names its partitions and opens a reader
//! per partition at a position; Weir reads them on its workers and keeps their positions in
//! checkpoints.
//!
//! Partition `i` of `partitions()` is read by worker `i % workers`. Each worker opens its
//! partitions with `open(name, position)` (`None` the first time, else the JSON value that
//! `position()` gave for the last rows of the checkpoint it resumes from) and calls `read()`:
//! a `pyarrow.RecordBatch` or a list of dicts is rows, an empty list is "nothing now" (asked
//! again after `poll_interval`), `None` the end of the partition. A dict or a time that does
//! not fit the schema goes to the dead-letter output with the reason; `weir.Retryable` raised
//! by `read()` is a transient failure retried with backoff; any other exception fails the run
//! with the traceback (there is no row to set aside: the reader itself is broken).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch, StringArray};
use arrow_pyarrow::{FromPyArrow, ToPyArrow};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::metrics::StepMetrics;
use weir_core::time::EventTimeSpec;
use weir_core::{Blame, CoreError, Result, Retry, Source, SourceContext, SourceFactory, SourcePoll};

use crate::steps::describe;

/// The user's source object, shared by every worker's instance.
pub(crate) struct PySourceFactory {
    obj: Arc<Py<PyAny>>,
    schema: SchemaRef,
    partitions: Vec<String>,
    time: Option<EventTimeSpec>,
    poll_interval: Duration,
}

impl std::fmt::Debug for PySourceFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PySourceFactory").field("partitions", &self.partitions).finish_non_exhaustive()
    }
}

fn user_error(message: String) -> CoreError {
    CoreError::Other { message, blame: Blame::User, retry: Retry::Never }
}

impl PySourceFactory {
    /// Reads a `weir.Source`: its schema, partitions and poll interval.
    pub(crate) fn new(obj: &Bound<'_, PyAny>, time: Option<EventTimeSpec>) -> PyResult<Self> {
        let schema = Arc::new(Schema::from_pyarrow_bound(&obj.getattr("schema")?)?);
        let partitions: Vec<String> = obj.call_method0("partitions")?.extract()?;
        if partitions.is_empty() {
            return Err(pyo3::exceptions::PyValueError::new_err("weir.Source.partitions() returned no partition"));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = partitions.iter().find(|p| !seen.insert(p.as_str())) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "weir.Source.partitions() names partition `{twice}` twice"
            )));
        }
        let poll_interval: f64 = obj.getattr("poll_interval")?.extract()?;
        Ok(Self {
            obj: Arc::new(obj.clone().unbind()),
            schema,
            partitions,
            time,
            poll_interval: Duration::from_secs_f64(poll_interval.clamp(0.001, 60.0)),
        })
    }
}

impl SourceFactory for PySourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>> {
        let parts = self
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % workers.max(1) == worker)
            .map(|(_, name)| Part { name: name.clone(), reader: None, position: None, done: false, retry: None })
            .collect();
        Ok(Box::new(PySource {
            obj: self.obj.clone(),
            schema: self.schema.clone(),
            time: self.time.clone(),
            poll_interval: self.poll_interval,
            parts,
            next: 0,
        }))
    }

    fn resumable(&self) -> bool {
        true
    }
}

/// One partition of a worker's instance.
struct Part {
    name: String,
    /// The partition's reader, opened at the first poll (after a restore).
    reader: Option<Py<PyAny>>,
    /// JSON text of the position after the last rows handed out.
    position: Option<String>,
    done: bool,
    /// After a `weir.Retryable`: failures in a row, and when to try again.
    retry: Option<(u32, Instant)>,
}

struct PySource {
    obj: Arc<Py<PyAny>>,
    schema: SchemaRef,
    time: Option<EventTimeSpec>,
    poll_interval: Duration,
    parts: Vec<Part>,
    /// The partition read first at the next poll (round robin).
    next: usize,
}

impl std::fmt::Debug for PySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("PySource").field("partitions", &names).finish_non_exhaustive()
    }
}

/// What one `read()` gave.
enum Read {
    /// Rows, the dicts refused, and where in the partition they were read (for dead letters).
    Rows {
        batch: RecordBatch,
        refused: Vec<DeadLetter>,
        at: String,
    },
    Nothing,
    End,
    Retry(String),
}

impl PySource {
    fn read(&mut self, i: usize, cx: &SourceContext) -> Result<Read> {
        let schema = self.schema.clone();
        let part = &mut self.parts[i];
        Python::attach(|py| -> Result<Read> {
            let json = py.import("json").map_err(|e| user_error(describe(py, &e)))?;
            if part.reader.is_none() {
                let position = match &part.position {
                    None => py.None().into_bound(py),
                    Some(text) => json.call_method1("loads", (text,)).map_err(|e| user_error(describe(py, &e)))?,
                };
                let reader = self.obj.call_method1(py, "open", (&part.name, position)).map_err(|e| {
                    user_error(format!(
                        "python source: open() of partition `{}` raised {}",
                        part.name,
                        describe(py, &e)
                    ))
                })?;
                part.reader = Some(reader);
            }
            let Some(reader) = &part.reader else { return Ok(Read::Nothing) };
            let got = match reader.call_method0(py, "read") {
                Ok(got) => got.into_bound(py),
                Err(e) => {
                    let retryable = py
                        .import("weir.errors")
                        .and_then(|m| m.getattr("Retryable"))
                        .is_ok_and(|r| e.is_instance(py, &r));
                    let what = format!("read() of partition `{}` raised {}", part.name, describe(py, &e));
                    return if retryable {
                        Ok(Read::Retry(what))
                    } else {
                        Err(user_error(format!("python source: {what}")))
                    };
                }
            };
            if got.is_none() {
                return Ok(Read::End);
            }
            let here = |p: &Option<String>| match p {
                Some(p) => format!("partition {}, after position {p}", part.name),
                None => format!("partition {}, from its start", part.name),
            };
            let origin = "python source".to_string();
            let at = here(&part.position);
            let (batch, refused) = if let Ok(list) = got.cast::<PyList>() {
                if list.is_empty() {
                    return Ok(Read::Nothing);
                }
                let (batch, bad) = rows_of(py, list, &schema)?;
                let refused = bad
                    .into_iter()
                    .map(|(payload, reason)| DeadLetter {
                        payload: Payload::Raw(payload.into_bytes()),
                        kind: ErrorKind::Schema,
                        reason,
                        step: cx.step.clone(),
                        origin: origin.clone(),
                        position: Some(at.clone()),
                        time_ms: now_ms(),
                        attempts: 1,
                        first_failure_ms: None,
                    })
                    .collect();
                (batch, refused)
            } else {
                let batch = RecordBatch::from_pyarrow_bound(&got).map_err(|_| {
                    user_error(format!(
                        "python source: read() of partition `{}` returned {}; it returns a pyarrow.RecordBatch, a list of dicts, [] for nothing now, or None at the end",
                        part.name,
                        got.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    ))
                })?;
                (fit(batch, &schema, &part.name)?, Vec::new())
            };
            let position = reader.call_method0(py, "position").map_err(|e| {
                user_error(format!(
                    "python source: position() of partition `{}` raised {}",
                    part.name,
                    describe(py, &e)
                ))
            })?;
            let text: String = json.call_method1("dumps", (position,)).and_then(|t| t.extract()).map_err(|e| {
                user_error(format!(
                    "python source: position() of partition `{}` is not JSON: {}",
                    part.name,
                    describe(py, &e)
                ))
            })?;
            part.position = Some(text);
            Ok(Read::Rows { batch, refused, at })
        })
    }
}

/// Rows from a list of dicts: a plain schema is built directly (a dict that does not fit is
/// refused alone); any other through `pyarrow.RecordBatch.from_pylist`, row by row when the
/// whole list does not convert, to find the rows that do not.
fn rows_of(
    py: Python<'_>,
    list: &Bound<'_, PyList>,
    schema: &SchemaRef,
) -> Result<(RecordBatch, Vec<(String, String)>)> {
    let err = |e: PyErr| user_error(format!("python source: {}", describe(py, &e)));
    let json = py.import("json").map_err(err)?;
    let show = |d: &Bound<'_, PyAny>| -> String {
        json.call_method1("dumps", (d,))
            .and_then(|t| t.extract::<String>())
            .or_else(|_| d.repr().map(|r| r.to_string()))
            .unwrap_or_default()
    };
    let not_dict = |d: &Bound<'_, PyAny>| {
        format!(
            "read() returned {} in its list, not a dict",
            d.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )
    };
    if crate::rows::plain_schema(schema) {
        let mut dicts = Vec::with_capacity(list.len());
        let mut bad = Vec::new();
        for item in list.iter() {
            match item.cast::<PyDict>() {
                Ok(d) => dicts.push(d.clone()),
                Err(_) => bad.push((show(&item), not_dict(&item))),
            }
        }
        let (batch, refused) = crate::rows::from_dicts(py, &dicts, schema).map_err(err)?;
        bad.extend(refused.into_iter().map(|(i, reason)| {
            (
                show(dicts[i].as_any()),
                reason
                    .replace("the function returned", "the source read")
                    .replace("the step's schema", "the source's schema"),
            )
        }));
        return Ok((batch, bad));
    }
    let pa_schema = schema.as_ref().clone().to_pyarrow(py).map_err(err)?;
    let record_batch = py.import("pyarrow").and_then(|pa| pa.getattr("RecordBatch")).map_err(err)?;
    let convert = |rows: &Bound<'_, PyAny>| -> PyResult<RecordBatch> {
        let kw = PyDict::new(py);
        kw.set_item("schema", &pa_schema)?;
        RecordBatch::from_pyarrow_bound(&record_batch.call_method("from_pylist", (rows,), Some(&kw))?)
    };
    if let Ok(batch) = convert(list.as_any()) {
        return Ok((batch, Vec::new()));
    }
    let (good, mut bad) = (PyList::empty(py), Vec::new());
    for item in list.iter() {
        if item.cast::<PyDict>().is_err() {
            bad.push((show(&item), not_dict(&item)));
            continue;
        }
        let one = PyList::new(py, [&item]).map_err(err)?;
        match convert(one.as_any()) {
            Ok(_) => good.append(&item).map_err(err)?,
            Err(e) => {
                bad.push((show(&item), format!("the source read a row that does not fit its schema: {}", e.value(py))))
            }
        }
    }
    Ok((convert(good.as_any()).map_err(err)?, bad))
}

/// A batch the reader built itself must have the source's columns; same names and types in
/// another order are put in order.
fn fit(batch: RecordBatch, schema: &SchemaRef, part: &str) -> Result<RecordBatch> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let col = batch.column_by_name(f.name()).ok_or_else(|| {
            user_error(format!(
                "python source: read() of partition `{part}` returned a batch without column `{}` (it has {})",
                f.name(),
                names(batch.schema().fields())
            ))
        })?;
        if col.data_type() != f.data_type() {
            return Err(user_error(format!(
                "python source: read() of partition `{part}` returned column `{}` as {}, but the schema says {}",
                f.name(),
                col.data_type(),
                f.data_type()
            )));
        }
        columns.push(col.clone());
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| {
        user_error(format!("python source: read() of partition `{part}` returned a batch that does not fit: {e}"))
    })
}

fn names(fields: &arrow_schema::Fields) -> String {
    fields.iter().map(|f| format!("`{}`", f.name())).collect::<Vec<_>>().join(", ")
}

/// The position table's schema: a partition's name and its position as JSON text.
fn positions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Utf8, false),
        Field::new("position", DataType::Utf8, false),
    ]))
}

#[async_trait::async_trait]
impl Source for PySource {
    fn partitions(&self) -> usize {
        self.parts.len()
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        if cx.stopping() || self.parts.iter().all(|p| p.done) {
            return Ok(SourcePoll::End);
        }
        let n = self.parts.len();
        let mut wake = Instant::now() + self.poll_interval;
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.parts[i].done {
                continue;
            }
            if let Some((_, at)) = self.parts[i].retry {
                if Instant::now() < at {
                    wake = wake.min(at);
                    continue;
                }
            }
            // A reader may block (a device SDK, a request): the worker's other tasks move to
            // another thread meanwhile.
            let read = weir_core::runtime::blocking(|| self.read(i, cx))?;
            match read {
                Read::Nothing => {}
                Read::End => {
                    let part = &mut self.parts[i];
                    part.done = true;
                    if let Some(reader) = part.reader.take() {
                        Python::attach(|py| reader.call_method0(py, "close").map(|_| ())).map_err(|e| {
                            Python::attach(|py| {
                                user_error(format!(
                                    "python source: close() of partition `{}` raised {}",
                                    part.name,
                                    describe(py, &e)
                                ))
                            })
                        })?;
                    }
                    self.next = (i + 1) % n;
                    return Ok(SourcePoll::PartitionEnd(i));
                }
                Read::Retry(what) => {
                    let part = &mut self.parts[i];
                    let failures = part.retry.map_or(1, |(f, _)| f + 1);
                    let pause =
                        Duration::from_millis(100).saturating_mul(1 << failures.min(8)).min(Duration::from_secs(10));
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(step = %cx.step, failures, error = %what, "Python source failed; retrying with backoff.");
                    }
                    part.retry = Some((failures, Instant::now() + pause));
                    wake = wake.min(Instant::now() + pause);
                }
                Read::Rows { batch, refused, at } => {
                    self.parts[i].retry = None;
                    self.next = (i + 1) % n;
                    let mut letters = refused;
                    cx.count_records((batch.num_rows() + letters.len()) as u64);
                    let rows = batch;
                    let (batch, bad) = weir_core::time::stamp(self.time.as_ref(), rows.clone(), now_ms())?;
                    if !bad.is_empty() {
                        for (row, kind, reason) in bad {
                            letters.push(DeadLetter {
                                payload: Payload::Row(rows.slice(row, 1)),
                                kind,
                                reason,
                                step: cx.step.clone(),
                                origin: "python source".into(),
                                position: Some(at.clone()),
                                time_ms: now_ms(),
                                attempts: 1,
                                first_failure_ms: None,
                            });
                        }
                    }
                    if !letters.is_empty() {
                        StepMetrics::add(&cx.metrics.dead_lettered, letters.len() as u64);
                        cx.dead_letters.write(letters)?;
                    }
                    if batch.is_empty() {
                        return Ok(SourcePoll::Waiting);
                    }
                    return Ok(SourcePoll::Rows { partition: i, batch });
                }
            }
        }
        let mut shutdown = cx.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.changed() => {}
        }
        Ok(SourcePoll::Waiting)
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let (names, positions): (Vec<&str>, Vec<&str>) =
            self.parts.iter().filter_map(|p| p.position.as_deref().map(|pos| (p.name.as_str(), pos))).unzip();
        let batch = RecordBatch::try_new(
            positions_schema(),
            vec![Arc::new(StringArray::from(names)), Arc::new(StringArray::from(positions))],
        )?;
        Ok(Some(batch))
    }

    fn restore(&mut self, positions: &[RecordBatch]) -> Result<()> {
        for b in positions {
            let (Some(names), Some(pos)) = (
                b.column_by_name("partition").and_then(|c| c.as_any().downcast_ref::<StringArray>()),
                b.column_by_name("position").and_then(|c| c.as_any().downcast_ref::<StringArray>()),
            ) else {
                return Err(CoreError::Config(
                    "the checkpoint's positions are not a Python source's (partition, position)".into(),
                ));
            };
            for r in 0..b.num_rows() {
                if let Some(part) = self.parts.iter_mut().find(|p| p.name == names.value(r)) {
                    part.position = Some(pos.value(r).to_string());
                }
            }
        }
        Ok(())
    }
}
