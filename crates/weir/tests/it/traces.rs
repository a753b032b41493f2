//! OpenTelemetry traces exported over OTLP/HTTP to a receiver served by the test, which
//! decodes each request as a collector does (`ExportTraceServiceRequest`, protobuf): the spans
//! of a batch's trip through the steps, across the exchange between workers and into the
//! sink, the checkpoints', sink retries, sampling, and a trace carried from one job to the
//! next through Kafka's `traceparent` headers.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

/// One exported span, as the collector got it.
#[derive(Debug, Clone)]
struct Got {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attrs: BTreeMap<String, String>,
    events: Vec<String>,
    failed: bool,
    service: String,
}

impl Got {
    fn int(&self, key: &str) -> i64 {
        self.attrs
            .get(key)
            .unwrap_or_else(|| panic!("span {} has no {key}: {:?}", self.name, self.attrs))
            .parse()
            .unwrap()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: Option<&Any>) -> String {
    match v {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A minimal OTLP/HTTP receiver on a free loopback port: `POST /v1/traces` bodies decoded
/// into spans. The first `fail` requests get 503 (a collector restarting).
fn collector(fail: usize) -> (String, Arc<Mutex<Vec<Got>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let s = spans.clone();
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let Some((headers, body)) = read_request(&conn) else { continue };
            assert_eq!(headers.get("content-type").map(String::as_str), Some("application/x-protobuf"));
            if i < fail {
                let _ =
                    write!(conn, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            }
            let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP trace export");
            let mut got = Vec::new();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for sp in ss.spans {
                        got.push(Got {
                            trace: hex(&sp.trace_id),
                            id: hex(&sp.span_id),
                            parent: hex(&sp.parent_span_id),
                            name: sp.name,
                            attrs: sp
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                                .collect(),
                            events: sp.events.iter().map(|e| e.name.clone()).collect(),
                            failed: sp.status.is_some_and(|s| s.code == 2),
                            service: service.clone(),
                        });
                    }
                }
            }
            s.lock().unwrap().extend(got);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, spans)
}

/// Runs a pipeline written in YAML with its traces, to the end, and stops the exporter.
fn run_traced(yaml: &str, workers: usize) {
    let built = Pipeline::from_config(weir::yaml::parse_with("t.yaml", yaml, |_| None).unwrap()).build().unwrap();
    let spec = built.plan(&RunOptions { workers: Some(workers), ..Default::default() }).unwrap();
    rt().block_on(async move {
        let traces = built.start_traces().unwrap().expect("the pipeline has traces");
        let res = Job::new(spec).unwrap().run().await;
        traces.finish().await;
        res.unwrap();
    });
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The span ids of `spans` by id.
fn by_id(spans: &[Got]) -> HashMap<&str, &Got> {
    spans.iter().map(|s| (s.id.as_str(), s)).collect()
}

/// The names from `s` up to its root, each parent checked to be in the same trace.
fn ancestry<'a>(s: &'a Got, ids: &HashMap<&str, &'a Got>) -> Vec<&'a str> {
    let mut out = vec![s.name.as_str()];
    let mut at = s;
    while !at.parent.is_empty() {
        let p = ids.get(at.parent.as_str()).unwrap_or_else(|| panic!("the parent of {} was not exported", at.name));
        assert_eq!(p.trace, at.trace, "{} and its parent {} are in different traces", at.name, p.name);
        out.push(p.name.as_str());
        at = p;
    }
    out
}

fn pipeline(input: &Path, out: &Path, dir: &Path, traces: &str) -> String {
    format!(
        "name: traced
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
  event_time: {{ column: ts, format: ms }}
steps:
  - filter: {{ id: warm, where: \"temp > 21\" }}
  - key_by: {{ id: by-seq, keys: [seq] }}
  - filter: {{ id: odd, where: \"seq % 2 = 1\" }}
sink:
  id: out
  file: {{ path: {out}, format: json }}
checkpoints: {{ dir: {ck}, interval: 50ms }}
dead_letters: {{ path: {dead} }}
traces: {traces}
",
        input = input.display(),
        out = out.display(),
        ck = dir.join("ck").display(),
        dead = dir.join("dead.jsonl").display(),
    )
}

#[test]
fn every_batch_is_traced_from_its_source_through_each_step_and_the_exchange_into_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in.jsonl"), dir.path().join("out"));
    let n = 20_000;
    events(&input, 0, n);
    let (url, spans) = collector(0);
    let traces = format!("{{ endpoint: \"{url}\", sample_ratio: 1.0, export_delay: 50ms }}");
    run_traced(&pipeline(&input, &out, dir.path(), &traces), 2);
    let warm = (0..n).filter(|i| i % 9 >= 1).count() as i64;
    let odd = (0..n).filter(|i| i % 9 >= 1 && i % 2 == 1).count() as i64;
    assert_eq!(committed_rows(&out).len() as i64, odd);
    let sum = |s: &[Got], name: &str, key: &str| named(s, name).iter().map(|s| s.int(key)).sum::<i64>();
    // Exporting goes on after the run's last spans end: poll until the sink's writes are in.
    let spans = poll(|| {
        let s = spans.lock().unwrap().clone();
        (sum(&s, "sink out", "weir.rows") == odd).then_some(s)
    });
    let ids = by_id(&spans);
    assert!(spans.iter().all(|s| s.service == "weir"), "service.name is weir");
    // Every batch was sampled, so the spans count every row at every step.
    assert_eq!(sum(&spans, "batch events", "weir.rows"), n as i64);
    assert_eq!(sum(&spans, "step warm", "weir.rows_in"), n as i64);
    assert_eq!(sum(&spans, "step warm", "weir.rows_out"), warm);
    assert_eq!(sum(&spans, "step odd", "weir.rows_in"), warm);
    assert_eq!(sum(&spans, "step odd", "weir.rows_out"), odd);
    for b in named(&spans, "batch events") {
        assert!(b.parent.is_empty(), "a batch read from a file starts its trace");
        assert_eq!(b.attrs["weir.source"], "events");
    }
    // Each step's span is the child of the one before, across the exchange (`by-seq` hands
    // rows to the worker of their key, in another task), down to the sink's write.
    for s in named(&spans, "step warm") {
        assert_eq!(ancestry(s, &ids), ["step warm", "batch events"]);
    }
    let workers: std::collections::BTreeSet<&str> =
        named(&spans, "step odd").iter().map(|s| s.attrs["weir.worker"].as_str()).collect();
    assert_eq!(workers.len(), 2, "rows reached `odd` on both workers");
    for s in named(&spans, "sink out") {
        assert_eq!(ancestry(s, &ids), ["sink out", "step odd", "step warm", "batch events"]);
    }
    // Checkpoints: one span each, with the state each task wrote and the manifest under it.
    let cks = named(&spans, "checkpoint");
    assert!(!cks.is_empty(), "checkpoint spans");
    for c in &cks {
        assert!(c.parent.is_empty());
        assert_eq!(c.attrs["weir.job"], "traced");
        let kids: Vec<&str> = spans.iter().filter(|s| s.parent == c.id).map(|s| s.name.as_str()).collect();
        assert!(kids.contains(&"checkpoint manifest"), "{kids:?}");
        assert!(kids.iter().filter(|k| **k == "checkpoint state").count() >= 2, "{kids:?}");
    }
}

#[test]
fn with_no_batch_sampled_only_checkpoints_are_traced() {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in.jsonl"), dir.path().join("out"));
    events(&input, 0, 5_000);
    let (url, spans) = collector(0);
    let traces =
        format!("{{ endpoint: \"{url}/v1/traces\", sample_ratio: 0, service_name: quiet, export_delay: 50ms }}");
    run_traced(&pipeline(&input, &out, dir.path(), &traces), 2);
    let spans = poll(|| {
        let s = spans.lock().unwrap().clone();
        s.iter().any(|s| s.attrs.get("weir.final").is_some_and(|f| f == "true")).then_some(s)
    });
    assert!(
        spans.iter().all(|s| s.name.starts_with("checkpoint")),
        "{:?}",
        spans.iter().find(|s| !s.name.starts_with("checkpoint"))
    );
    assert!(spans.iter().all(|s| s.service == "quiet"));
}

#[test]
fn a_collector_that_is_down_or_refusing_costs_the_run_nothing() {
    for refusing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (input, out) = (dir.path().join("in.jsonl"), dir.path().join("out"));
        events(&input, 0, 5_000);
        let url = if refusing {
            let (url, _) = collector(usize::MAX);
            url
        } else {
            // A port nothing listens on.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let traces = format!("{{ endpoint: \"{url}\", sample_ratio: 1.0, timeout: 2s, export_delay: 20ms }}");
        run_traced(&pipeline(&input, &out, dir.path(), &traces), 2);
        let want = (0..5_000).filter(|i| i % 9 >= 1 && i % 2 == 1).count();
        assert_eq!(committed_rows(&out).len(), want, "refusing: {refusing}");
    }
}

#[test]
fn a_sink_write_that_is_retried_has_a_span_per_attempt_and_the_request_carries_its_traceparent() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 3_000);
    // The webhook: 503 to its first request, 200 to the others; it keeps each traceparent.
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/ingest", hook.local_addr().unwrap());
    let parents = Arc::new(Mutex::new(Vec::<String>::new()));
    let p = parents.clone();
    std::thread::spawn(move || {
        for (i, conn) in hook.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let Some((headers, _)) = read_request(&conn) else { continue };
            p.lock().unwrap().push(headers.get("traceparent").cloned().unwrap_or_default());
            let status = if i == 0 { "503 Service Unavailable" } else { "200 OK" };
            let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let (url, spans) = collector(0);
    let yaml = format!(
        "name: hooked
source:
  id: events
  file: {{ path: {input}, format: json }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
sink:
  id: hook
  http: {{ url: \"{hook_url}\", max_rows: 100000 }}
  retry: {{ initial_backoff: 10ms }}
dead_letters: {{ path: {dead} }}
traces: {{ endpoint: \"{url}\", sample_ratio: 1.0, export_delay: 50ms }}
",
        input = input.display(),
        dead = dir.path().join("dead.jsonl").display(),
    );
    run_traced(&yaml, 1);
    let spans = poll(|| {
        let s = spans.lock().unwrap().clone();
        (!named(&s, "sink retry").is_empty()).then_some(s)
    });
    let retry = named(&spans, "sink retry");
    assert_eq!(retry.len(), 1, "one write was retried once");
    assert_eq!(retry[0].int("weir.attempt"), 2);
    assert!(!retry[0].failed, "the second attempt went through");
    let ids = by_id(&spans);
    let write = ids[retry[0].parent.as_str()];
    assert_eq!(write.name, "sink hook");
    assert_eq!(write.int("weir.attempts"), 2);
    assert_eq!(write.events, ["write failed"]);
    // Both attempts of that write sent the write span's context; the receiving service goes
    // on from it.
    let parents = parents.lock().unwrap().clone();
    let want = format!("00-{}-{}-01", write.trace, write.id);
    assert_eq!(parents.iter().filter(|p| **p == want).count(), 2, "{parents:?} vs {want}");
    // Every request carried a sampled context of an exported write span.
    for p in &parents {
        let id = p.split('-').nth(2).unwrap();
        assert_eq!(ids[id].name, "sink hook");
    }
}

#[test]
fn a_trace_goes_on_in_the_job_that_reads_what_another_wrote_to_kafka() {
    let k = crate::kafka::Cluster::new(&[("traced", 2)]);
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    events(&input, 0, 4_000);
    let (url, spans) = collector(0);
    let schema = "{ fields: [ { name: seq, type: int64 }, { name: ts, type: int64 }, { name: temp, type: float64 } ] }";
    let writer = format!(
        "name: writer
source:
  id: file
  file: {{ path: {input}, format: json }}
  schema: {schema}
sink:
  id: to-kafka
  kafka: {{ brokers: \"{brokers}\", topic: traced }}
dead_letters: {{ path: {dead} }}
traces: {{ endpoint: \"{url}\", sample_ratio: 1.0, service_name: writer, export_delay: 50ms }}
",
        input = input.display(),
        brokers = k.brokers,
        dead = dir.path().join("dead-w.jsonl").display(),
    );
    run_traced(&writer, 1);
    // The reader samples nothing of its own: what it traces is what arrived traced.
    let reader = format!(
        "name: reader
source:
  id: from-kafka
  kafka: {{ brokers: \"{brokers}\", topics: [traced], stop_at_end: true, format: json }}
  schema: {schema}
sink:
  id: out
  file: {{ path: {out}, format: json }}
dead_letters: {{ path: {dead} }}
traces: {{ endpoint: \"{url}\", sample_ratio: 0, service_name: reader, export_delay: 50ms }}
",
        brokers = k.brokers,
        out = out.display(),
        dead = dir.path().join("dead-r.jsonl").display(),
    );
    run_traced(&reader, 1);
    assert_eq!(crate::kafka::lines(&out).len(), 4_000);
    let spans = poll(|| {
        let s = spans.lock().unwrap().clone();
        (!named(&s, "sink out").is_empty()).then_some(s)
    });
    let ids = by_id(&spans);
    let reads = named(&spans, "batch from-kafka");
    assert!(!reads.is_empty(), "the reader traced the batches that came with a sampled context");
    for r in &reads {
        assert_eq!(r.service, "reader");
        let parent = ids.get(r.parent.as_str()).unwrap_or_else(|| panic!("{r:?} has no exported parent"));
        assert_eq!(parent.name, "sink to-kafka", "a read batch goes on from the write that produced its first record");
        assert_eq!(parent.service, "writer");
        assert_eq!(parent.trace, r.trace);
    }
    for s in named(&spans, "sink out") {
        assert_eq!(ancestry(s, &ids), ["sink out", "batch from-kafka", "sink to-kafka", "batch file"]);
    }
}

#[test]
fn rows_posted_with_a_traceparent_go_on_in_the_callers_trace() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let (url, spans) = collector(0);
    let http =
        HttpIngestSettings { token: Some("tok".into()), queue: 4, respond: "accepted".into(), ..Default::default() };
    let mut cfg = seq_pipeline("readings", SourceConnector::Http(http), false, &out, None);
    cfg.traces =
        Some(serde_yaml::from_str(&format!("{{ endpoint: \"{url}\", sample_ratio: 0, export_delay: 50ms }}")).unwrap());
    let built = Pipeline::from_config(cfg).build().unwrap();
    let job = Job::new(built.plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap()).unwrap();
    let (state, stop) = (built.http_state(&job), job.shutdown_handle());
    let rt = rt();
    let traces = rt.block_on(async { built.start_traces() }).unwrap().unwrap();
    let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let running = rt.spawn(job.run());
    // The caller's span: sampled, so the ingest continues it although this job samples nothing.
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let body = br#"[{"seq": 1, "ts": 1, "temp": 1.5}, {"seq": 2, "ts": 2, "temp": 2.5}]"#;
    let traceparent = format!("00-{trace}-{parent}-01");
    let headers = [("Content-Type", "application/json"), ("traceparent", traceparent.as_str())];
    let (status, _, answer) = http_send_with(server.addr(), "POST", "/ingest/readings", Some("tok"), &headers, body);
    assert_eq!(status, 200, "{answer}");
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    rt.block_on(traces.finish());
    let spans = poll(|| {
        let s = spans.lock().unwrap().clone();
        (!named(&s, "sink out").is_empty()).then_some(s)
    });
    let batch = named(&spans, "batch readings");
    assert_eq!(batch.len(), 1, "{spans:?}");
    assert_eq!((batch[0].trace.as_str(), batch[0].parent.as_str()), (trace, parent));
    assert_eq!(batch[0].int("weir.rows"), 2);
    // The sink's write is the batch's child; the batch's parent is the caller's span.
    for s in named(&spans, "sink out") {
        assert_eq!((s.parent.as_str(), s.trace.as_str()), (batch[0].id.as_str(), trace));
    }
}
