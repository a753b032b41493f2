//! The metrics endpoint over real HTTP on loopback.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::prelude::*;
use weir_core::metrics::{Registry, StepMetrics};
use weir_core::StepId;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_prometheus_text_and_health() {
    let reg = Arc::new(Registry::default());
    let m = reg.step(&StepId::new("hot"), 0);
    StepMetrics::add(&m.rows_in, 10);
    StepMetrics::add(&m.filtered, 7);
    reg.step(&StepId::new("hot"), 1).rows_in.fetch_add(5, std::sync::atomic::Ordering::Relaxed);
    let server =
        weir::http::MetricsServer::start("127.0.0.1:0", weir::http::HttpState::metrics_only("job1".into(), reg))
            .await
            .unwrap();
    let body = get(server.addr(), "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("weir_step_rows_in_total{job=\"job1\",step=\"hot\"} 15"), "summed over workers: {body}");
    assert!(body.contains("weir_step_rows_filtered_total{job=\"job1\",step=\"hot\"} 7"));
    assert!(body.contains("# TYPE weir_step_rows_in_total counter"));
    assert!(get(server.addr(), "/healthz").await.ends_with("ok\n"));
    assert!(get(server.addr(), "/nope").await.starts_with("HTTP/1.1 404"));
}

/// Every sample of a Prometheus text, as the reference parser (`prometheus_client`, the
/// Python package) reads it: a text it refuses fails the test.
fn parse_with_reference(text: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let script = crate::common::repo().join("scripts/check_metrics.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference parser refused the text (pip install prometheus_client; scripts/test.sh does): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A real job's `/metrics` parses with the reference parser: label values with quotes,
/// backslashes and newlines come back as they were, and batch times and latency are
/// histograms whose buckets, sum and count agree.
#[test]
fn metrics_parse_with_the_reference_parser() {
    let yaml = r#"
name: scrape
source:
  id: sensors
  generator: { devices: 50, count: 20000, stamp_created: true }
  event_time: { column: ts, format: ms }
  batch_size: 500
steps:
  - filter: { id: warm, where: "readings.temp > 0.0" }
sink:
  id: out
  file: { path: /dev/null, format: json }
  latency_column: created_us
"#;
    let built = Pipeline::from_config(weir::yaml::parse("scrape.yaml", yaml).unwrap()).build().unwrap();
    let job = weir_core::runtime::Job::new(built.plan(&RunOptions { workers: Some(1), fresh: true }).unwrap()).unwrap();
    let reg = job.registry();
    reg.connectors.set("weir_test_odd_labels", "A gauge with awkward label values.", &[("v", "a \"b\" \\c\nd")], 1.5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", built.http_state(&job))).unwrap();
    rt.block_on(job.run()).unwrap();
    let (status, text) = crate::common::http_get(server.addr(), "/metrics");
    assert_eq!(status, 200);
    let samples = parse_with_reference(&text);
    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(find("weir_test_odd_labels", &[("v", "a \"b\" \\c\nd"), ("job", "scrape")]), 1.5);
    assert_eq!(find("weir_source_records_total", &[]), 20_000.0);
    // The filter's batch times: one sample per batch, the +Inf bucket counting them all.
    let batches = find("weir_step_batches_in_total", &[("step", "warm")]);
    assert!(batches >= 40.0, "{batches}");
    assert_eq!(find("weir_step_batch_duration_seconds_count", &[("step", "warm")]), batches);
    assert_eq!(find("weir_step_batch_duration_seconds_bucket", &[("step", "warm"), ("le", "+Inf")]), batches);
    assert!(find("weir_step_batch_duration_seconds_sum", &[("step", "warm")]) > 0.0);
    let rows = find("weir_sink_rows_total", &[]);
    assert_eq!(find("weir_sink_latency_seconds_count", &[]), rows);
    assert_eq!(find("weir_sink_latency_seconds_bucket", &[("le", "+Inf")]), rows);
    let le_1ms = find("weir_sink_latency_seconds_bucket", &[("le", "0.001")]);
    let le_1s = find("weir_sink_latency_seconds_bucket", &[("le", "1")]);
    assert!(le_1ms <= le_1s && le_1s <= rows, "buckets are cumulative");
    // The same rows up to the start of the sink's write: never later than after it.
    assert_eq!(find("weir_sink_entry_latency_seconds_count", &[]), rows);
    let (entry, taken) = (find("weir_sink_entry_latency_seconds_sum", &[]), find("weir_sink_latency_seconds_sum", &[]));
    assert!(entry > 0.0 && entry <= taken, "entry {entry} s, taken {taken} s");
    let families: std::collections::HashSet<&str> = samples.iter().map(|s| s["family"].as_str().unwrap()).collect();
    assert!(families.contains("weir_step_batch_duration_seconds"), "{families:?}");
}

/// Ids that would need escaping in labels, folders or URLs are refused when the pipeline is
/// built, with the id and the character named.
#[test]
fn odd_step_ids_and_names_are_refused_at_build() {
    for (name, id, want) in [
        ("ok", "a b", "step id `a b` has the character ' '"),
        ("ok", "a\"b", "step id `a\\\"b` has the character '\"'"),
        ("bad/name", "s", "pipeline name `bad/name` has the character '/'"),
    ] {
        let yaml = format!(
            "name: '{name}'\nsource:\n  id: in\n  generator: {{ count: 1 }}\nsteps:\n  - filter: {{ id: '{id}', where: 'true' }}\nsink:\n  id: out\n  stdout: {{}}\n"
        );
        let err = Pipeline::from_config(weir::yaml::parse("ids.yaml", &yaml).unwrap()).build().unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}

/// The quarantine is listed on the API and a key can be released early, with the token only.
#[test]
fn quarantined_keys_are_listed_and_released_with_the_token() {
    use weir_core::quarantine::{Quarantine, QuarantineSpec};
    let q = Arc::new(Quarantine::new(
        QuarantineSpec {
            keys: vec!["device_id".into()],
            max_failures: 0,
            window: std::time::Duration::from_secs(60),
            cool_down: std::time::Duration::from_secs(600),
        },
        Arc::new(weir_core::testing::MemoryDeadLetters::default()),
    ));
    let now = std::time::Instant::now();
    q.note_failure("dev/7", now);
    q.note_failure("dev-8", now);
    let reg = Arc::new(Registry::default());
    reg.quarantine.set(q.clone()).unwrap();
    let state = weir::http::HttpState {
        quarantine: Some(q.clone()),
        token: Some("s3cret".into()),
        ..weir::http::HttpState::metrics_only("q".into(), reg)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let (status, body) = crate::common::http_get(server.addr(), "/quarantine");
    assert_eq!(status, 200);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.iter().map(|k| k["key"].as_str().unwrap()).collect::<Vec<_>>(), ["dev-8", "dev/7"]);
    assert!(listed[0]["until_ms"].as_i64().unwrap() > weir_core::deadletter::now_ms() + 500_000);
    let release = |token| crate::common::http_request(server.addr(), "POST", "/quarantine/dev%2F7/release", token);
    assert_eq!(release(None).0, 401);
    assert_eq!(release(Some("wrong")).0, 401);
    let (status, body) = release(Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(release(Some("s3cret")).0, 404, "released already");
    assert_eq!(q.active(), 1);
    let (_, body) = crate::common::http_get(server.addr(), "/quarantine");
    assert!(body.contains("dev-8") && !body.contains("dev/7"), "{body}");
    let (_, text) = crate::common::http_get(server.addr(), "/metrics");
    assert!(text.contains("weir_quarantine_keys{job=\"q\"} 1\n"), "{text}");
    assert!(text.contains("weir_quarantine_keys_quarantined_total{job=\"q\"} 2\n"), "{text}");
    assert!(text.contains("weir_quarantine_keys_released_total{job=\"q\"} 1\n"), "{text}");
}

/// The HTTP port runs where busy workers cannot starve it: with a pipeline keeping both
/// cores busy, `/healthz` answers within 100 ms at p99.
#[test]
fn health_answers_fast_while_the_workers_are_saturated() {
    let yaml = r#"
name: busy
source:
  id: sensors
  generator: { devices: 1000 }
  event_time: { column: ts, format: ms }
steps:
  - filter: { id: warm, where: "readings.temp > 0.0" }
  - key_by: { id: by-device, keys: [device_id] }
  - window: { id: w, tumbling: 1s, aggregates: { n: count(), t: avg(readings.temp) } }
sink:
  id: out
  file: { path: /dev/null, format: json }
"#;
    let built = Pipeline::from_config(weir::yaml::parse("busy.yaml", yaml).unwrap()).build().unwrap();
    let job = weir_core::runtime::Job::new(built.plan(&RunOptions { workers: Some(2), fresh: true }).unwrap()).unwrap();
    let reg = job.registry();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", built.http_state(&job))).unwrap();
    let stop = job.shutdown_handle();
    let running = rt.spawn(job.run());
    // Saturated: rows are flowing before the probes start.
    crate::common::poll(|| (reg.source_records.load(std::sync::atomic::Ordering::Relaxed) > 200_000).then_some(()));
    let mut took: Vec<std::time::Duration> = (0..200)
        .map(|_| {
            let t0 = std::time::Instant::now();
            assert_eq!(crate::common::http_get(server.addr(), "/healthz").0, 200);
            t0.elapsed()
        })
        .collect();
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    took.sort();
    let p99 = took[197];
    eprintln!("/healthz while saturated: p50 {:?}, p99 {p99:?}, max {:?}", took[100], took[199]);
    assert!(p99 < std::time::Duration::from_millis(100), "p99 {p99:?}, max {:?}", took[199]);
}

/// The shipped alert rules pass `promtool check rules`, and every metric the Grafana dashboard
/// and the rules ask for is one a job exports (scraped from a run with Kafka, two workers,
/// checkpoints, alerts and the quarantine).
#[test]
fn the_dashboard_and_the_alert_rules_use_metrics_weir_exports() {
    let repo = crate::common::repo();
    let rules = repo.join("deploy/prometheus/weir-rules.yml");
    let o = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool runs (Debian's prometheus package; scripts/test.sh installs it)");
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let k = crate::kafka::Cluster::new(&[("in", 2)]);
    k.produce("in", &crate::kafka::lines(&crate::common::data("sensors-3k.jsonl")), None);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
name: dash
source:
  id: in
  kafka: {{ brokers: "{brokers}", topics: [in], group_id: dash-{pid}, start: earliest }}
  schema:
    fields:
      - {{ name: device_id, type: string }}
      - {{ name: ts, type: int64 }}
      - {{ name: readings, type: struct, fields: [ {{ name: temp, type: float64 }} ] }}
  event_time: {{ column: ts, format: ms }}
steps:
  - key_by: {{ id: by-device, keys: [device_id] }}
  - detect: {{ id: rules, rules: [ {{ name: hot, threshold: {{ value: readings.temp, above: 25.0 }} }} ] }}
  - alert: {{ id: alerts }}
  - table: {{ id: devices, input: in, key: device_id, aggregates: {{ n: count() }} }}
  - interval_join: {{ id: pairs, left: in, right: devices, on: device_id, between: [-1s, 1s] }}
sinks:
  - {{ id: out, input: alerts, file: {{ path: "{out}" }} }}
  - {{ id: pairs-out, input: pairs, file: {{ path: "{pairs}" }} }}
dead_letters: {{ path: "{dead}" }}
checkpoints: {{ dir: "{ck}", interval: 100ms }}
"#,
        brokers = k.brokers,
        pid = std::process::id(),
        out = dir.path().join("out").display(),
        pairs = dir.path().join("pairs").display(),
        dead = dir.path().join("dead.jsonl").display(),
        ck = dir.path().join("ck").display(),
    );
    let built = Pipeline::from_config(weir::yaml::parse("dash.yaml", &yaml).unwrap()).build().unwrap();
    let job = weir_core::runtime::Job::new(built.plan(&RunOptions { workers: Some(2), fresh: true }).unwrap()).unwrap();
    let (reg, stop) = (job.registry(), job.shutdown_handle());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let running = rt.spawn(job.run());
    // Everything read, the lag reported (from librdkafka's statistics) and a checkpoint done.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let lag = reg.connectors.get("weir_kafka_consumer_lag", &[("topic", "in"), ("partition", "0")]);
        let done = reg.checkpoints.completed.load(std::sync::atomic::Ordering::Relaxed);
        let read = reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
        if read == 3000 && lag.is_some() && done > 0 {
            break;
        }
        assert!(std::time::Instant::now() < until, "after 30 s: {read} read, lag {lag:?}, {done} checkpoints");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    let text = reg.render_prometheus("dash");
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dashboard = std::fs::read_to_string(repo.join("deploy/grafana/weir.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let r: serde_yaml::Value = serde_yaml::from_str(&rules_text).unwrap();
    for g in r["groups"].as_sequence().unwrap() {
        for rule in g["rules"].as_sequence().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(at) = e[i..].find("weir_") {
            let start = i + at;
            let end =
                start + e[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(e.len() - start);
            used.insert(&e[start..end]);
            i = end.min(bytes.len());
        }
    }
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<_> = used.iter().filter(|m| !exported.contains(**m)).collect();
    assert!(missing.is_empty(), "asked for but not exported: {missing:?}\n{text}");
}
