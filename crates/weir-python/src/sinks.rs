//! Sinks written in Python: a `weir.Sink` subclass gets each batch as a `pyarrow.RecordBatch`.
//!
//! `open(worker, workers)` runs once per worker before its first batch, `write(batch)` per
//! batch, `close()` at the end. A `weir.Retryable` raised by `write` is a transient failure: the
//! runtime retries the batch with the sink's `retry` backoff. Any other exception refuses the
//! batch: its rows go to the dead-letter output with the traceback, and the job goes on.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_pyarrow::ToPyArrow;
use pyo3::prelude::*;
use weir_core::error::RefusedRow;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};

use crate::steps::describe;

/// The user's sink object, shared by every worker's instance.
pub(crate) struct PySinkFactory {
    obj: Arc<Py<PyAny>>,
}

impl std::fmt::Debug for PySinkFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PySinkFactory").finish_non_exhaustive()
    }
}

impl PySinkFactory {
    pub(crate) fn new(obj: Py<PyAny>) -> Self {
        Self { obj: Arc::new(obj) }
    }
}

fn config_error(what: &str, e: &PyErr) -> CoreError {
    Python::attach(|py| CoreError::Other {
        message: format!("python sink: {what}: {}", describe(py, e)),
        blame: Blame::User,
        retry: Retry::Never,
    })
}

impl SinkFactory for PySinkFactory {
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Sink>> {
        Python::attach(|py| self.obj.call_method1(py, "open", (worker, workers)).map(|_| ()))
            .map_err(|e| config_error("open()", &e))?;
        Ok(Box::new(PySink { obj: self.obj.clone() }))
    }
}

struct PySink {
    obj: Arc<Py<PyAny>>,
}

impl std::fmt::Debug for PySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PySink").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Sink for PySink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        Python::attach(|py| -> Result<()> {
            let batch = rows.to_pyarrow(py).map_err(|e| config_error("handing the batch over", &e))?;
            match self.obj.call_method1(py, "write", (batch,)) {
                Ok(_) => Ok(()),
                Err(e) => {
                    let retryable = py
                        .import("weir.errors")
                        .and_then(|m| m.getattr("Retryable"))
                        .is_ok_and(|r| e.is_instance(py, &r));
                    let message = describe(py, &e);
                    if retryable {
                        return Err(CoreError::Other {
                            message: format!("python sink: {message}"),
                            blame: Blame::External,
                            retry: Retry::Backoff,
                        });
                    }
                    let reason = format!("python sink: write() raised {message}");
                    Err(CoreError::Refused(
                        (0..rows.num_rows()).map(|row| RefusedRow { row, reason: reason.clone() }).collect(),
                    ))
                }
            }
        })
    }

    async fn close(&mut self) -> Result<()> {
        Python::attach(|py| self.obj.call_method0(py, "close").map(|_| ())).map_err(|e| config_error("close()", &e))
    }
}
