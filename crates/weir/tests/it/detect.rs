//! The `detect` step in a whole pipeline.

use std::collections::BTreeMap;

use weir::prelude::*;

use crate::common::{example, read_jsonl};

#[tokio::test]
async fn the_detect_example_flags_the_injected_anomalies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.jsonl");
    let dl = dir.path().join("dl.jsonl");
    let built =
        example("detect.yaml", &[("OUTPUT", &out), ("DEAD_LETTERS", &dl), ("COUNT", std::path::Path::new("50000"))]);
    let summary = built.run(&RunOptions { workers: Some(2), fresh: true }).await.unwrap();
    assert_eq!(summary.source_records, 50_000);
    let rows = read_jsonl(&out);
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        let cols: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(cols, ["anomaly", "device_id", "event_time", "rule", "score", "severity", "value"]);
        assert_eq!(r["anomaly"], true);
        *by_rule.entry(r["rule"].as_str().unwrap().to_string()).or_default() += 1;
    }
    // About 50 injected anomalies (temp + 15, vibration x 20): each value rule sees most of them.
    for rule in ["temp-high", "vibration-mad", "temp-ewma"] {
        let n = by_rule.get(rule).copied().unwrap_or(0);
        assert!((30..=120).contains(&n), "{rule}: {n} detections ({by_rule:?})");
    }
    assert!(!by_rule.contains_key("dead-man"), "the run is shorter than the silence timeout");
    let critical = rows.iter().filter(|r| r["severity"] == "critical").count();
    assert_eq!(critical, by_rule["temp-high"]);
}

#[test]
fn a_rule_needs_exactly_one_kind() {
    let yaml = r#"
name: bad
source: { id: s, generator: { count: 1 } }
steps:
  - key_by: { id: k, keys: [device_id] }
  - detect:
      id: d
      rules:
        - { name: r, threshold: { value: readings.temp, above: 1 }, silence: { timeout: 1s } }
sink: { id: out, stdout: { format: json } }
"#;
    let cfg = weir::yaml::parse("p.yaml", yaml).unwrap();
    let err = Pipeline::from_config(cfg).build().unwrap_err().to_string();
    assert!(err.contains("step `d`: detect rule `r` needs exactly one of"), "{err}");
}
