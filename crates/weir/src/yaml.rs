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

/// Makes the relative paths of a pipeline file relative to `base`, the file's folder, so a
/// pipeline finds its model, input and outputs wherever it is run from. A path written in the
/// file counts, and so does a `${VAR:-default}`'s default and a default of the code (the
/// dead-letter file); a path that an environment variable gave (`OUTPUT=out.jsonl weir run
/// dir/p.yaml`) stays relative to the working directory, where the person who typed it is.
/// URLs (`s3://...`), absolute paths and `-` are left alone.
///
/// `text` is the file before expansion and `lookup` the variables it was expanded with.
pub fn resolve_paths(
    cfg: &mut PipelineConfig,
    text: &str,
    base: &std::path::Path,
    lookup: impl Fn(&str) -> Option<String>,
) {
    // The raw file says where each value came from; if it does not parse as plain YAML (it
    // did once expanded), paths are left as they are.
    let Ok(raw) = serde_yaml::from_str::<serde_yaml::Value>(text) else { return };
    let from_env = |raw: &serde_yaml::Value| -> bool {
        let Some(s) = raw.as_str().and_then(|s| s.strip_prefix("${")) else { return false };
        let name = s.split([':', '}']).next().unwrap_or_default();
        lookup(name).is_some_and(|v| !v.is_empty())
    };
    let fix = |path: &mut String, raw: &serde_yaml::Value| {
        let p = std::path::Path::new(path.as_str());
        if path.is_empty() || path == "-" || path.contains("://") || p.is_absolute() || from_env(raw) {
            return;
        }
        *path = base.join(p).to_string_lossy().into_owned();
    };
    let at = |keys: &[&str]| keys.iter().fold(&raw, |v, k| &v[*k]);
    for (i, src) in cfg.sources.iter_mut().enumerate() {
        if let crate::config::SourceConnector::File(f) = &mut src.connector {
            let raw_src = if raw["sources"].is_sequence() { &raw["sources"][i] } else { &raw["source"] };
            fix(&mut f.path, &raw_src["file"]["path"]);
        }
    }
    let raw_sink = if raw["sinks"].is_null() { &raw["sink"] } else { &raw["sinks"] };
    match &mut cfg.sink.connector {
        crate::config::SinkConnector::File(f) => fix(&mut f.path, &raw_sink["file"]["path"]),
        crate::config::SinkConnector::FanOut(parts) => {
            for (i, part) in parts.0.iter_mut().enumerate() {
                if let crate::config::SinkConnector::File(f) = &mut part.connector {
                    fix(&mut f.path, &raw_sink[i]["file"]["path"]);
                }
            }
        }
        _ => {}
    }
    fix(&mut cfg.dead_letters.path, at(&["dead_letters", "path"]));
    fix(&mut cfg.quarantine.output, at(&["quarantine", "output"]));
    if let Some(c) = cfg.checkpoints.as_mut() {
        fix(&mut c.dir, at(&["checkpoints", "dir"]));
    }
    for (i, step) in cfg.steps.iter_mut().enumerate() {
        let raw_step = &raw["steps"][i];
        match step {
            crate::config::StepConfig::Detect(d) => {
                for (j, rule) in d.rules.iter_mut().enumerate() {
                    if let Some(m) = rule.model.as_mut() {
                        fix(&mut m.path, &raw_step["detect"]["rules"][j]["model"]["path"]);
                    }
                }
            }
            crate::config::StepConfig::Window(w) => {
                if let crate::config::LateConfig::SideOutput(path) = &mut w.late {
                    fix(path, &raw_step["window"]["late"]["side_output"]);
                }
            }
            crate::config::StepConfig::Alert(a) => {
                for (j, route) in a.routes.iter_mut().enumerate() {
                    if let Some(f) = route.file.as_mut() {
                        fix(&mut f.path, &raw_step["alert"]["routes"][j]["file"]["path"]);
                    }
                }
            }
            _ => {}
        }
    }
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

/// The pipeline-file fuzz target (`fuzz/`): any text is loaded as `weir run` loads it, and a
/// file that loads must survive writing back out, reading again, and `build()`.
///
/// # Panics
/// When that breaks (what the fuzzer looks for).
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lookup = |k: &str| (k == "SET").then(|| "value".to_string());
    let Ok(mut cfg) = parse_with("fuzz.yaml", text, lookup) else { return };
    resolve_paths(&mut cfg, text, std::path::Path::new("/pipes"), lookup);
    let again = serde_yaml::to_string(&cfg).expect("a loaded config writes back");
    let back: PipelineConfig = serde_yaml::from_str(&again).expect("what was written reads again");
    // Compared as text: a NaN threshold is a fine config that is not equal to itself.
    assert_eq!(serde_yaml::to_string(&back).ok(), Some(again), "a config survives writing and reading");
    let _ = crate::Pipeline::from_config(cfg).build();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SinkConnector, SourceConnector};

    /// Replays the inputs kept under `fuzz-regressions/pipeline_yaml/`.
    #[test]
    fn pipeline_files_fuzzing_found_stay_fixed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions/pipeline_yaml");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            assert!(std::panic::catch_unwind(|| fuzz(&data)).is_ok(), "{} panics again", path.display());
            seen += 1;
        }
        assert!(seen >= 1);
    }

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
    fn relative_paths_follow_the_file_unless_the_environment_gave_them() {
        let text = r#"
name: p
source: { id: in, file: { path: "data/in.jsonl" } }
steps:
  - detect: { id: d, rules: [ { name: m, model: { path: "${MODEL:-../models/m.onnx}", inputs: [a] } } ] }
sink: { id: out, file: { path: "${OUTPUT}" } }
dead_letters: { path: "${DEAD:-dead.jsonl}" }
checkpoints: { dir: "s3://bucket/ck" }
"#;
        let env = |k: &str| (k == "OUTPUT").then(|| "out.jsonl".to_string());
        let mut cfg = parse_with("p.yaml", text, env).unwrap();
        resolve_paths(&mut cfg, text, std::path::Path::new("/srv/pipes"), env);
        let (SourceConnector::File(i), SinkConnector::File(o)) = (&cfg.source().connector, &cfg.sink.connector) else {
            panic!("file in, file out")
        };
        assert_eq!(i.path, "/srv/pipes/data/in.jsonl");
        assert_eq!(o.path, "out.jsonl", "given by the environment");
        assert_eq!(cfg.dead_letters.path, "/srv/pipes/dead.jsonl", "the file's default");
        assert_eq!(cfg.quarantine.output, "/srv/pipes/quarantine.jsonl", "the code's default");
        assert_eq!(cfg.checkpoints.as_ref().unwrap().dir, "s3://bucket/ck");
        let crate::config::StepConfig::Detect(d) = &cfg.steps[0] else { panic!() };
        assert_eq!(d.rules[0].model.as_ref().unwrap().path, "/srv/pipes/../models/m.onnx");
    }

    #[test]
    fn finds_step_lines() {
        let t = "steps:\n  - filter:\n      id: hot\n  - select: {id: cols, columns: [a]}\n";
        assert_eq!(step_line(t, "hot"), Some(3));
        assert_eq!(step_line(t, "cols"), Some(4));
        assert_eq!(step_line(t, "nope"), None);
    }
}
