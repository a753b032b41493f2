//! The crash harness: runs W1, W3 and W5 with checkpoints, kills the process with SIGKILL at
//! random moments, restarts it (alternating 1 and 2 workers) until the input is consumed, and
//! checks that the committed output equals an uninterrupted run's, row for row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{repo, stderr, weir};

/// A small deterministic generator, so a failing run can be repeated from its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Rows as a multiset: exact fields (strings, integers) map to the floats of the rows with them.
pub(crate) type Rows = BTreeMap<String, Vec<Vec<f64>>>;

pub(crate) fn rows(text: &str) -> Rows {
    let mut out = Rows::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        let mut exact = String::new();
        let mut floats = Vec::new();
        for (k, x) in obj {
            match x {
                serde_json::Value::Number(n) if n.is_f64() => floats.push(n.as_f64().unwrap()),
                _ => exact.push_str(&format!("{k}={x};")),
            }
        }
        out.entry(exact).or_default().push(floats);
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    out
}

/// Same rows, floats equal to 1e-9 relative (sums may be added in another order).
pub(crate) fn assert_same(want: &Rows, got: &Rows, what: &str) {
    let (nw, ng): (usize, usize) = (want.values().map(Vec::len).sum(), got.values().map(Vec::len).sum());
    assert_eq!(ng, nw, "{what}: {ng} rows, expected {nw}");
    for (k, w) in want {
        let g = got.get(k).unwrap_or_else(|| panic!("{what}: missing row {k}"));
        assert_eq!(g.len(), w.len(), "{what}: row {k} appears {} times, expected {}", g.len(), w.len());
        for (a, b) in w.iter().zip(g) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{what}: row {k}: {x} vs {y}");
            }
        }
    }
}

pub(crate) fn committed(dir: &Path) -> String {
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    names.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"));
    names.sort();
    names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
}

/// Where a crash test keeps its checkpoints.
#[derive(Clone, Copy)]
enum Store<'a> {
    /// `dir/ck`.
    Local,
    /// An S3 bucket on the test endpoint (`scripts/services.sh`).
    S3 { bucket: &'a str },
}

impl Store<'_> {
    /// How long a run may live before it is killed: `(least, spread)` ms. A remote store
    /// takes longer per checkpoint, so its runs must live longer to complete some.
    fn kill_window(self) -> (u64, u64) {
        match self {
            Store::Local => (60, 300),
            Store::S3 { .. } => (300, 1200),
        }
    }

    fn location(self, dir: &Path) -> String {
        match self {
            Store::Local => dir.join("ck").display().to_string(),
            Store::S3 { bucket } => format!("s3://{bucket}/checkpoints"),
        }
    }

    /// The YAML `checkpoints:` section. For S3 the endpoint goes in `options` (so that path is
    /// exercised) and the credentials in the environment ([`s3_env`]).
    fn section(self, dir: &Path) -> String {
        let mut s = format!("checkpoints:\n  dir: {}\n  interval: 50ms\n", self.location(dir));
        if let Store::S3 { .. } = self {
            s.push_str(&format!("  options: {{ endpoint: \"{}\", allow_http: \"true\" }}\n", s3_endpoint()));
        }
        s
    }
}

fn s3_endpoint() -> String {
    std::env::var("WEIR_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5055".into())
}

/// Credentials for the test S3 server (moto accepts any), as a deployment would pass them.
fn s3_env(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "weir-test").env("AWS_SECRET_ACCESS_KEY", "weir-test").env("AWS_REGION", "us-east-1")
}

/// Creates a fresh bucket on the test S3 server with a plain HTTP PUT (the object store API
/// has no bucket calls). Fails with a hint when the server is not running.
fn s3_bucket(name: &str) -> String {
    use std::io::{Read as _, Write as _};
    let endpoint = s3_endpoint();
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/').to_string();
    let bucket = format!("{name}-{}", std::process::id());
    let mut c = std::net::TcpStream::connect(&host)
        .unwrap_or_else(|e| panic!("no S3 test server at {endpoint} ({e}); `source scripts/services.sh` starts one"));
    write!(c, "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {reply}");
    bucket
}

/// Where a crash test's pipeline writes, and how its committed output is read.
#[derive(Clone, Copy)]
enum Output<'a> {
    /// Part files under `dir/out` (the example's file sink).
    Files,
    /// A PostgreSQL table written exactly once; the example has its own `checkpoints:`
    /// section, set through `CHECKPOINTS` and `CHECKPOINT_INTERVAL`.
    Postgres { url: &'a str, table: &'a str },
    /// The same table and part files under `dir/out` (`sinks:`): both must hold the result.
    PostgresAndFiles { url: &'a str, table: &'a str },
}

impl Output<'_> {
    fn committed(self, dir: &Path) -> String {
        match self {
            Output::Files => committed(&dir.join("out")),
            Output::Postgres { url, table } => postgres_rows(url, table),
            Output::PostgresAndFiles { url, table } => {
                let files = committed(&dir.join("out"));
                assert_same(&rows(&files), &rows(&postgres_rows(url, table)), "the files against the table");
                files
            }
        }
    }
}

/// A table's rows as JSON lines, shaped as the file sink writes them: times as milliseconds,
/// and floats that happen to be whole still floats (`24.0`, where PostgreSQL writes `24`).
fn postgres_rows(url: &str, table: &str) -> String {
    let cols = weir::connectors::testing::psql(
        url,
        &format!("SELECT string_agg(column_name || ':' || data_type, ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = '{table}'"),
    );
    let mut exprs = Vec::new();
    let mut floats = Vec::new();
    for c in cols.split(',') {
        let (name, ty) = c.split_once(':').unwrap();
        exprs.push(match ty {
            t if t.starts_with("timestamp") => format!("'{name}', (extract(epoch from {name}) * 1000)::bigint"),
            _ => format!("'{name}', {name}"),
        });
        if ty == "double precision" || ty == "real" {
            floats.push(name.to_string());
        }
    }
    let text =
        weir::connectors::testing::psql(url, &format!("SELECT json_build_object({}) FROM {table}", exprs.join(", ")));
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for f in &floats {
                if let Some(x) = v[f.as_str()].as_f64() {
                    v[f.as_str()] =
                        serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number);
                }
            }
            format!("{v}\n")
        })
        .collect()
}

/// The example pipeline with a checkpoint section appended.
fn checkpointed(example: &str, dir: &Path, store: Store<'_>) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(example)).unwrap();
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, format!("{text}\n{}", store.section(dir))).unwrap();
    p
}

fn spawn(pipeline: &Path, dir: &Path, input: &Path, workers: usize, out: Output<'_>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    if let Output::Postgres { url, table } | Output::PostgresAndFiles { url, table } = out {
        c.env("PG_URL", url).env("TABLE", table).env("CHECKPOINTS", dir.join("ck")).env("CHECKPOINT_INTERVAL", "50ms");
    }
    s3_env(&mut c)
        .args(["run", pipeline.to_str().unwrap(), "--workers", &workers.to_string(), "--quiet", "--no-progress"])
        .env("INPUT", input)
        // W5 joins the input with a second stream (see [`input`]).
        .env("INPUT_A", input)
        .env("INPUT_B", dir.join("input-b.jsonl"))
        .env("OUTPUT", dir.join("out"))
        .env("DEAD_LETTERS", dir.join("dead.jsonl"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `weir checkpoints list` of the store, with S3 settings from the environment.
fn listing(dir: &Path, store: Store<'_>) -> String {
    let o = s3_env(&mut Command::new(env!("CARGO_BIN_EXE_weir")))
        .args(["checkpoints", "list", &store.location(dir)])
        .env("AWS_ENDPOINT", s3_endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    assert!(o.status.success(), "checkpoints list: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The input, `input.jsonl`, and a second stream of the same devices with another seed,
/// `input-b.jsonl`, for W5.
fn input(dir: &Path, events: u64) -> PathBuf {
    let f = dir.join("input.jsonl");
    for (name, seed) in [("input.jsonl", "7"), ("input-b.jsonl", "8")] {
        let path = dir.join(name);
        let n = events.to_string();
        let o = weir(&["gen", "-n", &n, "--devices", "2000", "--seed", seed, "--output", path.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    f
}

/// Kills a run `kills` times at random moments, then lets it finish, and compares.
fn crash_until_done(example: &str, events: u64, kills: u32, seed: u64, store: Store<'_>) {
    crash_until_done_into(example, example, Output::Files, events, kills, seed, store);
}

/// [`crash_until_done`] of `example` writing to `out`, compared with `reference` (the same
/// pipeline into a file) run without checkpoints.
fn crash_until_done_into(
    example: &str,
    reference_example: &str,
    out: Output<'_>,
    events: u64,
    kills: u32,
    seed: u64,
    store: Store<'_>,
) {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), events);
    // The reference: the same pipeline without checkpoints, uninterrupted.
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", reference_example, "--workers", "2", "--quiet"],
        &[
            ("INPUT", &input),
            ("INPUT_A", &input),
            ("INPUT_B", &dir.path().join("input-b.jsonl")),
            ("OUTPUT", &reference),
            ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl")),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());
    assert!(!want.is_empty());

    let pipeline = match out {
        Output::Files => checkpointed(example, dir.path(), store),
        Output::Postgres { .. } | Output::PostgresAndFiles { .. } => repo().join(example),
    };
    let mut rng = Rng(seed);
    let (mut killed, mut runs) = (0u32, 0usize);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(600), "no progress after {runs} runs (seed {seed})");
        let workers = 1 + runs % 2;
        runs += 1;
        if killed >= kills {
            // The run that finishes should have work left. On a fast machine the input can
            // run out just before the last kill (the killed run had drained it): the kills
            // before still tested recovery, provided there were a few.
            let listed = listing(dir.path(), store);
            if listed.lines().nth(2).is_some_and(|l| l.contains("drained")) {
                assert!(
                    killed >= 3.min(kills),
                    "the input was consumed after {killed} kills; make it larger (seed {seed}):\n{listed}"
                );
                eprintln!("the input ran out at the last kill ({killed} kills, seed {seed}); finishing from the drained checkpoint");
            }
            // ...and must resume from a checkpoint, or the kills tested nothing. On a slow
            // machine every kill may have come before the first checkpoint: then one more run
            // is killed only once a checkpoint has completed.
            if !listed.contains("complete") {
                let mut child = spawn(&pipeline, dir.path(), &input, workers, out);
                let waited = Instant::now();
                while !listing(dir.path(), store).contains("complete") {
                    assert!(
                        waited.elapsed() < Duration::from_secs(120),
                        "no checkpoint completed in {runs} runs (seed {seed}):\n{}",
                        listing(dir.path(), store)
                    );
                    assert!(
                        child.try_wait().unwrap().is_none(),
                        "the run ended before its first checkpoint (seed {seed})"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                continue;
            }
        }
        let mut child = spawn(&pipeline, dir.path(), &input, workers, out);
        if killed < kills {
            let (least, spread) = store.kill_window();
            std::thread::sleep(Duration::from_millis(least + rng.below(spread)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                continue;
            }
        }
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "run {runs} failed (seed {seed}): {}", stderr(&o));
        break;
    }
    assert!(killed >= kills, "the input was consumed after {killed} kills; make it larger (seed {seed})");
    let got = rows(&out.committed(dir.path()));
    assert_same(&want, &got, &format!("{example} after {killed} kills in {runs} runs (seed {seed})"));
    if matches!(out, Output::Postgres { .. }) {
        return;
    }
    // Nothing left half-written: only committed part files remain.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("part-"))
        .collect();
    assert!(leftovers.is_empty(), "in-progress files left behind: {leftovers:?}");
}

pub(crate) fn seed() -> u64 {
    std::env::var("WEIR_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    })
}

#[test]
fn w1_survives_kill_9_at_random_moments_exactly_once() {
    crash_until_done("examples/w1-sensor-window.yaml", 1_000_000, 20, seed(), Store::Local);
}

/// The same on an S3-compatible checkpoint store (moto's server, started by the test command).
#[test]
fn w1_on_an_s3_checkpoint_store_survives_kill_9_exactly_once() {
    let bucket = s3_bucket("weir-crash");
    crash_until_done("examples/w1-sensor-window.yaml", 4_000_000, 8, seed(), Store::S3 { bucket: &bucket });
}

/// W1 into a PostgreSQL table, exactly once: a transaction per checkpoint, committed with the
/// sink's progress row; after each kill, recovery restores the checkpoint that row names.
#[test]
fn w1_into_postgres_survives_kill_9_exactly_once() {
    let url = std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("weir_crash_w1_{}", std::process::id());
    let progress = weir::connectors::testing::psql(&url, "SELECT to_regclass('weir_sink_progress') IS NOT NULL");
    if progress == "t" {
        weir::connectors::testing::psql(&url, "DELETE FROM weir_sink_progress WHERE sink = 'w1-postgres/windows'");
    }
    let out = Output::Postgres { url: &url, table: &table };
    crash_until_done_into(
        "examples/w1-postgres.yaml",
        "examples/w1-sensor-window.yaml",
        out,
        1_000_000,
        10,
        seed(),
        Store::Local,
    );
    weir::connectors::testing::psql(
        &url,
        &format!("DROP TABLE {table}; DELETE FROM weir_sink_progress WHERE sink = 'w1-postgres/windows'"),
    );
}

/// Two exactly-once sinks of one result (`sinks:`): the table (its own progress row) and part
/// files; each kill may fall between the table's commit and the files', which recovery finishes.
#[test]
fn w1_into_postgres_and_files_survives_kill_9_exactly_once() {
    let url = std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("weir_crash_w1_fan_{}", std::process::id());
    let key = "w1-postgres-and-files/windows";
    let progress = weir::connectors::testing::psql(&url, "SELECT to_regclass('weir_sink_progress') IS NOT NULL");
    if progress == "t" {
        weir::connectors::testing::psql(&url, &format!("DELETE FROM weir_sink_progress WHERE sink = '{key}'"));
    }
    let out = Output::PostgresAndFiles { url: &url, table: &table };
    crash_until_done_into(
        "examples/w1-postgres-and-files.yaml",
        "examples/w1-sensor-window.yaml",
        out,
        1_000_000,
        10,
        seed(),
        Store::Local,
    );
    weir::connectors::testing::psql(
        &url,
        &format!("DROP TABLE {table}; DELETE FROM weir_sink_progress WHERE sink = '{key}'"),
    );
}

/// W5: two sources read at their own pace, joined with state on both sides; every kill loses
/// the join's rows since the last checkpoint, and each source resumes from its own position.
#[test]
fn w5_survives_kill_9_at_random_moments_exactly_once() {
    crash_until_done("examples/w5-interval-join.yaml", 600_000, 15, seed(), Store::Local);
}

#[test]
fn w3_survives_kill_9_at_random_moments_exactly_once() {
    crash_until_done("examples/w3-ewma-anomaly.yaml", 1_000_000, 20, seed(), Store::Local);
}

/// SIGINT under checkpoints saves the open windows instead of flushing them; the next run
/// resumes them, and the result is that of one uninterrupted run.
#[test]
fn sigint_saves_state_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 400_000);
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", "examples/w1-sensor-window.yaml", "--quiet"],
        &[("INPUT", &input), ("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let pipeline = checkpointed("examples/w1-sensor-window.yaml", dir.path(), Store::Local);
    let mut child = spawn(&pipeline, dir.path(), &input, 2, Output::Files);
    // Mid-run: a first checkpoint has completed, and the run goes on.
    let waited = Instant::now();
    while !(dir.path().join("ck").is_dir() && listing(dir.path(), Store::Local).contains("complete")) {
        assert!(waited.elapsed() < Duration::from_secs(120), "no checkpoint completed");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let partial = rows(&committed(&dir.path().join("out")));
    let listing = listing(dir.path(), Store::Local);
    assert!(listing.contains("complete") && !listing.contains("drained"), "stopped, not drained:\n{listing}");
    let o = spawn(&pipeline, dir.path(), &input, 1, Output::Files).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());
    assert!(partial.values().map(Vec::len).sum::<usize>() < want.values().map(Vec::len).sum::<usize>());
    assert_same(&want, &rows(&committed(&dir.path().join("out"))), "after SIGINT and a restart");
    // A third run has nothing left to do, and writes nothing more.
    let before = committed(&dir.path().join("out"));
    let o = spawn(&pipeline, dir.path(), &input, 2, Output::Files).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(committed(&dir.path().join("out")), before);
}
