//! SQL expressions over Arrow [`RecordBatch`](arrow_array::RecordBatch)es,
//! for Weir's `filter` and computed-column (`select`) steps.
//!
//! Expressions are parsed with DataFusion's SQL front end (sqlparser, generic
//! dialect), planned into a DataFusion logical expression against the input
//! schema, type-coerced and simplified the way DataFusion's optimizer does,
//! then turned into a physical expression that is evaluated vectorised on
//! whole batches. Plain column references (`device_id`, `readings.temp`)
//! skip DataFusion entirely and take the column or struct child directly.
//!
//! ```
//! use std::sync::Arc;
//! use arrow_array::{Float64Array, RecordBatch, StringArray, StructArray};
//! use arrow_schema::{DataType, Field, Fields, Schema};
//! use weir_expr::{compile_projections, project, Predicate};
//!
//! let readings = Fields::from(vec![Field::new("temp", DataType::Float64, true)]);
//! let schema = Arc::new(Schema::new(vec![
//!     Field::new("device_id", DataType::Utf8, false),
//!     Field::new("readings", DataType::Struct(readings.clone()), true),
//! ]));
//! let batch = RecordBatch::try_new(
//!     schema.clone(),
//!     vec![
//!         Arc::new(StringArray::from(vec!["a", "b"])),
//!         Arc::new(StructArray::new(
//!             readings,
//!             vec![Arc::new(Float64Array::from(vec![Some(21.5), Some(30.0)]))],
//!             None,
//!         )),
//!     ],
//! )?;
//!
//! let hot = Predicate::compile("readings.temp > 25.0", &schema)?;
//! assert_eq!(hot.evaluate(&batch)?.values().iter().collect::<Vec<_>>(), [false, true]);
//!
//! let items = ["*".to_string(), "readings.temp * 1.8 + 32 AS temp_f".to_string()];
//! let (projs, out_schema) = compile_projections(&items, &schema)?;
//! let out = project(&batch, &projs, &out_schema)?;
//! assert_eq!(out.schema().field(2).name(), "temp_f");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Language
//!
//! * **Columns**: identifiers are column names, matched case-sensitively as
//!   written. `a.b.c` reads field `c` of struct field `b` of struct column
//!   `a`. Quote names with odd characters or dots: `"my col"`, `` `a.b` ``,
//!   `"readings"."temp (C)"`. `m['key']` looks up a map key or struct field;
//!   `l[1]` indexes a list (1-based).
//! * **Operators**: arithmetic (`+ - * / %`), comparisons, `AND`/`OR`/`NOT`,
//!   `IS [NOT] NULL`, `IS [NOT] DISTINCT FROM`, `[NOT] IN (...)`,
//!   `[NOT] BETWEEN`, `[NOT] LIKE`/`ILIKE`, `SIMILAR TO`, regex `~`,
//!   string concatenation `||`, `CASE WHEN`, `CAST(x AS type)`,
//!   `TRY_CAST`, `x::type`, typed literals (`TIMESTAMP '2024-01-01T00:00:00'`,
//!   `INTERVAL '5 minutes'`).
//! * **Functions**: DataFusion's core, math, string, unicode, regex,
//!   date/time and nested (array/map/struct) scalar function libraries:
//!   `abs`, `round`, `sqrt`, `power`, `coalesce`, `nullif`, `greatest`,
//!   `lower`, `upper`, `concat`, `length`, `substr`, `replace`, `trim`,
//!   `starts_with`, `regexp_like`, `date_trunc`, `date_part`, `to_timestamp`,
//!   `array_length`, `named_struct`, ... (see [`available_functions`]).
//!   Functions tied to a query start time (`now()`, `current_date`, ...) and
//!   aggregate or window functions are not available.
//!
//! # Semantics
//!
//! * A field of a NULL struct is NULL, whatever value the child array holds
//!   in that row.
//! * A [`Predicate`] keeps a row only where it is TRUE: NULL counts as false.
//! * Numbers without a decimal point are `Int64`, with one `Float64`.
//!   Mixed types are coerced as in DataFusion (`int_col * 1.5` is `Float64`).
#![warn(missing_docs)]

mod error;
mod expr;
mod nulls;
mod parse;
mod projection;
mod registry;

pub use error::{ExprError, Result};
pub use expr::{CompiledExpr, Predicate};
pub use projection::{compile_projections, project, Projection};

/// Names of all scalar functions expressions can call, sorted (aliases not
/// included).
pub fn available_functions() -> &'static [String] {
    registry::REGISTRY.function_names()
}

/// Every leaf column path of `schema` as it would be written in an
/// expression, struct fields flattened (`readings.temp`), in schema order.
pub fn column_paths(schema: &arrow_schema::Schema) -> Vec<String> {
    parse::column_paths(schema)
}

#[cfg(test)]
mod tests;
