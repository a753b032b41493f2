//! The `weir` command, run as a user would.
#![allow(clippy::unwrap_used)]
// The tests use every connector the command has by default.
#![cfg(all(feature = "kafka", feature = "mqtt", feature = "nats", feature = "amqp", feature = "postgres"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod console;
mod crash;
mod dashboard;
mod kafka_crash;
mod kafka_handoff;
mod server_crash;

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

/// Starts a command whose stderr is read line by line on a thread (so the child never blocks
/// on a full pipe); the lines arrive on the receiver.
fn spawn_logged(c: &mut Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (20 s at most) for a JSON log line that `pick` accepts; returns what it picked and
/// the line.
fn wait_for_log<T>(
    logs: &std::sync::mpsc::Receiver<String>,
    mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
) -> (T, serde_json::Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = logs.recv_timeout(left) else { break };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        if let Some(t) = pick(&v) {
            return (t, v);
        }
        seen.push(line);
    }
    panic!("no such log line within 20 s; saw:\n{}", seen.join("\n"));
}

use weir_core::testing::poll;

/// The value of an unlabelled-but-for-`job` series on a running `weir`'s `/metrics` (0 when
/// absent).
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
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

/// Every pipeline under `examples/` loads and checks out as shipped (its inputs absent: the
/// schemas are declared), so the docs never point at a broken example.
#[test]
fn every_shipped_example_validates() {
    let vars = [
        ("INPUT", Path::new("/nonexistent/in.jsonl")),
        ("OUTPUT", Path::new("/tmp/never")),
        // W5 reads two inputs.
        ("INPUT_A", Path::new("/nonexistent/a.jsonl")),
        ("INPUT_B", Path::new("/nonexistent/b.jsonl")),
    ];
    // W4's lookup table is read when the pipeline is checked (its columns are the step's).
    let devices = repo().join("tests/data/devices-50.csv");
    let w4_vars = [vars[0], vars[1], ("DEVICES", devices.as_path())];
    let mut names: Vec<_> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 18, "{names:?}");
    for p in names {
        let w4 = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("w4-"));
        let o = weir(&["validate", p.to_str().unwrap()], if w4 { &w4_vars } else { &vars });
        assert!(o.status.success() && stderr(&o).contains(": ok ("), "{}: {}", p.display(), stderr(&o));
    }
}

/// `weir plan` prints W5's graph and tasks as committed under tests/data (text, DOT and
/// Mermaid); set `WEIR_BLESS=1` to rewrite them after a deliberate change.
#[test]
fn plan_prints_the_graph_and_its_tasks() {
    let vars = [
        ("INPUT_A", Path::new("/nonexistent/a.jsonl")),
        ("INPUT_B", Path::new("/nonexistent/b.jsonl")),
        ("OUTPUT", Path::new("/tmp/never")),
    ];
    for (format, file) in [("text", "plan-w5.txt"), ("dot", "plan-w5.dot"), ("mermaid", "plan-w5.mmd")] {
        let o = weir(&["plan", "examples/w5-interval-join.yaml", "--workers", "2", "--format", format], &vars);
        assert!(o.status.success(), "{}", stderr(&o));
        let got = String::from_utf8(o.stdout).unwrap();
        let path = repo().join("tests/data").join(file);
        if std::env::var_os("WEIR_BLESS").is_some() {
            std::fs::write(&path, &got).unwrap();
        }
        assert_eq!(got, std::fs::read_to_string(&path).unwrap(), "{file}");
    }
    // At one worker the sources still run as tasks of their own, and nothing is hashed apart.
    let o = weir(&["plan", "examples/w5-interval-join.yaml", "--workers", "1"], &vars);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("  2: pairs -> columns -> out"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A straight pipeline fuses its steps between exchanges, as it always ran.
    let o = weir(
        &["plan", "examples/w1-sensor-window.yaml", "--workers", "2"],
        &[("INPUT", Path::new("/x")), ("OUTPUT", Path::new("/y"))],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("  0: events\n  1: per-device-10s -> columns -> out"), "{text}");
}

/// Graph mistakes point at the step's line in the file.
#[test]
fn validate_names_the_line_of_a_graph_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.yaml");
    std::fs::write(
        &p,
        "name: g\nsources:\n  - { id: a, generator: {} }\n  - { id: b, generator: {} }\nsteps:\n  - union: { id: u, inputs: [a, bb] }\nsink: { id: out, stdout: {} }\n",
    )
    .unwrap();
    let o = weir(&["validate", p.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("g.yaml:6:") && err.contains("input `bb`") && err.contains("did you mean `b`"), "{err}");
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
    // JSON logs at the level RUST_LOG asks for: the line announcing the HTTP port names it.
    let (mut child, logs) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["--log-format", "json", "run", p.to_str().unwrap(), "--quiet", "--metrics-addr", "127.0.0.1:0"])
            .env_remove("WEIR_LOG")
            .env("RUST_LOG", "info")
            .current_dir(dir.path()),
    );
    let addr = wait_for_log(&logs, |v| v["fields"]["message"].as_str()?.starts_with("Serving metrics").then_some(())).1
        ["fields"]["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let started = wait_for_log(&logs, |v| (v["fields"]["message"] == "Job started.").then_some(())).1;
    assert_eq!(started["fields"]["job"], "endless", "{started}");
    // Rows are in the open windows before the signal comes.
    poll(|| (metric(&addr, "weir_source_records_total") >= 2000.0).then_some(()));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
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

/// Paths written in a pipeline file are found from its folder wherever `weir` runs; a path an
/// environment variable gives stays relative to the working directory.
#[test]
fn relative_paths_are_resolved_against_the_pipeline_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("pipes");
    std::fs::create_dir(&sub).unwrap();
    // One malformed line, so the dead-letter file is written too.
    let mut input = std::fs::read_to_string(repo().join("tests/data/sensors-3k.jsonl")).unwrap();
    input.push_str("{not json\n");
    std::fs::write(sub.join("in.jsonl"), input).unwrap();
    std::fs::create_dir(sub.join("models")).unwrap();
    std::fs::copy(repo().join("models/sensor_anomaly.onnx"), sub.join("models/m.onnx")).unwrap();
    let p = sub.join("p.yaml");
    std::fs::write(
        &p,
        "name: rel\nsource:\n  id: in\n  file: { path: in.jsonl }\n  event_time: { column: ts, format: ms }\nsteps:\n  - key_by: { id: k, keys: [device_id] }\n  - detect:\n      id: d\n      rules:\n        - { name: m, model: { path: models/m.onnx, inputs: [readings.temp, readings.humidity, readings.pressure, readings.vibration] } }\nsink:\n  id: out\n  file: { path: \"${OUTPUT:-out.jsonl}\" }\ndead_letters: { path: dead.jsonl }\n",
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
        c.args(["run", "pipes/p.yaml", "--quiet"]).current_dir(dir.path()).env_remove("OUTPUT");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(sub.join("out.jsonl").exists() && sub.join("dead.jsonl").exists(), "written beside the pipeline");
    assert!(!dir.path().join("out.jsonl").exists());
    let o = run(&[("OUTPUT", "mine.jsonl")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.path().join("mine.jsonl").exists(), "a path from the environment is the caller's");
}

/// Rows diverted by the quarantine (or refused by a sink, or failed by a step) are replayed
/// as rows, back in at the step that failed them, from a dead-letter file or topic.
#[test]
fn dlq_replay_feeds_rows_back_in_from_a_file_or_a_kafka_topic() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = String::new();
    for i in 0..400i64 {
        let ts = 1_700_000_000_000 + i * 10;
        match i % 8 {
            0 => text.push_str("{\"device_id\":\"broken\",\"ts\":\"never\",\"readings\":{\"temp\":1.0}}\n"),
            4 => text.push_str(&format!("{{\"device_id\":\"broken\",\"ts\":{ts},\"readings\":{{\"temp\":2.5}}}}\n")),
            _ => text
                .push_str(&format!("{{\"device_id\":\"ok-{}\",\"ts\":{ts},\"readings\":{{\"temp\":1.0}}}}\n", i % 3)),
        }
    }
    std::fs::write(&input, text).unwrap();
    let quar = dir.path().join("q.jsonl");
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "name: p\nsource:\n  id: in\n  file: {{path: \"{}\"}}\n  batch_size: 16\n  schema:\n    fields:\n      - {{name: device_id, type: string}}\n      - {{name: ts, type: int64}}\n      - {{name: readings, type: struct, fields: [{{name: temp, type: float64}}]}}\n  event_time: {{column: ts}}\nsteps:\n  - key_by: {{id: by-device, keys: [device_id]}}\n  - select: {{id: cols, columns: [device_id, ts, readings.temp AS temp]}}\nsink:\n  id: out\n  file: {{path: \"{}\"}}\ndead_letters: {{path: \"{}\"}}\nquarantine: {{max_dead_letters: 3, within: 1h, cool_down: 1h, output: \"{}\"}}\n",
            input.display(),
            dir.path().join("out.jsonl").display(),
            dir.path().join("dead.jsonl").display(),
            quar.display()
        ),
    )
    .unwrap();
    let o = weir(&["run", p.to_str().unwrap(), "--quiet"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let diverted = std::fs::read_to_string(&quar).unwrap();
    let n = diverted.lines().count();
    assert!(n > 10 && diverted.lines().all(|l| l.contains("\"kind\":\"quarantined\"")), "{diverted}");

    let check = |out: &Path| {
        let rows: Vec<serde_json::Value> =
            std::fs::read_to_string(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), n, "every diverted row comes out of the replay");
        assert!(rows.iter().all(|r| r["device_id"] == "broken" && r["temp"] == 2.5), "{rows:?}");
    };
    let out = dir.path().join("replayed.jsonl");
    let o = weir(
        &[
            "dlq",
            "replay",
            quar.to_str().unwrap(),
            "--pipeline",
            p.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("rows, back in at step `in`"), "{}", stderr(&o));
    check(&out);

    // The same entries in a dead-letter topic.
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("dlq", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    kafka_crash::produce(&brokers, "dlq", &quar);
    let out = dir.path().join("from-kafka.jsonl");
    let from = format!("kafka://{brokers}/dlq");
    let o = weir(&["dlq", "replay", &from, "--pipeline", p.to_str().unwrap(), "--output", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    check(&out);
}

/// The container image runs what `cargo build --release -p weir-cli` makes, and its default
/// command's arguments are ones `weir run` takes; the compose file mounts a pipeline that
/// exists and points Weir at its broker.
#[test]
fn the_container_image_runs_the_built_command_with_arguments_it_takes() {
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let manifest = std::fs::read_to_string(repo().join("crates/weir-cli/Cargo.toml")).unwrap();
    assert!(manifest.contains("[[bin]]\nname = \"weir\""), "the binary is called weir");
    assert!(docker.contains("RUN cargo build --release --locked -p weir-cli"), "{docker}");
    assert!(docker.contains("COPY --from=build /src/target/release/weir /usr/local/bin/weir"), "{docker}");
    assert!(docker.contains("USER 10001"), "the image runs as a user, not root");
    let array = |key: &str| -> Vec<String> {
        let line = docker.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
        serde_json::from_str(line[key.len()..].trim()).unwrap()
    };
    assert_eq!(array("ENTRYPOINT"), ["weir"]);
    let cmd = array("CMD");
    assert_eq!(&cmd[..2], ["run", "/etc/weir/pipeline.yaml"]);
    // Every argument after the pipeline is one `weir run` takes (clap stops at `--help` only
    // when what came before it parsed).
    let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    args[1] = "examples/demo.yaml";
    args.push("--help");
    let o = weir(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--metrics-addr"));
    assert!(docker.contains("EXPOSE 9464") && docker.contains("/healthz"), "{docker}");

    let compose: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("deploy/compose.yaml")).unwrap()).unwrap();
    let volume = compose["services"]["weir"]["volumes"][0].as_str().unwrap();
    let host = volume.split(':').next().unwrap();
    assert!(repo().join("deploy").join(host).exists(), "{volume}");
    assert_eq!(compose["services"]["weir"]["environment"]["BROKERS"], "kafka:29092");
    assert!(compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        .as_str()
        .unwrap()
        .contains("INTERNAL://kafka:29092"));
}

/// The Helm chart's container runs `weir` with arguments `weir run` takes (the rendering
/// itself is checked by `python/tests/test_helm.py`).
#[test]
fn the_helm_charts_container_arguments_parse() {
    let sts = std::fs::read_to_string(repo().join("deploy/helm/weir/templates/statefulset.yaml")).unwrap();
    let line = sts.lines().find(|l| l.trim_start().starts_with("args:")).expect("an args line");
    let list = line.trim_start().trim_start_matches("args:").replace("{{ .Values.port }}", "9464");
    let mut args: Vec<String> = serde_yaml::from_str(&list).unwrap();
    assert_eq!(&args[..2], ["run", "/etc/weir/pipeline.yaml"]);
    args[1] = "examples/demo.yaml".into();
    args.push("--help".into());
    let o = weir(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// JSON log lines carry the job, stage and worker of the task that logged them, at the
/// default level too (the task span is on at every level).
#[test]
fn json_logs_name_the_job_and_worker_at_the_default_level() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = std::fs::read_to_string(repo().join("tests/data/sensors-3k.jsonl")).unwrap();
    text.push_str("{not json\n");
    std::fs::write(&input, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json", "run", "examples/w2-filter-project.yaml", "--quiet", "--workers", "2"])
        .env_remove("WEIR_LOG")
        .env_remove("RUST_LOG")
        .env("INPUT", &input)
        .env("OUTPUT", dir.path().join("out.jsonl"))
        .env("DEAD_LETTERS", dir.path().join("dead.jsonl"))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> =
        stderr(&o).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let warn = lines
        .iter()
        .find(|l| l["fields"]["message"] == "Writing dead letters.")
        .unwrap_or_else(|| panic!("no warning about dead letters: {lines:?}"));
    assert_eq!(warn["level"], "WARN");
    assert_eq!(warn["span"]["job"], "w2-filter-project", "{warn}");
    assert!(warn["span"]["worker"].is_number() && warn["span"]["stage"] == 0, "{warn}");
}

/// The sum of a series' values whose labels contain each of `labels` (`step="rules"`), on a
/// running `weir`'s `/metrics`.
fn metric_where(addr: &str, name: &str, labels: &[&str]) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `POST path` with a body and the bearer token: the status and body.
fn post(addr: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// A running pipeline takes a changed file live: a detect threshold raised mid-run holds from
/// the next batch on, the open windows and the alerts already firing stay, the log level
/// changes; a change that needs a restart (a window's size) is refused with its setting named
/// and changes nothing; SIGHUP applies the file again.
#[test]
fn a_changed_pipeline_file_is_applied_live_and_a_structural_change_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("live.yaml");
    let (windows, hot) = (dir.path().join("windows.jsonl"), dir.path().join("hot.jsonl"));
    let pipeline = |above: f64, size: &str, level: &str| {
        format!(
            "name: live\nsource:\n  id: in\n  generator: {{rate: 5000, devices: 5}}\n  event_time: {{column: ts}}\nsteps:\n  - key_by: {{id: by-device, keys: [device_id]}}\n  - detect: {{id: rules, rules: [{{name: hot, threshold: {{value: readings.temp, above: {above}}}}}]}}\n  - alert: {{id: alerts}}\n  - window: {{id: counts, input: by-device, tumbling: {size}, aggregates: {{n: count()}}}}\nsinks:\n  - {{id: hot, input: alerts, file: {{path: \"{}\"}}}}\n  - {{id: windows, input: counts, file: {{path: \"{}\"}}}}\nlog: {{level: \"{level}\"}}\n",
            hot.display(),
            windows.display()
        )
    };
    // Every reading is above -1000: every device's alert fires at once.
    std::fs::write(&p, pipeline(-1000.0, "1h", "warn,weir::http=info")).unwrap();
    let (child, logs) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["--log-format", "json", "run", p.to_str().unwrap(), "--quiet", "--metrics-addr", "127.0.0.1:0"])
            .env_remove("WEIR_LOG")
            .env_remove("RUST_LOG")
            .env("WEIR_API_TOKEN", "s3cret")
            .current_dir(dir.path()),
    );
    // The run never ends by itself: a failing assertion must not leave it running.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(child);
    let addr = wait_for_log(&logs, |v| v["fields"]["message"].as_str()?.starts_with("Serving metrics").then_some(())).1
        ["fields"]["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let detected = || metric_where(&addr, "weir_step_results_out_total", &["step=\"rules\""]);
    poll(|| (detected() >= 1000.0).then_some(()));

    // Raise the limit past every reading: from the next batch on, nothing is detected.
    std::fs::write(&p, pipeline(1000.0, "1h", "info")).unwrap();
    poll(|| (metric_where(&addr, "weir_config_reloads_total", &["outcome=\"applied\""]) >= 1.0).then_some(()));
    // The new level lets the reloader's own info line through.
    wait_for_log(&logs, |v| {
        (v["fields"]["message"] == "Applied the changed pipeline file to the running pipeline.").then_some(())
    });
    let at_reload = detected();
    let read_then = metric(&addr, "weir_source_records_total");
    poll(|| (metric(&addr, "weir_source_records_total") >= read_then + 5000.0).then_some(()));
    // Batches already past the step when the change landed are all it may have judged the old way.
    assert!(detected() - at_reload < 1000.0, "{} detections after the change", detected() - at_reload);
    let quiet = detected();
    let read_now = metric(&addr, "weir_source_records_total");
    poll(|| (metric(&addr, "weir_source_records_total") >= read_now + 5000.0).then_some(()));
    assert_eq!(detected(), quiet, "nothing above 1000 is detected");
    // The alerts raised before stay as they were.
    let (status, body) = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET /alerts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        (text.split(' ').nth(1).unwrap_or("").to_string(), text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
    };
    assert_eq!(status, "200", "{body}");
    let alerts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(alerts.len(), 5, "{body}");
    assert!(alerts.iter().all(|a| a["state"] == "firing"), "{body}");

    // A window of another size needs a restart: refused, named, nothing changes.
    let (status, body) = post(&addr, "/config", "s3cret", &pipeline(1000.0, "2h", "info"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("steps[3].window.tumbling") && body.contains("restart"), "{body}");
    let (status, _) = post(&addr, "/config", "wrong", &pipeline(1.0, "1h", "info"));
    assert_eq!(status, 401);
    assert_eq!(metric_where(&addr, "weir_config_reloads_total", &["outcome=\"refused\""]), 1.0);
    // SIGHUP reads the file again (unchanged: applied, changing nothing).
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    poll(|| (metric_where(&addr, "weir_config_reloads_total", &["outcome=\"applied\""]) >= 2.0).then_some(()));
    // The quarantine's limits change live too (the run's quarantine follows the key_by's key).
    let tighter = pipeline(1000.0, "1h", "info") + "quarantine: {max_dead_letters: 7, cool_down: 30s}\n";
    let (status, body) = post(&addr, "/config", "s3cret", &tighter);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("quarantine: 7 dead letters"), "{body}");
    // And an alert step's routes.
    let routed = tighter.replace(
        "- alert: {id: alerts}",
        &format!(
            "- alert: {{id: alerts, routes: [{{name: log, file: {{path: \"{}\"}}}}]}}",
            dir.path().join("routed.jsonl").display()
        ),
    );
    let (status, body) = post(&addr, "/config", "s3cret", &routed);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("routes now log"), "{body}");

    // The hour-long windows counted every reading, before the change and after it.
    let read = metric(&addr, "weir_source_records_total");
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    let total: f64 = std::fs::read_to_string(&windows)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_f64().unwrap())
        .sum();
    assert!(total >= read, "the windows counted {total} of at least {read} readings");
}
