//! The PostgreSQL sink: against the machine's server (`scripts/services.sh`; tables of each
//! test's own) and, where the server must restart mid-run, against a server of the test's own
//! (`weir_connectors::testing::PostgresServer`).

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::testing::{psql, PostgresServer, RedisServer};
use weir_core::runtime::Job;
use weir_core::testing::poll;

use crate::common::*;

/// The machine's server.
fn server() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A table name no other test run uses.
fn table(name: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    format!("weir_test_{name}_{}_{n}", std::process::id())
}

/// A file of `seq` events into a PostgreSQL sink with the given settings (YAML lines under
/// `postgres:`), optionally with checkpoints.
fn pipeline(input: &Path, dir: &Path, sink: &str, checkpoints: bool) -> PipelineConfig {
    let ck = if checkpoints {
        format!("checkpoints: {{ dir: {}, interval: 100ms }}\n", dir.join("ck").display())
    } else {
        String::new()
    };
    let yaml = format!(
        "name: pg-test
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: ts, type: int64 }}
      - {{ name: temp, type: float64 }}
  event_time: {{ column: ts, format: ms }}
sink:
  id: rows
  postgres:
{sink}
dead_letters: {{ path: {dead} }}
{ck}",
        input = input.display(),
        dead = dir.join("dead.jsonl").display(),
    );
    weir::yaml::parse_with("pg-test.yaml", &yaml, |_| None).unwrap()
}

fn run(cfg: PipelineConfig, workers: usize) -> weir_core::Result<RunSummary> {
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(workers), ..Default::default() }),
    )
}

fn dead_letters(dir: &Path) -> Vec<serde_json::Value> {
    let p = dir.join("dead.jsonl");
    if p.exists() {
        read_jsonl(&p)
    } else {
        Vec::new()
    }
}

#[test]
fn rows_are_appended_to_a_table_made_from_their_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (url, t) = (server(), table("append"));
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 20_000);
    let sink = format!("    url: {url}\n    table: {t}\n    create_table: true");
    let summary = run(pipeline(&input, dir.path(), &sink, false), 2).unwrap();
    assert_eq!(summary.source_records, 20_000);
    assert_eq!(
        psql(&url, &format!("SELECT count(*), count(DISTINCT seq), sum(seq), min(temp), max(temp) FROM {t}")),
        format!("20000|20000|{}|20.5|28.5", (0..20_000u64).sum::<u64>())
    );
    let types = psql(
        &url,
        &format!("SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = '{t}'"),
    );
    assert_eq!(types, "seq bigint NO, ts bigint NO, temp double precision NO");
    // A second run appends.
    run(pipeline(&input, dir.path(), &sink, false), 1).unwrap();
    assert_eq!(psql(&url, &format!("SELECT count(*) FROM {t}")), "40000");
    psql(&url, &format!("DROP TABLE {t}"));
}

#[test]
fn an_upsert_keeps_the_latest_row_of_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let (url, t) = (server(), table("upsert"));
    // Keys repeat within a batch and across runs: the last row of each wins.
    let input = dir.path().join("in.jsonl");
    let text: String = (0..5000)
        .map(|i| format!("{{\"seq\":{},\"ts\":{},\"temp\":{i}.0}}\n", i % 50, 1_796_000_000_000i64 + i))
        .collect();
    std::fs::write(&input, text).unwrap();
    let sink = format!("    url: {url}\n    table: {t}\n    mode: upsert\n    key: [seq]\n    create_table: true");
    run(pipeline(&input, dir.path(), &sink, false), 1).unwrap();
    assert_eq!(psql(&url, &format!("SELECT count(*), min(temp), max(temp) FROM {t}")), "50|4950|4999");
    assert_eq!(psql(&url, &format!("SELECT temp FROM {t} WHERE seq = 7")), "4957");
    let text: String = (0..50).map(|i| format!("{{\"seq\":{i},\"ts\":1796000009000,\"temp\":-1.0}}\n")).collect();
    std::fs::write(&input, text).unwrap();
    run(pipeline(&input, dir.path(), &sink, false), 1).unwrap();
    assert_eq!(psql(&url, &format!("SELECT count(*), min(temp), max(temp) FROM {t}")), "50|-1|-1");
    assert_eq!(
        psql(&url, &format!("SELECT count(*) FROM pg_constraint WHERE conrelid = '{t}'::regclass AND contype = 'p'")),
        "1"
    );
    psql(&url, &format!("DROP TABLE {t}"));
}

#[test]
fn rows_the_database_refuses_are_dead_lettered_with_its_message_and_the_rest_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (url, t) = (server(), table("refused"));
    psql(&url, &format!("CREATE TABLE {t} (seq bigint PRIMARY KEY CHECK (seq % 1000 <> 42), ts bigint, temp real, note text DEFAULT 'x')"));
    psql(&url, &format!("INSERT INTO {t} (seq) VALUES (7)"));
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 5000);
    let sink = format!("    url: {url}\n    table: {t}");
    let summary = run(pipeline(&input, dir.path(), &sink, false), 2).unwrap();
    assert_eq!(summary.source_records, 5000);
    // Seq 7 is there already (a duplicate key), and 42, 1042, ... fail the check.
    assert_eq!(psql(&url, &format!("SELECT count(*), count(*) FILTER (WHERE note = 'x') FROM {t}")), "4995|4995");
    let dead = dead_letters(dir.path());
    let mut reasons: Vec<(i64, String)> = dead
        .iter()
        .map(|d| {
            let row: serde_json::Value = match &d["payload"] {
                serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
                v => v.clone(),
            };
            (row["seq"].as_i64().unwrap(), d["reason"].as_str().unwrap().to_string())
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.iter().map(|r| r.0).collect::<Vec<_>>(), [7, 42, 1042, 2042, 3042, 4042], "{dead:?}");
    assert!(
        reasons[0].1.contains("duplicate key value violates unique constraint") && reasons[0].1.contains("23505"),
        "{}",
        reasons[0].1
    );
    assert!(reasons[1].1.contains("violates check constraint") && reasons[1].1.contains("23514"), "{}", reasons[1].1);
    assert!(dead.iter().all(|d| d["kind"] == "sink"), "{dead:?}");
    psql(&url, &format!("DROP TABLE {t}"));
}

#[test]
fn settings_the_table_cannot_take_are_refused_naming_table_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (url, t) = (server(), table("settings"));
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 10);
    let err = |sink: String| run(pipeline(&input, dir.path(), &sink, false), 1).unwrap_err().to_string();
    let e = err(format!("    url: {url}\n    table: {t}"));
    assert!(e.contains(&format!("table `{t}` does not exist")) && e.contains("create_table"), "{e}");
    psql(&url, &format!("CREATE TABLE {t} (seq boolean, ts bigint, temp float8)"));
    let e = err(format!("    url: {url}\n    table: {t}"));
    assert!(e.contains("column `seq`") && e.contains("is boolean") && e.contains("Int64"), "{e}");
    psql(&url, &format!("DROP TABLE {t}; CREATE TABLE {t} (seq bigint, ts bigint)"));
    let e = err(format!("    url: {url}\n    table: {t}"));
    assert!(e.contains("has no column `temp`") && e.contains("seq, ts"), "{e}");
    psql(&url, &format!("ALTER TABLE {t} ADD COLUMN temp numeric"));
    let e = err(format!("    url: {url}\n    table: {t}"));
    assert!(e.contains("type numeric"), "{e}");
    psql(&url, &format!("ALTER TABLE {t} ALTER COLUMN temp TYPE float8"));
    let e = err(format!("    url: {url}\n    table: {t}\n    mode: upsert\n    key: [seq]"));
    assert!(e.contains("upsert into") && e.contains("ON CONFLICT"), "{e}");
    // Checked before connecting: the key must be a column, upsert needs one.
    let bad = |sink: &str| {
        let p = Pipeline::from_config(pipeline(&input, dir.path(), sink, false)).build();
        p.and_then(|p| p.plan(&RunOptions::default()).map(|_| ())).unwrap_err().to_string()
    };
    let e = bad(&format!("    url: {url}\n    table: {t}\n    mode: upsert"));
    assert!(e.contains("needs `key`"), "{e}");
    let e = bad(&format!("    url: {url}\n    table: {t}\n    mode: upsert\n    key: [nope]"));
    assert!(e.contains("key column `nope`"), "{e}");
    let e = bad(&format!("    url: {url}\n    table: {t}\n    delivery: exactly_once"));
    assert!(e.contains("needs `checkpoints`"), "{e}");
    let yaml = weir::yaml::parse_with(
        "p.yaml",
        &format!(
            "name: p\nsource: {{ id: s, stdin: {{}} }}\nsink:\n  id: o\n  postgres:\n    url: {url}\n    tabel: x\n"
        ),
        |_| None,
    );
    let e = yaml.unwrap_err().to_string();
    assert!(e.contains("tabel") && e.contains("p.yaml:7"), "{e}");
    psql(&url, &format!("DROP TABLE {t}"));
}

/// Exactly once through a server restart: the open transaction dies with its connection, the
/// run starts again from its last checkpoint (waiting for the server), and the table ends with
/// every row once.
#[test]
fn exactly_once_through_a_database_restart_mid_run() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PostgresServer::start(dir.path());
    let redis = RedisServer::start(dir.path());
    let f = dir.path().join("a.jsonl");
    events(&f, 0, 30_000);
    xadd(&redis.url(), &f);
    let mut src = RedisStreamsSettings::new(redis.url(), vec!["s".into()]);
    src.group = Some("g".into());
    src.consumer = Some("t".into());
    src.end_when_idle = Some(Duration::from_secs(2));
    // Checkpoints far apart, so the database goes away while a transaction holds rows.
    let mut cfg = seq_pipeline(
        "redis",
        SourceConnector::RedisStreams(src),
        true,
        &dir.path().join("unused"),
        Some((&dir.path().join("ck"), "1s")),
    );
    let sink = format!("url: {}\ntable: seqs\ncreate_table: true", pg.url());
    cfg.sink = SinkConfig::new("rows", SinkConnector::Postgres(serde_yaml::from_str(&sink).unwrap()));
    let job = Job::new(
        Pipeline::from_config(cfg)
            .build()
            .unwrap()
            .plan(&RunOptions { workers: Some(2), ..Default::default() })
            .unwrap(),
    )
    .unwrap();
    let reg = job.registry();
    let rt = rt();
    let handle = rt.spawn(job.run());
    poll(|| (reg.connectors.get("weir_postgres_rows_total", &[("table", "seqs")]).unwrap_or(0.0) > 0.0).then_some(()));
    pg.restart();
    events(&f, 30_000, 5000);
    xadd(&redis.url(), &f);
    rt.block_on(handle).unwrap().unwrap();
    let restarts = reg.connectors.get("weir_job_restarts_total", &[("reason", "sink")]).unwrap_or(0.0);
    assert!(restarts >= 1.0, "the lost transaction restarted the run: {restarts}");
    assert_eq!(
        psql(&pg.url(), "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM seqs"),
        "35000|35000|0|34999"
    );
    let progress = psql(&pg.url(), "SELECT sink, checkpoint > 0 FROM weir_sink_progress");
    assert_eq!(progress, "server-source/rows|t");
}

fn xadd(url: &str, file: &Path) {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for chunk in lines.chunks(1000) {
        let mut p = redis::pipe();
        for l in chunk {
            p.cmd("XADD").arg("s").arg("*").arg("data").arg(*l).ignore();
        }
        p.query::<()>(&mut c).unwrap();
    }
}

/// The password from `PGPASSWORD` when the URL has none; a missing or wrong one fails the run
/// at once with the server's reason, and a password never shows in settings or errors.
#[test]
fn a_password_comes_from_pgpassword_and_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start_with_password(dir.path(), Some("s3cret-pw"));
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 100);
    let sink = |url: &str| format!("    url: {url}\n    table: t\n    create_table: true");
    std::env::remove_var("PGPASSWORD");
    let e = run(pipeline(&input, dir.path(), &sink(&pg.url()), false), 1).unwrap_err().to_string();
    assert!(e.contains("password missing"), "{e}");
    let wrong = format!("postgres://postgres:wrong-pw@127.0.0.1:{}/postgres", pg.port);
    let e = run(pipeline(&input, dir.path(), &sink(&wrong), false), 1).unwrap_err().to_string();
    assert!(e.contains("password authentication failed") && !e.contains("wrong-pw"), "{e}");
    let cfg = pipeline(&input, dir.path(), &sink(&wrong), false);
    assert!(!format!("{cfg:?}").contains("wrong-pw"), "settings show no password");
    std::env::set_var("PGPASSWORD", "s3cret-pw");
    run(pipeline(&input, dir.path(), &sink(&pg.url()), false), 1).unwrap();
    assert_eq!(psql(&pg.url(), "SELECT count(*) FROM t"), "100");
}

/// TLS when the URL says `sslmode=require`: the server's certificate is verified against
/// `ca_file`; one that does not verify fails the run at once with the reason. The test's server
/// refuses TCP connections without TLS, so a run that works used it.
#[test]
fn tls_verifies_the_server_certificate_against_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl").args(args).current_dir(d).output().expect("running openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=weir-test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let pg = PostgresServer::start_with_tls(d, &d.join("server.pem"), &d.join("server.key"));
    let input = d.join("in.jsonl");
    events(&input, 0, 100);
    let tls_url = format!("{}?sslmode=require", pg.url());
    let sink = |url: &str, ca: Option<&Path>| {
        let ca = ca.map(|p| format!("\n    ca_file: {}", p.display())).unwrap_or_default();
        format!("    url: \"{url}\"\n    table: t\n    create_table: true{ca}")
    };
    run(pipeline(&input, d, &sink(&tls_url, Some(&d.join("ca.pem"))), false), 1).unwrap();
    assert_eq!(psql(&tls_url, "SELECT count(*) FROM t"), "100");
    // Not trusted: the run fails at once, naming the certificate.
    let e = run(pipeline(&input, d, &sink(&tls_url, None), false), 1).unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");
    // Without TLS the server refuses.
    let e = run(pipeline(&input, d, &sink(&pg.url(), None), false), 1).unwrap_err().to_string();
    assert!(e.contains("no encryption") || e.contains("pg_hba.conf"), "{e}");
}
