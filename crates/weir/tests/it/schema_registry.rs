//! Avro and Protobuf payloads in the Confluent wire format on Kafka (librdkafka's mock
//! cluster), with the schemas in a schema registry served by the test. Karapace, the registry with the same REST
//! API, is not installable here (not on PyPI; its source build needs Go and GitHub), so this
//! registry implements the endpoints Weir uses as Confluent documents them: `GET
//! /schemas/ids/{id}` (`{"schema": "<text>"}`, with `schemaType` for non-Avro ones), `POST
//! /subjects/{subject}/versions` (register: `{"id": n}`) and `POST /subjects/{subject}` (look
//! up) and `GET /subjects/{subject}/versions/{version}` (a Protobuf schema's imports), 404 with
//! error code 40403 for what it lacks.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::ClientConfig;
use weir::prelude::*;
use weir_formats::avro::apache_avro::types::Value as Avro;
use weir_formats::avro::Schema;

use crate::common::*;

const V1: &str = r#"{"type":"record","name":"Reading","namespace":"lab","fields":[
  {"name":"device","type":"string"},
  {"name":"temp","type":"double"},
  {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"note","type":["null","string"],"default":null}]}"#;
/// The next version: `note` removed, `site` added with a default (a backward-compatible change).
const V2: &str = r#"{"type":"record","name":"Reading","namespace":"lab","fields":[
  {"name":"device","type":"string"},
  {"name":"temp","type":"double"},
  {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"site","type":"string","default":"hq"}]}"#;

/// What the test's registry holds: schemas by id (text and type), subjects' versions.
#[derive(Debug, Default)]
struct Held {
    schemas: HashMap<u32, (String, String)>,
    subjects: HashMap<String, Vec<u32>>,
    /// The `references` of a schema (Protobuf imports).
    references: HashMap<u32, serde_json::Value>,
    /// Texts of subjects' versions that schemas reference: `"<subject>/<version>"`.
    versions: HashMap<String, String>,
}

/// The id of a schema text among `held`'s: Avro compared by canonical form, others by text.
fn same_schema(held: &Held, text: &str, kind: &str) -> Option<u32> {
    let canon = |t: &str| match kind {
        "AVRO" => Schema::parse_str(t).ok().map(|s| s.canonical_form()),
        _ => Some(t.to_string()),
    };
    let want = canon(text)?;
    held.schemas.iter().find(|(_, (t, k))| k == kind && canon(t).as_deref() == Some(&want)).map(|(id, _)| *id)
}

/// A request: method, path and body.
fn request(conn: &std::net::TcpStream) -> Option<(String, String, Vec<u8>)> {
    use std::io::{BufRead as _, Read as _};
    let mut r = std::io::BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((method, path, body))
}

/// A registry on a free port with Confluent's endpoints for readers and writers: `GET
/// /schemas/ids/{id}`, `POST /subjects/{s}/versions` (register; an Avro schema it has keeps
/// its id) and `POST /subjects/{s}` (look up). The first `outage` requests get 503. Returns the
/// URL, the count of requests and what it holds.
fn registry(
    schemas: HashMap<u32, (&'static str, &'static str)>,
    outage: usize,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Held>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Held {
        schemas: schemas.into_iter().map(|(id, (t, k))| (id, (t.to_string(), k.to_string()))).collect(),
        ..Held::default()
    }));
    let (a, h) = (asked.clone(), held.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let Some((method, path, body)) = request(&conn) else { continue };
            let n = a.fetch_add(1, Ordering::SeqCst);
            let mut held = h.lock().unwrap();
            let not_found =
                || ("404 Not Found", serde_json::json!({"error_code": 40403, "message": "Schema not found"}));
            let (status, answer) = if n < outage {
                ("503 Service Unavailable", serde_json::json!({"error_code": 50003, "message": "starting"}))
            } else if let Some(id) = path.strip_prefix("/schemas/ids/").and_then(|i| i.parse::<u32>().ok()) {
                match held.schemas.get(&id) {
                    Some((text, kind)) if kind == "AVRO" => ("200 OK", serde_json::json!({ "schema": text })),
                    Some((text, kind)) => {
                        let mut v = serde_json::json!({ "schema": text, "schemaType": kind });
                        if let Some(r) = held.references.get(&id) {
                            v["references"] = r.clone();
                        }
                        ("200 OK", v)
                    }
                    None => not_found(),
                }
            } else if let Some(text) = path.strip_prefix("/subjects/").and_then(|p| {
                let (subject, version) = p.split_once("/versions/")?;
                held.versions.get(&format!("{subject}/{version}"))
            }) {
                ("200 OK", serde_json::json!({ "schema": text, "schemaType": "PROTOBUF" }))
            } else if let Some(rest) = path.strip_prefix("/subjects/").filter(|_| method == "POST") {
                let posted = serde_json::from_slice::<serde_json::Value>(&body).unwrap();
                let text = posted["schema"].as_str().unwrap().to_string();
                let kind = posted["schemaType"].as_str().unwrap_or("AVRO").to_string();
                let (subject, register) = match rest.strip_suffix("/versions") {
                    Some(s) => (s.to_string(), true),
                    None => (rest.to_string(), false),
                };
                let found = same_schema(&held, &text, &kind);
                let in_subject = found.filter(|id| held.subjects.get(&subject).is_some_and(|v| v.contains(id)));
                match (register, found, in_subject) {
                    (false, _, Some(id)) => {
                        ("200 OK", serde_json::json!({ "subject": subject, "id": id, "version": 1, "schema": text }))
                    }
                    (false, _, None) => not_found(),
                    (true, found, _) => {
                        let id = found.unwrap_or_else(|| held.schemas.keys().max().copied().unwrap_or(0) + 1);
                        held.schemas.insert(id, (text, kind));
                        let versions = held.subjects.entry(subject).or_default();
                        if !versions.contains(&id) {
                            versions.push(id);
                        }
                        ("200 OK", serde_json::json!({ "id": id }))
                    }
                }
            } else {
                not_found()
            };
            drop(held);
            let body = answer.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, asked, held)
}

/// One record in the wire format: magic byte, id, datum.
fn framed(schema: &str, id: u32, fields: Vec<(&str, Avro)>) -> Vec<u8> {
    let s = Schema::parse_str(schema).unwrap();
    let v = Avro::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let mut out = Vec::new();
    weir_formats::avro::frame(id, &weir_formats::avro::datum(&s, v), &mut out);
    out
}

fn produce(brokers: &str, topic: &str, payloads: &[Vec<u8>]) {
    let p: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for v in payloads {
        p.send(BaseRecord::<str, [u8]>::to(topic).payload(v.as_slice())).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

fn pipeline(brokers: &str, registry: &str, out: &Path, dead: &Path) -> String {
    format!(
        r#"name: avro-in
source:
  id: readings
  kafka:
    brokers: "{brokers}"
    topics: [readings]
    stop_at_end: true
    avro:
      schema_registry: {{ url: "{registry}" }}
      reader_schema: |
        {{"type":"record","name":"Reading","namespace":"lab","fields":[
          {{"name":"device","type":"string"}},
          {{"name":"temp","type":"double"}},
          {{"name":"ts","type":{{"type":"long","logicalType":"timestamp-millis"}}}},
          {{"name":"site","type":"string","default":"hq"}}]}}
  schema:
    fields:
      - {{ name: device, type: string }}
      - {{ name: temp, type: float64 }}
      - {{ name: ts, type: int64 }}
      - {{ name: site, type: string }}
  event_time: {{ column: ts, format: ms }}
sink:
  id: out
  file: {{ path: "{out}", format: json }}
dead_letters: {{ path: "{dead}" }}
"#,
        out = out.display(),
        dead = dead.display(),
    )
}

#[test]
fn avro_records_of_two_schema_versions_are_read_through_a_registry_and_the_unreadable_dead_lettered() {
    let k = crate::kafka::Cluster::new(&[("readings", 1)]);
    let mut payloads = Vec::new();
    for i in 0..300i64 {
        let note = if i % 2 == 0 {
            Avro::Union(0, Box::new(Avro::Null))
        } else {
            Avro::Union(1, Box::new(Avro::String("n".into())))
        };
        payloads.push(framed(
            V1,
            1,
            vec![
                ("device", Avro::String(format!("d-{}", i % 7))),
                ("temp", Avro::Double(20.0 + i as f64 / 10.0)),
                ("ts", Avro::TimestampMillis(1_796_000_000_000 + i)),
                ("note", note),
            ],
        ));
    }
    // A record written without the registry, and one whose schema id the registry lacks.
    payloads.push(b"{\"device\":\"d-x\",\"temp\":1.0}".to_vec());
    let mut unknown = payloads[0].clone();
    unknown[1..5].copy_from_slice(&7u32.to_be_bytes());
    payloads.push(unknown);
    for i in 300..600i64 {
        payloads.push(framed(
            V2,
            2,
            vec![
                ("device", Avro::String(format!("d-{}", i % 7))),
                ("temp", Avro::Double(20.0 + i as f64 / 10.0)),
                ("ts", Avro::TimestampMillis(1_796_000_000_000 + i)),
                ("site", Avro::String("lab".into())),
            ],
        ));
    }
    // A Protobuf schema under an id this Avro source meets.
    let mut proto = payloads[0].clone();
    proto[1..5].copy_from_slice(&3u32.to_be_bytes());
    payloads.push(proto);
    produce(&k.brokers, "readings", &payloads);
    // The registry is still starting when the job asks first: the batch waits, nothing is lost.
    let (url, asked, _) = registry(
        HashMap::from([(1, (V1, "AVRO")), (2, (V2, "AVRO")), (3, ("syntax = \"proto3\"; message M {}", "PROTOBUF"))]),
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let cfg = weir::yaml::parse_with("avro.yaml", &pipeline(&k.brokers, &url, &out, &dead), |_| None).unwrap();
    let summary = rt()
        .block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
        )
        .unwrap();
    assert_eq!(summary.source_records, 603);
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 600);
    let mut by_ts: Vec<&serde_json::Value> = rows.iter().collect();
    by_ts.sort_by_key(|r| r["ts"].as_i64().unwrap());
    for (i, r) in by_ts.iter().enumerate() {
        let i = i as i64;
        assert_eq!(r["device"], format!("d-{}", i % 7));
        assert_eq!(r["ts"], 1_796_000_000_000 + i);
        assert!((r["temp"].as_f64().unwrap() - (20.0 + i as f64 / 10.0)).abs() < 1e-9);
        // v1 has no `site`: the reader schema's default; v2 wrote one. v1's `note` is not read.
        assert_eq!(r["site"], if i < 300 { "hq" } else { "lab" }, "{r}");
        assert!(r.get("note").is_none());
    }
    let dead = read_jsonl(&dead);
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("the first byte is 0x7b")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("schema id 7 is not in the schema registry")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("schema id 3 is a PROTOBUF schema")), "{reasons:?}");
    // Each dead letter names where its record was.
    assert!(dead.iter().all(|d| d.to_string().contains("readings[0]")), "{dead:?}");
    // Two refused while starting, then ids 1, 2, 3 and 7 once each: schemas are cached.
    assert_eq!(asked.load(Ordering::SeqCst), 6);
}

#[test]
fn an_avro_source_with_a_bad_registry_url_or_reader_schema_is_refused_before_it_runs() {
    for (avro, want) in [
        ("{ schema_registry: { url: \"ftp://x\" } }", "scheme `ftp` is not http or https"),
        (
            "{ schema_registry: { url: \"http://127.0.0.1:1\" }, reader_schema: \"{\\\"type\\\": \\\"recordd\\\"}\" }",
            "reader_schema",
        ),
    ] {
        let text = format!(
            "name: a\nsource:\n  id: s\n  kafka: {{ brokers: \"127.0.0.1:1\", topics: [t], avro: {avro} }}\n  schema: {{ fields: [ {{ name: a, type: int64 }} ] }}\nsink: {{ id: o, stdout: {{}} }}\n"
        );
        let cfg = weir::yaml::parse("a.yaml", &text).unwrap();
        let err =
            Pipeline::from_config(cfg).build().and_then(|b| b.check(&RunOptions::default())).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn rows_written_as_avro_register_their_schema_and_read_back_equal() {
    let k = crate::kafka::Cluster::new(&[("avro-out", 2)]);
    let (url, _, held) = registry(HashMap::new(), 1);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 2_000);
    let writer = format!(
        r#"name: avro-writer
source:
  id: file
  file: {{ path: "{input}", format: json }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
steps:
  - select: {{ id: shape, columns: ["seq", "ts", "temp", "CASE WHEN temp > 25 THEN 'hot' ELSE NULL END AS label"] }}
sink:
  id: out
  kafka:
    brokers: "{brokers}"
    topic: avro-out
    avro: {{ schema_registry: {{ url: "{url}" }}, record_name: Reading, namespace: lab }}
dead_letters: {{ path: "{dead}" }}
"#,
        input = input.display(),
        brokers = k.brokers,
        dead = dir.path().join("dead-w.jsonl").display(),
    );
    let run = |yaml: &str| {
        let cfg = weir::yaml::parse_with("a.yaml", yaml, |_| None).unwrap();
        rt().block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
        )
    };
    run(&writer).unwrap();
    // Registered once, under the topic strategy's subject, as the record named in the settings;
    // a second run finds the same schema and id.
    run(&writer).unwrap();
    {
        let held = held.lock().unwrap();
        assert_eq!(held.subjects.get("avro-out-value"), Some(&vec![1]), "{:?}", held.subjects);
        let text = &held.schemas[&1].0;
        assert!(text.contains("\"name\":\"lab.Reading\""), "{text}");
        assert!(text.contains(r#"{"name":"label","type":["null","string"]}"#), "{text}");
    }
    let out = dir.path().join("back.jsonl");
    let reader = format!(
        r#"name: avro-reader
source:
  id: back
  kafka: {{ brokers: "{brokers}", topics: [avro-out], stop_at_end: true, avro: {{ schema_registry: {{ url: "{url}" }} }} }}
  schema:
    fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }}, {{ name: label, type: string, required: false }} ]
sink: {{ id: o, file: {{ path: "{out}", format: json }} }}
dead_letters: {{ path: "{dead}" }}
"#,
        brokers = k.brokers,
        out = out.display(),
        dead = dir.path().join("dead-r.jsonl").display(),
    );
    run(&reader).unwrap();
    let rows = read_jsonl(&out);
    // Both writer runs' rows: each seq twice, every value as written.
    assert_eq!(rows.len(), 4_000);
    for r in &rows {
        let seq = r["seq"].as_i64().unwrap();
        let temp = 20.0 + (seq % 9) as f64 + 0.5;
        assert_eq!(r["ts"], 1_796_000_000_000 + seq);
        assert_eq!(r["temp"].as_f64().unwrap(), temp);
        assert_eq!(r["label"], if temp > 25.0 { serde_json::json!("hot") } else { serde_json::Value::Null }, "{r}");
    }
    let mut seen = std::collections::BTreeMap::new();
    for r in &rows {
        *seen.entry(r["seq"].as_i64().unwrap()).or_insert(0) += 1;
    }
    assert!(seen.len() == 2_000 && seen.values().all(|n| *n == 2), "every seq once per writer run");
    // Only looking the schema up, under a subject that lacks it, fails the run before it writes.
    let lookup = writer.replace("namespace: lab }", "namespace: lab, subject: other, register: false }");
    let e = run(&lookup).unwrap_err().to_string();
    assert!(e.contains("subject `other` has no version with the sink's schema"), "{e}");
}

/// Protobuf's wire format, written by hand (independent of the decoder's library).
fn pb_key(field: u32, wire: u8, out: &mut Vec<u8>) {
    pb_varint(u64::from(field << 3 | u32::from(wire)), out);
}

fn pb_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pb_bytes(field: u32, b: &[u8], out: &mut Vec<u8>) {
    pb_key(field, 2, out);
    pb_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

const READING_PROTO: &str = r#"syntax = "proto3";
package lab;
import "common.proto";
message Other { int32 x = 1; }
message Reading {
  string device = 1;
  double temp = 2;
  int64 ts = 3;
  enum Level { LOW = 0; HIGH = 1; }
  Level level = 4;
  common.Site site = 5;
}"#;

const COMMON_PROTO: &str = r#"syntax = "proto3";
package common;
message Site { string name = 1; }"#;

#[test]
fn protobuf_records_are_read_with_their_schema_and_its_imports_from_a_registry() {
    let k = crate::kafka::Cluster::new(&[("pb", 1)]);
    let mut payloads = Vec::new();
    for i in 0..500i64 {
        let mut m = Vec::new();
        pb_bytes(1, format!("d-{}", i % 5).as_bytes(), &mut m);
        pb_key(2, 1, &mut m);
        m.extend_from_slice(&(20.0 + i as f64 / 4.0).to_le_bytes());
        pb_key(3, 0, &mut m);
        pb_varint((1_796_000_000_000 + i) as u64, &mut m);
        if i % 3 == 0 {
            pb_key(4, 0, &mut m);
            pb_varint(1, &mut m);
        }
        if i % 2 == 0 {
            let mut site = Vec::new();
            pb_bytes(1, b"lab-a", &mut site);
            pb_bytes(5, &site, &mut m);
        }
        // The second message of the file: indexes [1], written as count 1 then 1 (zigzag).
        let mut rec = vec![0, 0, 0, 0, 10, 2, 2];
        rec.extend_from_slice(&m);
        payloads.push(rec);
    }
    // An id the registry lacks, and an Avro schema's id.
    let mut unknown = payloads[0].clone();
    unknown[4] = 99;
    let avro = framed(
        V1,
        1,
        vec![
            ("device", Avro::String("d".into())),
            ("temp", Avro::Double(1.0)),
            ("ts", Avro::TimestampMillis(1)),
            ("note", Avro::Union(0, Box::new(Avro::Null))),
        ],
    );
    payloads.extend([unknown, avro]);
    produce(&k.brokers, "pb", &payloads);
    let (url, _, held) = registry(HashMap::from([(10, (READING_PROTO, "PROTOBUF")), (1, (V1, "AVRO"))]), 0);
    {
        let mut h = held.lock().unwrap();
        h.references.insert(10, serde_json::json!([{ "name": "common.proto", "subject": "common", "version": 1 }]));
        h.versions.insert("common/1".into(), COMMON_PROTO.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let yaml = format!(
        r#"name: pb-in
source:
  id: pb
  kafka: {{ brokers: "{brokers}", topics: [pb], stop_at_end: true, protobuf: {{ schema_registry: {{ url: "{url}" }} }} }}
  schema:
    fields:
      - {{ name: device, type: string }}
      - {{ name: temp, type: float64 }}
      - {{ name: ts, type: int64 }}
      - {{ name: level, type: string }}
      - {{ name: site, type: struct, required: false, fields: [ {{ name: name, type: string }} ] }}
sink: {{ id: out, file: {{ path: "{out}", format: json }} }}
dead_letters: {{ path: "{dead}" }}
"#,
        brokers = k.brokers,
        out = out.display(),
        dead = dead.display(),
    );
    let cfg = weir::yaml::parse_with("pb.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap();
    let mut rows = read_jsonl(&out);
    rows.sort_by_key(|r| r["ts"].as_i64().unwrap());
    assert_eq!(rows.len(), 500);
    for (i, r) in rows.iter().enumerate() {
        let i = i as i64;
        assert_eq!(r["device"], format!("d-{}", i % 5));
        assert_eq!(r["temp"].as_f64().unwrap(), 20.0 + i as f64 / 4.0);
        assert_eq!(r["ts"], 1_796_000_000_000 + i);
        // An unset proto3 enum is its first value; an unset message is null.
        assert_eq!(r["level"], if i % 3 == 0 { "HIGH" } else { "LOW" });
        assert_eq!(
            r["site"],
            if i % 2 == 0 { serde_json::json!({ "name": "lab-a" }) } else { serde_json::Value::Null },
            "{r}"
        );
    }
    let reasons: Vec<String> = read_jsonl(&dead).iter().map(|d| d["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("schema id 99 is not in the schema registry")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("schema id 1 is an AVRO schema; this source reads Protobuf")),
        "{reasons:?}"
    );
}

#[test]
fn rows_written_as_protobuf_register_their_proto_and_read_back_equal() {
    let k = crate::kafka::Cluster::new(&[("pb-out", 1)]);
    let (url, _, held) = registry(HashMap::new(), 0);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 1_000);
    let writer = format!(
        r#"name: pb-writer
source:
  id: file
  file: {{ path: "{input}", format: json }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
steps:
  - select: {{ id: shape, columns: ["seq", "ts", "temp", "CASE WHEN temp > 25 THEN 'hot' ELSE NULL END AS label"] }}
sink:
  id: out
  kafka:
    brokers: "{brokers}"
    topic: pb-out
    protobuf: {{ schema_registry: {{ url: "{url}" }}, record_name: Reading, namespace: lab, subject_strategy: record }}
dead_letters: {{ path: "{dead}" }}
"#,
        input = input.display(),
        brokers = k.brokers,
        dead = dir.path().join("dead-w.jsonl").display(),
    );
    let run = |yaml: &str| {
        let cfg = weir::yaml::parse_with("p.yaml", yaml, |_| None).unwrap();
        rt().block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
        )
    };
    run(&writer).unwrap();
    {
        let held = held.lock().unwrap();
        let ids = &held.subjects["lab.Reading"];
        let (text, kind) = &held.schemas[&ids[0]];
        assert_eq!(kind, "PROTOBUF");
        assert!(text.contains("package lab;") && text.contains("optional string label = 4;"), "{text}");
    }
    let out = dir.path().join("back.jsonl");
    let reader = format!(
        r#"name: pb-reader
source:
  id: back
  kafka: {{ brokers: "{brokers}", topics: [pb-out], stop_at_end: true, protobuf: {{ schema_registry: {{ url: "{url}" }} }} }}
  schema:
    fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }}, {{ name: label, type: string, required: false }} ]
sink: {{ id: o, file: {{ path: "{out}", format: json }} }}
dead_letters: {{ path: "{dead}" }}
"#,
        brokers = k.brokers,
        out = out.display(),
        dead = dir.path().join("dead-r.jsonl").display(),
    );
    run(&reader).unwrap();
    let mut rows = read_jsonl(&out);
    rows.sort_by_key(|r| r["seq"].as_i64().unwrap());
    assert_eq!(rows.len(), 1_000);
    for (i, r) in rows.iter().enumerate() {
        let seq = i as i64;
        let temp = 20.0 + (seq % 9) as f64 + 0.5;
        assert_eq!((r["seq"].as_i64(), r["ts"].as_i64()), (Some(seq), Some(1_796_000_000_000 + seq)));
        assert_eq!(r["temp"].as_f64().unwrap(), temp);
        assert_eq!(r["label"], if temp > 25.0 { serde_json::json!("hot") } else { serde_json::Value::Null }, "{r}");
    }
    // Both formats at once cannot be.
    let both =
        writer.replace("protobuf: {", "avro: { schema_registry: { url: \"http://127.0.0.1:1\" } }\n    protobuf: {");
    let cfg = weir::yaml::parse_with("p.yaml", &both, |_| None).unwrap();
    let e = Pipeline::from_config(cfg).build().and_then(|b| b.check(&RunOptions::default())).unwrap_err().to_string();
    assert!(e.contains("`avro` and `protobuf` are two payload formats"), "{e}");
}

#[test]
fn json_payloads_that_break_the_json_schema_are_dead_lettered_with_the_rule_they_broke() {
    let k = crate::kafka::Cluster::new(&[("js", 1)]);
    let mut lines: Vec<String> =
        (0..300).map(|i| format!("{{\"device_id\":\"d-{}\",\"seq\":{i},\"temp\":{}.5}}", i % 4, 20 + i % 9)).collect();
    lines.push("{\"device_id\":\"d-x\",\"seq\":-1,\"temp\":20.5}".into());
    lines.push("{\"device_id\":\"d-y\",\"seq\":301,\"temp\":\"hot\"}".into());
    lines.push("{\"seq\":302,\"temp\":1.5}".into());
    k.produce("js", &lines, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("reading.schema.json");
    std::fs::write(
        &schema,
        r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["device_id", "seq"],
            "properties": {"device_id": {"type": "string", "pattern": "^d-"},
                           "seq": {"type": "integer", "minimum": 0},
                           "temp": {"type": "number"}}}"#,
    )
    .unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let yaml = format!(
        r#"name: js
source:
  id: js
  kafka: {{ brokers: "{brokers}", topics: [js], stop_at_end: true, json_schema: "{schema}" }}
  schema: {{ fields: [ {{ name: device_id, type: string }}, {{ name: seq, type: int64 }}, {{ name: temp, type: float64 }} ] }}
sink: {{ id: o, file: {{ path: "{out}", format: json }} }}
dead_letters: {{ path: "{dead}" }}
"#,
        brokers = k.brokers,
        schema = schema.display(),
        out = out.display(),
        dead = dead.display(),
    );
    let cfg = weir::yaml::parse_with("js.yaml", &yaml, |_| None).unwrap();
    rt().block_on(
        Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() }),
    )
    .unwrap();
    let rows = read_jsonl(&out);
    assert_seqs(&rows, 0..300, "rows that match the schema");
    let dead = read_jsonl(&dead);
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("at '/seq': must be >=0, but got -1"), "{reasons:?}");
    assert!(reasons[1].contains("at '/temp': want number, but got string"), "{reasons:?}");
    assert!(reasons[2].contains("at '/': missing properties 'device_id'"), "{reasons:?}");
    // Offsets of the refused records, as every Kafka dead letter names them.
    assert!(dead[0].to_string().contains("offset 300"), "{}", dead[0]);
    // A schema that is not one is refused before the run, naming the key.
    let bad = yaml.replace(&schema.display().to_string(), "{\\\"type\\\": 12}");
    let cfg = weir::yaml::parse_with("js.yaml", &bad, |_| None).unwrap();
    let e = Pipeline::from_config(cfg).build().and_then(|b| b.check(&RunOptions::default())).unwrap_err().to_string();
    assert!(e.contains("`json_schema` is not a valid JSON Schema"), "{e}");
}
