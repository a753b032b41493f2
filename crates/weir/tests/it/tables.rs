//! The `table` step: running aggregates and latest rows per key, emitted as changes that sinks
//! apply as upserts and deletes, and read over the API port while the job runs.

use std::collections::BTreeMap;

use serde_json::Value;
use weir::prelude::*;

use crate::common::*;

const SENSOR: &str = r#"{ fields: [ { name: device_id, type: string }, { name: ts, type: int64 },
  { name: readings, type: struct, fields: [ { name: temp, type: float64 } ] } ] }"#;

fn build(text: &str) -> BuiltPipeline {
    let cfg = weir::yaml::parse_with("t.yaml", text, |_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Pipeline::from_config(cfg).build().unwrap()
}

/// The sensors file through a table of `steps`, written to `out` as JSON Lines.
fn sensors(steps: &str, sink: &str) -> String {
    format!(
        "name: t\nsource: {{ id: in, batch_size: 10, file: {{ path: \"{}\", format: json }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\nsteps:\n{steps}sink: {sink}\n",
        data("sensors-3k.jsonl").display()
    )
}

/// Per device: (count, max temp, temp of the newest reading).
fn per_device() -> BTreeMap<String, (i64, f64, f64)> {
    let mut want: BTreeMap<String, (i64, f64, f64, i64)> = BTreeMap::new();
    for v in read_jsonl(&data("sensors-3k.jsonl")) {
        let (d, ts, t) = (
            v["device_id"].as_str().unwrap().to_string(),
            v["ts"].as_i64().unwrap(),
            v["readings"]["temp"].as_f64().unwrap(),
        );
        let e = want.entry(d).or_insert((0, f64::MIN, 0.0, i64::MIN));
        e.0 += 1;
        e.1 = e.1.max(t);
        if ts >= e.3 {
            e.2 = t;
            e.3 = ts;
        }
    }
    want.into_iter().map(|(d, (n, m, l, _))| (d, (n, m, l))).collect()
}

const AGGS: &str = "  - table: { id: devices, key: device_id, aggregates: { n: count(), max_temp: max(readings.temp), temp: last(readings.temp) } }\n";

/// Each device's last change carries its aggregates over the whole file; its first change is
/// an insert and the others updates; at one and two workers.
#[test]
fn a_tables_changes_end_at_each_keys_aggregates() {
    let want = per_device();
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = sensors(AGGS, &format!("{{ id: out, file: {{ path: \"{}\", format: json }} }}", out.display()));
        let rt = rt();
        let s = rt.block_on(build(&text).run(&RunOptions { workers: Some(workers), ..Default::default() })).unwrap();
        assert_eq!(s.source_records, 3000);
        let mut last: BTreeMap<String, Value> = BTreeMap::new();
        let mut ops: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in read_jsonl(&out) {
            let d = v["device_id"].as_str().unwrap().to_string();
            ops.entry(d.clone()).or_default().push(v["_op"].as_str().unwrap().to_string());
            last.insert(d, v);
        }
        assert_eq!(last.len(), want.len());
        for (d, (n, m, t)) in &want {
            let v = &last[d];
            assert_eq!(
                (v["n"].as_i64().unwrap(), v["max_temp"].as_f64().unwrap(), v["temp"].as_f64().unwrap()),
                (*n, *m, *t),
                "{d}"
            );
            let o = &ops[d];
            assert!(o[0] == "insert" && o[1..].iter().all(|x| x == "update"), "{d}: {o:?}");
        }
    }
}

/// The API port answers a key's current value, a prefix scan, and says what is wrong with a
/// query it cannot answer.
#[test]
fn the_api_port_reads_a_table() {
    let want = per_device();
    let built = build(&sensors(AGGS, "{ id: out, stdout: {} }"));
    let rt = rt();
    rt.block_on(async {
        let job =
            weir_core::runtime::Job::new(built.plan(&RunOptions { workers: Some(2), ..Default::default() }).unwrap())
                .unwrap();
        let server = weir::http::MetricsServer::start("127.0.0.1:0", built.http_state(&job)).await.unwrap();
        job.run().await.unwrap();
        let addr = server.addr();
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(addr, "/tables/devices/dev-00042")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let (n, m, t) = want["dev-00042"];
        assert_eq!(
            (
                v["device_id"].as_str().unwrap(),
                v["n"].as_i64().unwrap(),
                v["max_temp"].as_f64().unwrap(),
                v["temp"].as_f64().unwrap()
            ),
            ("dev-00042", n, m, t)
        );

        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(addr, "/tables/devices?prefix=dev-0001&limit=5"))
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), 5);
        assert_eq!(v["truncated"], true, "dev-00010..dev-00019 are ten");
        assert!(v["rows"].as_array().unwrap().iter().all(|r| r["device_id"].as_str().unwrap().starts_with("dev-0001")));

        let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/tables/devices/nope")).await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("not in table `devices`"), "{body}");
        let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/tables/nope/x")).await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("no table `nope`") && body.contains("devices"), "{body}");
        let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/tables")).await.unwrap();
        assert_eq!((status, body.trim()), (200, "[\"devices\"]"));
    });
}

/// `latest: true` keeps each key's newest row; with a TTL, keys not updated for a while are
/// deleted as the watermark moves on.
#[test]
fn latest_rows_and_deletes_by_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let text = sensors(
        "  - table: { id: last, key: device_id, latest: true, state_ttl: 1s }\n",
        &format!("{{ id: out, file: {{ path: \"{}\", format: json }} }}", out.display()),
    );
    let rt = rt();
    rt.block_on(build(&text).run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();
    let rows = read_jsonl(&out);
    let deletes = rows.iter().filter(|r| r["_op"] == "delete").count();
    // 50 devices, a reading each about every second: a gap of over 3 s (the TTL plus the 2 s
    // watermark bound) deletes the key; the data has 146 such gaps. The end of input deletes
    // nothing.
    assert!((100..=146).contains(&deletes), "{deletes} deletes");
    // Every row carries the whole input row.
    assert!(rows.iter().all(|r| r["readings"]["temp"].is_f64()));
    // After a delete, the key's next change is an insert.
    let mut state: BTreeMap<String, bool> = BTreeMap::new();
    for r in &rows {
        let d = r["device_id"].as_str().unwrap().to_string();
        let op = r["_op"].as_str().unwrap();
        let present = state.get(&d).copied().unwrap_or(false);
        match op {
            "insert" => assert!(!present, "{d}: insert while present"),
            "update" | "delete" => assert!(present, "{d}: {op} while absent"),
            _ => panic!("{op}"),
        }
        state.insert(d, op != "delete");
    }
}

/// The state a change log leaves: per key its last insert or update, keys deleted gone.
fn replay(changes: &[Value], key: &str) -> BTreeMap<String, Value> {
    let mut state = BTreeMap::new();
    for c in changes {
        let k = c[key].as_str().unwrap().to_string();
        if c["_op"] == "delete" {
            state.remove(&k);
        } else {
            state.insert(k, c.clone());
        }
    }
    state
}

/// A table's changes written at once to a file, a PostgreSQL upsert table and Redis hashes:
/// the database and Redis end up holding what replaying the change log gives, deleted keys
/// gone, and no `_op` column in either.
#[test]
fn upsert_sinks_apply_a_tables_changes_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let pg = std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let (table, prefix) =
        (format!("weir_test_table_{}_{n}", std::process::id()), format!("weirtest:table:{}:{n}", std::process::id()));
    let text = format!(
        "name: t\nsource: {{ id: in, batch_size: 10, file: {{ path: \"{}\", format: json }}, schema: {SENSOR}, event_time: {{ column: ts }} }}\nsteps:\n  - table: {{ id: devices, key: device_id, aggregates: {{ n: count(), max_temp: max(readings.temp) }}, state_ttl: 1s }}\nsinks:\n  - {{ id: log, input: devices, file: {{ path: \"{}\", format: json }} }}\n  - {{ id: pg, input: devices, postgres: {{ url: \"{pg}\", table: {table}, mode: upsert, key: [device_id], create_table: true }} }}\n  - {{ id: kv, input: devices, redis: {{ url: \"{redis_url}\", key: \"{prefix}:{{device_id}}\" }} }}\n",
        data("sensors-3k.jsonl").display(),
        log.display()
    );
    rt().block_on(build(&text).run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();
    let changes = read_jsonl(&log);
    let want = replay(&changes, "device_id");
    assert!(changes.iter().any(|c| c["_op"] == "delete"), "the TTL deleted keys");
    assert!(want.len() < 50, "some devices are gone at the end");

    let got =
        weir_connectors::testing::psql(&pg, &format!("SELECT device_id, n, max_temp FROM {table} ORDER BY device_id"));
    let want_pg: Vec<String> =
        want.values().map(|v| format!("{}|{}|{}", v["device_id"].as_str().unwrap(), v["n"], v["max_temp"])).collect();
    assert_eq!(got.lines().collect::<Vec<_>>(), want_pg);
    let cols = weir_connectors::testing::psql(
        &pg,
        &format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = '{table}' AND column_name = '_op'"
        ),
    );
    assert_eq!(cols, "0");
    weir_connectors::testing::psql(&pg, &format!("DROP TABLE {table}"));

    let mut c = redis::Client::open(redis_url).unwrap().get_connection().unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(&mut c).unwrap();
    keys.sort();
    let want_keys: Vec<String> = want.keys().map(|d| format!("{prefix}:{d}")).collect();
    assert_eq!(keys, want_keys);
    let h: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&keys[0]).query(&mut c).unwrap();
    let first = want.values().next().unwrap();
    assert_eq!(h.get("n").map(String::as_str), Some(first["n"].to_string().as_str()));
    assert!(!h.contains_key("_op"));
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
}
