//! The example pipelines on small inputs, against the reference results (scripts/reference.py),
//! at one and two workers.

use weir::prelude::*;

use crate::common::*;

fn run_example(example_file: &str, input: &str, workers: usize) -> (Vec<serde_json::Value>, RunSummary) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let dead = dir.path().join("dead.jsonl");
    let input = data(input);
    let devices = data("devices-50.csv");
    let vars = [("INPUT", input.as_path()), ("OUTPUT", &out), ("DEAD_LETTERS", &dead), ("DEVICES", &devices)];
    let mut cfg = example(example_file, &vars).config().clone();
    // Small chunks, so that with two workers a split file really is read by both.
    cfg.file_source().chunk_size = 16 * 1024;
    let p = Pipeline::from_config(cfg).build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let summary = rt.block_on(p.run(&RunOptions { workers: Some(workers), ..Default::default() })).unwrap();
    assert!(!dead.exists(), "clean input must leave no dead letters");
    for (id, m) in &summary.steps {
        assert!(m.balanced(), "step {id}: rows do not add up: {m:?}");
    }
    (read_jsonl(&out), summary)
}

#[test]
fn w1_window_matches_reference_at_1_and_2_workers() {
    for workers in [1, 2] {
        let (rows, summary) = run_example("w1-sensor-window.yaml", "sensors-3k.jsonl", workers);
        assert_same_rows(read_jsonl(&data("w1-expected.jsonl")), rows, &format!("w1, {workers} workers"));
        assert_eq!(summary.source_records, 3000);
    }
}

#[test]
fn w2_filter_matches_reference_at_1_and_2_workers() {
    for workers in [1, 2] {
        let (rows, _) = run_example("w2-filter-project.yaml", "sensors-3k.jsonl", workers);
        assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), rows, &format!("w2, {workers} workers"));
    }
}

#[test]
fn w3_ewma_matches_reference_at_1_and_2_workers() {
    for workers in [1, 2] {
        let (rows, _) = run_example("w3-ewma-anomaly.yaml", "sensors-3k.jsonl", workers);
        assert_same_rows(read_jsonl(&data("w3-expected.jsonl")), rows, &format!("w3, {workers} workers"));
    }
}

#[test]
fn w4_lookup_join_and_window_matches_reference_at_1_and_2_workers() {
    for workers in [1, 2] {
        let (rows, summary) = run_example("w4-enrich-window.yaml", "sensors-3k.jsonl", workers);
        assert_same_rows(read_jsonl(&data("w4-expected.jsonl")), rows, &format!("w4, {workers} workers"));
        // dev-00019 and dev-00039 are not in the table: their 117 events are left out.
        assert_eq!(summary.steps.iter().find(|(id, _)| id.as_str() == "device").unwrap().1.filtered, 117);
    }
}

/// W5: two sources, each with its own watermark, joined on device and time; the pairs are the
/// reference's at one and two workers, and the join keeps no row past the end.
#[test]
fn w5_interval_join_matches_reference_at_1_and_2_workers() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let dead = dir.path().join("dead.jsonl");
        let (a, b) = (data("sensors-3k.jsonl"), data("sensors-3k-b.jsonl"));
        let vars = [("INPUT_A", a.as_path()), ("INPUT_B", b.as_path()), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)];
        let mut cfg = example("w5-interval-join.yaml", &vars).config().clone();
        for s in &mut cfg.sources {
            // Small chunks, so that with two workers each file really is read by both.
            if let SourceConnector::File(f) = &mut s.connector {
                f.chunk_size = 16 * 1024;
            }
        }
        let p = Pipeline::from_config(cfg).build().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let summary = rt.block_on(p.run(&RunOptions { workers: Some(workers), ..Default::default() })).unwrap();
        assert!(!dead.exists(), "clean input must leave no dead letters");
        for (id, m) in &summary.steps {
            assert!(m.balanced(), "step {id}: rows do not add up: {m:?}");
        }
        assert_eq!(summary.source_records, 6000, "both feeds count as input");
        let join = &summary.steps.iter().find(|(id, _)| id.as_str() == "pairs").unwrap().1;
        assert_eq!((join.rows_in, join.late_dropped), (6000, 0), "{join:?}");
        assert_same_rows(read_jsonl(&data("w5-expected.jsonl")), read_jsonl(&out), &format!("w5, {workers} workers"));
    }
}

#[test]
fn file_split_across_workers_reads_every_line_once() {
    // A chunk size far below the file size forces many chunk borders.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let input = data("sensors-3k.jsonl");
    let mut cfg = example(
        "w2-filter-project.yaml",
        &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dir.path().join("d"))],
    )
    .config()
    .clone();
    cfg.file_source().chunk_size = 4096;
    cfg.steps.clear();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for workers in [1, 2, 3] {
        rt.block_on(
            Pipeline::from_config(cfg.clone())
                .build()
                .unwrap()
                .run(&RunOptions { workers: Some(workers), ..Default::default() }),
        )
        .unwrap();
        let rows = read_jsonl(&out);
        assert_eq!(rows.len(), 3000, "{workers} workers");
        let mut ts: Vec<i64> = rows.iter().map(|r| r["ts"].as_i64().unwrap()).collect();
        ts.sort_unstable();
        let mut want: Vec<i64> = read_jsonl(&input).iter().map(|r| r["ts"].as_i64().unwrap()).collect();
        want.sort_unstable();
        assert_eq!(ts, want);
    }
}
