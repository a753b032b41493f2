use std::path::{Path, PathBuf};

use serde_json::Value;
use weir::prelude::*;

/// The settings of a pipeline's connectors, for tests that adjust a loaded example.
pub(crate) trait Ends {
    fn file_source(&mut self) -> &mut FileSourceSettings;
    fn kafka_source(&mut self) -> &mut KafkaSourceSettings;
    fn kafka_sink(&mut self) -> &mut KafkaSinkSettings;
}

impl Ends for PipelineConfig {
    fn file_source(&mut self) -> &mut FileSourceSettings {
        match &mut self.source_mut().connector {
            SourceConnector::File(f) => f,
            other => panic!("the source is {}, not a file", other.name()),
        }
    }
    fn kafka_source(&mut self) -> &mut KafkaSourceSettings {
        match &mut self.source_mut().connector {
            SourceConnector::Kafka(k) => k,
            other => panic!("the source is {}, not Kafka", other.name()),
        }
    }
    fn kafka_sink(&mut self) -> &mut KafkaSinkSettings {
        match &mut self.sink.connector {
            SinkConnector::Kafka(k) => k,
            other => panic!("the sink is {}, not Kafka", other.name()),
        }
    }
}

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub(crate) fn data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

/// Loads an example pipeline with variables taken from `vars`.
pub(crate) fn example(name: &str, vars: &[(&str, &Path)]) -> BuiltPipeline {
    let path = repo().join("examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = weir::yaml::parse_with(name, &text, |k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.display().to_string())
    })
    .unwrap();
    Pipeline::from_config(cfg).build().unwrap()
}

pub(crate) fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sort_key(v: &Value) -> String {
    // Exact fields first, so rows that tie on rounded floats still pair up by their keys.
    match v {
        Value::Object(m) => {
            let exact = m.iter().filter(|(_, v)| !matches!(v, Value::Number(n) if n.is_f64()));
            let approx = m.iter().filter_map(|(k, v)| match v {
                Value::Number(n) if n.is_f64() => Some(format!("{k}={:.6}", n.as_f64().unwrap())),
                _ => None,
            });
            exact.map(|(k, v)| format!("{k}={v}")).chain(approx).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-12)
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

/// Asserts two row sets are equal up to order and float rounding (1e-9 relative).
pub(crate) fn assert_same_rows(mut expected: Vec<Value>, mut actual: Vec<Value>, what: &str) {
    assert_eq!(expected.len(), actual.len(), "{what}: row counts differ");
    expected.sort_by_key(sort_key);
    actual.sort_by_key(sort_key);
    for (e, a) in expected.iter().zip(&actual) {
        assert!(close(e, a), "{what}: expected {e}, got {a}");
    }
}

/// Sends the job's logs to the test's output when `WEIR_TEST_LOG` is set (an `EnvFilter`,
/// e.g. `info`), for a test that fails where only the logs can tell why.
pub(crate) fn logs() {
    if let Ok(filter) = std::env::var("WEIR_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A plain blocking HTTP request on loopback: the status and the body. The server closes the
/// connection after its answer (`Connection: close`).
pub(crate) fn http_request(addr: std::net::SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let (status, _, body) = http_send(addr, method, path, token, None, b"");
    (status, body)
}

/// [`http_request`] with a body of `content_type`: the status, the head and the body.
pub(crate) fn http_send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let headers: Vec<(&str, &str)> = content_type.map(|t| ("Content-Type", t)).into_iter().collect();
    http_send_with(addr, method, path, token, &headers, body)
}

/// [`http_send`] with any request `headers`.
pub(crate) fn http_send_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// One HTTP request read from a connection an endpoint of a test accepted: its headers (names
/// in lower case) and its body; `None` when the connection ends first.
pub(crate) fn read_request(conn: &std::net::TcpStream) -> Option<(std::collections::HashMap<String, String>, Vec<u8>)> {
    use std::io::{BufRead, Read};
    let mut r = std::io::BufReader::new(conn.try_clone().ok()?);
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len = headers.get("content-length").map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((headers, body))
}

/// `GET path`: the status and the body.
pub(crate) fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None)
}

pub(crate) use weir_core::testing::poll;

/// The runtime a test runs a job on: two workers, as on the CI machine.
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Events with a unique `seq`, one JSON object per line.
pub(crate) fn events(path: &Path, from: u64, n: u64) {
    let text: String = (from..from + n)
        .map(|i| format!("{{\"seq\":{i},\"ts\":{},\"temp\":{}.5}}\n", 1_796_000_000_000 + i, 20 + i % 9))
        .collect();
    std::fs::write(path, text).unwrap();
}

pub(crate) fn committed_rows(out: &Path) -> Vec<Value> {
    let mut parts: Vec<_> = std::fs::read_dir(out).unwrap().flatten().map(|e| e.path()).collect();
    parts.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"));
    parts.sort();
    parts.iter().flat_map(|p| read_jsonl(p)).collect()
}

/// Checks that `rows` hold each `seq` of `want` exactly once, naming what is missing or
/// repeated (not the whole list).
pub(crate) fn assert_seqs(rows: &[Value], want: impl Iterator<Item = i64>, what: &str) {
    let mut count = std::collections::BTreeMap::new();
    for r in rows {
        *count.entry(r["seq"].as_i64().unwrap()).or_insert(0) += 1;
    }
    let want: Vec<i64> = want.collect();
    let missing: Vec<i64> = want.iter().copied().filter(|s| !count.contains_key(s)).collect();
    let twice: Vec<i64> = count.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
    let extra = count.len() - (want.len() - missing.len());
    let head = |v: &[i64]| v.iter().take(10).map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    assert!(
        missing.is_empty() && twice.is_empty() && extra == 0,
        "{what}: {} rows; {} missing (first: {}), {} repeated (first: {}), {extra} unexpected",
        rows.len(),
        missing.len(),
        head(&missing),
        twice.len(),
        head(&twice)
    );
}

/// Checks that `rows` hold every `seq` of `want`, repeats allowed (at least once), naming the
/// first missing ones.
pub(crate) fn assert_every_seq(rows: &[Value], want: std::ops::Range<i64>, what: &str) {
    let seen: std::collections::BTreeSet<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    let missing: Vec<i64> = want.filter(|s| !seen.contains(s)).take(10).collect();
    assert!(missing.is_empty(), "{what}: {} rows, missing (first 10): {missing:?}", rows.len());
}

/// Waits (polling, with the usual deadline) until the source has failed to reconnect at least
/// `n` times (`failures()`) and the outage has lasted `at_least`, checking all the while that
/// the running `job` has not ended.
pub(crate) fn assert_runs_through_outage<T>(
    job: &tokio::task::JoinHandle<T>,
    at_least: std::time::Duration,
    n: f64,
    failures: impl Fn() -> f64,
    what: &str,
) {
    let since = std::time::Instant::now();
    poll(|| {
        assert!(!job.is_finished(), "{what}");
        (failures() >= n && since.elapsed() >= at_least).then_some(())
    });
    assert!(!job.is_finished(), "{what}");
}

/// The schema of [`events`].
pub(crate) fn seq_schema() -> SchemaSpec {
    serde_yaml::from_str("fields: [{name: seq, type: int64}, {name: ts, type: int64}, {name: temp, type: float64}]")
        .unwrap()
}

/// A pipeline reading rows of [`seq_schema`] from source `id`, `connector` (`ts` its event time when
/// `event_time`) into the file sink at `out`, dead letters beside it, with a checkpoint in
/// `dir` every `interval` when `checkpoints` is `Some((dir, interval))`.
pub(crate) fn seq_pipeline(
    id: &str,
    connector: SourceConnector,
    event_time: bool,
    out: &Path,
    checkpoints: Option<(&Path, &str)>,
) -> PipelineConfig {
    let mut src = SourceConfig::new(id, connector);
    src.schema = Some(seq_schema());
    if event_time {
        src.event_time = Some(EventTimeConfig::new("ts", TimeFormat::Millis));
    }
    let mut p = Pipeline::new("server-source");
    p.source(src).sink(SinkConfig::new(
        "out",
        SinkConnector::File(FileSinkSettings { path: out.display().to_string(), format: FormatSpec::Json }),
    ));
    let mut cfg = p.build().unwrap().config().clone();
    cfg.dead_letters.path = out.with_extension("dead.jsonl").display().to_string();
    if let Some((ck, interval)) = checkpoints {
        cfg.checkpoints = Some(serde_yaml::from_str(&format!("dir: {}\ninterval: {interval}", ck.display())).unwrap());
    }
    cfg
}

/// What loading and checking a one-source pipeline says of the source settings `source` (its
/// connector key and settings, as in YAML) and the pipeline's `extra` top-level keys: the
/// error's text, or empty when there is none.
pub(crate) fn source_settings_error(source: &str, extra: &str) -> String {
    let text = format!(
        "name: m\nsource:\n  id: s\n  {source}\n  schema: {{ fields: [ {{ name: a, type: int64 }} ] }}\nsink: {{ id: o, stdout: {{}} }}\n{extra}"
    );
    match weir::yaml::parse("m.yaml", &text) {
        Err(e) => e.to_string(),
        Ok(cfg) => Pipeline::from_config(cfg)
            .build()
            .and_then(|b| b.check(&RunOptions::default()).map(|_| ()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}
