//! Batches to pyarrow and back through the Arrow C data interface, with each schema converted
//! once per worker rather than once per batch.
//!
//! `arrow-pyarrow`'s `RecordBatch` conversions export the schema with every batch (and go
//! through a one-batch stream reader to dodge an old pyarrow bug); for a nested schema that
//! costs more than a cheap batch function itself. Here the batch travels as a struct array
//! only, and pyarrow is given the `pyarrow.Schema` it already has.

use std::sync::{Arc, OnceLock};

use arrow_array::ffi::{from_ffi_and_data_type, FFI_ArrowArray};
use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, StructArray};
use arrow_pyarrow::ToPyArrow;
use arrow_schema::{DataType, SchemaRef};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// One direction's schema: the Rust one, and its pyarrow twin made on first use.
#[derive(Debug)]
struct Side {
    schema: SchemaRef,
    py: OnceLock<Py<PyAny>>,
}

impl Side {
    fn new(schema: SchemaRef) -> Self {
        Self { schema, py: OnceLock::new() }
    }

    fn py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(s) = self.py.get() {
            return Ok(s.bind(py).clone());
        }
        let made = self.schema.as_ref().clone().to_pyarrow(py)?;
        let _ = self.py.set(made.clone().unbind());
        Ok(made)
    }
}

/// Moves batches of one step's input schema into Python and its output schema back.
#[derive(Debug)]
pub(crate) struct Bridge {
    input: Side,
    output: Side,
}

impl Bridge {
    pub(crate) fn new(input: SchemaRef, output: SchemaRef) -> Self {
        Self { input: Side::new(input), output: Side::new(output) }
    }

    /// The output schema as a `pyarrow.Schema`.
    pub(crate) fn out_schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.output.py(py)
    }

    /// `batch` as a `pyarrow.RecordBatch` sharing its buffers.
    pub(crate) fn export<'py>(&self, py: Python<'py>, batch: &RecordBatch) -> PyResult<Bound<'py, PyAny>> {
        if !Arc::ptr_eq(batch.schema_ref(), &self.input.schema) && batch.schema_ref() != &self.input.schema {
            // Not the planned schema (it should not happen): convert it fully, once.
            return batch.to_pyarrow(py);
        }
        let schema = self.input.py(py)?;
        let data = StructArray::from(batch.clone()).into_data();
        let mut ffi = Box::new(FFI_ArrowArray::new(&data));
        let addr = std::ptr::addr_of_mut!(*ffi) as usize;
        let record_batch = py.import(pyo3::intern!(py, "pyarrow"))?.getattr(pyo3::intern!(py, "RecordBatch"))?;
        // pyarrow moves the array out of `ffi` (leaving it released), so dropping the box after
        // frees only the box; on failure the box still owns the array and releases it.
        let out = record_batch.call_method1(pyo3::intern!(py, "_import_from_c"), (addr, schema))?;
        drop(ffi);
        Ok(out)
    }

    /// A `pyarrow.RecordBatch` whose schema equals the output schema (the `to_batch` helper
    /// made sure), back as a Rust batch sharing its buffers.
    ///
    /// Given the step's `input`, a column the function passed through untouched (it wraps
    /// the very buffers of an input column) is replaced by that input column, and every other
    /// column is imported on its own. Imported together, each column would keep the whole
    /// exported batch alive, input columns included, and so on back through every chained
    /// Python step, so a batch would hold the memory of all the batches it was made from.
    /// (It costs about the same time either way: callgrind counts equal instructions.)
    pub(crate) fn import(&self, obj: &Bound<'_, PyAny>, input: Option<&RecordBatch>) -> PyResult<RecordBatch> {
        let mut ffi = FFI_ArrowArray::empty();
        let addr = std::ptr::addr_of_mut!(ffi) as usize;
        obj.call_method1(pyo3::intern!(obj.py(), "_export_to_c"), (addr,))?;
        let fields = self.output.schema.fields().clone();
        // SAFETY: pyarrow filled `ffi` with a struct array of the output schema's fields.
        let data = unsafe { from_ffi_and_data_type(ffi, DataType::Struct(fields)) }
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let array = StructArray::from(data);
        let rows = array.len();
        let (_, mut columns, nulls) = array.into_parts();
        if nulls.is_some_and(|n| n.null_count() > 0) {
            return Err(PyValueError::new_err("a batch cannot have null rows"));
        }
        if let Some(input) = input {
            let originals: Vec<_> = input.columns().iter().map(|c| c.to_data()).collect();
            for (j, col) in columns.iter_mut().enumerate() {
                let data = col.to_data();
                *col = match originals.iter().position(|o| o.ptr_eq(&data)) {
                    Some(i) => input.column(i).clone(),
                    None => import_column(obj, j, data.data_type().clone())?,
                };
            }
        }
        let options = RecordBatchOptions::default().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.output.schema.clone(), columns, &options)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

/// Column `j` of the `pyarrow.RecordBatch` `obj`, imported alone, so that it keeps only its
/// own buffers alive.
fn import_column(obj: &Bound<'_, PyAny>, j: usize, data_type: DataType) -> PyResult<ArrayRef> {
    let py = obj.py();
    let mut ffi = FFI_ArrowArray::empty();
    let addr = std::ptr::addr_of_mut!(ffi) as usize;
    obj.call_method1(pyo3::intern!(py, "column"), (j,))?.call_method1(pyo3::intern!(py, "_export_to_c"), (addr,))?;
    // SAFETY: pyarrow filled `ffi` with column `j`, whose type the batch import just read.
    let data = unsafe { from_ffi_and_data_type(ffi, data_type) }.map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(arrow_array::make_array(data))
}
