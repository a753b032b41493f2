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
        match &mut self.source.connector {
            SourceConnector::File(f) => f,
            other => panic!("the source is {}, not a file", other.name()),
        }
    }
    fn kafka_source(&mut self) -> &mut KafkaSourceSettings {
        match &mut self.source.connector {
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
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
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
