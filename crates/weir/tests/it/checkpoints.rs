//! Checkpoints through the public API: the exactly-once file sink end to end, resuming from a
//! drained checkpoint, starting fresh, the metrics, and the settings that cannot work.

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

/// W1 on the 3k-event fixture with checkpoints every 10 ms into `dir`.
fn w1(dir: &Path, chunk: usize) -> PipelineConfig {
    let out = dir.join("out");
    let dead = dir.join("dead.jsonl");
    let mut cfg = example(
        "w1-sensor-window.yaml",
        &[("INPUT", &data("sensors-3k.jsonl")), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)],
    )
    .config()
    .clone();
    cfg.file_source().chunk_size = chunk;
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.join("ck").display().to_string(),
        options: Default::default(),
        interval: Duration::from_millis(10),
        keep: 2,
        member: None,
    });
    cfg
}

fn committed(dir: &Path) -> Vec<serde_json::Value> {
    let mut parts: Vec<_> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"))
        .collect();
    parts.sort();
    parts.iter().flat_map(|p| read_jsonl(p)).collect()
}

fn run(cfg: &PipelineConfig, workers: usize, fresh: bool) -> weir::Result<RunSummary> {
    let p = Pipeline::from_config(cfg.clone()).build()?;
    rt().block_on(p.run(&RunOptions { workers: Some(workers), fresh }))
}

#[test]
fn exactly_once_output_then_nothing_more_then_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = w1(dir.path(), 4096);
    run(&cfg, 2, false).unwrap();
    let expected = read_jsonl(&data("w1-expected.jsonl"));
    assert_same_rows(expected.clone(), committed(dir.path()), "first run");
    // No in-progress file is left once the run has ended.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("part-")), "{names:?}");

    // The input was consumed: a second run resumes from the drained checkpoint and adds nothing.
    let s = run(&cfg, 1, false).unwrap();
    assert_eq!(s.sink_rows, 0);
    assert_same_rows(expected.clone(), committed(dir.path()), "after a second run");

    // --fresh starts over: the whole result again, in new part files.
    run(&cfg, 1, true).unwrap();
    assert_eq!(committed(dir.path()).len(), 2 * expected.len());
}

#[test]
fn checkpoint_metrics_are_recorded_and_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Pipeline::from_config(w1(dir.path(), 4096))
        .build()
        .unwrap()
        .plan(&RunOptions { workers: Some(2), ..Default::default() })
        .unwrap();
    let job = Job::new(spec).unwrap();
    let reg = job.registry();
    rt().block_on(job.run()).unwrap();
    let c = &reg.checkpoints;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert!(g(&c.completed) >= 1);
    assert_eq!(g(&c.last_epoch), g(&c.completed), "epochs count from 1 in a fresh store");
    assert!(g(&c.last_completed_ms) > 0);
    let text = reg.render_prometheus("w1");
    for m in ["weir_checkpoints_completed_total", "weir_checkpoint_size_bytes", "weir_checkpoint_age_seconds"] {
        assert!(text.contains(&format!("{m}{{job=\"w1\"}}")), "{m} missing:\n{text}");
    }
}

#[test]
fn a_changed_chunk_size_is_refused_with_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    // Two workers read the file in 4 KiB chunks; the checkpoints record per-chunk positions.
    run(&w1(dir.path(), 4096), 2, false).unwrap();
    let msg = run(&w1(dir.path(), 8192), 2, false).unwrap_err().to_string();
    assert!(msg.contains("4096") && msg.contains("8192") && msg.contains("--fresh"), "{msg}");
    run(&w1(dir.path(), 8192), 2, true).unwrap();
}

#[test]
fn sources_that_cannot_resume_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new("gen-ck");
    p.source(SourceConfig::new(
        "events",
        SourceConnector::Generator(GeneratorSettings { count: Some(10), ..Default::default() }),
    ))
    .sink(SinkConfig::new("out", SinkConnector::Stdout(StdoutSettings { format: FormatSpec::Json })))
    .checkpoints(dir.path().join("ck").display().to_string(), Duration::from_secs(1));
    let err = rt().block_on(p.build().unwrap().run(&RunOptions::default())).unwrap_err().to_string();
    assert!(err.contains("cannot") && err.contains("events"), "{err}");
}

#[test]
fn a_checkpoint_can_be_asked_for_while_the_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = w1(dir.path(), 4096);
    // Only on-demand and final checkpoints, on a source that never ends by itself.
    cfg.checkpoints.as_mut().unwrap().interval = Duration::ZERO;
    cfg.file_source().follow = true;
    let spec = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions { workers: Some(2), ..Default::default() });
    let job = Job::new(spec.unwrap()).unwrap();
    let (reg, stop, ask) = (job.registry(), job.shutdown_handle(), job.checkpoint_handle());
    let rt = rt();
    let run = rt.spawn(job.run());
    let completed = || reg.checkpoints.completed.load(std::sync::atomic::Ordering::Relaxed);
    // The whole input is read (the job now only follows the file): still no checkpoint.
    poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) >= 3000).then_some(()));
    assert_eq!(completed(), 0, "no checkpoint before one is asked for");
    ask.trigger();
    let t = std::time::Instant::now();
    while completed() == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the checkpoint asked for never completed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!run.is_finished(), "the job goes on after the checkpoint");
    stop.stop();
    rt.block_on(run).unwrap().unwrap();
    assert_eq!(completed(), 2, "the one asked for, then the final one at shutdown");
}

/// A key quarantined before a restart is still quarantined after it: the bookkeeping is part
/// of the checkpoint.
#[test]
fn quarantine_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let line =
        |dev: &str, ts: &str| format!("{{\"device_id\":\"{dev}\",\"ts\":{ts},\"readings\":{{\"temp\":30.0}}}}\n");
    let first: String =
        (0..10).map(|i| line("broken", "\"never\"") + &line("ok", &format!("{}", 1_700_000_000_000i64 + i))).collect();
    std::fs::write(&input, &first).unwrap();
    let (out, dead, quar) = (dir.path().join("out"), dir.path().join("dead.jsonl"), dir.path().join("q.jsonl"));
    let mut cfg = example("w2-filter-project.yaml", &[("INPUT", &input), ("OUTPUT", &out), ("DEAD_LETTERS", &dead)])
        .config()
        .clone();
    cfg.quarantine = QuarantineConfig {
        keys: Some(vec!["device_id".into()]),
        max_dead_letters: 3,
        within: Duration::from_secs(3600),
        cool_down: Duration::from_secs(3600),
        output: quar.display().to_string(),
        ..QuarantineConfig::default()
    };
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.path().join("ck").display().to_string(),
        options: Default::default(),
        interval: Duration::ZERO,
        keep: 2,
        member: None,
    });
    run(&cfg, 1, false).unwrap();
    // Now the broken device sends good rows; the new run reads only these.
    let more: String = (0..5).map(|i| line("broken", &format!("{}", 1_700_000_001_000i64 + i))).collect();
    std::fs::write(&input, first + &more).unwrap();
    let s = run(&cfg, 1, false).unwrap();
    let source = s.steps[0].1;
    assert_eq!((source.rows_in, source.quarantined), (5, 5), "{source:?}");
    assert_eq!(read_jsonl(&quar).iter().filter(|l| l["kind"] == "quarantined").count(), 5);
}
