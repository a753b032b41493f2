//! The HTTP sink against an endpoint served by the test: one that fails once with 503 (the
//! batch is retried) and refuses one request with 400 (its rows are dead-lettered).

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use weir::prelude::*;

use crate::common::*;

/// A request the endpoint took: its `Idempotency-Key`, content type and body.
type Taken = (String, String, String);

/// Serves on a free port: the second request gets 503, a body holding `"seq":2500` gets 400,
/// every other request 200 (and is recorded).
fn endpoint() -> (String, Arc<Mutex<Vec<Taken>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    let taken = Arc::new(Mutex::new(Vec::new()));
    let t = taken.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let Some((headers, body)) = read_request(&conn) else { continue };
            let header = |k: &str| headers.get(k).cloned().unwrap_or_default();
            let (key, kind) = (header("idempotency-key"), header("content-type"));
            let body = String::from_utf8(body).unwrap();
            let (status, text) = if n == 1 {
                ("503 Service Unavailable", "busy")
            } else if body.contains("\"seq\":2500,") {
                ("400 Bad Request", "{\"error\":\"seq 2500 is not welcome\"}")
            } else {
                t.lock().unwrap().push((key, kind, body));
                ("200 OK", "{}")
            };
            let _ =
                write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
        }
    });
    (url, taken)
}

#[test]
fn rows_are_posted_in_requests_retried_when_the_endpoint_is_busy_and_dead_lettered_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (url, taken) = endpoint();
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 5000);
    let yaml = format!(
        "name: http-sink
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema:
    fields:
      - {{ name: seq, type: int64 }}
      - {{ name: ts, type: int64 }}
      - {{ name: temp, type: float64 }}
sink:
  id: out
  http:
    url: {url}
    max_rows: 1000
    headers: {{ Authorization: Bearer s3cret }}
  retry: {{ initial_backoff: 10ms }}
dead_letters: {{ path: {dead} }}
",
        input = input.display(),
        dead = dir.path().join("dead.jsonl").display(),
    );
    let cfg = weir::yaml::parse_with("h.yaml", &yaml, |_| None).unwrap();
    assert!(!format!("{cfg:?}").contains("s3cret"), "the token is not in Debug output");
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap();
    let taken = taken.lock().unwrap().clone();
    // The first request went through, the second got 503: the batch was sent again, its first
    // request with the same key.
    let mut keys: Vec<&str> = taken.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert_eq!(keys[0], keys[1], "a repeated request carries the same Idempotency-Key");
    keys.dedup();
    let mut rows = Vec::new();
    for (_, kind, body) in taken.iter().skip(1) {
        assert_eq!(kind, "application/json");
        rows.extend(serde_json::from_str::<Vec<serde_json::Value>>(body).unwrap());
    }
    assert_seqs(&rows, (0..5000).filter(|s| !(2000..3000).contains(s)), "taken by the endpoint");
    let dead = read_jsonl(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1000, "the refused request's rows");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(reason.contains("400 Bad Request") && reason.contains("seq 2500 is not welcome"), "{reason}");
    // Settings are checked before anything runs.
    let bad = |sink: &str| {
        let yaml = format!("name: h\nsource: {{ id: s, stdin: {{}}, schema: {{ fields: [{{ name: a, type: string }}] }} }}\nsink:\n  id: o\n  http: {sink}\n");
        let cfg = weir::yaml::parse_with("h.yaml", &yaml, |_| None).unwrap();
        Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions::default()).unwrap_err().to_string()
    };
    assert!(bad("{ url: \"ftp://x\" }").contains("not http or https"));
    assert!(bad("{ url: \"http://x\", max_rows: 0 }").contains("`max_rows` must be above 0"));
    assert!(bad("{ url: \"http://x\", body: xml }").contains("json or jsonl"));
}
