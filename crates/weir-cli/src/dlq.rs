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

/// Dead letters chosen for replay.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// The raw payloads of records that failed before decoding (kinds `decode`, `schema`,
    /// `event_time`, `clock`), one record per line: they go through the whole pipeline again.
    pub(crate) records: Vec<u8>,
    /// Rows that failed after decoding (kinds `sink`, `function`, `expression`,
    /// `quarantined`), as JSON objects, by the step that failed them: they go back in at that
    /// step (the source's id for quarantined rows, the sink's for rows it refused).
    pub(crate) rows: BTreeMap<String, Vec<String>>,
    /// Entries taken.
    pub(crate) taken: u64,
    /// Entries skipped: other kinds, unreadable lines, payloads holding a line break.
    pub(crate) skipped: u64,
}

/// The dead-letter entries of a file, or of a Kafka topic (`kafka://host:port[,host:port]/topic`,
/// read from its start to its end as of now).
pub(crate) fn read_entries(from: &str) -> Result<Vec<String>, String> {
    #[cfg(not(feature = "kafka"))]
    if from.starts_with("kafka://") {
        return Err(format!("`{from}`: this build of weir leaves Kafka out (cargo feature `kafka`)"));
    }
    #[cfg(feature = "kafka")]
    if let Some(rest) = from.strip_prefix("kafka://") {
        let (brokers, topic) =
            rest.rsplit_once('/').ok_or_else(|| format!("`{from}`: expected kafka://host:port/topic"))?;
        let client =
            weir::connectors::kafka::KafkaClientConfig { brokers: brokers.into(), properties: Default::default() };
        let records = weir::connectors::kafka::read_topic(&client, topic, std::time::Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        return Ok(records.into_iter().map(|r| String::from_utf8_lossy(&r).into_owned()).collect());
    }
    let f = std::fs::File::open(from).map_err(|e| format!("cannot read dead-letter file `{from}`: {e}"))?;
    std::io::BufReader::new(f)
        .lines()
        .collect::<std::io::Result<Vec<String>>>()
        .map_err(|e| format!("cannot read dead-letter file `{from}`: {e}"))
}

/// Picks the entries whose kind is in `kinds` (all when empty) for replay.
pub(crate) fn replay_records(entries: &[String], kinds: &[String]) -> Replay {
    use base64::Engine as _;
    let mut r = Replay::default();
    for line in entries {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
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
            Some("json") if !payload.contains('\n') => {
                let step = v["step"].as_str().unwrap_or_default().to_string();
                r.rows.entry(step).or_default().push(payload.to_string());
                r.taken += 1;
                continue;
            }
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
    r
}
