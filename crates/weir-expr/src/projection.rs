//! Projections: `expr [AS name]` items producing a new batch.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchOptions};
use arrow_schema::{FieldRef, Schema, SchemaRef};

use crate::error::{ExprError, Result};
use crate::expr::CompiledExpr;
use crate::parse;

/// One item of a projection: `expr [AS name]`.
///
/// Without `AS`, a plain column path keeps its last segment as name
/// (`readings.temp` -> `temp`); anything else gets the expression text as
/// name (`upper(device_id)` -> `upper(device_id)`).
#[derive(Debug, Clone)]
pub struct Projection {
    /// The output column name.
    pub name: String,
    /// The expression computing the column.
    pub expr: CompiledExpr,
}

impl Projection {
    /// Compiles one item, `expr [[AS] name]`, against `schema`.
    ///
    /// `*` is not an expression; use [`compile_projections`] for it.
    pub fn compile(item: &str, schema: &SchemaRef) -> Result<Self> {
        if item.trim() == "*" {
            return Err(ExprError::plan(item.trim(), "`*` expands to several columns; use compile_projections"));
        }
        let parsed = parse::parse_item(item)?;
        let default_name = parse::column_idents(&parsed.expr).and_then(|ids| ids.last().map(|id| id.value.clone()));
        let expr = CompiledExpr::from_ast(&parsed.expr_text, parsed.expr, schema)?;
        let name = parsed.alias.or(default_name).unwrap_or_else(|| expr.sql().to_string());
        Ok(Self { name, expr })
    }

    /// The output field: the expression's type and nullability under
    /// [`name`](Self::name) (keeping the source field's metadata for a plain
    /// column path).
    pub fn output_field(&self) -> FieldRef {
        let field = self.expr.field();
        if field.name() == &self.name {
            Arc::clone(field)
        } else {
            Arc::new(field.as_ref().clone().with_name(self.name.clone()))
        }
    }
}

/// Compiles a list of projection items and returns the output schema too.
///
/// A `*` item means all input columns in order, so
/// `["*", "readings.temp * 1.8 + 32 AS temp_f"]` adds a column. Duplicate
/// output names are an error ([`ExprError::DuplicateName`]) naming both
/// items. The output schema keeps the input schema's metadata.
pub fn compile_projections(items: &[String], schema: &SchemaRef) -> Result<(Vec<Projection>, SchemaRef)> {
    let mut projections = Vec::new();
    // Output name -> the item that produced it.
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut add = |proj: Projection, item: &str, out: &mut Vec<Projection>| {
        if let Some(first) = seen.get(&proj.name) {
            return Err(ExprError::DuplicateName { name: proj.name, first: first.clone(), second: item.to_string() });
        }
        seen.insert(proj.name.clone(), item.to_string());
        out.push(proj);
        Ok(())
    };
    for item in items {
        let trimmed = item.trim();
        if trimmed == "*" {
            for (i, field) in schema.fields().iter().enumerate() {
                let sql = parse::quote_segment(field.name());
                let expr = CompiledExpr::column_path(&sql, vec![i], Arc::clone(field), schema);
                let proj = Projection { name: field.name().clone(), expr };
                add(proj, trimmed, &mut projections)?;
            }
        } else {
            add(Projection::compile(item, schema)?, trimmed, &mut projections)?;
        }
    }
    let fields: Vec<FieldRef> = projections.iter().map(Projection::output_field).collect();
    let out = Schema::new_with_metadata(fields, schema.metadata().clone());
    Ok((projections, Arc::new(out)))
}

/// Evaluates projections on a batch into a new batch with `out_schema` (as
/// returned by [`compile_projections`]). The row count is kept even when
/// there are no projections.
pub fn project(batch: &RecordBatch, projs: &[Projection], out_schema: &SchemaRef) -> Result<RecordBatch> {
    if projs.len() != out_schema.fields().len() {
        return Err(ExprError::Eval {
            expr: projs.iter().map(|p| p.expr.sql()).collect::<Vec<_>>().join(", "),
            message: format!(
                "{} projections but the output schema has {} fields",
                projs.len(),
                out_schema.fields().len()
            ),
        });
    }
    let columns = projs.iter().map(|p| p.expr.evaluate(batch)).collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(out_schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| ExprError::Eval {
        expr: projs.iter().map(|p| p.expr.sql()).collect::<Vec<_>>().join(", "),
        message: e.to_string(),
    })
}
