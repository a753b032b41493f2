//! Names made from a row's values, for sinks that address their output per row: a Redis key
//! `device:{device_id}`, an MQTT topic `alerts/{site}/{device_id}`, a routing key.

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::{DataType, Schema};
use weir_core::{CoreError, Result};

/// A template of literal text and `{column}` references (`{{` and `}}` are literal braces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A column, by index in the rows' schema.
    Column(usize, String),
}

impl RowTemplate {
    /// Parses `text` against the rows' `schema`; `what` names the setting in errors.
    ///
    /// # Errors
    /// An unclosed or empty `{}`, or a name that is not a column (the error lists them).
    pub fn parse(text: &str, schema: &Schema, what: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(CoreError::Config(format!("{what} `{text}`: `{{` without `}}`"))),
                        }
                    }
                    let name = name.trim().to_string();
                    let Some((i, f)) = schema.column_with_name(&name) else {
                        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                        return Err(CoreError::Config(format!(
                            "{what} `{text}`: `{{{name}}}` is not a column (the rows have: {})",
                            names.join(", ")
                        )));
                    };
                    if matches!(f.data_type(), DataType::Struct(_) | DataType::List(_) | DataType::Map(_, _)) {
                        return Err(CoreError::Config(format!(
                            "{what} `{text}`: `{{{name}}}` is a {}, not a plain value",
                            f.data_type()
                        )));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Column(i, name));
                }
                '}' => return Err(CoreError::Config(format!("{what} `{text}`: `}}` without `{{` (write `}}}}`)"))),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Self { text: text.to_string(), parts })
    }

    /// The same for every row (no column in it).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Renders rows of `batch`, which has the schema the template was parsed against.
    ///
    /// # Errors
    /// A column type the display formatter does not know.
    pub fn renderer<'a>(&'a self, batch: &'a RecordBatch) -> Result<TemplateRows<'a>> {
        let options = FormatOptions::default();
        let columns = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(_) => Ok(None),
                Part::Column(i, _) => {
                    let a = batch.column(*i).as_ref();
                    Ok(Some((a, ArrayFormatter::try_new(a, &options)?)))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TemplateRows { template: self, columns })
    }
}

/// A template bound to a batch (see [`RowTemplate::renderer`]).
pub struct TemplateRows<'a> {
    template: &'a RowTemplate,
    columns: Vec<Option<(&'a dyn Array, ArrayFormatter<'a>)>>,
}

impl std::fmt::Debug for TemplateRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateRows").field("template", &self.template.text).finish_non_exhaustive()
    }
}

impl TemplateRows<'_> {
    /// Row `row`'s text, written into `out` (cleared first).
    ///
    /// # Errors
    /// A referenced column is null in that row: the message names it.
    pub fn render(&self, row: usize, out: &mut String) -> std::result::Result<(), String> {
        use std::fmt::Write as _;
        out.clear();
        for (p, c) in self.template.parts.iter().zip(&self.columns) {
            match (p, c) {
                (Part::Text(t), _) => out.push_str(t),
                (Part::Column(_, name), Some((a, fmt))) => {
                    if a.is_null(row) {
                        return Err(format!("`{{{name}}}` of `{}` is null in this row", self.template.text));
                    }
                    match a.data_type() {
                        DataType::Utf8 => out.push_str(a.as_string::<i32>().value(row)),
                        _ => {
                            let _ = write!(out, "{}", fmt.value(row));
                        }
                    }
                }
                (Part::Column(..), None) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::Field;

    use super::*;

    #[test]
    fn columns_fill_the_template_and_mistakes_are_named() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("berlin"), None])) as ArrayRef,
                Arc::new(Int64Array::from(vec![7, 8])),
            ],
        )
        .unwrap();
        let t = RowTemplate::parse("alerts/{site}/{ n }/{{x}}", &schema, "topic").unwrap();
        assert!(!t.is_constant());
        let r = t.renderer(&batch).unwrap();
        let mut s = String::new();
        r.render(0, &mut s).unwrap();
        assert_eq!(s, "alerts/berlin/7/{x}");
        assert_eq!(r.render(1, &mut s).unwrap_err(), "`{site}` of `alerts/{site}/{ n }/{{x}}` is null in this row");
        assert!(RowTemplate::parse("plain", &schema, "topic").unwrap().is_constant());
        let e = RowTemplate::parse("a/{nope}", &schema, "topic").unwrap_err().to_string();
        assert_eq!(e, "topic `a/{nope}`: `{nope}` is not a column (the rows have: site, n)");
        let e = RowTemplate::parse("a/{site", &schema, "key").unwrap_err().to_string();
        assert!(e.contains("without"), "{e}");
        let e = RowTemplate::parse("a}", &schema, "key").unwrap_err().to_string();
        assert!(e.contains("`}` without `{`"), "{e}");
    }
}
