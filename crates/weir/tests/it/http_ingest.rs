//! HTTP ingest through the API port: answers, refusals, backpressure, and answers that wait
//! for the checkpoint.

use weir::http::MetricsServer;
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

fn pipeline(http: HttpIngestSettings, out: &std::path::Path, checkpoints: Option<&std::path::Path>) -> BuiltPipeline {
    let cfg = seq_pipeline("readings", SourceConnector::Http(http), false, out, checkpoints.map(|ck| (ck, "300ms")));
    Pipeline::from_config(cfg).build().unwrap()
}

fn settings(queue: usize, respond: &str) -> HttpIngestSettings {
    HttpIngestSettings { token: Some("tok".into()), queue, respond: respond.into(), ..Default::default() }
}

#[test]
fn posted_records_become_rows_and_bad_ones_are_named_in_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let built = pipeline(settings(4, "accepted"), &out, None);
    let job = Job::new(built.plan(&RunOptions { workers: Some(2), ..Default::default() }).unwrap()).unwrap();
    let (state, stop) = (built.http_state(&job), job.shutdown_handle());
    let rt = rt();
    let server = rt.block_on(MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let addr = server.addr();
    let running = rt.spawn(job.run());
    let post = |body: &str, kind: Option<&str>, token: Option<&str>| {
        http_send(addr, "POST", "/ingest/readings", token, kind, body.as_bytes())
    };
    // A JSON array with one bad record.
    let (status, _, body) = post(
        r#"[{"seq": 0, "ts": 1, "temp": 1.5}, {"seq": "one", "ts": 2, "temp": 2.5}, {"seq": 2, "ts": 3, "temp": 3.5}]"#,
        Some("application/json"),
        Some("tok"),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"][0]["index"], 1, "{answer}");
    assert!(answer["rejected"][0]["reason"].as_str().unwrap().contains("seq"), "{answer}");
    // JSON Lines.
    let lines: String = (3..103).map(|i| format!("{{\"seq\": {i}, \"ts\": {i}, \"temp\": 1.0}}\n")).collect();
    let (status, _, body) = post(&lines, Some("application/x-ndjson"), Some("tok"));
    assert_eq!((status, body.trim()), (200, r#"{"accepted":100,"rejected":[]}"#));
    // Refusals.
    assert_eq!(post("[]", Some("application/json"), Some("nope")).0, 401);
    assert_eq!(post("[]", Some("application/json"), None).0, 401);
    assert_eq!(post("[]", Some("text/csv"), Some("tok")).0, 415);
    assert_eq!(post("[{\"seq\": 1", Some("application/json"), Some("tok")).0, 400);
    assert_eq!(http_send(addr, "POST", "/ingest/other", Some("tok"), None, b"[]").0, 404);
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    assert_seqs(&read_jsonl(&out), (0..103).filter(|s| *s != 1), "posted rows");
    let dead = read_jsonl(&out.with_extension("dead.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0]["origin"].as_str(), dead[0]["position"].as_str()),
        (Some("http ingest"), Some("record 1 of the request"))
    );
}

/// Nothing reads the queue (the job is planned, not running): the queue's one place is taken
/// and the next request is refused at once with 503 and `Retry-After`, not buffered.
#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let built = pipeline(settings(1, "accepted"), &dir.path().join("out.jsonl"), None);
    let job = Job::new(built.plan(&RunOptions::default()).unwrap()).unwrap();
    let rt = rt();
    let server = rt.block_on(MetricsServer::start("127.0.0.1:0", built.http_state(&job))).unwrap();
    let addr = server.addr();
    let first = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        use std::io::Write as _;
        let body = b"[{\"seq\": 1, \"ts\": 1, \"temp\": 1.0}]";
        write!(s, "POST /ingest/readings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        s.write_all(body).unwrap();
        s
    });
    let _held = first.join().unwrap();
    let (status, head, body) = poll(|| {
        let r = http_send(addr, "POST", "/ingest/readings", Some("tok"), Some("application/json"), b"[]");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(status, 503);
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert!(body.contains("behind"), "{body}");
    drop(job);
}

/// With `respond: checkpointed` the answer waits for the checkpoint: once it comes, the rows
/// are in the committed output.
#[test]
fn a_checkpointed_answer_means_the_rows_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let built = pipeline(settings(4, "checkpointed"), &out, Some(&ck));
    let job = Job::new(built.plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap()).unwrap();
    let (state, stop) = (built.http_state(&job), job.shutdown_handle());
    let rt = rt();
    let server = rt.block_on(MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let running = rt.spawn(job.run());
    for round in 0..3 {
        let body: String =
            (round * 10..round * 10 + 10).map(|i| format!("{{\"seq\": {i}, \"ts\": {i}, \"temp\": 1.0}}\n")).collect();
        let (status, _, answer) = http_send(
            server.addr(),
            "POST",
            "/ingest/readings",
            Some("tok"),
            Some("application/json"),
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{answer}");
        assert_seqs(&committed_rows(&out), 0..round * 10 + 10, "committed when answered");
    }
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
}

#[test]
fn settings_are_checked() {
    let plan = |http: &str, extra: &str| source_settings_error(&format!("http: {http}"), extra);
    assert!(plan("{ token: t, respond: checkpointed }", "").contains("add `checkpoints`"));
    assert!(plan("{ token: t, respond: later }", "").contains("expected accepted or checkpointed"));
    assert!(plan("{ token: t }", "").is_empty(), "{}", plan("{ token: t }", ""));
    if std::env::var_os("WEIR_API_TOKEN").is_none() {
        assert!(plan("{}", "").contains("needs a bearer token"), "{}", plan("{}", ""));
        assert!(plan("{}", "api: { token: from-api }\n").is_empty());
    }
    assert!(plan("{ token: t, queue: 2, tokn: x }", "").contains("unknown field `tokn`"));
}
