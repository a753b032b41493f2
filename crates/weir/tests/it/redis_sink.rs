//! The Redis sink against the machine's server (`scripts/services.sh`), keys of each test's own.

use std::path::Path;

use weir::prelude::*;

use crate::common::*;

fn server() -> String {
    std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix(name: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    format!("weir-test-{name}-{}-{n}", std::process::id())
}

/// Events `{seq, device, ts, temp}` of `devices` devices into a Redis sink (YAML under `redis:`).
fn run_into(dir: &Path, lines: &str, sink: &str) -> RunSummary {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, lines).unwrap();
    let yaml = format!(
        "name: redis-sink-test
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: device, type: string, required: false }}
      - {{ name: temp, type: float64 }}
sink:
  id: out
  redis:
{sink}
dead_letters: {{ path: {dead} }}
",
        input = input.display(),
        dead = dir.join("dead.jsonl").display(),
    );
    let cfg = weir::yaml::parse_with("t.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap()
}

fn conn() -> redis::Connection {
    redis::Client::open(server()).unwrap().get_connection().unwrap()
}

fn events(n: i64, devices: i64) -> String {
    (0..n).map(|i| format!("{{\"seq\":{i},\"device\":\"d{}\",\"temp\":{i}.5}}\n", i % devices)).collect()
}

#[test]
fn hset_keeps_the_latest_row_of_each_key_with_a_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let p = prefix("hset");
    run_into(
        dir.path(),
        &events(1000, 10),
        &format!("    url: {}\n    key: \"{p}:{{device}}\"\n    ttl: 1h", server()),
    );
    let mut c = conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{p}:*")).query(&mut c).unwrap();
    assert_eq!(keys.len(), 10, "{keys:?}");
    let h: std::collections::BTreeMap<String, String> =
        redis::cmd("HGETALL").arg(format!("{p}:d3")).query(&mut c).unwrap();
    assert_eq!(h.get("seq").map(String::as_str), Some("993"));
    assert_eq!(h.get("device").map(String::as_str), Some("d3"), "strings without JSON quotes");
    assert_eq!(h.get("temp").map(String::as_str), Some("993.5"));
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{p}:d3")).query(&mut c).unwrap();
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{ttl}");
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
}

#[test]
fn xadd_appends_entries_trimmed_to_maxlen() {
    let dir = tempfile::tempdir().unwrap();
    let p = prefix("xadd");
    run_into(
        dir.path(),
        &events(3000, 2),
        &format!("    url: {}\n    command: xadd\n    key: \"{p}\"\n    field: row", server()),
    );
    let mut c = conn();
    let len: i64 = redis::cmd("XLEN").arg(&p).query(&mut c).unwrap();
    assert_eq!(len, 3000);
    let last: redis::Value =
        redis::cmd("XREVRANGE").arg(&p).arg("+").arg("-").arg("COUNT").arg(1).query(&mut c).unwrap();
    let text = format!("{last:?}");
    assert!(text.contains("row") && text.contains(r#"{\"seq\":2999,\"device\":\"d1\",\"temp\":2999.5}"#), "{text}");
    // With MAXLEN ~ the stream is trimmed near the bound (whole macro nodes, so a little above).
    let p2 = format!("{p}-trim");
    run_into(
        dir.path(),
        &events(3000, 2),
        &format!("    url: {}\n    command: xadd\n    key: \"{p2}\"\n    maxlen: 500", server()),
    );
    let len: i64 = redis::cmd("XLEN").arg(&p2).query(&mut c).unwrap();
    assert!((500..1000).contains(&len), "{len}");
    let _: () = redis::cmd("DEL").arg(&p).arg(&p2).query(&mut c).unwrap();
}

#[test]
fn publish_sends_each_row_as_json_to_its_channel() {
    let dir = tempfile::tempdir().unwrap();
    let p = prefix("pub");
    let mut sub = conn();
    let mut ps = sub.as_pubsub();
    ps.psubscribe(format!("{p}.*")).unwrap();
    ps.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    run_into(
        dir.path(),
        &events(20, 2),
        &format!("    url: {}\n    command: publish\n    key: \"{p}.{{device}}\"", server()),
    );
    let mut got = Vec::new();
    while got.len() < 20 {
        let m = ps.get_message().unwrap();
        got.push((m.get_channel_name().to_string(), m.get_payload::<String>().unwrap()));
    }
    assert_eq!(got[0], (format!("{p}.d0"), r#"{"seq":0,"device":"d0","temp":0.5}"#.to_string()));
    assert_eq!(got[19].0, format!("{p}.d1"));
}

#[test]
fn rows_redis_refuses_or_without_a_key_are_dead_lettered_and_the_rest_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = prefix("refused");
    let mut c = conn();
    // d1's key holds a string: HSET on it fails with WRONGTYPE.
    let _: () = redis::cmd("SET").arg(format!("{p}:d1")).arg("x").query(&mut c).unwrap();
    let lines = format!("{}{{\"seq\":100,\"temp\":1.0}}\n", events(10, 3));
    run_into(dir.path(), &lines, &format!("    url: {}\n    key: \"{p}:{{device}}\"", server()));
    let dead = read_jsonl(&dir.path().join("dead.jsonl"));
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(dead.len(), 4, "3 rows of d1 and the row without a device: {reasons:?}");
    assert_eq!(reasons.iter().filter(|r| r.contains("WRONGTYPE")).count(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("`{device}`") && r.contains("is null")), "{reasons:?}");
    let seq: String = redis::cmd("HGET").arg(format!("{p}:d2")).arg("seq").query(&mut c).unwrap();
    assert_eq!(seq, "8");
    let _: () =
        redis::cmd("DEL").arg(format!("{p}:d0")).arg(format!("{p}:d1")).arg(format!("{p}:d2")).query(&mut c).unwrap();
    // A template naming no column is refused before anything runs.
    let cfg = weir::yaml::parse_with(
        "t.yaml",
        &format!("name: t\nsource: {{ id: s, stdin: {{}}, schema: {{ fields: [{{ name: a, type: string }}] }} }}\nsink:\n  id: o\n  redis:\n    url: {}\n    key: \"x:{{b}}\"\n", server()),
        |_| None,
    )
    .unwrap();
    let e = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`{b}` is not a column (the rows have: a)"), "{e}");
}
