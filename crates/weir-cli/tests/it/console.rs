//! The web console in a real browser: `weir run` serves it at `/` of its API port, and
//! `scripts/check_console.py` opens it in Debian's headless Chromium (through Playwright) and
//! checks what a person would see there, acknowledging an alert from the page.

use std::process::{Command, Stdio};

use weir::connectors::testing::free_port;

use super::dashboard::{browser_at_hand, wait_for_api, Running};
use super::{metric, poll, repo};

/// A pipeline of two sources (readings, and a file with bad records for the dead letters),
/// detection and alerts, a window, and three sinks: nine nodes.
fn pipeline(dir: &std::path::Path) -> String {
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"device_id\":\"d1\",\"ts\":1}\nnot json\n{\"device_id\":\"d2\",\"ts\":\"soon\"}\n{oops\n{\"device_id\":\"d3\",\"ts\":3}\n",
    )
    .unwrap();
    let out = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"name: console
sources:
  - id: readings
    generator: {{ rate: 2000, devices: 5, duration: 10m }}
    event_time: {{ column: ts }}
  - id: uploads
    file: {{ path: "{bad}", format: json }}
    schema: {{ fields: [ {{ name: device_id, type: string }}, {{ name: ts, type: int64 }} ] }}
    event_time: {{ column: ts }}
steps:
  - key_by: {{ id: by-device, input: readings, keys: [device_id] }}
  - detect: {{ id: rules, rules: [ {{ name: hot, threshold: {{ value: readings.temp, above: -1000 }} }} ] }}
  - alert: {{ id: alerts }}
  - window: {{ id: counts, input: by-device, tumbling: 1s, aggregates: {{ n: count() }} }}
  - filter: {{ id: accepted, input: uploads, where: "ts > 0" }}
sinks:
  - {{ id: alert-log, input: alerts, file: {{ path: "{a}" }} }}
  - {{ id: count-log, input: counts, file: {{ path: "{c}" }} }}
  - {{ id: upload-log, input: accepted, file: {{ path: "{u}" }} }}
dead_letters: {{ path: "{d}" }}
"#,
        bad = bad.display(),
        a = out("alerts.jsonl"),
        c = out("counts.jsonl"),
        u = out("uploads-out.jsonl"),
        d = out("dead.jsonl"),
    )
}

#[test]
fn the_console_shows_the_running_pipeline_and_acknowledges_an_alert() {
    browser_at_hand();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("console.yaml");
    std::fs::write(&p, pipeline(dir.path())).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("weir.log");
    let mut weir = Running(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", p.to_str().unwrap(), "--workers", "2", "--no-progress", "--metrics-addr", &api])
            .env("WEIR_API_TOKEN", "s3cret")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let weir_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_api(&mut weir, &api, &log);
    poll(|| (metric(&api, "weir_source_records_total") > 0.0).then_some(()));
    // The port samples the job every second, so the charts of a page opened now start with
    // the seconds before it.
    poll(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&api).ok()?;
        write!(s, "GET /api/console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let v: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()?;
        (v["history"].as_array()?.len() >= 3).then_some(())
    });
    let shot = std::env::var("WEIR_CONSOLE_SCREENSHOT")
        .unwrap_or_else(|_| dir.path().join("console.png").display().to_string());
    let o = Command::new("python3")
        .arg(repo().join("scripts/check_console.py"))
        .args(["--api", &api, "--token", "s3cret", "--nodes", "9", "--timeout", "30", "--screenshot", &shot])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success() && out.contains("check_console: ok"),
        "scripts/check_console.py failed ({}):\n--- its stdout\n{out}\n--- its stderr\n{err}\n--- weir's log\n{}",
        o.status,
        weir_log()
    );
    eprintln!("{out}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot of the page");
}

/// `--no-console` turns the page off; the JSON API stays.
#[test]
fn no_console_serves_no_page() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("console.yaml");
    std::fs::write(&p, pipeline(dir.path())).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", p.to_str().unwrap(), "--no-progress", "--no-console", "--metrics-addr", &api])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(|| std::net::TcpStream::connect(&api).ok());
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&api).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let page = get("/");
    let alerts = get("/alerts");
    let _ = child.kill();
    let _ = child.wait();
    assert!(page.starts_with("HTTP/1.1 404") && page.contains("--no-console"), "{page}");
    assert!(alerts.starts_with("HTTP/1.1 200"), "{alerts}");
}
