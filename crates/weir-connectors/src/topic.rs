//! A message's routing metadata as columns, shared by the sources that read named topics or
//! subjects (MQTT, NATS): the topic itself, fields taken from its levels by a pattern
//! (`sensors/{site}/{device_id}/telemetry`, `sensors.{site}.{device_id}`), and the message's
//! headers or properties as one JSON object.

use std::sync::Arc;

use arrow_array::{ArrayRef, StringArray};
use arrow_schema::{DataType, Field};
use weir_core::Result;

/// How a protocol writes topics: the level separator, its one-level and rest wildcards, and
/// the setting a pattern comes from (for errors).
#[derive(Debug, PartialEq, Eq)]
pub struct Syntax {
    sep: char,
    one: &'static str,
    rest: &'static str,
    setting: &'static str,
}

/// MQTT topics: `a/+/c/#`.
pub const MQTT: Syntax = Syntax { sep: '/', one: "+", rest: "#", setting: "mqtt `topic_fields" };
/// AMQP topic routing keys: `a.*.c.#`.
pub const AMQP: Syntax = Syntax { sep: '.', one: "*", rest: "#", setting: "rabbitmq `routing_key_fields" };
/// NATS subjects: `a.*.c.>`.
pub const NATS: Syntax = Syntax { sep: '.', one: "*", rest: ">", setting: "nats `subject_fields" };

/// A topic pattern naming levels. A `{name}` level becomes a text column; other levels must
/// match as written (the one-level wildcard matches any one level, a final rest wildcard any
/// rest), or the columns are null for that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
    syntax: &'static Syntax,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Field(String),
    Any,
    Rest,
}

impl TopicPattern {
    /// Parses a pattern written in `syntax`.
    ///
    /// # Errors
    /// An empty field name, a field name used twice, a rest wildcard before the last level, or
    /// no field.
    pub fn parse(pattern: &str, syntax: &'static Syntax) -> Result<Self> {
        let parts: Vec<&str> = pattern.split(syntax.sep).collect();
        let at = syntax.setting;
        let mut levels = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let level = if let Some(name) = p.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                weir_core::ensure_config!(!name.is_empty(), "{at}: {pattern}`: a `{{}}` level needs a name");
                weir_core::ensure_config!(
                    !levels.iter().any(|l| l == &Level::Field(name.to_string())),
                    "{at}: {pattern}`: field `{name}` is named twice"
                );
                Level::Field(name.to_string())
            } else if *p == syntax.one {
                Level::Any
            } else if *p == syntax.rest {
                weir_core::ensure_config!(
                    i + 1 == parts.len(),
                    "{at}: {pattern}`: `{}` can only be the last level",
                    syntax.rest
                );
                Level::Rest
            } else {
                Level::Literal((*p).to_string())
            };
            levels.push(level);
        }
        let p = Self { levels, syntax };
        weir_core::ensure_config!(
            !p.names().is_empty(),
            "{at}: {pattern}`: name at least one level, like `sensors{0}{{device_id}}{0}telemetry`",
            syntax.sep
        );
        Ok(p)
    }

    /// The column names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.levels
            .iter()
            .filter_map(|l| match l {
                Level::Field(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The named levels of `topic`, or `None` when it does not fit the pattern.
    pub fn extract<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        let parts: Vec<&str> = topic.split(self.syntax.sep).collect();
        let mut out = Vec::new();
        for (i, l) in self.levels.iter().enumerate() {
            match l {
                Level::Rest => return Some(out),
                _ if i >= parts.len() => return None,
                Level::Literal(s) if s != parts[i] => return None,
                Level::Field(_) => out.push(parts[i]),
                _ => {}
            }
        }
        (parts.len() == self.levels.len()).then_some(out)
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s: Vec<String> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.clone(),
                Level::Field(n) => format!("{{{n}}}"),
                Level::Any => self.syntax.one.into(),
                Level::Rest => self.syntax.rest.into(),
            })
            .collect();
        f.write_str(&s.join(&self.syntax.sep.to_string()))
    }
}

/// The metadata columns a source adds after the payload's, in this order: the topic, the
/// pattern's fields, the headers (or properties) as a JSON object text. All are nullable text.
#[derive(Debug, Clone, Default)]
pub struct MetaColumns {
    /// A column holding the topic (subject).
    pub topic: Option<String>,
    /// Columns from the topic's levels.
    pub fields: Option<TopicPattern>,
    /// A column holding the headers or properties.
    pub headers: Option<String>,
}

impl MetaColumns {
    /// True when no metadata column is asked for.
    pub fn is_empty(&self) -> bool {
        self.topic.is_none() && self.fields.is_none() && self.headers.is_none()
    }

    /// Appends the metadata columns to a payload's `fields`.
    ///
    /// # Errors
    /// A column with the name of another; `connector` names the source in the message.
    pub fn extend_schema(&self, fields: &mut Vec<Field>, connector: &str) -> Result<()> {
        let names = self.topic.iter().map(String::as_str);
        let names = names.chain(self.fields.iter().flat_map(TopicPattern::names));
        for name in names.chain(self.headers.iter().map(String::as_str)) {
            weir_core::ensure_config!(
                fields.iter().all(|f| f.name() != name),
                "{connector}: column `{name}` has the name of another column; rename it"
            );
            fields.push(Field::new(name, DataType::Utf8, true));
        }
        Ok(())
    }

    /// Appends the columns of `n` rows to `cols`; row `r` came on `topic(r)` with
    /// `headers(r)`.
    pub fn append<'a>(
        &self,
        cols: &mut Vec<ArrayRef>,
        n: usize,
        topic: impl Fn(usize) -> &'a str,
        headers: impl Fn(usize) -> Option<&'a str>,
    ) {
        if self.topic.is_some() {
            cols.push(Arc::new(StringArray::from_iter_values((0..n).map(&topic))));
        }
        if let Some(p) = &self.fields {
            let levels: Vec<Option<Vec<&str>>> = (0..n).map(|r| p.extract(topic(r))).collect();
            for i in 0..p.names().len() {
                cols.push(Arc::new(StringArray::from_iter(levels.iter().map(|l| l.as_ref().map(|v| v[i])))));
            }
        }
        if self.headers.is_some() {
            cols.push(Arc::new(StringArray::from_iter((0..n).map(headers))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_name_levels() {
        let p = TopicPattern::parse("sensors/{site}/{device_id}/telemetry", &MQTT).unwrap();
        assert_eq!(p.names(), ["site", "device_id"]);
        assert_eq!(p.extract("sensors/berlin/d-7/telemetry"), Some(vec!["berlin", "d-7"]));
        assert_eq!(p.extract("sensors/berlin/d-7/status"), None);
        assert_eq!(p.extract("sensors/berlin/d-7"), None);
        assert_eq!(p.extract("sensors/berlin/d-7/telemetry/x"), None);
        let rest = TopicPattern::parse("+/{device}/#", &MQTT).unwrap();
        assert_eq!(rest.extract("a/d1/b/c"), Some(vec!["d1"]));
        assert_eq!(rest.to_string(), "+/{device}/#");
        for bad in ["a/b", "a/{}/c", "{x}/{x}", "#/{x}"] {
            assert!(TopicPattern::parse(bad, &MQTT).is_err(), "{bad}");
        }
    }

    #[test]
    fn nats_subjects_split_on_dots_with_their_own_wildcards() {
        let p = TopicPattern::parse("sensors.{site}.*.{device}.>", &NATS).unwrap();
        assert_eq!(p.extract("sensors.berlin.x.d-7.telemetry.temp"), Some(vec!["berlin", "d-7"]));
        assert_eq!(p.extract("sensors/berlin/x/d-7/t"), None);
        assert_eq!(p.to_string(), "sensors.{site}.*.{device}.>");
        let e = TopicPattern::parse(">.{x}", &NATS).unwrap_err().to_string();
        assert!(e.contains("nats `subject_fields: >.{x}`: `>` can only be the last level"), "{e}");
    }
}
