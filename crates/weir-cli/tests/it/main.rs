//! The `weir` command, run as a user would.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod crash;
mod kafka_crash;
mod kafka_handoff;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn weir(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.args(args).current_dir(repo());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_writes_results_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w1.jsonl");
    let o = weir(
        &["run", "examples/w1-sensor-window.yaml", "--workers", "2"],
        &[
            ("INPUT", &repo().join("tests/data/sensors-3k.jsonl")),
            ("OUTPUT", &out),
            ("DEAD_LETTERS", &dir.path().join("d.jsonl")),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = std::fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(rows, 303);
    let err = stderr(&o);
    assert!(err.contains("per-device-10s") && err.contains("3000 events in"), "summary missing: {err}");
}

#[test]
fn validate_names_the_file_and_line_of_a_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, "name: x\nsource:\n  id: in\n  generator: {count: 10}\nsteps:\n  - filter: {id: f, were: \"a\"}\nsink:\n  id: out\n  stdout: {}\n").unwrap();
    let o = weir(&["validate", p.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("bad.yaml:6:") && err.contains("unknown field `were`"), "{err}");
}

#[test]
fn validate_points_at_the_step_with_a_bad_expression() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, "name: x\nsource:\n  id: in\n  generator: {count: 10}\nsteps:\n  - filter:\n      id: hot\n      where: \"readings.tmp > 1\"\nsink:\n  id: out\n  stdout: {}\n").unwrap();
    let o = weir(&["validate", p.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("bad.yaml:7:") && err.contains("step `hot`") && err.contains("readings.tmp"), "{err}");
}

#[test]
fn validate_needs_no_input_when_the_schema_is_declared() {
    // W1 declares its schema: it checks out with no input file, and a bad column would still
    // be caught (the test above); `run` on it reports the missing file.
    let missing = [("INPUT", Path::new("/nonexistent/in.jsonl")), ("OUTPUT", Path::new("/tmp/never.jsonl"))];
    let o = weir(&["validate", "examples/w1-sensor-window.yaml"], &missing);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("ok ("), "{}", stderr(&o));
    // Without a declared schema the input is needed to infer one, and validate says so.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("inferred.yaml");
    std::fs::write(&p, "name: x\nsource:\n  id: in\n  file: {path: /nonexistent/in.jsonl, format: json}\nsink:\n  id: out\n  stdout: {}\n").unwrap();
    let o = weir(&["validate", p.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/in.jsonl"), "{}", stderr(&o));
}

#[test]
fn a_missing_input_exits_2_with_the_path() {
    let o = weir(
        &["run", "examples/w2-filter-project.yaml"],
        &[("INPUT", Path::new("/nonexistent/in.jsonl")), ("OUTPUT", Path::new("/tmp/never.jsonl"))],
    );
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/in.jsonl"), "{err}");
}

#[test]
fn gen_then_run_the_generated_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.jsonl");
    let o = weir(&["gen", "-n", "500", "--output", f.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&f).unwrap();
    assert_eq!(text.lines().count(), 500);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["readings"]["temp"].is_f64() && first["device_id"].as_str().unwrap().starts_with("dev-"));
    let out = dir.path().join("o.jsonl");
    let o = weir(
        &["run", "examples/w2-filter-project.yaml"],
        &[("INPUT", &f), ("OUTPUT", &out), ("DEAD_LETTERS", &dir.path().join("d"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn sigint_flushes_open_windows_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("endless.yaml");
    let out = dir.path().join("out.jsonl");
    std::fs::write(
        &p,
        format!(
            "name: endless\nsource:\n  id: in\n  generator: {{rate: 5000, devices: 5}}\n  event_time: {{column: ts}}\nsteps:\n  - key_by: {{id: k, keys: [device_id]}}\n  - window: {{id: w, tumbling: 1h, aggregates: {{n: count()}}}}\nsink:\n  id: out\n  file: {{path: \"{}\"}}\n",
            out.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .current_dir(dir.path())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    // The hour-long windows were open; a clean stop flushes them.
    let rows = std::fs::read_to_string(&out).unwrap();
    assert!(!rows.is_empty(), "open windows must be flushed on SIGINT");
    let total: i64 =
        rows.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_i64().unwrap()).sum();
    assert!(total > 1000, "{total}");
}

#[test]
fn stdin_to_stdout_with_dead_letters() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pipe.yaml");
    let dead = dir.path().join("dead.jsonl");
    std::fs::write(
        &p,
        format!(
            "name: pipe\nsource:\n  id: in\n  stdin: {{format: json}}\n  schema:\n    fields: [{{name: a, type: int64}}, {{name: b, type: string, required: false}}]\nsteps:\n  - filter: {{id: big, where: \"a > 1\"}}\nsink:\n  id: out\n  stdout: {{}}\ndead_letters: {{path: \"{}\"}}\n",
            dead.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"a\":1}\n{\"a\":2,\"b\":\"x\"}\nnot json\n{\"a\":\"three\"}\n{\"a\":5}")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "{\"a\":2,\"b\":\"x\"}\n{\"a\":5,\"b\":null}\n");
    let letters: Vec<serde_json::Value> =
        std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["kind"], "decode");
    assert_eq!(letters[0]["position"], "line 3, offset 24");
    assert_eq!(letters[1]["kind"], "schema");
    assert_eq!(letters[1]["origin"], "stdin");
}

#[test]
fn dlq_stats_counts_by_kind_step_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let o = weir(
        &["run", "examples/w1-sensor-window.yaml", "--workers", "1", "--quiet"],
        &[
            ("INPUT", &repo().join("tests/data/sensors-3k-malformed.jsonl")),
            ("OUTPUT", &dir.path().join("o.jsonl")),
            ("DEAD_LETTERS", &dead),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let letters: Vec<serde_json::Value> =
        std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |k: &str| letters.iter().filter(|l| l["kind"] == k).count();
    let o = weir(&["dlq", "stats", dead.to_str().unwrap(), "--key", "device_id"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with(&format!("{} dead letters\n", letters.len())), "{out}");
    for kind in ["decode", "schema", "clock"] {
        assert!(count(kind) > 0);
        assert!(out.contains(&format!("{:>10}  {kind}\n", count(kind))), "{kind}: {out}");
    }
    assert!(out.contains(&format!("{:>10}  events\n", letters.len())), "{out}");
    assert!(out.contains("(unparseable)") && out.contains("dev-"), "{out}");
    let o = weir(&["dlq", "stats", "/nonexistent.jsonl"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read dead-letter file `/nonexistent.jsonl`"));
}

/// Dead letters go back through a fixed pipeline: the records the fix accepts come out, the
/// others are dead-lettered again (to a separate file).
#[test]
fn dlq_replay_through_a_fixed_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |required: bool| {
        format!(
            "name: p\nsource:\n  id: in\n  file: {{path: \"${{INPUT}}\"}}\n  schema:\n    fields:\n      - {{name: device_id, type: string}}\n      - {{name: ts, type: int64}}\n      - {{name: readings, type: struct, fields: [{{name: temp, type: float64, required: {required}}}]}}\n  event_time: {{column: ts}}\nsteps:\n  - select: {{id: cols, columns: [device_id, ts, readings.temp AS temp]}}\nsink:\n  id: out\n  file: {{path: \"${{OUTPUT}}\"}}\ndead_letters: {{path: \"${{DEAD_LETTERS}}\"}}\n"
        )
    };
    let (v1, v2) = (dir.path().join("v1.yaml"), dir.path().join("v2.yaml"));
    std::fs::write(&v1, pipeline(true)).unwrap();
    std::fs::write(&v2, pipeline(false)).unwrap();
    let dead = dir.path().join("dead.jsonl");
    let o = weir(
        &["run", v1.to_str().unwrap(), "--quiet"],
        &[
            ("INPUT", &repo().join("tests/data/sensors-malformed.jsonl")),
            ("OUTPUT", &dir.path().join("o1.jsonl")),
            ("DEAD_LETTERS", &dead),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let letters: Vec<serde_json::Value> =
        std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let schema: Vec<_> = letters.iter().filter(|l| l["kind"] == "schema").collect();
    let missing_temp = schema.iter().filter(|l| l["reason"].as_str().unwrap().contains("readings.temp")).count();
    assert!(missing_temp > 0 && missing_temp < schema.len());

    // Without --output the replay would overwrite the sink's file: refused.
    let o = weir(
        &["dlq", "replay", dead.to_str().unwrap(), "--pipeline", v2.to_str().unwrap()],
        &[("INPUT", Path::new("unused")), ("OUTPUT", &dir.path().join("o1.jsonl")), ("DEAD_LETTERS", &dead)],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let out = dir.path().join("replayed.jsonl");
    let o = weir(
        &[
            "dlq",
            "replay",
            dead.to_str().unwrap(),
            "--pipeline",
            v2.to_str().unwrap(),
            "--kind",
            "schema",
            "--output",
            out.to_str().unwrap(),
        ],
        &[("INPUT", Path::new("unused")), ("OUTPUT", Path::new("unused")), ("DEAD_LETTERS", &dead)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("replaying {} dead letters", schema.len())), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), missing_temp, "the fix accepts the records without a temperature");
    assert!(rows.iter().all(|r| r["temp"].is_null()));
    let again = std::fs::read_to_string(format!("{}.replay.jsonl", dead.display())).unwrap();
    assert_eq!(again.lines().count(), schema.len() - missing_temp, "the others fail again, into their own file");
}
