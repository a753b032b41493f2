//! Rows as Python dicts and back, for the row functions (`map`, `filter`).
//!
//! `pyarrow.RecordBatch.to_pylist` and `from_pylist` cost several hundred nanoseconds a row,
//! more than a small row function itself. Plain columns (booleans, integers, floats, strings)
//! are converted here instead, a column at a time, into exactly the Python values pyarrow
//! would make; any other column still goes through pyarrow, so nested and temporal values
//! look the same to the function either way.

use std::sync::Arc;

use arrow_array::builder::{LargeStringBuilder, StringBuilder};
use arrow_array::cast::AsArray as _;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array,
    RecordBatch, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, SchemaRef};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyList, PyString};
use pyo3::IntoPyObjectExt as _;

/// The rows of `batch` as dicts keyed by column name, equal to what `to_pylist` gives.
/// `exported` hands over the batch as a `pyarrow.RecordBatch`; it is called only when some
/// column is not plain.
pub(crate) fn to_dicts<'py>(
    py: Python<'py>,
    batch: &RecordBatch,
    exported: impl FnOnce() -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let n = batch.num_rows();
    let mut exported = Some(exported);
    let mut in_python: Option<Bound<'py, PyAny>> = None;
    let mut columns: Vec<Vec<Bound<'py, PyAny>>> = Vec::with_capacity(batch.num_columns());
    for (i, col) in batch.columns().iter().enumerate() {
        if let Some(values) = plain_values(py, col.as_ref())? {
            columns.push(values);
            continue;
        }
        let b = match &in_python {
            Some(b) => b.clone(),
            None => {
                let make = exported.take().ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("batch export"))?;
                let b = make()?;
                in_python = Some(b.clone());
                b
            }
        };
        let list = b.call_method1(pyo3::intern!(py, "column"), (i,))?.call_method0(pyo3::intern!(py, "to_pylist"))?;
        columns.push(list.cast::<PyList>()?.iter().collect());
    }
    let keys: Vec<Bound<'py, PyString>> =
        batch.schema_ref().fields().iter().map(|f| PyString::intern(py, f.name())).collect();
    let mut rows = Vec::with_capacity(n);
    for r in 0..n {
        let d = PyDict::new(py);
        for (k, c) in keys.iter().zip(&columns) {
            d.set_item(k, &c[r])?;
        }
        rows.push(d);
    }
    Ok(rows)
}

/// A plain column's values as Python objects; `None` for any other type.
fn plain_values<'py>(py: Python<'py>, col: &dyn Array) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    let none = py.None().into_bound(py);
    let n = col.len();
    macro_rules! each {
        ($arr:expr, $conv:expr) => {{
            let a = $arr;
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                out.push(if a.is_null(i) { none.clone() } else { $conv(a.value(i))? });
            }
            out
        }};
    }
    let int = |v: i64| v.into_bound_py_any(py);
    let uint = |v: u64| v.into_bound_py_any(py);
    let float = |v: f64| -> PyResult<Bound<'py, PyAny>> { Ok(PyFloat::new(py, v).into_any()) };
    let text = |v: &str| -> PyResult<Bound<'py, PyAny>> { Ok(PyString::new(py, v).into_any()) };
    let values = match col.data_type() {
        DataType::Null => vec![none.clone(); n],
        DataType::Boolean => {
            each!(col.as_boolean(), |v: bool| -> PyResult<Bound<'py, PyAny>> {
                Ok(PyBool::new(py, v).to_owned().into_any())
            })
        }
        DataType::Int8 => each!(col.as_primitive::<Int8Type>(), |v: i8| int(v.into())),
        DataType::Int16 => each!(col.as_primitive::<Int16Type>(), |v: i16| int(v.into())),
        DataType::Int32 => each!(col.as_primitive::<Int32Type>(), |v: i32| int(v.into())),
        DataType::Int64 => each!(col.as_primitive::<Int64Type>(), int),
        DataType::UInt8 => each!(col.as_primitive::<UInt8Type>(), |v: u8| uint(v.into())),
        DataType::UInt16 => each!(col.as_primitive::<UInt16Type>(), |v: u16| uint(v.into())),
        DataType::UInt32 => each!(col.as_primitive::<UInt32Type>(), |v: u32| uint(v.into())),
        DataType::UInt64 => each!(col.as_primitive::<UInt64Type>(), uint),
        DataType::Float32 => each!(col.as_primitive::<Float32Type>(), |v: f32| float(v.into())),
        DataType::Float64 => each!(col.as_primitive::<Float64Type>(), float),
        DataType::Utf8 => each!(col.as_string::<i32>(), text),
        DataType::LargeUtf8 => each!(col.as_string::<i64>(), text),
        DataType::Utf8View => each!(col.as_string_view(), text),
        _ => return Ok(None),
    };
    Ok(Some(values))
}

/// Whether rows of `schema` can be built here (every field plain).
pub(crate) fn plain_schema(schema: &SchemaRef) -> bool {
    schema.fields().iter().all(|f| column_kind(f.data_type()).is_some())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Bool,
    Int,
    UInt,
    Float,
    Text,
}

fn column_kind(t: &DataType) -> Option<ColumnKind> {
    use DataType as T;
    Some(match t {
        T::Boolean => ColumnKind::Bool,
        T::Int8 | T::Int16 | T::Int32 | T::Int64 => ColumnKind::Int,
        T::UInt8 | T::UInt16 | T::UInt32 | T::UInt64 => ColumnKind::UInt,
        T::Float32 | T::Float64 => ColumnKind::Float,
        T::Utf8 | T::LargeUtf8 => ColumnKind::Text,
        _ => return None,
    })
}

/// One field of one row, checked against its column.
enum Value<'py> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(Bound<'py, PyString>),
}

/// A column being built.
enum Column {
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    UInt(Vec<Option<u64>>),
    Float(Vec<Option<f64>>),
    // Straight into the array's buffers: no `String` per value.
    Text(StringBuilder),
    LargeText(LargeStringBuilder),
}

/// Builds a batch of `schema` (plain fields only, see [`plain_schema`]) from the dicts a row
/// function returned. A dict that does not fit is left out and reported with its index in
/// `rows` and the reason; a key the schema lacks is ignored and a missing one is null, as
/// with `from_pylist`.
pub(crate) fn from_dicts(
    py: Python<'_>,
    rows: &[Bound<'_, PyDict>],
    schema: &SchemaRef,
) -> PyResult<(RecordBatch, Vec<(usize, String)>)> {
    let fields = schema.fields();
    let kinds: Vec<ColumnKind> = fields
        .iter()
        .map(|f| column_kind(f.data_type()).ok_or_else(|| pyo3::exceptions::PyTypeError::new_err("not a plain schema")))
        .collect::<PyResult<_>>()?;
    let keys: Vec<Bound<'_, PyString>> = fields.iter().map(|f| PyString::intern(py, f.name())).collect();
    let mut columns: Vec<Column> = kinds
        .iter()
        .zip(fields.iter())
        .map(|(k, f)| match k {
            ColumnKind::Bool => Column::Bool(Vec::with_capacity(rows.len())),
            ColumnKind::Int => Column::Int(Vec::with_capacity(rows.len())),
            ColumnKind::UInt => Column::UInt(Vec::with_capacity(rows.len())),
            ColumnKind::Float => Column::Float(Vec::with_capacity(rows.len())),
            ColumnKind::Text if *f.data_type() == DataType::LargeUtf8 => {
                Column::LargeText(LargeStringBuilder::with_capacity(rows.len(), rows.len() * 16))
            }
            ColumnKind::Text => Column::Text(StringBuilder::with_capacity(rows.len(), rows.len() * 16)),
        })
        .collect();
    let mut bad = Vec::new();
    let mut row: Vec<Value<'_>> = Vec::with_capacity(fields.len());
    'rows: for (r, d) in rows.iter().enumerate() {
        row.clear();
        for ((field, kind), key) in fields.iter().zip(&kinds).zip(&keys) {
            match value(d.get_item(key)?, field, *kind) {
                Ok(v) => row.push(v),
                Err(why) => {
                    bad.push((
                        r,
                        format!("the function returned {}, which does not fit the step's schema: {why}", repr(d)),
                    ));
                    continue 'rows;
                }
            }
        }
        for (col, v) in columns.iter_mut().zip(row.drain(..)) {
            match (col, v) {
                (Column::Bool(c), Value::Bool(b)) => c.push(Some(b)),
                (Column::Int(c), Value::Int(i)) => c.push(Some(i)),
                (Column::UInt(c), Value::UInt(u)) => c.push(Some(u)),
                (Column::Float(c), Value::Float(f)) => c.push(Some(f)),
                (Column::Text(c), Value::Text(s)) => c.append_value(s.to_str()?),
                (Column::LargeText(c), Value::Text(s)) => c.append_value(s.to_str()?),
                (Column::Bool(c), _) => c.push(None),
                (Column::Int(c), _) => c.push(None),
                (Column::UInt(c), _) => c.push(None),
                (Column::Float(c), _) => c.push(None),
                (Column::Text(c), _) => c.append_null(),
                (Column::LargeText(c), _) => c.append_null(),
            }
        }
    }
    let arrays: Vec<ArrayRef> = columns.into_iter().zip(fields.iter()).map(|(c, f)| finish(c, f.data_type())).collect();
    let options = arrow_array::RecordBatchOptions::default().with_row_count(Some(rows.len() - bad.len()));
    let batch = RecordBatch::try_new_with_options(schema.clone(), arrays, &options)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok((batch, bad))
}

fn repr(d: &Bound<'_, PyDict>) -> String {
    d.repr().map(|r| r.to_string()).unwrap_or_else(|_| "a dict".into())
}

/// Checks one value against its field. Integers are range-checked for narrow columns, so
/// building the array later cannot fail.
fn value<'py>(v: Option<Bound<'py, PyAny>>, field: &Field, kind: ColumnKind) -> Result<Value<'py>, String> {
    let name = field.name();
    let v = match v {
        Some(v) if !v.is_none() => v,
        _ if field.is_nullable() => return Ok(Value::Null),
        _ => return Err(format!("`{name}` is missing or None, and the column is not nullable")),
    };
    let wrong = |what: &str| format!("`{name}` is {} {}, not {what}", article(&v), type_name(&v));
    match kind {
        ColumnKind::Bool => v.cast::<PyBool>().map(|b| Value::Bool(b.is_true())).map_err(|_| wrong("a bool")),
        ColumnKind::Int => {
            if v.is_instance_of::<PyBool>() {
                return Err(wrong("an int"));
            }
            let i: i64 = v.extract().map_err(|_| wrong("an int"))?;
            let fits = match field.data_type() {
                DataType::Int8 => i8::try_from(i).is_ok(),
                DataType::Int16 => i16::try_from(i).is_ok(),
                DataType::Int32 => i32::try_from(i).is_ok(),
                _ => true,
            };
            if fits {
                Ok(Value::Int(i))
            } else {
                Err(format!("`{name}` = {i} does not fit in {}", field.data_type()))
            }
        }
        ColumnKind::UInt => {
            if v.is_instance_of::<PyBool>() {
                return Err(wrong("an int"));
            }
            let u: u64 = v.extract().map_err(|_| wrong("a non-negative int"))?;
            let fits = match field.data_type() {
                DataType::UInt8 => u8::try_from(u).is_ok(),
                DataType::UInt16 => u16::try_from(u).is_ok(),
                DataType::UInt32 => u32::try_from(u).is_ok(),
                _ => true,
            };
            if fits {
                Ok(Value::UInt(u))
            } else {
                Err(format!("`{name}` = {u} does not fit in {}", field.data_type()))
            }
        }
        // The common case first: exactly a float, read without a conversion call.
        ColumnKind::Float if v.is_exact_instance_of::<PyFloat>() => {
            Ok(Value::Float(v.cast::<PyFloat>().map_err(|_| wrong("a number"))?.value()))
        }
        ColumnKind::Float => {
            if v.is_instance_of::<PyString>() || v.is_instance_of::<PyBool>() {
                return Err(wrong("a number"));
            }
            v.extract::<f64>().map(Value::Float).map_err(|_| wrong("a number"))
        }
        ColumnKind::Text => v.cast_into::<PyString>().map(Value::Text).map_err(|e| {
            let v = e.into_inner();
            format!("`{name}` is {} {}, not a str", article(&v), type_name(&v))
        }),
    }
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "value".into())
}

fn article(v: &Bound<'_, PyAny>) -> &'static str {
    if type_name(v).starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn finish(c: Column, t: &DataType) -> ArrayRef {
    // The values were range-checked against `t` in `value`, so the narrowing casts are exact.
    #[allow(clippy::cast_possible_truncation)]
    match c {
        Column::Bool(v) => Arc::new(BooleanArray::from(v)),
        Column::Int(v) => match t {
            DataType::Int8 => Arc::new(v.into_iter().map(|x| x.map(|x| x as i8)).collect::<Int8Array>()),
            DataType::Int16 => Arc::new(v.into_iter().map(|x| x.map(|x| x as i16)).collect::<Int16Array>()),
            DataType::Int32 => Arc::new(v.into_iter().map(|x| x.map(|x| x as i32)).collect::<Int32Array>()),
            _ => Arc::new(Int64Array::from(v)),
        },
        Column::UInt(v) => match t {
            DataType::UInt8 => Arc::new(v.into_iter().map(|x| x.map(|x| x as u8)).collect::<UInt8Array>()),
            DataType::UInt16 => Arc::new(v.into_iter().map(|x| x.map(|x| x as u16)).collect::<UInt16Array>()),
            DataType::UInt32 => Arc::new(v.into_iter().map(|x| x.map(|x| x as u32)).collect::<UInt32Array>()),
            _ => Arc::new(UInt64Array::from(v)),
        },
        #[allow(clippy::cast_possible_truncation)]
        Column::Float(v) => match t {
            DataType::Float32 => Arc::new(v.into_iter().map(|x| x.map(|x| x as f32)).collect::<Float32Array>()),
            _ => Arc::new(Float64Array::from(v)),
        },
        Column::Text(mut b) => Arc::new(b.finish()),
        Column::LargeText(mut b) => Arc::new(b.finish()),
    }
}
