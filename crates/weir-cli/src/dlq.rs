//! `weir dlq stats`: what is in a dead-letter file, by kind, step and key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead as _;

use serde_json::Value;

/// Counts of dead letters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) total: u64,
    pub(crate) unreadable: u64,
    pub(crate) by_kind: BTreeMap<String, u64>,
    pub(crate) by_step: BTreeMap<String, u64>,
    pub(crate) by_key: BTreeMap<String, u64>,
    pub(crate) first: Option<String>,
    pub(crate) last: Option<String>,
}

/// Reads a dead-letter file. `key` is a dotted path looked up in each payload that is JSON
/// (payloads that do not parse count under `(unparseable)`).
pub(crate) fn stats(path: &std::path::Path, key: Option<&str>) -> std::io::Result<Stats> {
    let f = std::fs::File::open(path)?;
    let mut s = Stats::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        s.total += 1;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            s.unreadable += 1;
            continue;
        };
        let text = |k: &str| v[k].as_str().unwrap_or("?").to_string();
        *s.by_kind.entry(text("kind")).or_default() += 1;
        *s.by_step.entry(text("step")).or_default() += 1;
        if let Some(t) = v["time"].as_str() {
            if s.first.as_deref().is_none_or(|f| t < f) {
                s.first = Some(t.to_string());
            }
            if s.last.as_deref().is_none_or(|l| t > l) {
                s.last = Some(t.to_string());
            }
        }
        if let Some(k) = key {
            let payload = v["payload"].as_str().and_then(|p| serde_json::from_str::<Value>(p).ok());
            let found = payload.as_ref().map(|p| k.split('.').fold(p, |acc, part| &acc[part]));
            let name = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) => "(missing)".to_string(),
                Some(other) => other.to_string(),
                None => "(unparseable)".to_string(),
            };
            *s.by_key.entry(name).or_default() += 1;
        }
    }
    Ok(s)
}

/// Renders the counts, largest first, at most `top` keys.
pub(crate) fn render(s: &Stats, top: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} dead letters", s.total);
    if let (Some(f), Some(l)) = (&s.first, &s.last) {
        let _ = writeln!(out, "from {f} to {l}");
    }
    if s.unreadable > 0 {
        let _ = writeln!(out, "{} lines are not dead-letter entries", s.unreadable);
    }
    for (title, map) in [("kind", &s.by_kind), ("step", &s.by_step), ("key", &s.by_key)] {
        if map.is_empty() {
            continue;
        }
        let mut rows: Vec<_> = map.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(out, "\nby {title}:");
        for (name, n) in rows.iter().take(top) {
            let _ = writeln!(out, "  {n:>10}  {name}");
        }
        if rows.len() > top {
            let _ = writeln!(out, "  ... {} more", rows.len() - top);
        }
    }
    out
}

/// Dead letters chosen for replay: their raw payloads, ready to be read as records again.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// The payloads, one record per line.
    pub(crate) records: Vec<u8>,
    /// Entries taken.
    pub(crate) taken: u64,
    /// Entries skipped: other kinds or steps, rows that failed after decoding (their payload
    /// is a rendered row, not a record of the source), payloads holding a line break.
    pub(crate) skipped: u64,
}

/// Reads the entries of `path` whose kind is in `kinds` (all when empty).
pub(crate) fn replay_records(path: &std::path::Path, kinds: &[String]) -> std::io::Result<Replay> {
    use base64::Engine as _;
    let f = std::fs::File::open(path)?;
    let mut r = Replay::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            r.skipped += 1;
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or_default();
        if !kinds.is_empty() && !kinds.iter().any(|k| k == kind) {
            r.skipped += 1;
            continue;
        }
        let payload = v["payload"].as_str().unwrap_or_default();
        let bytes = match v["payload_encoding"].as_str() {
            Some("utf8") => payload.as_bytes().to_vec(),
            Some("base64") => match base64::engine::general_purpose::STANDARD.decode(payload) {
                Ok(b) => b,
                Err(_) => {
                    r.skipped += 1;
                    continue;
                }
            },
            _ => {
                r.skipped += 1;
                continue;
            }
        };
        if bytes.contains(&b'\n') {
            r.skipped += 1;
            continue;
        }
        r.records.extend_from_slice(&bytes);
        r.records.push(b'\n');
        r.taken += 1;
    }
    Ok(r)
}
