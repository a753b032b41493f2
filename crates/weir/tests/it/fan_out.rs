//! Several sinks for one result (`sinks: [...]`): every sink gets every row, a retried write
//! does not repeat the sinks that had taken it, refused rows name their sink.

use std::io::Write;
use std::path::Path;

use weir::prelude::*;
use weir_connectors::testing::psql;

use crate::common::*;

fn pg() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn unique(name: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    format!("weir_test_{name}_{}_{n}", std::process::id())
}

/// `seq` events into the YAML `sinks` given (indented list items).
fn config(dir: &Path, n: u64, sinks: &str, extra: &str) -> PipelineConfig {
    let input = dir.join("in.jsonl");
    events(&input, 0, n);
    let yaml = format!(
        "name: fan-out
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: ts, type: int64 }}
      - {{ name: temp, type: float64 }}
sinks:
{sinks}
dead_letters: {{ path: {dead} }}
{extra}",
        input = input.display(),
        dead = dir.join("dead.jsonl").display(),
    );
    weir::yaml::parse_with("fan.yaml", &yaml, |_| None).unwrap()
}

fn run(cfg: PipelineConfig) -> weir_core::Result<RunSummary> {
    rt().block_on(Pipeline::from_config(cfg).build()?.run(&RunOptions { workers: Some(2), ..Default::default() }))
}

#[test]
fn every_sink_of_the_list_gets_every_row_and_refusals_name_their_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (url, t) = (pg(), unique("fan"));
    psql(&url, &format!("CREATE TABLE {t} (seq bigint PRIMARY KEY CHECK (seq <> 77), ts bigint, temp float8)"));
    let redis_key = unique("fan");
    let out = dir.path().join("all.jsonl");
    let sinks = format!(
        "  - {{ id: all, file: {{ path: {} }} }}
  - {{ id: history, postgres: {{ url: \"{url}\", table: {t} }} }}
  - {{ id: latest, redis: {{ url: \"redis://127.0.0.1:6379\", key: \"{redis_key}:{{seq}}\" }} }}",
        out.display()
    );
    let cfg = config(dir.path(), 3000, &sinks, "");
    // The list is one sink step whose YAML form reads back the same.
    let again = weir::yaml::parse_with("again.yaml", &serde_yaml::to_string(&cfg).unwrap(), |_| None).unwrap();
    assert_eq!(again, cfg);
    run(cfg).unwrap();
    assert_seqs(&read_jsonl(&out), 0..3000, "the file");
    assert_eq!(psql(&url, &format!("SELECT count(*) FROM {t}")), "2999");
    let mut c = redis::Client::open("redis://127.0.0.1:6379").unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{redis_key}:*")).query(&mut c).unwrap();
    assert_eq!(keys.len(), 3000);
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
    let dead = read_jsonl(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("sink `history`: postgres refused the row") && reason.contains("check constraint"),
        "{reason}"
    );
    psql(&url, &format!("DROP TABLE {t}"));
}

#[test]
fn a_retried_write_does_not_repeat_the_sinks_that_had_taken_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // An endpoint that is busy (503) for its first two requests, then takes everything.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/in", listener.local_addr().unwrap());
    let taken = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let t = taken.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let Some((_, body)) = read_request(&conn) else { continue };
            let status = if n < 2 {
                "503 Service Unavailable"
            } else {
                *t.lock().unwrap() += serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap().len();
                "200 OK"
            };
            let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let out = dir.path().join("all.jsonl");
    let sinks = format!(
        "  - {{ id: all, file: {{ path: {} }} }}\n  - {{ id: hook, http: {{ url: \"{url}\" }} }}",
        out.display()
    );
    let mut cfg = config(dir.path(), 2000, &sinks, "");
    cfg.sink.retry.initial_backoff = std::time::Duration::from_millis(10);
    run(cfg).unwrap();
    assert_seqs(&read_jsonl(&out), 0..2000, "the file, written once although the batch was retried");
    assert_eq!(*taken.lock().unwrap(), 2000);
}

#[test]
fn lists_that_cannot_work_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let url = pg();
    let err = |sinks: &str, extra: &str| run(config(dir.path(), 1, sinks, extra)).unwrap_err().to_string();
    let ck = format!("checkpoints: {{ dir: {} }}", dir.path().join("ck").display());
    let e = err(
        &format!("  - {{ id: a, postgres: {{ url: \"{url}\", table: x, create_table: true }} }}\n  - {{ id: b, postgres: {{ url: \"{url}\", table: y, create_table: true }} }}"),
        &ck,
    );
    assert!(e.contains("sinks `a` and `b` are each exactly once"), "{e}");
    let e = err("  - { id: a, stdout: {} }\n  - { id: a, stdout: {} }", "");
    assert!(e.contains("two sinks in the list are called `a`"), "{e}");
    let e = err("  - { id: a, stdout: {}, retry: { max_attempts: 3 } }", "");
    assert!(e.contains("`retry` applies to every sink of a list"), "{e}");
    let e = err("  - { id: a, fan_out: [ { id: b, stdout: {} } ] }", "");
    assert!(e.contains("cannot hold another list"), "{e}");
}
