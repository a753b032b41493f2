//! Bad input: dead letters with reasons, accounting, and clear errors.

use weir::prelude::*;

use crate::common::*;

#[test]
fn malformed_lines_go_to_dead_letters_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let input = data("sensors-malformed.jsonl");
    let p = example("w2-filter-project.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(p.run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();

    // The good lines give exactly the reference result.
    assert_same_rows(read_jsonl(&data("w2-malformed-expected.jsonl")), read_jsonl(&out), "w2 on malformed input");

    // Every bad line is in the dead-letter file, with a kind and a position.
    let letters = read_jsonl(&dead);
    let lines = std::fs::read(&input).unwrap();
    let total = lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    let source = &summary.steps[0].1;
    assert_eq!(source.rows_in as usize, total);
    assert_eq!(source.dead_lettered as usize, letters.len());
    assert!(letters.len() >= 50, "the fixture has about 5% bad lines, got {}", letters.len());
    for l in &letters {
        let kind = l["kind"].as_str().unwrap();
        assert!(["decode", "schema"].contains(&kind), "{l}");
        assert!(l["position"].as_str().unwrap().contains("offset"), "{l}");
        assert!(!l["reason"].as_str().unwrap().is_empty());
        assert_eq!(l["step"], "events");
    }
    let kinds: std::collections::HashSet<_> = letters.iter().map(|l| l["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.len(), 2, "both decode and schema errors occur in the fixture: {kinds:?}");
    assert!(
        letters.iter().any(|l| l["kind"] == "decode" && l["payload"].as_str().unwrap().contains("not json at all")),
        "garbage lines are kept with their payload"
    );
    assert!(
        letters.iter().any(|l| l["reason"].as_str().unwrap().contains("readings.temp")),
        "a missing field is named"
    );
    // rows in = out + filtered + dead-lettered, per step.
    for (id, m) in &summary.steps {
        assert!(m.balanced(), "step {id}: {m:?}");
    }
    assert_eq!(source.rows_out + source.dead_lettered, source.rows_in);
}

#[test]
fn line_numbers_are_reported_with_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let input = data("sensors-malformed.jsonl");
    let p = example("w2-filter-project.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)]);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(p.run(&RunOptions { workers: Some(1), ..Default::default() }))
        .unwrap();
    let text = std::fs::read(&input).unwrap();
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    for l in read_jsonl(&dead) {
        let pos = l["position"].as_str().unwrap();
        let n: usize = pos.strip_prefix("line ").unwrap().split(',').next().unwrap().parse().unwrap();
        let raw = lines[n - 1];
        if l["payload_encoding"] == "utf8" {
            assert_eq!(l["payload"].as_str().unwrap().as_bytes(), raw, "line {n}");
        }
    }
}

#[test]
fn a_missing_input_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let p = example(
        "w2-filter-project.yaml",
        &[("INPUT", &missing), ("OUTPUT", &dir.path().join("o")), ("DEAD_LETTERS", &dir.path().join("d"))],
    );
    let err = p.plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("step `events`: cannot open input file") && err.contains("nope.jsonl"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_the_line() {
    let text = "name: x\nsource:\n  id: in\n  stdin: {}\nsteps:\n  - filter:\n      id: f\n      wher: \"a > 1\"\nsink:\n  id: out\n  stdout: {}\n";
    let e = weir::yaml::parse_with("p.yaml", text, |_| None).unwrap_err();
    assert_eq!(e.line, Some(8), "{e}");
    assert!(e.message.contains("unknown field `wher`"), "{e}");
    let text = "name: x\nsource:\n  id: in\n  stdin: {}\n  batch_size: lots\nsink:\n  id: out\n  stdout: {}\n";
    let e = weir::yaml::parse_with("p.yaml", text, |_| None).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    let text = "name: x\nsource:\n  id: in\n  stdin: {}\nsteps:\n  - windw: {id: w}\nsink:\n  id: out\n  stdout: {}\n";
    let e = weir::yaml::parse_with("p.yaml", text, |_| None).unwrap_err();
    assert!(e.message.contains("unknown field `windw`"), "{e}");
    assert_eq!(e.line, Some(6), "{e}");
}

#[test]
fn bad_references_are_caught_by_build_with_a_declared_schema() {
    let text = "name: x\nsource:\n  id: in\n  stdin: {}\n  schema:\n    fields: [{name: a, type: int64}]\nsteps:\n  - filter: {id: f, where: \"b > 1\"}\nsink:\n  id: out\n  stdout: {}\n";
    let cfg = weir::yaml::parse_with("p.yaml", text, |_| None).unwrap();
    let e = Pipeline::from_config(cfg).build().unwrap_err().to_string();
    assert!(e.starts_with("step `f`:") && e.contains('b'), "{e}");
    assert_eq!(weir::yaml::step_line(text, "f"), Some(8));
}

#[test]
fn duplicate_step_ids_are_rejected() {
    let mut p = Pipeline::new("dup");
    p.source(SourceConfig::new("a", SourceConnector::Generator(GeneratorSettings::default())))
        .filter("a", "true")
        .sink(SinkConfig::new("out", SinkConnector::Stdout(StdoutSettings { format: FormatSpec::Json })));
    assert!(p.build().unwrap_err().to_string().contains("step id `a` is used twice"));
}

/// What kind of dead letter each input line must give: `None` for a good line.
fn expected_kind(line: &[u8]) -> Option<&'static str> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { return Some("decode") };
    if !v["ts"].is_i64() || !v["readings"]["temp"].is_f64() || !v["device_id"].is_string() {
        return Some("schema");
    }
    if v["ts"].as_i64().unwrap() > 2_000_000_000_000 {
        return Some("clock");
    }
    None
}

/// `gen_sensors.py --malformed` through W1 and W3: no crash, every bad line dead-lettered with
/// the right kind (2038 timestamps as `clock`, before they can move a watermark), and the good
/// lines' results exactly those of the reference on the good lines alone.
#[test]
fn malformed_input_through_w1_and_w3() {
    let input = data("sensors-3k-malformed.jsonl");
    let text = std::fs::read(&input).unwrap();
    let mut want: std::collections::BTreeMap<usize, &str> = std::collections::BTreeMap::new();
    let mut offset = 0;
    for line in text.split(|b| *b == b'\n') {
        if !line.is_empty() {
            if let Some(k) = expected_kind(line) {
                want.insert(offset, k);
            }
        }
        offset += line.len() + 1;
    }
    assert!(
        want.values().any(|k| *k == "clock")
            && want.values().any(|k| *k == "decode")
            && want.values().any(|k| *k == "schema")
    );
    for (example_file, expected) in [
        ("w1-sensor-window.yaml", "w1-malformed-expected.jsonl"),
        ("w3-ewma-anomaly.yaml", "w3-malformed-expected.jsonl"),
    ] {
        for workers in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
            let mut cfg =
                example(example_file, &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)]).config().clone();
            cfg.file_source().chunk_size = 16 * 1024;
            let p = Pipeline::from_config(cfg).build().unwrap();
            let summary = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(p.run(&RunOptions { workers: Some(workers), ..Default::default() }))
                .unwrap();
            let what = format!("{example_file}, {workers} workers");
            assert_same_rows(read_jsonl(&data(expected)), read_jsonl(&out), &what);
            let got: std::collections::BTreeMap<usize, String> = read_jsonl(&dead)
                .iter()
                .map(|l| {
                    let pos = l["position"].as_str().unwrap();
                    let off: usize = pos.rsplit("offset ").next().unwrap().parse().unwrap();
                    (off, l["kind"].as_str().unwrap().to_string())
                })
                .collect();
            let want_s: std::collections::BTreeMap<usize, String> =
                want.iter().map(|(o, k)| (*o, k.to_string())).collect();
            assert_eq!(got, want_s, "{what}: dead letters by offset and kind");
            for (id, m) in &summary.steps {
                assert!(m.balanced(), "{what}: step {id}: {m:?}");
            }
            assert_eq!(summary.steps[0].1.late_dropped, 0);
            let late: u64 = summary.steps.iter().map(|(_, m)| m.late_dropped).sum();
            assert_eq!(late, 0, "{what}: a 2038 row must not make other rows late");
        }
    }
}

mod accounting {
    use proptest::prelude::*;
    use weir::prelude::*;

    use crate::common::*;

    /// One input line and whether it is good.
    fn line() -> impl Strategy<Value = (String, bool)> {
        let good = (0u8..5, 0i64..60_000, -10.0f64..40.0).prop_map(|(d, t, x)| {
            (
                format!("{{\"device_id\":\"d{d}\",\"ts\":{},\"readings\":{{\"temp\":{x}}}}}", 1_700_000_000_000i64 + t),
                true,
            )
        });
        let bad = prop_oneof![
            Just(("{\"device_id\":\"d1\",\"ts\":17".to_string(), false)),
            Just(("{\"device_id\":\"d1\",\"ts\":\"soon\",\"readings\":{\"temp\":1.0}}".to_string(), false)),
            Just(("{\"device_id\":\"d1\",\"ts\":1700000000000,\"readings\":{}}".to_string(), false)),
            Just(("\u{0}\u{ff} garbage".to_string(), false)),
            Just(("{\"device_id\":\"d2\",\"ts\":2147483647000,\"readings\":{\"temp\":1.0}}".to_string(), false)),
        ];
        prop_oneof![4 => good, 1 => bad]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        /// Every row is accounted for at every step, whatever the mix of good and bad lines.
        #[test]
        fn every_row_is_accounted_for(lines in prop::collection::vec(line(), 1..300), workers in 1usize..3) {
            let dir = tempfile::tempdir().unwrap();
            let input = dir.path().join("in.jsonl");
            let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
            std::fs::write(&input, text).unwrap();
            let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
            let mut cfg = example("w1-sensor-window.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)]).config().clone();
            cfg.file_source().chunk_size = 4096;
            // Vibration is optional here so the generated lines need not carry it.
            cfg.source_mut().schema.as_mut().unwrap().fields[2].fields[1].required = false;
            cfg.steps.insert(0, StepConfig::Filter(FilterConfig { id: "warm".into(), predicate: "readings.temp > 0".into(), input: None }));
            let summary = tokio::runtime::Runtime::new().unwrap().block_on(Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(workers), ..Default::default() })).unwrap();
            let bad = lines.iter().filter(|(_, ok)| !ok).count() as u64;
            let source = summary.steps[0].1;
            prop_assert_eq!(source.rows_in, lines.len() as u64);
            prop_assert_eq!(source.dead_lettered, bad);
            for (id, m) in &summary.steps {
                prop_assert!(m.balanced(), "step {}: {:?}", id, m);
            }
            // What each step passes on is what the next one receives.
            for pair in summary.steps.windows(2) {
                let (a, b) = (&pair[0].1, &pair[1].1);
                prop_assert_eq!(a.rows_out + a.results_out, b.rows_in, "{} -> {}", pair[0].0, pair[1].0);
            }
            let written = if bad > 0 { read_jsonl(&dead).len() as u64 } else { 0 };
            prop_assert_eq!(written, bad);
        }
    }
}

/// A device that keeps failing is quarantined: its later rows go to the quarantine output,
/// nobody else is affected, and the counts add up.
#[test]
fn a_key_that_keeps_failing_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = String::new();
    let (mut broken_good, mut others) = (0, 0);
    for i in 0..400 {
        let ts = 1_700_000_000_000i64 + i * 10;
        if i % 4 == 0 {
            // The broken device sends bad timestamps half the time.
            if i % 8 == 0 {
                text.push_str("{\"device_id\":\"broken\",\"ts\":\"never\",\"readings\":{\"temp\":1.0}}\n");
            } else {
                broken_good += 1;
                text.push_str(&format!("{{\"device_id\":\"broken\",\"ts\":{ts},\"readings\":{{\"temp\":1.0}}}}\n"));
            }
        } else {
            others += 1;
            text.push_str(&format!("{{\"device_id\":\"ok-{}\",\"ts\":{ts},\"readings\":{{\"temp\":1.0}}}}\n", i % 3));
        }
    }
    std::fs::write(&input, text).unwrap();
    let (out, dead, quar) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"), dir.path().join("q.jsonl"));
    let mut cfg = example("w2-filter-project.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)])
        .config()
        .clone();
    cfg.steps.clear();
    cfg.source_mut().batch_size = 16;
    cfg.quarantine = QuarantineConfig {
        keys: Some(vec!["device_id".into()]),
        max_dead_letters: 3,
        within: std::time::Duration::from_secs(3600),
        cool_down: std::time::Duration::from_secs(3600),
        output: quar.display().to_string(),
        ..QuarantineConfig::default()
    };
    let summary = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
        )
        .unwrap();
    let rows = read_jsonl(&out);
    let diverted = read_jsonl(&quar);
    assert!(!diverted.is_empty(), "the broken device must be quarantined");
    assert!(diverted
        .iter()
        .all(|l| l["kind"] == "quarantined" && l["payload"].as_str().unwrap().contains("\"broken\"")));
    let broken_out = rows.iter().filter(|r| r["device_id"] == "broken").count();
    assert_eq!(
        broken_out + diverted.len(),
        broken_good,
        "every good row of the broken device is in the output or the quarantine"
    );
    assert_eq!(rows.len() - broken_out, others, "other devices are untouched");
    // After quarantine, the broken device's bad rows still reach the dead letters, but it
    // stays quarantined for the whole run (the cool-down is an hour).
    let source = summary.steps[0].1;
    assert_eq!(source.quarantined as usize, diverted.len());
    assert_eq!(source.dead_lettered as usize, read_jsonl(&dead).len());
    assert!(source.balanced(), "{source:?}");
}

/// Opt-in load shedding: while the job lags, the rows the predicate picks are dropped, and
/// every one of them is counted.
#[test]
fn load_shedding_drops_only_picked_rows_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let input = data("sensors-3k.jsonl");
    let mut cfg = example("w2-filter-project.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)])
        .config()
        .clone();
    cfg.steps.clear();
    cfg.source_mut().batch_size = 100;
    // The fixture's events are from 2023: the lag is years, so the job counts as overloaded.
    cfg.load_shedding = Some(LoadSheddingConfig {
        drop_where: "readings.temp < 25.0".into(),
        max_lag: Some(std::time::Duration::from_secs(1)),
        max_queue_fill: None,
        sustained: std::time::Duration::ZERO,
        pause: None,
    });
    let summary = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
        )
        .unwrap();
    let rows = read_jsonl(&out);
    let hot = read_jsonl(&input).iter().filter(|r| r["readings"]["temp"].as_f64().unwrap() >= 25.0).count();
    let kept_hot = rows.iter().filter(|r| r["readings"]["temp"].as_f64().unwrap() >= 25.0).count();
    assert_eq!(kept_hot, hot, "rows the predicate does not pick are never shed");
    let source = summary.steps[0].1;
    assert!(source.shed > 2000, "{source:?}");
    assert_eq!(source.shed as usize + rows.len(), 3000);
    assert!(source.balanced(), "{source:?}");
}

/// A quarantined key raises an alert event (rule `quarantine`) through the pipeline's alert
/// routes, so someone hears of the broken device without reading logs.
#[test]
fn a_quarantined_key_raises_an_alert_through_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = String::new();
    for i in 0..200i64 {
        let ts = 1_700_000_000_000 + i * 10;
        if i % 4 == 0 {
            text.push_str("{\"device_id\":\"broken\",\"ts\":\"never\",\"readings\":{\"temp\":1.0}}\n");
        } else {
            text.push_str(&format!("{{\"device_id\":\"ok-{}\",\"ts\":{ts},\"readings\":{{\"temp\":1.0}}}}\n", i % 3));
        }
    }
    std::fs::write(&input, text).unwrap();
    let events = dir.path().join("events.jsonl");
    let yaml = format!(
        r#"
name: quarantine-alerts
source:
  id: in
  file: {{ path: "{input}" }}
  schema:
    fields:
      - {{ name: device_id, type: string }}
      - {{ name: ts, type: int64 }}
      - {{ name: readings, type: struct, fields: [ {{ name: temp, type: float64 }} ] }}
  event_time: {{ column: ts, format: ms }}
  batch_size: 16
steps:
  - key_by: {{ id: by-device, keys: [device_id] }}
  - detect: {{ id: rules, rules: [ {{ name: hot, threshold: {{ value: readings.temp, above: 1000.0 }} }} ] }}
  - alert:
      id: alerts
      routes:
        - {{ name: log, file: {{ path: "{events}" }} }}
sink: {{ id: out, file: {{ path: "{out}" }} }}
dead_letters: {{ path: "{dead}" }}
quarantine: {{ max_dead_letters: 3, within: 1h, cool_down: 1h, output: "{quar}" }}
"#,
        input = input.display(),
        events = events.display(),
        out = dir.path().join("out.jsonl").display(),
        dead = dir.path().join("dead.jsonl").display(),
        quar = dir.path().join("q.jsonl").display(),
    );
    let cfg = weir::yaml::parse("q.yaml", &yaml).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
        )
        .unwrap();
    let got = read_jsonl(&events);
    let q: Vec<_> = got.iter().filter(|e| e["rule"] == "quarantine").collect();
    assert_eq!(q.len(), 1, "{got:?}");
    assert_eq!((q[0]["event"].as_str(), q[0]["key"].as_str()), (Some("fired"), Some("broken")), "{}", q[0]);
    assert_eq!(q[0]["alert_id"], "quarantine/broken");
}
