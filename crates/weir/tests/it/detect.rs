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

/// The model's formula (scripts/make_onnx_model.py).
fn model_score(x: [f64; 4]) -> f64 {
    let (mean, std, w) = ([23.35, 45.0, 1013.0, 0.02], [1.6, 5.0, 2.0, 0.005], [1.0, 0.25, 0.25, 0.05]);
    let d2: f64 = (0..4).map(|i| w[i] * ((x[i] - mean[i]) / std[i]).powi(2)).sum();
    1.0 / (1.0 + (-(d2.sqrt() - 4.0)).exp())
}

fn model_pipeline(
    dir: &std::path::Path,
    rows: &[(&str, [f64; 4])],
    emit: &str,
    inputs: &str,
) -> weir::Result<BuiltPipeline> {
    let input = dir.join("in.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (d, [t, h, p, v]))| {
            format!(
                r#"{{"device_id":"{d}","ts":{},"readings":{{"temp":{t},"humidity":{h},"pressure":{p},"vibration":{v}}}}}"#,
                1_700_000_000_000i64 + i as i64
            )
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model = crate::common::repo().join("models/sensor_anomaly.onnx");
    let yaml = format!(
        r#"
name: model
source: {{ id: in, file: {{ path: "{}", format: json }}, event_time: {{ column: ts, format: ms }} }}
steps:
  - key_by: {{ id: k, keys: [device_id] }}
  - detect:
      id: d
      emit: {emit}
      rules:
        - name: m
          severity: critical
          model: {{ path: "{}", inputs: [{inputs}], threshold: 0.9, max_batch: 2, value: readings.temp }}
sink: {{ id: out, file: {{ path: "{}", format: json }} }}
dead_letters: {{ path: "{}" }}
"#,
        input.display(),
        model.display(),
        dir.join("out.jsonl").display(),
        dir.join("dl.jsonl").display()
    );
    Pipeline::from_config(weir::yaml::parse("m.yaml", &yaml).unwrap()).build()
}

const FOUR: &str = "readings.temp, readings.humidity, readings.pressure, readings.vibration";

#[tokio::test]
async fn the_model_rule_scores_rows_with_the_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        ("dev-1", [23.35, 45.0, 1013.0, 0.02]),
        ("dev-2", [26.55, 50.0, 1015.0, 0.025]),
        ("dev-1", [38.35, 45.0, 1013.0, 0.4]),
        ("dev-2", [22.0, 44.0, 1012.0, 0.021]),
        ("dev-3", [24.0, 47.0, 1013.5, 0.6]),
    ];
    let built = model_pipeline(dir.path(), &rows, "all", FOUR).unwrap();
    built.run(&RunOptions { workers: Some(1), fresh: true }).await.unwrap();
    let mut out = read_jsonl(&dir.path().join("out.jsonl"));
    out.sort_by_key(|r| r["event_time"].as_i64().unwrap());
    assert_eq!(out.len(), rows.len());
    for (r, (dev, x)) in out.iter().zip(&rows) {
        assert_eq!(r["device_id"], *dev);
        assert_eq!(r["rule"], "m");
        assert_eq!(r["value"].as_f64().unwrap(), x[0]);
        let want = model_score(*x);
        assert!((r["score"].as_f64().unwrap() - want).abs() < 1e-5, "{r} vs {want}");
        assert_eq!(r["anomaly"], want > 0.9, "{r}");
    }
    assert_eq!(out.iter().filter(|r| r["anomaly"] == true).count(), 2);
}

#[test]
fn a_model_rule_with_the_wrong_inputs_is_refused_when_planned() {
    let dir = tempfile::tempdir().unwrap();
    let err = model_pipeline(dir.path(), &[("d", [0.0; 4])], "anomalies", "readings.temp, readings.humidity")
        .unwrap_err()
        .to_string();
    assert!(err.contains("detect rule `m`") && err.contains("takes 4 features per row, but [N, 2] was given"), "{err}");
}
