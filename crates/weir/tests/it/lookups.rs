//! The lookup join against a PostgreSQL table (the machine's server, tables of each test's own):
//! rows enriched through one query per batch, misses kept or set aside, and the cache.

use std::path::Path;
use std::time::Duration;

use weir::prelude::*;
use weir_connectors::postgres::lookup::{open as open_pg, PgTableSpec};
use weir_connectors::testing::psql;
use weir_core::lookup::LookupKeys;

use crate::common::*;

fn server() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A table `devices` of the test's own: `id bigint` key, `site text`, `temp_limit double
/// precision`, `floor integer`, `ok boolean`, `rating numeric`; ids 1..=3.
fn devices(name: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let t = format!("weir_test_devices_{name}_{}_{n}", std::process::id());
    psql(
        &server(),
        &format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, site text, temp_limit double precision, floor integer, ok boolean, rating numeric);
             INSERT INTO {t} VALUES (1, 'north', 20.5, 3, true, 1.25), (2, 'south', 30, NULL, false, 2), (3, 'east', 25, 1, true, 0.5)"
        ),
    );
    t
}

/// Events `{id, v}` (ids 1, 9, none, 2, 1) through a lookup on `id` against `table` (YAML lines
/// under `table:`).
fn run_lookup(dir: &Path, table: &str, join: &str, missing: &str) -> Vec<serde_json::Value> {
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":1,\"v\":10}\n{\"id\":9,\"v\":90}\n{\"v\":0}\n{\"id\":2,\"v\":20}\n{\"id\":1,\"v\":11}\n",
    )
    .unwrap();
    let out = dir.join("out.jsonl");
    let yaml = format!(
        "name: pg-lookup
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema: {{ fields: [ {{ name: id, type: int64, required: false }}, {{ name: v, type: int64 }} ] }}
steps:
  - lookup:
      id: device
      key: id
      table:
{table}
      join: {join}
      missing: {missing}
sink: {{ id: out, file: {{ path: {out}, format: json }} }}
dead_letters: {{ path: {dead} }}
",
        input = input.display(),
        out = out.display(),
        dead = dir.join("dead.jsonl").display(),
    );
    let cfg = weir::yaml::parse_with("t.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap();
    let mut rows = read_jsonl(&out);
    rows.sort_by_key(|r| r["v"].as_i64());
    rows
}

#[test]
fn rows_are_enriched_from_a_postgres_table_by_a_key_of_its_own_type() {
    let dir = tempfile::tempdir().unwrap();
    let t = devices("join");
    let table = format!(
        "        postgres: {{ url: \"{}\", table: {t} }}\n        columns: [site, temp_limit, floor, ok, rating]",
        server()
    );
    let rows = run_lookup(dir.path(), &table, "left", "drop");
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[1],
        serde_json::json!({"id": 1, "v": 10, "site": "north", "temp_limit": 20.5, "floor": 3, "ok": true, "rating": 1.25})
    );
    assert_eq!(rows[3]["floor"], serde_json::Value::Null, "a null in the table: {}", rows[3]);
    assert_eq!(rows[3]["site"], "south");
    assert_eq!(rows[4]["site"], serde_json::Value::Null, "id 9 is not in the table: {}", rows[4]);
    assert_eq!(rows[0]["site"], serde_json::Value::Null, "a null key finds nothing: {}", rows[0]);

    let dir = tempfile::tempdir().unwrap();
    let rows = run_lookup(dir.path(), &table, "inner", "dead_letter");
    let vs: Vec<i64> = rows.iter().map(|r| r["v"].as_i64().unwrap()).collect();
    assert_eq!(vs, [10, 11, 20]);
    let dead: Vec<String> =
        read_jsonl(&dir.path().join("dead.jsonl")).iter().map(|d| d["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(dead, ["no row in the lookup table for key `9`", "the lookup key is null"]);
    psql(&server(), &format!("DROP TABLE {t}"));
}

fn keys(k: &[&str]) -> LookupKeys {
    let mut keys = LookupKeys::default();
    let col: arrow_array::ArrayRef = std::sync::Arc::new(arrow_array::StringArray::from(k.to_vec()));
    keys.fill(&[col]).unwrap();
    keys
}

#[test]
fn answers_are_cached_for_their_ttl_and_bad_settings_are_named() {
    let t = devices("cache");
    let spec = |ttl: Duration| PgTableSpec {
        url: server(),
        table: t.clone(),
        key: vec!["id".into()],
        columns: Some(vec!["site".into()]),
        cache_size: 1000,
        cache_ttl: ttl,
        ca_file: None,
    };
    let long = open_pg(spec(Duration::from_secs(3600))).unwrap();
    let short = open_pg(spec(Duration::from_millis(50))).unwrap();
    assert_eq!(long.lookup(&keys(&["3", "7", "3", "3"])).unwrap().1, [true, false, true, true]);
    assert_eq!(short.lookup(&keys(&["3"])).unwrap().1, [true]);
    assert_eq!(long.len(), 2, "found rows and missing keys are both kept");
    let s = long.stats();
    assert_eq!((s.queries, s.keys_asked, s.cache_hits), (1, 2, 2), "one question for the batch's keys: {s:?}");
    psql(&server(), &format!("DELETE FROM {t} WHERE id = 3; INSERT INTO {t} (id, site) VALUES (7, 'west')"));
    // Cached for an hour: the table's change is not seen yet, and the server is not asked.
    assert_eq!(long.lookup(&keys(&["3", "7"])).unwrap().1, [true, false]);
    assert_eq!(long.stats().queries, 1);
    // Cached for 50 ms: seen once the answers expire.
    poll(|| (short.lookup(&keys(&["3", "7"])).unwrap().1 == [false, true]).then_some(()));

    let mut bad = spec(Duration::from_secs(1));
    bad.columns = Some(vec!["nope".into()]);
    let e = open_pg(bad).unwrap_err().to_string();
    assert!(e.contains("has no column `nope`") && e.contains("`site`"), "{e}");
    let mut bad = spec(Duration::from_secs(1));
    bad.table = "weir_test_no_such_table".into();
    let e = open_pg(bad).unwrap_err().to_string();
    assert!(e.contains("weir_test_no_such_table") && e.contains("does not exist"), "{e}");
    psql(&server(), &format!("DROP TABLE {t}"));
}

/// A database restart between two lookups: the second waits for the server and gets its rows
/// on a new connection.
#[test]
fn a_lookup_after_a_database_restart_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = weir_connectors::testing::PostgresServer::start(dir.path());
    psql(
        &pg.url(),
        "CREATE TABLE devices (id text PRIMARY KEY, site text); INSERT INTO devices VALUES ('d1', 'north')",
    );
    let table = open_pg(PgTableSpec {
        url: pg.url(),
        table: "devices".into(),
        key: vec!["id".into()],
        columns: None,
        cache_size: 10,
        cache_ttl: Duration::ZERO,
        ca_file: None,
    })
    .unwrap();
    assert_eq!(table.lookup(&keys(&["d1", "d2"])).unwrap().1, [true, false]);
    pg.restart();
    let (rows, found) = table.lookup(&keys(&["d1"])).unwrap();
    assert_eq!(found, [true]);
    assert!(format!("{:?}", rows.column(0)).contains("north"));
}

#[test]
fn rows_are_enriched_from_redis_hashes_read_as_the_schema_types() {
    let url = std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let prefix = format!("weir-test-lookup-{}-{n}:", std::process::id());
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(format!("{prefix}1"))
        .arg(&["site", "north", "limit", "20.5", "floor", "3"])
        .ignore()
        .cmd("HSET")
        .arg(format!("{prefix}2"))
        .arg(&["site", "south", "limit", "warm"])
        .ignore()
        .query(&mut c)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let table = format!(
        "        redis: {{ url: \"{url}\", prefix: \"{prefix}\" }}\n        schema: {{ fields: [ {{ name: site, type: string }}, {{ name: limit, type: float64 }}, {{ name: floor, type: int64 }} ] }}"
    );
    let rows = run_lookup(dir.path(), &table, "left", "drop");
    assert_eq!(rows[1], serde_json::json!({"id": 1, "v": 10, "site": "north", "limit": 20.5, "floor": 3}));
    assert_eq!(
        rows[3],
        serde_json::json!({"id": 2, "v": 20, "site": "south", "limit": null, "floor": null}),
        "a value that does not parse, and a field the hash lacks, are nulls"
    );
    assert_eq!(rows[4]["site"], serde_json::Value::Null, "no hash for id 9: {}", rows[4]);
    let _: () = redis::cmd("DEL").arg(format!("{prefix}1")).arg(format!("{prefix}2")).query(&mut c).unwrap();
}
