//! Parsing expression text with sqlparser, and resolving column paths
//! against an Arrow schema before DataFusion plans anything.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Schema};
use datafusion_sql::sqlparser::ast::{AccessExpr, Expr, Ident, Visit, Visitor};
use datafusion_sql::sqlparser::dialect::GenericDialect;
use datafusion_sql::sqlparser::keywords::Keyword;
use datafusion_sql::sqlparser::parser::{Parser, ParserError};
use datafusion_sql::sqlparser::tokenizer::{Location, Token};

use crate::error::{ExprError, Result};
use crate::registry::is_excluded_function;

/// At most this many column paths are listed in an "unknown column" message.
const MAX_LISTED_COLUMNS: usize = 64;

/// A parsed projection item: `expr [[AS] alias]`.
#[derive(Debug)]
pub(crate) struct ParsedItem {
    /// The expression.
    pub(crate) expr: Expr,
    /// The source text of the expression alone, trimmed.
    pub(crate) expr_text: String,
    /// The alias, unquoted.
    pub(crate) alias: Option<String>,
}

fn parse_error(sql: &str, e: ParserError) -> ExprError {
    let message = match e {
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
        other => other.to_string(),
    };
    ExprError::Parse { expr: sql.to_string(), message }
}

fn parser(sql: &str) -> Result<Parser<'static>> {
    static DIALECT: GenericDialect = GenericDialect {};
    Parser::new(&DIALECT).try_with_sql(sql).map_err(|e| parse_error(sql, e))
}

/// Parses a whole string as one expression.
pub(crate) fn parse_expr(sql: &str) -> Result<Expr> {
    let mut p = parser(sql)?;
    let expr = p.parse_expr().map_err(|e| parse_error(sql, e))?;
    p.expect_token(&Token::EOF).map_err(|e| parse_error(sql, e))?;
    Ok(expr)
}

/// Parses `expr [[AS] alias]`.
pub(crate) fn parse_item(item: &str) -> Result<ParsedItem> {
    let mut p = parser(item)?;
    let expr = p.parse_expr().map_err(|e| parse_error(item, e))?;
    let next = p.peek_token();
    let expr_end = byte_offset(item, next.span.start).unwrap_or(item.len());
    let alias = if p.parse_keyword(Keyword::AS) {
        Some(p.parse_identifier().map_err(|e| parse_error(item, e))?)
    } else if next.token == Token::EOF {
        None
    } else {
        // Implicit alias: `expr name`.
        Some(p.parse_identifier().map_err(|e| parse_error(item, e))?)
    };
    p.expect_token(&Token::EOF).map_err(|e| parse_error(item, e))?;
    Ok(ParsedItem { expr, expr_text: item[..expr_end].trim().to_string(), alias: alias.map(|a| a.value) })
}

/// Converts a tokenizer location (1-based line and character column) to a
/// byte offset into `src`.
fn byte_offset(src: &str, loc: Location) -> Option<usize> {
    if loc.line == 0 {
        return None;
    }
    let (mut line, mut col) = (1, 1);
    for (i, ch) in src.char_indices() {
        if line == loc.line && col == loc.column {
            return Some(i);
        }
        if ch == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line == loc.line && col == loc.column).then_some(src.len())
}

/// How an identifier path resolved against the schema.
#[derive(Debug, Clone)]
pub(crate) enum Resolved {
    /// A column, or a field inside (nested) struct columns: `indices[0]` is
    /// the top-level column, each following index a struct child.
    Path {
        /// Child indices from the top-level column down.
        indices: Vec<usize>,
        /// The addressed field; nullable if it or any ancestor is.
        field: FieldRef,
    },
    /// A valid reference that is not a plain struct path (e.g. a map
    /// lookup); left to DataFusion.
    Other,
}

/// Resolves `names` (a column followed by nested field names).
pub(crate) fn resolve(schema: &Schema, names: &[&str]) -> Option<Resolved> {
    let (first, rest) = names.split_first()?;
    let (idx, field) = schema.fields().find(first)?;
    let mut indices = vec![idx];
    let mut field: &Field = field;
    let mut nullable = field.is_nullable();
    for name in rest {
        match field.data_type() {
            DataType::Struct(children) => {
                let (idx, child) = children.find(name)?;
                indices.push(idx);
                field = child;
                nullable |= child.is_nullable();
            }
            // get_field on a map looks the key up at run time.
            DataType::Map(..) => return Some(Resolved::Other),
            DataType::Dictionary(_, value) => {
                return match value.as_ref() {
                    DataType::Struct(children) if children.find(name).is_some() => Some(Resolved::Other),
                    _ => None,
                };
            }
            _ => return None,
        }
    }
    let field = Arc::new(field.clone().with_nullable(nullable));
    Some(Resolved::Path { indices, field })
}

/// The identifier path of a plain column reference (`a`, `a.b`, `"a"."b c"`),
/// if `expr` is one.
pub(crate) fn column_idents(expr: &Expr) -> Option<Vec<&Ident>> {
    match expr {
        Expr::Identifier(id) if !is_variable(id) => Some(vec![id]),
        Expr::CompoundIdentifier(ids) if !ids.first().is_some_and(is_variable) => Some(ids.iter().collect()),
        Expr::CompoundFieldAccess { root, access_chain } => {
            let Expr::Identifier(root) = root.as_ref() else {
                return None;
            };
            let mut ids = vec![root];
            for access in access_chain {
                match access {
                    AccessExpr::Dot(Expr::Identifier(id)) => ids.push(id),
                    _ => return None,
                }
            }
            Some(ids)
        }
        _ => None,
    }
}

fn is_variable(id: &Ident) -> bool {
    id.quote_style.is_none() && id.value.starts_with('@')
}

/// Checks that every column reference in `expr` exists in `schema` (the
/// error lists the available column paths) and that no function unavailable
/// on streams is called.
pub(crate) fn validate_columns(sql: &str, expr: &Expr, schema: &Schema) -> Result<()> {
    let mut v = ColumnValidator { schema, skip: HashSet::new() };
    match expr.visit(&mut v) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(message) => Err(ExprError::plan(sql, message)),
    }
}

struct ColumnValidator<'a> {
    schema: &'a Schema,
    /// Identifier expressions already checked as part of an access chain.
    skip: HashSet<*const Expr>,
}

impl ColumnValidator<'_> {
    fn check(&self, ids: &[&Ident]) -> ControlFlow<String> {
        let names: Vec<&str> = ids.iter().map(|id| id.value.as_str()).collect();
        match resolve(self.schema, &names) {
            Some(_) => ControlFlow::Continue(()),
            None => {
                let path = ids.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(".");
                ControlFlow::Break(format!("unknown column `{path}`; available: {}", available_columns(self.schema)))
            }
        }
    }
}

impl Visitor for ColumnValidator<'_> {
    type Break = String;

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        if self.skip.contains(&std::ptr::from_ref(expr)) {
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Function(f) => match f.name.0.as_slice() {
                [part] if part.as_ident().is_some_and(|id| is_excluded_function(&id.value)) => {
                    ControlFlow::Break(format!(
                        "function `{}` is not available in stream expressions \
                         (its value would be frozen when the expression is compiled)",
                        f.name
                    ))
                }
                _ => ControlFlow::Continue(()),
            },
            Expr::Identifier(id) if !is_variable(id) => self.check(&[id]),
            Expr::CompoundIdentifier(ids) if !ids.first().is_some_and(is_variable) => {
                self.check(&ids.iter().collect::<Vec<_>>())
            }
            Expr::CompoundFieldAccess { root, access_chain } => {
                // `a.b[1].c`: like DataFusion, the root identifier and the
                // leading `.name` accesses form the column path; later
                // `.name` accesses are field names, not columns.
                let mut ids = Vec::new();
                if let Expr::Identifier(id) = root.as_ref() {
                    if !is_variable(id) {
                        ids.push(id);
                        self.skip.insert(std::ptr::from_ref(root.as_ref()));
                    }
                }
                let mut leading = !ids.is_empty();
                for access in access_chain {
                    if let AccessExpr::Dot(e) = access {
                        if let Expr::Identifier(id) = e {
                            self.skip.insert(std::ptr::from_ref(e));
                            if leading {
                                ids.push(id);
                            }
                            continue;
                        }
                    }
                    leading = false;
                }
                if ids.is_empty() {
                    ControlFlow::Continue(())
                } else {
                    self.check(&ids)
                }
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Renders one path segment, quoting it when it is not a plain identifier.
pub(crate) fn quote_segment(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// All addressable leaf column paths (structs flattened), in schema order.
pub(crate) fn column_paths(schema: &Schema) -> Vec<String> {
    fn walk(prefix: &str, field: &Field, out: &mut Vec<String>) {
        let path = if prefix.is_empty() {
            quote_segment(field.name())
        } else {
            format!("{prefix}.{}", quote_segment(field.name()))
        };
        match field.data_type() {
            DataType::Struct(children) if !children.is_empty() => {
                for child in children {
                    walk(&path, child, out);
                }
            }
            _ => out.push(path),
        }
    }
    let mut out = Vec::new();
    for field in schema.fields() {
        walk("", field, &mut out);
    }
    out
}

fn available_columns(schema: &Schema) -> String {
    let paths = column_paths(schema);
    if paths.is_empty() {
        return "(none)".to_string();
    }
    let mut listed = paths.iter().take(MAX_LISTED_COLUMNS).cloned().collect::<Vec<_>>().join(", ");
    if paths.len() > MAX_LISTED_COLUMNS {
        listed.push_str(&format!(", ... ({} more)", paths.len() - MAX_LISTED_COLUMNS));
    }
    listed
}
