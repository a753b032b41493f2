//! Compiled expressions and filter predicates.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow_schema::{DataType, Field, FieldRef, SchemaRef};
use datafusion_common::{DFSchema, DataFusionError};
use datafusion_expr::execution_props::ExecutionProps;
use datafusion_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion_expr::simplify::SimplifyContext;
use datafusion_optimizer::simplify_expressions::ExprSimplifier;
use datafusion_physical_expr::utils::collect_columns;
use datafusion_physical_expr::{create_physical_expr, PhysicalExpr};
use datafusion_sql::planner::{ParserOptions, PlannerContext, SqlToRel};
use datafusion_sql::sqlparser::ast::Expr as SqlExpr;

use crate::error::{ExprError, Result};
use crate::nulls;
use crate::parse::{self, Resolved};
use crate::registry::REGISTRY;

/// A compiled expression bound to an input schema.
///
/// Cheap to clone (everything is behind `Arc`s) and `Send + Sync`, so one
/// compiled expression can serve many tasks.
#[derive(Debug, Clone)]
pub struct CompiledExpr {
    sql: Arc<str>,
    /// Result type and nullability; the name is the expression text (or the
    /// field's own name for a plain column path).
    field: FieldRef,
    input: SchemaRef,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// A plain column path: read the column / struct child directly.
    Column { path: Arc<[usize]> },
    /// Anything else: a DataFusion physical expression.
    Physical {
        expr: Arc<dyn PhysicalExpr>,
        /// Top-level columns the expression reads (for the schema check).
        columns: Arc<[usize]>,
        /// The subset of `columns` that are structs (for null push-down).
        struct_columns: Arc<[usize]>,
    },
}

/// DataFusion's message without its "Error during planning: " style prefix
/// or the diagnostic wrapper around it.
fn df_message(e: &DataFusionError) -> String {
    let message = e.find_root().message();
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// DataFusion reads `user.country` as the function `USER` followed by a field access when
/// `user` is a column: for a column named like a SQL word, say to quote it.
fn sql_word_hint(sql: &str, schema: &SchemaRef, message: String) -> String {
    if !message.starts_with("Dot access not supported") {
        return message;
    }
    let word = schema.fields().iter().map(|f| f.name().as_str()).find(|name| {
        sql.match_indices(&format!("{name}.")).any(|(i, _)| {
            let before = sql[..i].chars().next_back();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '"' || c == '.')
        })
    });
    match word {
        Some(w) => format!(
            "`{w}` is a SQL word, so `{w}.` does not read the column `{w}`: quote the name, as in `\"{w}\".{}`",
            sql.split_once(&format!("{w}.")).map_or("field", |(_, rest)| rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("field"))
        ),
        None => message,
    }
}

impl CompiledExpr {
    /// Compiles `sql` (an expression, no SELECT) against `schema`.
    ///
    /// Identifiers are case-sensitive column names; `a.b.c` addresses field
    /// `c` of struct field `b` of struct column `a`. Quote names with odd
    /// characters: `"my col"` or `` `my col` ``. Function names and keywords
    /// are case-insensitive.
    pub fn compile(sql: &str, schema: &SchemaRef) -> Result<Self> {
        let ast = parse::parse_expr(sql)?;
        Self::from_ast(sql.trim(), ast, schema)
    }

    /// Compiles an already parsed expression; `sql` is its text.
    pub(crate) fn from_ast(sql: &str, ast: SqlExpr, schema: &SchemaRef) -> Result<Self> {
        parse::validate_columns(sql, &ast, schema)?;

        if let Some(ids) = parse::column_idents(&ast) {
            let names: Vec<&str> = ids.iter().map(|id| id.value.as_str()).collect();
            if let Some(Resolved::Path { indices, field }) = parse::resolve(schema, &names) {
                return Ok(Self::column_path(sql, indices, field, schema));
            }
        }

        let plan_err = |e: DataFusionError| ExprError::plan(sql, sql_word_hint(sql, schema, df_message(&e)));
        let df_schema = Arc::new(DFSchema::try_from(Arc::clone(schema)).map_err(plan_err)?);

        let options = ParserOptions::new()
            // Column names are matched exactly as written (Arrow schemas from
            // JSON are often camelCase); function names stay case-insensitive.
            .with_enable_ident_normalization(false)
            // Keep `CAST(x AS VARCHAR)` as Utf8, the type the rest of Weir uses.
            .with_map_string_types_to_utf8view(false);
        let planner = SqlToRel::new_with_options(&*REGISTRY, options);
        let logical = planner.sql_to_expr(ast, &df_schema, &mut PlannerContext::new()).map_err(plan_err)?;

        // What DataFusion's analyzer and optimizer would do to a filter or
        // projection expression: type coercion, then simplification (which
        // also rewrites functions such as coalesce into CASE).
        let context = SimplifyContext::builder()
            .with_schema(Arc::clone(&df_schema))
            .with_config_options(Arc::clone(REGISTRY.config()))
            .build();
        let simplifier = ExprSimplifier::new(context);
        let coerced = simplifier.coerce(logical, &df_schema).map_err(plan_err)?;
        let simplified = simplifier.simplify(coerced).map_err(plan_err)?;

        let physical =
            create_physical_expr(&simplified, &df_schema, &ExecutionProps::new(), &PhysicalPlanningContext::default())
                .map_err(plan_err)?;
        let ret = physical.return_field(schema).map_err(plan_err)?;

        let mut columns: Vec<usize> = collect_columns(&physical).iter().map(|c| c.index()).collect();
        columns.sort_unstable();
        let struct_columns: Vec<usize> =
            columns.iter().copied().filter(|&i| matches!(schema.field(i).data_type(), DataType::Struct(_))).collect();

        let field = Field::new(sql, ret.data_type().clone(), ret.is_nullable());
        Ok(Self {
            sql: sql.into(),
            field: Arc::new(field),
            input: Arc::clone(schema),
            kind: Kind::Physical { expr: physical, columns: columns.into(), struct_columns: struct_columns.into() },
        })
    }

    /// A plain column path (`indices` from the top-level column down).
    pub(crate) fn column_path(sql: &str, indices: Vec<usize>, field: FieldRef, schema: &SchemaRef) -> Self {
        Self { sql: sql.into(), field, input: Arc::clone(schema), kind: Kind::Column { path: indices.into() } }
    }

    /// The type of the values [`evaluate`](Self::evaluate) returns.
    pub fn data_type(&self) -> &DataType {
        self.field.data_type()
    }

    /// Whether [`evaluate`](Self::evaluate) may return nulls.
    pub fn nullable(&self) -> bool {
        self.field.is_nullable()
    }

    /// The expression text, trimmed.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The result as an Arrow field: type, nullability and, for a plain
    /// column path, the source field's name and metadata; otherwise the name
    /// is the expression text.
    pub fn field(&self) -> &FieldRef {
        &self.field
    }

    /// The input schema the expression was compiled against.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input
    }

    /// Whether this is a plain column path (`col`, `col.field`), evaluated by
    /// taking the column or struct child directly, without DataFusion.
    pub fn is_column_path(&self) -> bool {
        matches!(self.kind, Kind::Column { .. })
    }

    /// Evaluates on a batch, returning one value per row (scalars broadcast
    /// to batch length).
    ///
    /// The batch must have the schema the expression was compiled against
    /// (the columns the expression reads are checked). Fields of a NULL
    /// struct read as NULL.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<ArrayRef> {
        let eval_err = |message: String| ExprError::eval(&self.sql, message);
        match &self.kind {
            Kind::Column { path } => {
                self.check_schema(batch, &path[..1])?;
                nulls::read_path(batch.columns(), path).map_err(|e| eval_err(e.to_string()))
            }
            Kind::Physical { expr, columns, struct_columns } => {
                self.check_schema(batch, columns)?;
                let pushed = self.push_down_nulls(batch, struct_columns).map_err(|e| eval_err(e.to_string()))?;
                let batch = pushed.as_ref().unwrap_or(batch);
                let value = expr
                    .evaluate(batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
                    .map_err(|e| eval_err(df_message(&e)))?;
                Ok(value)
            }
        }
    }

    /// Verifies that the columns read have the compiled types.
    fn check_schema(&self, batch: &RecordBatch, columns: &[usize]) -> Result<()> {
        let schema = batch.schema_ref();
        if Arc::ptr_eq(schema, &self.input) {
            return Ok(());
        }
        for &i in columns {
            let expected = self.input.field(i);
            let ok = schema
                .fields()
                .get(i)
                .is_some_and(|f| f.name() == expected.name() && f.data_type().equals_datatype(expected.data_type()));
            if !ok {
                let found = schema
                    .fields()
                    .get(i)
                    .map(|f| format!("`{}` of type {}", f.name(), f.data_type()))
                    .unwrap_or_else(|| "no column".to_string());
                return Err(ExprError::eval(
                    &self.sql,
                    format!(
                        "batch does not match the compiled schema: column {i} should be `{}` of type {}, found {found}",
                        expected.name(),
                        expected.data_type()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Returns a copy of `batch` whose struct columns have their nulls pushed
    /// into their children, or `None` if no column needed it.
    fn push_down_nulls(
        &self,
        batch: &RecordBatch,
        struct_columns: &[usize],
    ) -> std::result::Result<Option<RecordBatch>, arrow_schema::ArrowError> {
        let mut columns: Option<Vec<ArrayRef>> = None;
        for &i in struct_columns {
            if let Some(new) = nulls::push_down(batch.column(i), None)? {
                columns.get_or_insert_with(|| batch.columns().to_vec())[i] = new;
            }
        }
        columns
            .map(|columns| {
                RecordBatch::try_new_with_options(
                    batch.schema(),
                    columns,
                    &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
                )
            })
            .transpose()
    }
}

/// A filter predicate: a boolean expression.
#[derive(Debug, Clone)]
pub struct Predicate {
    expr: CompiledExpr,
}

impl Predicate {
    /// Compiles `sql` against `schema`; it is an error
    /// ([`ExprError::NotBoolean`]) if the expression is not boolean.
    pub fn compile(sql: &str, schema: &SchemaRef) -> Result<Self> {
        let expr = CompiledExpr::compile(sql, schema)?;
        if expr.data_type() != &DataType::Boolean {
            return Err(ExprError::NotBoolean { expr: expr.sql().to_string(), actual: expr.data_type().clone() });
        }
        Ok(Self { expr })
    }

    /// The underlying boolean expression.
    pub fn expr(&self) -> &CompiledExpr {
        &self.expr
    }

    /// The predicate text, trimmed.
    pub fn sql(&self) -> &str {
        self.expr.sql()
    }

    /// Returns the mask; NULL counts as false (SQL WHERE semantics). The
    /// returned array has no null buffer, one value per row.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let array = self.expr.evaluate(batch)?;
        let mask = array.as_boolean_opt().ok_or_else(|| {
            ExprError::eval(self.expr.sql(), format!("expected a boolean result, got {}", array.data_type()))
        })?;
        Ok(match mask.nulls() {
            Some(nulls) if nulls.null_count() > 0 => BooleanArray::new(mask.values() & nulls.inner(), None),
            _ => BooleanArray::new(mask.values().clone(), None),
        })
    }
}
