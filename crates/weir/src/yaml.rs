//! Loading a pipeline from YAML: `${VAR}` expansion, parsing with line numbers, and pointing
//! later validation errors at the line of the step they concern.

use std::fmt;

use crate::config::PipelineConfig;

/// A problem in a pipeline file, with the line when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, for messages.
    pub file: String,
    /// 1-based line.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Replaces `${VAR}` and `${VAR:-default}` with environment values; `$${` stays a literal `${`.
///
/// # Errors
/// An unset variable without default, or an unclosed `${`, naming the line.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(p) = rest.find("${") {
            if p > 0 && rest.as_bytes()[p - 1] == b'$' {
                out.push_str(&rest[..p - 1]);
                out.push_str("${");
                rest = &rest[p + 2..];
                continue;
            }
            out.push_str(&rest[..p]);
            let Some(close) = rest[p..].find('}') else {
                return Err((i + 1, "unclosed `${` (write `$${` for a literal)".into()));
            };
            let inner = &rest[p + 2..p + close];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (lookup(name), default) {
                (Some(v), d) if !v.is_empty() || d.is_none() => out.push_str(&v),
                (_, Some(d)) => out.push_str(d),
                (_, None) => {
                    return Err((
                        i + 1,
                        format!("environment variable `{name}` is not set (give a default with `${{{name}:-value}}`)"),
                    ))
                }
            }
            rest = &rest[p + close + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Parses a pipeline file's text (after expansion).
///
/// # Errors
/// Bad YAML, unknown keys, wrong types: with the line.
pub fn parse(file: &str, text: &str) -> Result<PipelineConfig, ConfigError> {
    parse_with(file, text, |k| std::env::var(k).ok())
}

/// [`parse`] with variables looked up by `lookup` instead of the environment.
///
/// # Errors
/// As [`parse`].
pub fn parse_with(
    file: &str,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, ConfigError> {
    let expanded = expand_env(text, lookup).map_err(|(line, message)| ConfigError {
        file: file.into(),
        line: Some(line),
        message,
    })?;
    serde_yaml::from_str::<PipelineConfig>(&expanded).map_err(|e| {
        let line = e.location().map(|l| l.line());
        // serde_yaml appends " at line L column C"; the line goes in front instead.
        let mut message = e.to_string();
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        ConfigError { file: file.into(), line, message }
    })
}

/// Finds the line of the step with id `step` (`id: step`), for errors found after parsing.
pub fn step_line(text: &str, step: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ").trim_start_matches('{').trim();
            let t = t.strip_prefix("id:").map(str::trim).unwrap_or_default();
            let t = t.split([',', '}', '#']).next().unwrap_or_default().trim().trim_matches(['"', '\'']);
            t == step
        })
        .map(|i| i + 1)
        .or_else(|| text.lines().position(|l| l.contains(&format!("id: {step}"))).map(|i| i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_and_defaults() {
        let env = |k: &str| (k == "IN").then(|| "/data/in.jsonl".to_string());
        assert_eq!(
            expand_env("path: ${IN}\nx: ${OUT:-out.jsonl}\n", env).unwrap(),
            "path: /data/in.jsonl\nx: out.jsonl\n"
        );
        assert_eq!(expand_env("a: $${IN}", env).unwrap(), "a: ${IN}");
        let (line, msg) = expand_env("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("`NOPE` is not set"));
    }

    #[test]
    fn finds_step_lines() {
        let t = "steps:\n  - filter:\n      id: hot\n  - select: {id: cols, columns: [a]}\n";
        assert_eq!(step_line(t, "hot"), Some(3));
        assert_eq!(step_line(t, "cols"), Some(4));
        assert_eq!(step_line(t, "nope"), None);
    }
}
