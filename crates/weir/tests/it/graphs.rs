//! Pipelines as graphs: several sources, a union, branches with sinks of their own, and what
//! `build()` says about a graph that does not hold together.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use weir::prelude::*;

use crate::common::*;

const SENSOR: &str = r#"{ fields: [ { name: device_id, type: string }, { name: ts, type: int64 },
  { name: readings, type: struct, fields: [ { name: temp, type: float64 } ] } ] }"#;

/// Two file sources of the sensor schema, `a` and `b`, then `rest` (steps and sinks).
fn two_sources(rest: &str) -> String {
    let a = data("sensors-3k.jsonl");
    let b = data("sensors-3k-b.jsonl");
    format!(
        "name: g\nsources:\n  - {{ id: a, file: {{ path: \"{}\", format: json, chunk_size: 16384 }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\n  - {{ id: b, file: {{ path: \"{}\", format: json, chunk_size: 16384 }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\n{rest}",
        a.display(),
        b.display()
    )
}

fn build(text: &str) -> weir_core::Result<BuiltPipeline> {
    let cfg = weir::yaml::parse_with("g.yaml", text, |_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Pipeline::from_config(cfg).build()
}

fn run(text: &str, workers: usize) -> RunSummary {
    let p = build(text).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let s = rt.block_on(p.run(&RunOptions { workers: Some(workers), ..Default::default() })).unwrap();
    for (id, m) in &s.steps {
        assert!(m.balanced(), "step {id}: rows do not add up: {m:?}");
    }
    s
}

/// `(device_id, ts, temp)` of every row of JSON Lines files, as a multiset.
fn readings(files: &[&Path]) -> BTreeMap<(String, i64, String), usize> {
    let mut m = BTreeMap::new();
    for f in files {
        for v in read_jsonl(f) {
            let temp = v.pointer("/readings/temp").or_else(|| v.get("temp")).map(Value::to_string).unwrap();
            let key = (v["device_id"].as_str().unwrap().to_string(), v["ts"].as_i64().unwrap(), temp);
            *m.entry(key).or_default() += 1;
        }
    }
    m
}

/// A union of two sources is every row of both, once, at one and two workers.
#[test]
fn a_union_of_two_sources_has_every_row_of_both() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = two_sources(&format!(
            "steps:\n  - union: {{ id: both, inputs: [a, b] }}\nsink: {{ id: out, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
            out.display(),
            dir.path().join("dead.jsonl").display()
        ));
        let s = run(&text, workers);
        assert_eq!(s.source_records, 6000);
        assert_eq!(
            readings(&[&out]),
            readings(&[&data("sensors-3k.jsonl"), &data("sensors-3k-b.jsonl")]),
            "{workers} workers"
        );
    }
}

/// A window after a union sees both sources' rows and closes by the slower one's watermark:
/// its counts are those of the two inputs together, none dropped as late.
#[test]
fn a_window_after_a_union_counts_both_sources() {
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for f in ["sensors-3k.jsonl", "sensors-3k-b.jsonl"] {
        for v in read_jsonl(&data(f)) {
            let ts = v["ts"].as_i64().unwrap();
            *want.entry((v["device_id"].as_str().unwrap().to_string(), ts - ts % 10_000)).or_default() += 1;
        }
    }
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = two_sources(&format!(
            "steps:\n  - union: {{ id: both, inputs: [a, b] }}\n  - key_by: {{ id: dev, keys: [device_id] }}\n  - window: {{ id: w, tumbling: 10s, aggregates: {{ n: count() }} }}\nsink: {{ id: out, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
            out.display(),
            dir.path().join("dead.jsonl").display()
        ));
        let s = run(&text, workers);
        let w = &s.steps.iter().find(|(id, _)| id.as_str() == "w").unwrap().1;
        assert_eq!((w.rows_in, w.late_dropped), (6000, 0), "{w:?}");
        let got: BTreeMap<(String, i64), i64> = read_jsonl(&out)
            .iter()
            .map(|v| {
                (
                    (v["device_id"].as_str().unwrap().to_string(), v["window_start"].as_i64().unwrap()),
                    v["n"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "{workers} workers");
    }
}

/// One source feeding two branches, each with its own sink (`input`): every hot reading in
/// one file, every reading of the other source in another, at one and two workers.
#[test]
fn branches_write_to_sinks_of_their_own() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let (hot, all_b) = (dir.path().join("hot.jsonl"), dir.path().join("all-b.jsonl"));
        let text = two_sources(&format!(
            "steps:\n  - filter: {{ id: hot, input: a, where: \"readings.temp > 25\" }}\n  - select: {{ id: cols, input: b, columns: [device_id, ts, readings.temp AS temp] }}\nsinks:\n  - {{ id: hot-out, input: hot, file: {{ path: \"{}\", format: json }} }}\n  - {{ id: b-out, input: cols, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
            hot.display(),
            all_b.display(),
            dir.path().join("dead.jsonl").display()
        ));
        let s = run(&text, workers);
        let want_hot: BTreeMap<_, _> = readings(&[&data("sensors-3k.jsonl")])
            .into_iter()
            .filter(|((_, _, t), _)| t.parse::<f64>().unwrap() > 25.0)
            .collect();
        assert!(!want_hot.is_empty());
        assert_eq!(readings(&[&hot]), want_hot, "{workers} workers");
        assert_eq!(readings(&[&all_b]), readings(&[&data("sensors-3k-b.jsonl")]), "{workers} workers");
        let rows_of = |id: &str| s.steps.iter().find(|(i, _)| i.as_str() == id).unwrap().1.rows_out;
        assert_eq!(rows_of("b-out"), 3000);
        assert_eq!(s.sink_rows, 3000 + want_hot.values().sum::<usize>() as u64, "both sinks count as output");
    }
}

/// One step read by two steps: both get every row (the batch is shared, not copied).
#[test]
fn a_step_read_by_two_steps_feeds_both() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (dir.path().join("x.jsonl"), dir.path().join("y.jsonl"));
    let text = two_sources(&format!(
        "steps:\n  - union: {{ id: both, inputs: [a, b] }}\n  - filter: {{ id: cold, input: both, where: \"readings.temp < 20\" }}\n  - filter: {{ id: warm, input: both, where: \"readings.temp >= 20\" }}\nsinks:\n  - {{ id: x, input: cold, file: {{ path: \"{}\", format: json }} }}\n  - {{ id: y, input: warm, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
        x.display(),
        y.display(),
        dir.path().join("dead.jsonl").display()
    ));
    for workers in [1, 2] {
        run(&text, workers);
        assert_eq!(readings(&[&x, &y]), readings(&[&data("sensors-3k.jsonl"), &data("sensors-3k-b.jsonl")]));
    }
}

fn refused(text: &str) -> String {
    build(text).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("accepted:\n{text}"))
}

const OUT: &str = "sink: { id: out, stdout: {} }\n";

#[test]
fn an_input_that_names_nothing_is_refused_with_the_closest_name() {
    let e = refused(&two_sources(&format!(
        "steps:\n  - filter: {{ id: f, input: aa, where: \"ts > 0\" }}\n  - union: {{ id: u, inputs: [f, b] }}\n{OUT}"
    )));
    assert!(e.contains("step `f`") && e.contains("input `aa`") && e.contains("did you mean `a`"), "{e}");
    // A step can only read what comes before it, so a cycle cannot be written.
    let e = refused(&two_sources(&format!(
        "steps:\n  - filter: {{ id: f, input: g, where: \"ts > 0\" }}\n  - filter: {{ id: g, input: f, where: \"ts > 0\" }}\n  - union: {{ id: u, inputs: [g, b] }}\n{OUT}"
    )));
    assert!(e.contains("input `g` is not a source or a step before this one"), "{e}");
}

#[test]
fn a_source_or_step_nothing_reads_is_refused() {
    let e = refused(&two_sources(&format!("steps:\n  - filter: {{ id: f, input: a, where: \"ts > 0\" }}\n{OUT}")));
    assert!(e.contains("`b`") && e.contains("nothing reads"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - union: {{ id: u, inputs: [a, b] }}\n  - filter: {{ id: lost, input: a, where: \"ts > 0\" }}\n  - select: {{ id: s, input: u, columns: [ts] }}\n{OUT}"
    )));
    assert!(e.contains("`lost`") && e.contains("nothing reads"), "{e}");
}

#[test]
fn several_sources_need_steps_to_say_what_they_read() {
    let e = refused(&two_sources(&format!("steps:\n  - filter: {{ id: f, where: \"ts > 0\" }}\n{OUT}")));
    assert!(e.contains("`f` does not say what it reads") && e.contains("2 sources"), "{e}");
}

#[test]
fn a_union_of_different_columns_names_the_first_difference() {
    let e = refused(&two_sources(&format!(
        "steps:\n  - select: {{ id: s, input: b, columns: [device_id, ts] }}\n  - union: {{ id: u, inputs: [a, s] }}\n{OUT}"
    )));
    assert!(e.contains("step `u`") && e.contains("column 3 is `readings`") && e.contains("nothing in `s`"), "{e}");
}

#[test]
fn join_keys_of_different_types_are_refused() {
    let e = refused(&two_sources(&format!(
        "steps:\n  - select: {{ id: s, input: b, columns: [ts AS device_id, ts] }}\n  - interval_join: {{ id: j, left: a, right: s, on: device_id, between: [-1s, 1s] }}\n{OUT}"
    )));
    assert!(e.contains("step `j`") && e.contains("Utf8") && e.contains("Int64"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - interval_join: {{ id: j, left: a, right: b, on: device_id, between: [1s, -1s] }}\n{OUT}"
    )));
    assert!(e.contains("empty"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - interval_join: {{ id: j, left: a, right: b, on: device_id, between: [soon, 1s] }}\n{OUT}"
    )));
    assert!(e.contains("between") && e.contains("`soon`"), "{e}");
}

/// A diamond (one task feeding both inputs of a union) under frequent checkpoints and tiny
/// channels: barriers go out on both branches back to back, so the union lines them up
/// instead of waiting forever, and the exactly-once output has every row once.
#[test]
fn a_diamond_under_checkpoints_neither_stalls_nor_loses_rows() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let text = two_sources(&format!(
            "steps:\n  - filter: {{ id: cool, input: a, where: \"readings.temp < 22\" }}\n  - filter: {{ id: warm, input: a, where: \"readings.temp >= 22\" }}\n  - union: {{ id: both, inputs: [cool, warm] }}\n  - select: {{ id: unused-b, input: b, columns: [ts] }}\nsinks:\n  - {{ id: out, input: both, file: {{ path: \"{}\", format: json }} }}\n  - {{ id: drop, input: unused-b, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\nruntime: {{ channel_capacity: 1 }}\ncheckpoints: {{ dir: \"{}\", interval: 5ms }}\n",
            out.display(),
            dir.path().join("b-out").display(),
            dir.path().join("dead.jsonl").display(),
            dir.path().join("ck").display(),
        ));
        let s = run(&text, workers);
        let both = &s.steps.iter().find(|(id, _)| id.as_str() == "both").unwrap().1;
        assert_eq!(both.rows_out, 3000, "{workers} workers");
        let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        let refs: Vec<&Path> = files.iter().map(std::path::PathBuf::as_path).collect();
        assert_eq!(readings(&refs), readings(&[&data("sensors-3k.jsonl")]), "{workers} workers");
    }
}

/// A join reads the input that is behind first: when one source runs ahead (here `b`, in
/// batches ten times larger), the join does not take in rows no partner can match yet, so the
/// rows it keeps stay near what the watermark bound and the interval need. Both sides' peaks
/// are read from the metrics the join reports.
#[test]
fn a_join_reads_the_input_that_is_behind_first() {
    let a = data("sensors-3k.jsonl");
    let b = data("sensors-3k-b.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name: g\nsources:\n  - {{ id: a, batch_size: 10, file: {{ path: \"{}\", format: json }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\n  - {{ id: b, batch_size: 100, file: {{ path: \"{}\", format: json }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\nsteps:\n  - interval_join: {{ id: j, left: a, right: b, on: device_id, between: [-50ms, 50ms] }}\n  - select: {{ id: s, columns: [a.ts AS a_ts] }}\nsink: {{ id: out, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
        a.display(),
        b.display(),
        dir.path().join("out.jsonl").display(),
        dir.path().join("dead.jsonl").display()
    );
    let p = build(&text).unwrap();
    let job =
        weir_core::runtime::Job::new(p.plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap()).unwrap();
    let registry = job.registry();
    // One thread, as `weir run --workers 1`: the sources and the join take turns.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(job.run()).unwrap();
    let peak = |side: &str| {
        registry.connectors.get("weir_join_state_rows_peak", &[("step", "j"), ("side", side), ("worker", "0")]).unwrap()
    };
    // 2 s of bound at 20 ms a reading is 100 rows, plus a batch or two of the side ahead.
    assert!(peak("b") <= 400.0, "b (ahead): the join kept {} rows at once", peak("b"));
    assert!(peak("a") <= 400.0, "a: the join kept {} rows at once", peak("a"));
    assert_eq!(read_jsonl(&dir.path().join("out.jsonl")).len(), 302, "the pairs of tests/data/w5-expected.jsonl");
}

/// `(device_id, ts)` of every row of a test data file.
fn rows_of(file: &str) -> Vec<(String, i64)> {
    read_jsonl(&data(file))
        .iter()
        .map(|v| (v["device_id"].as_str().unwrap().to_string(), v["ts"].as_i64().unwrap()))
        .collect()
}

/// One side of a join's output row: its device and time, or `None` for a null side.
fn side_of(v: &Value, side: &str) -> Option<(String, i64)> {
    let s = v.get(side).filter(|s| !s.is_null())?;
    Some((s["device_id"].as_str().unwrap().to_string(), s["ts"].as_i64().unwrap()))
}

type Paired = BTreeMap<(Option<(String, i64)>, Option<(String, i64)>, i64), usize>;

/// A full window join of the two sources in tumbling windows pairs every row of a device's
/// window in `a` with every one in `b`, and pads the windows one side has alone, at one and
/// two workers.
#[test]
fn a_full_window_join_pairs_each_window_and_pads_the_lonely_ones() {
    const SIZE: i64 = 5_000;
    type Sides = [Vec<(String, i64)>; 2];
    let mut groups: BTreeMap<(String, i64), Sides> = BTreeMap::new();
    for (side, file) in ["sensors-3k.jsonl", "sensors-3k-b.jsonl"].into_iter().enumerate() {
        for (d, ts) in rows_of(file) {
            groups.entry((d.clone(), ts - ts.rem_euclid(SIZE))).or_default()[side].push((d, ts));
        }
    }
    let mut want = Paired::new();
    let mut padded = 0;
    for ((_, start), [l, r]) in &groups {
        if !l.is_empty() && !r.is_empty() {
            for a in l {
                for b in r {
                    *want.entry((Some(a.clone()), Some(b.clone()), *start)).or_default() += 1;
                }
            }
        } else {
            padded += 1;
            for a in l {
                *want.entry((Some(a.clone()), None, *start)).or_default() += 1;
            }
            for b in r {
                *want.entry((None, Some(b.clone()), *start)).or_default() += 1;
            }
        }
    }
    assert!(padded > 0, "the data has windows with rows on one side only");
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = two_sources(&format!(
            "steps:\n  - window_join: {{ id: j, left: a, right: b, on: device_id, tumbling: 5s, kind: full }}\nsink: {{ id: out, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
            out.display(),
            dir.path().join("dead.jsonl").display()
        ));
        run(&text, workers);
        let mut got = Paired::new();
        for v in read_jsonl(&out) {
            let start = v["window_start"].as_i64().unwrap();
            assert_eq!(v["window_end"].as_i64().unwrap(), start + SIZE);
            *got.entry((side_of(&v, "a"), side_of(&v, "b"), start)).or_default() += 1;
        }
        assert_eq!(got, want, "{workers} workers");
    }
}

/// A temporal join gives each row of `a` the row of `b` of its device that was the newest at
/// its time (the left join keeps rows with none yet), at one and two workers.
#[test]
fn a_temporal_join_finds_the_version_valid_at_each_rows_time() {
    let versions = rows_of("sensors-3k-b.jsonl");
    let mut want = Paired::new();
    for a in rows_of("sensors-3k.jsonl") {
        let v = versions.iter().filter(|b| b.0 == a.0 && b.1 <= a.1).max_by_key(|b| b.1).cloned();
        *want.entry((Some(a), v, 0)).or_default() += 1;
    }
    assert!(want.keys().any(|k| k.1.is_none()), "some rows come before their device's first version");
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = two_sources(&format!(
            "steps:\n  - temporal_join: {{ id: j, left: a, right: b, on: device_id, kind: left, as: [reading, config] }}\nsink: {{ id: out, file: {{ path: \"{}\", format: json }} }}\ndead_letters: {{ path: \"{}\" }}\n",
            out.display(),
            dir.path().join("dead.jsonl").display()
        ));
        let s = run(&text, workers);
        let j = s.steps.iter().find(|(id, _)| id.as_str() == "j").unwrap();
        assert_eq!(j.1.late_dropped, 0);
        let mut got = Paired::new();
        for v in read_jsonl(&out) {
            *got.entry((side_of(&v, "reading"), side_of(&v, "config"), 0)).or_default() += 1;
        }
        assert_eq!(got, want, "{workers} workers");
    }
}

/// Each join kind takes its own settings and names the kind another setting belongs to.
#[test]
fn a_join_with_another_kinds_setting_is_refused() {
    let e = refused(&two_sources(&format!(
        "steps:\n  - window_join: {{ id: j, left: a, right: b, on: device_id, between: [-1s, 1s] }}\n{OUT}"
    )));
    assert!(e.contains("`between` is a setting of interval_join, not of window_join"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - window_join: {{ id: j, left: a, right: b, on: device_id }}\n{OUT}"
    )));
    assert!(e.contains("exactly one of `tumbling`, `hopping`, `session`"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - temporal_join: {{ id: j, left: a, right: b, on: device_id, kind: full }}\n{OUT}"
    )));
    assert!(e.contains("inner or left"), "{e}");
    let e = refused(&two_sources(&format!(
        "steps:\n  - interval_join: {{ id: j, left: a, right: b, on: device_id }}\n{OUT}"
    )));
    assert!(e.contains("needs `between"), "{e}");
}
