//! Aggregate functions over window contents, kept as small fixed-size accumulators (a few
//! `f64` slots per key and window), never as rows.
//!
//! Accumulators live in one flat slab of `f64` shared by all windows of an operator: a window
//! of a key owns `stride` consecutive slots. Updating is column-wise (one tight loop per
//! aggregate over the batch), and closed windows give their slots back for reuse.
//!
//! SQL semantics: `count()` counts rows, `count(col)` non-null values; every other function
//! skips nulls and yields null for a window with no non-null value. `stddev` is the sample
//! standard deviation (n - 1), null below two values; `first`/`last` take the value with the
//! smallest/largest event time, ties going to the earlier/later arrival.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array};
use arrow_schema::{DataType, Field};
use weir_core::{CoreError, Result};

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    /// Number of rows (`count()`), or of non-null values (`count(col)`).
    Count,
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Value with the earliest event time.
    First,
    /// Value with the latest event time.
    Last,
    /// Sample standard deviation.
    Stddev,
}

impl AggFunc {
    /// The type of the aggregate's result over a column of type `input`.
    pub fn output_type(self, input: Option<&DataType>) -> DataType {
        let integral = |t: &DataType| t.is_integer() || *t == DataType::Boolean;
        match (self, input) {
            (AggFunc::Count, _) => DataType::Int64,
            (AggFunc::Sum, Some(t)) if integral(t) => DataType::Int64,
            (AggFunc::Min | AggFunc::Max | AggFunc::First | AggFunc::Last, Some(t))
                if t.is_numeric() || *t == DataType::Boolean =>
            {
                t.clone()
            }
            _ => DataType::Float64,
        }
    }

    /// All functions, with their names.
    pub const ALL: [(&'static str, AggFunc); 8] = [
        ("count", AggFunc::Count),
        ("sum", AggFunc::Sum),
        ("mean", AggFunc::Mean),
        ("min", AggFunc::Min),
        ("max", AggFunc::Max),
        ("first", AggFunc::First),
        ("last", AggFunc::Last),
        ("stddev", AggFunc::Stddev),
    ];

    /// Number of `f64` slots the accumulator takes.
    fn width(self) -> usize {
        match self {
            Self::Count => 1,
            Self::Sum | Self::Mean | Self::Min | Self::Max => 2,
            Self::First | Self::Last | Self::Stddev => 3,
        }
    }

    fn init(self, acc: &mut [f64]) {
        acc.fill(0.0);
        match self {
            Self::Min => acc[0] = f64::INFINITY,
            Self::Max => acc[0] = f64::NEG_INFINITY,
            _ => {}
        }
    }

    /// Folds one value (at event time `t`) into an accumulator.
    #[inline]
    fn update(self, acc: &mut [f64], v: f64, t: f64) {
        match self {
            Self::Count => acc[0] += 1.0,
            Self::Sum | Self::Mean => {
                acc[0] += v;
                acc[1] += 1.0;
            }
            Self::Min => {
                acc[0] = acc[0].min(v);
                acc[1] += 1.0;
            }
            Self::Max => {
                acc[0] = acc[0].max(v);
                acc[1] += 1.0;
            }
            Self::First => {
                if acc[2] == 0.0 || t < acc[1] {
                    acc[0] = v;
                    acc[1] = t;
                }
                acc[2] += 1.0;
            }
            Self::Last => {
                if acc[2] == 0.0 || t >= acc[1] {
                    acc[0] = v;
                    acc[1] = t;
                }
                acc[2] += 1.0;
            }
            Self::Stddev => {
                // Welford: n, mean, sum of squared deviations.
                acc[0] += 1.0;
                let d = v - acc[1];
                acc[1] += d / acc[0];
                acc[2] += d * (v - acc[1]);
            }
        }
    }

    /// Merges accumulator `b` into `a` (session windows joining).
    fn merge(self, a: &mut [f64], b: &[f64]) {
        match self {
            Self::Count => a[0] += b[0],
            Self::Sum | Self::Mean => {
                a[0] += b[0];
                a[1] += b[1];
            }
            Self::Min => {
                a[0] = a[0].min(b[0]);
                a[1] += b[1];
            }
            Self::Max => {
                a[0] = a[0].max(b[0]);
                a[1] += b[1];
            }
            Self::First => {
                if b[2] > 0.0 && (a[2] == 0.0 || b[1] < a[1]) {
                    a[0] = b[0];
                    a[1] = b[1];
                }
                a[2] += b[2];
            }
            Self::Last => {
                if b[2] > 0.0 && (a[2] == 0.0 || b[1] >= a[1]) {
                    a[0] = b[0];
                    a[1] = b[1];
                }
                a[2] += b[2];
            }
            Self::Stddev => {
                // Chan et al.'s parallel combination of Welford states.
                let (na, nb) = (a[0], b[0]);
                if nb == 0.0 {
                    return;
                }
                if na == 0.0 {
                    a.copy_from_slice(b);
                    return;
                }
                let n = na + nb;
                let d = b[1] - a[1];
                a[1] += d * nb / n;
                a[2] += b[2] + d * d * na * nb / n;
                a[0] = n;
            }
        }
    }

    fn finish(self, acc: &[f64]) -> Option<f64> {
        match self {
            Self::Count => Some(acc[0]),
            Self::Sum => (acc[1] > 0.0).then_some(acc[0]),
            Self::Mean => (acc[1] > 0.0).then(|| acc[0] / acc[1]),
            Self::Min | Self::Max => (acc[1] > 0.0).then_some(acc[0]),
            Self::First | Self::Last => (acc[2] > 0.0).then_some(acc[0]),
            Self::Stddev => (acc[0] > 1.0).then(|| (acc[2] / (acc[0] - 1.0)).max(0.0).sqrt()),
        }
    }
}

impl fmt::Display for AggFunc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = AggFunc::ALL.iter().find(|(_, g)| g == self).map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// One output column of a window: `name = func(column)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggSpec {
    /// Output column name.
    pub name: String,
    /// Function.
    pub func: AggFunc,
    /// Input column path; `None` only for `count()`.
    pub column: Option<String>,
}

impl AggSpec {
    /// Parses `func(column)`, e.g. `mean(readings.temp)`, `count()`, `count(*)`, `count`.
    ///
    /// # Errors
    /// Unknown function (the message lists the known ones), missing parentheses or column.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let t = text.trim();
        let (fname, arg) = match t.find('(') {
            Some(open) => {
                let close = t.rfind(')').filter(|c| *c > open && t[c + 1..].trim().is_empty()).ok_or_else(|| {
                    CoreError::Config(format!("aggregate `{name}`: `{t}` is missing its closing parenthesis"))
                })?;
                (t[..open].trim(), t[open + 1..close].trim())
            }
            None => (t, ""),
        };
        let func = AggFunc::from_str(fname).map_err(|_| {
            let known: Vec<_> = AggFunc::ALL.iter().map(|(n, _)| *n).collect();
            CoreError::Config(format!("aggregate `{name}`: unknown function `{fname}`; known: {}", known.join(", ")))
        })?;
        let column = match (func, arg) {
            (AggFunc::Count, "" | "*") => None,
            (_, "") => {
                return Err(CoreError::Config(format!(
                    "aggregate `{name}`: `{fname}` needs a column, as in `{fname}(readings.temp)`"
                )))
            }
            (_, a) => Some(a.to_string()),
        };
        Ok(Self { name: name.to_string(), func, column })
    }
}

impl FromStr for AggFunc {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let s = s.to_ascii_lowercase();
        let s = match s.as_str() {
            "avg" | "average" => "mean",
            "std" | "stddev_samp" => "stddev",
            other => other,
        };
        AggFunc::ALL.iter().find(|(n, _)| *n == s).map(|(_, f)| *f).ok_or(())
    }
}

/// The type of each aggregate's input column (`None` for `count()`), checked numeric.
///
/// # Errors
/// An unknown column, or one that is not numeric (nor boolean).
pub(crate) fn input_types(aggs: &[AggSpec], input: &arrow_schema::Schema) -> Result<Vec<Option<DataType>>> {
    aggs.iter()
        .map(|a| {
            let Some(c) = &a.column else { return Ok(None) };
            let f = crate::field_by_path(input, c)
                .map_err(|e| CoreError::Config(format!("aggregate `{}`: {e}", a.name)))?;
            let t = f.data_type();
            weir_core::ensure_config!(
                t.is_numeric() || t == &DataType::Boolean,
                "aggregate `{}`: `{}({c})` needs a numeric column, but `{c}` is {t}",
                a.name,
                a.func
            );
            Ok(Some(t.clone()))
        })
        .collect()
}

/// Each aggregate's input column of `rows` as f64 (`None` for `count()`).
///
/// # Errors
/// A column missing from the rows.
pub(crate) fn input_values(aggs: &[AggSpec], rows: &arrow_array::RecordBatch) -> Result<Vec<Option<Float64Array>>> {
    aggs.iter()
        .map(|a| match &a.column {
            None => Ok(None),
            Some(c) => {
                let col = weir_core::time::column_by_path(rows, c)?;
                let f = arrow_cast::cast(&col, &DataType::Float64)?;
                Ok(f.as_any().downcast_ref::<Float64Array>().cloned())
            }
        })
        .collect()
}

/// The accumulators of an operator: layout plus slab.
#[derive(Debug)]
pub(crate) struct Accumulators {
    funcs: Vec<AggFunc>,
    offsets: Vec<usize>,
    stride: usize,
    slab: Vec<f64>,
    free: Vec<u32>,
}

impl Accumulators {
    pub(crate) fn new(funcs: &[AggFunc]) -> Self {
        let mut offsets = Vec::with_capacity(funcs.len());
        let mut stride = 0;
        for f in funcs {
            offsets.push(stride);
            stride += f.width();
        }
        Self { funcs: funcs.to_vec(), offsets, stride: stride.max(1), slab: Vec::new(), free: Vec::new() }
    }

    /// A fresh accumulator slot.
    pub(crate) fn alloc(&mut self) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = (self.slab.len() / self.stride) as u32;
                self.slab.resize(self.slab.len() + self.stride, 0.0);
                s
            }
        };
        let base = slot as usize * self.stride;
        for (f, off) in self.funcs.iter().zip(&self.offsets) {
            f.init(&mut self.slab[base + off..base + off + f.width()]);
        }
        slot
    }

    /// Values per slot: the width of a slot's raw state, for snapshots.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// A slot's raw state, for snapshots.
    pub(crate) fn raw(&self, slot: u32) -> &[f64] {
        let base = slot as usize * self.stride;
        &self.slab[base..base + self.stride]
    }

    /// A fresh slot holding `raw` (as [`Accumulators::raw`] gave it), for restores.
    pub(crate) fn alloc_raw(&mut self, raw: &[f64]) -> u32 {
        let slot = self.alloc();
        let base = slot as usize * self.stride;
        self.slab[base..base + self.stride].copy_from_slice(&raw[..self.stride]);
        slot
    }

    pub(crate) fn release(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// Folds rows into slots: `slots[i]` is the slot of row `i` (`u32::MAX` skips the row).
    /// `values[a]` is aggregate `a`'s input as f64 (`None` for `count()`).
    pub(crate) fn update(&mut self, slots: &[u32], values: &[Option<Float64Array>], times: &Int64Array) {
        let times = times.values();
        for (a, (f, off)) in self.funcs.iter().zip(&self.offsets).enumerate() {
            let (f, off, w, stride) = (*f, *off, f.width(), self.stride);
            match &values[a] {
                None => {
                    for &s in slots.iter().filter(|s| **s != u32::MAX) {
                        self.slab[s as usize * stride + off] += 1.0;
                    }
                }
                Some(col) => {
                    let vals = col.values();
                    let nulls = col.nulls();
                    for (i, &s) in slots.iter().enumerate() {
                        if s == u32::MAX || nulls.is_some_and(|n| n.is_null(i)) {
                            continue;
                        }
                        let base = s as usize * stride + off;
                        f.update(&mut self.slab[base..base + w], vals[i], times[i] as f64);
                    }
                }
            }
        }
    }

    /// Merges slot `from` into slot `into` and releases `from`.
    pub(crate) fn merge(&mut self, into: u32, from: u32) {
        let (i, j) = (into as usize * self.stride, from as usize * self.stride);
        let src: Vec<f64> = self.slab[j..j + self.stride].to_vec();
        for (f, off) in self.funcs.iter().zip(&self.offsets) {
            f.merge(&mut self.slab[i + off..i + off + f.width()], &src[*off..*off + f.width()]);
        }
        self.release(from);
    }

    /// Output columns for the given slots, one per aggregate.
    pub(crate) fn finish(&self, slots: &[u32]) -> Vec<ArrayRef> {
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.funcs.len());
        for (f, off) in self.funcs.iter().zip(&self.offsets) {
            let get = |s: &u32| {
                let base = *s as usize * self.stride + off;
                f.finish(&self.slab[base..base + f.width()])
            };
            if *f == AggFunc::Count {
                cols.push(Arc::new(slots.iter().map(|s| get(s).map(|v| v as i64)).collect::<Int64Array>()));
            } else {
                cols.push(Arc::new(slots.iter().map(get).collect::<Float64Array>()));
            }
        }
        cols
    }

    /// Output fields, one per aggregate, given the type of each aggregate's input column
    /// (`None` for `count()`). An aggregate keeps its input's type where that means something:
    /// a sum of integers (or booleans) is an integer, and `min`, `max`, `first` and `last` are
    /// values of the column; `mean` and `stddev` are floats, `count` an integer.
    pub(crate) fn fields(specs: &[AggSpec], inputs: &[Option<DataType>]) -> Vec<Field> {
        specs
            .iter()
            .zip(inputs.iter().chain(std::iter::repeat(&None)))
            .map(|(s, input)| match s.func {
                AggFunc::Count => Field::new(&s.name, DataType::Int64, false),
                f => Field::new(&s.name, f.output_type(input.as_ref()), true),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(f: AggFunc, vals: &[Option<f64>], times: &[i64]) -> Option<f64> {
        let mut acc = Accumulators::new(&[f]);
        let s = acc.alloc();
        let col = Float64Array::from(vals.to_vec());
        acc.update(&vec![s; vals.len()], &[Some(col)], &Int64Array::from(times.to_vec()));
        acc.finish(&[s])[0].as_any().downcast_ref::<Float64Array>().map_or_else(
            || {
                let c = acc.finish(&[s]);
                let c = c[0].as_any().downcast_ref::<Int64Array>().unwrap();
                c.is_valid(0).then(|| c.value(0) as f64)
            },
            |c| c.is_valid(0).then(|| c.value(0)),
        )
    }

    #[test]
    fn every_aggregate_matches_its_definition() {
        let v = [Some(3.0), None, Some(1.0), Some(4.0), Some(1.5)];
        let t = [30, 10, 20, 50, 40];
        assert_eq!(run(AggFunc::Count, &v, &t), Some(4.0), "count(col) skips nulls");
        assert_eq!(run(AggFunc::Sum, &v, &t), Some(9.5));
        assert_eq!(run(AggFunc::Mean, &v, &t), Some(9.5 / 4.0));
        assert_eq!(run(AggFunc::Min, &v, &t), Some(1.0));
        assert_eq!(run(AggFunc::Max, &v, &t), Some(4.0));
        assert_eq!(run(AggFunc::First, &v, &t), Some(1.0), "earliest event time is 20 (10 is null)");
        assert_eq!(run(AggFunc::Last, &v, &t), Some(4.0));
        let mean = 9.5 / 4.0;
        let var = [3.0f64, 1.0, 4.0, 1.5].iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 3.0;
        assert!((run(AggFunc::Stddev, &v, &t).unwrap() - var.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn empty_and_all_null_windows_give_null() {
        assert_eq!(run(AggFunc::Sum, &[None, None], &[1, 2]), None);
        assert_eq!(run(AggFunc::Min, &[None], &[1]), None);
        assert_eq!(run(AggFunc::Stddev, &[Some(1.0)], &[1]), None);
        assert_eq!(run(AggFunc::Count, &[None], &[1]), Some(0.0));
    }

    #[test]
    fn merge_equals_one_pass() {
        let vals = [2.0, 7.0, 1.0, 8.0, 2.5, 9.0];
        let times = [5, 1, 9, 3, 7, 2];
        for (_, f) in AggFunc::ALL {
            let mut acc = Accumulators::new(&[f]);
            let (a, b, c) = (acc.alloc(), acc.alloc(), acc.alloc());
            let col = Some(Float64Array::from(vals.to_vec()));
            let tarr = Int64Array::from(times.to_vec());
            acc.update(&[a, a, b, b, b, a], std::slice::from_ref(&col), &tarr);
            acc.update(&[c; 6], std::slice::from_ref(&col), &tarr);
            acc.merge(a, b);
            let out = acc.finish(&[a, c]);
            let eq = match out[0].data_type() {
                DataType::Int64 => {
                    let o = out[0].as_any().downcast_ref::<Int64Array>().unwrap();
                    o.value(0) == o.value(1)
                }
                _ => {
                    let o = out[0].as_any().downcast_ref::<Float64Array>().unwrap();
                    (o.value(0) - o.value(1)).abs() < 1e-12
                }
            };
            assert!(eq, "{f}: merged {:?}", out[0]);
        }
    }

    #[test]
    fn parses_specs_and_names_errors() {
        assert_eq!(AggSpec::parse("n", "count()").unwrap().column, None);
        assert_eq!(AggSpec::parse("n", "count").unwrap().column, None);
        let s = AggSpec::parse("t", " avg( readings.temp ) ").unwrap();
        assert_eq!((s.func, s.column.as_deref()), (AggFunc::Mean, Some("readings.temp")));
        let e = AggSpec::parse("t", "median(x)").unwrap_err().to_string();
        assert!(e.contains("unknown function `median`; known: count, sum"), "{e}");
        assert!(AggSpec::parse("t", "max()").unwrap_err().to_string().contains("needs a column"));
        assert!(AggSpec::parse("t", "max(x").unwrap_err().to_string().contains("closing parenthesis"));
    }
}
