//! `examples/iot-dashboard.yaml` as shipped, with `examples/dashboard.html` in a real browser:
//! generated readings go at once to PostgreSQL (the history), Redis (the latest reading of each
//! device) and the API port's WebSocket feed, and `scripts/check_dashboard.py` opens the page
//! in Debian's headless Chromium (through Playwright) and checks what a person would see there.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use weir::connectors::testing::{free_port, psql};

use super::{metric, poll, repo};

/// The running pipeline, killed however the test ends.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails at once, saying what to install, when the browser or its driver is missing.
pub(crate) fn browser_at_hand() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: this test drives a real browser; `apt-get install chromium` \
         (scripts/test.sh installs it when missing)"
    );
    let o = Command::new("python3").args(["-c", "import playwright.sync_api"]).output().expect("python3 runs");
    assert!(
        o.status.success(),
        "the Python package playwright is missing: `python3 -m pip install 'playwright>=1.40,<2'` \
         (scripts/test.sh installs it when missing): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Waits until `weir` answers on `api`; fails with its log (`log`) if it ends first.
pub(crate) fn wait_for_api(weir: &mut Running, api: &str, log: &Path) {
    poll(|| {
        if let Some(status) = weir.0.try_wait().unwrap() {
            panic!(
                "weir ended ({status}) before serving its API:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::net::TcpStream::connect(api).ok()
    });
}

#[test]
fn the_dashboard_shows_the_live_feed_while_history_and_latest_readings_are_stored() {
    browser_at_hand();
    let db = std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("WEIR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007;
    let table = format!("weir_dashboard_{}_{n}", std::process::id());
    let prefix = format!("weir-test-dashboard-{}-{n}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("weir.log");
    // One worker: its readings come in time order, so each device's hash in Redis must end
    // up holding the device's newest row of the table.
    let mut weir = Running(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "examples/iot-dashboard.yaml", "--workers", "1", "--no-progress"])
            .current_dir(repo())
            .env("API_ADDR", &api)
            .env("DATABASE_URL", &db)
            .env("TABLE", &table)
            .env("REDIS_URL", &redis_url)
            .env("REDIS_PREFIX", &prefix)
            .env("REDIS_TTL", "10m")
            .env("DEAD_LETTERS", dir.path().join("dead.jsonl"))
            // Endless, as shipped, but bounded should the test die without stopping it.
            .env("DURATION", "10m")
            .env_remove("COUNT")
            .env_remove("WEIR_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let weir_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Running: the API answers, and rows reach the feed sink (the page can connect now).
    wait_for_api(&mut weir, &api, &log);
    poll(|| (metric(&api, "weir_feed_rows_total") > 0.0).then_some(()));

    let o = Command::new("python3")
        .arg(repo().join("scripts/check_dashboard.py"))
        .args(["--api", &api, "--timeout", "30"])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success() && out.contains("check_dashboard: ok"),
        "scripts/check_dashboard.py failed ({}):\n--- its stdout\n{out}\n--- its stderr\n{err}\n--- weir's log\n{}",
        o.status,
        weir_log()
    );
    eprintln!("{out}");
    assert!(weir.0.try_wait().unwrap().is_none(), "weir ended during the browser check:\n{}", weir_log());

    // A clean stop (SIGINT): every batch taken has reached each of the three sinks.
    let pid = weir.0.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = poll(|| weir.0.try_wait().unwrap());
    assert!(status.success(), "weir after SIGINT: {status}\n{}", weir_log());

    // The history: every row the run wrote (its summary's last line: `...; N rows written`),
    // of each of the example's 20 devices.
    let written: u64 = weir_log()
        .lines()
        .find_map(|l| l.strip_suffix(" rows written")?.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary in weir's log:\n{}", weir_log()));
    let stored = psql(&db, &format!("SELECT count(*), count(DISTINCT device_id) FROM {table}"));
    assert_eq!(stored, format!("{written}|20"), "rows and devices in {table}, after {written} rows written");
    let newest: BTreeMap<String, String> = psql(
        &db,
        &format!(
            "SELECT DISTINCT ON (device_id) device_id, (extract(epoch FROM ts) * 1000)::bigint, temp, anomalous \
             FROM {table} ORDER BY device_id, ts DESC"
        ),
    )
    .lines()
    .map(|l| {
        let (device, rest) = l.split_once('|').unwrap();
        (device.to_string(), rest.to_string())
    })
    .collect();
    assert_eq!(newest.len(), 20, "{newest:?}");

    // The latest reading of each device in Redis: its newest row of the table.
    let mut c = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:device:*")).query(&mut c).unwrap();
    assert_eq!(keys.len(), 20, "{keys:?}");
    for (device, row) in &newest {
        let key = format!("{prefix}:device:{device}");
        let h: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query(&mut c).unwrap();
        assert_eq!(h.get("device_id"), Some(device), "{key}: {h:?}");
        let mut cols = row.split('|');
        let (ts, temp) = (cols.next(), cols.next());
        assert_eq!(h.get("ts").map(String::as_str), ts, "{key} against the table's newest row {row}: {h:?}");
        assert_eq!(h.get("temp").map(String::as_str), temp, "{key} against the table's newest row {row}: {h:?}");
        for field in ["humidity", "pressure", "vibration", "anomalous"] {
            assert!(h.contains_key(field), "{key} lacks {field}: {h:?}");
        }
    }
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut c).unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{}: PTTL {ttl}", keys[0]);
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
    psql(&db, &format!("DROP TABLE {table}"));
}
