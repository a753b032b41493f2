//! Avro payloads in the Confluent wire format on Kafka (librdkafka's mock cluster), with the
//! writer schemas from a schema registry served by the test. Karapace, the registry with the
//! same REST API on PyPI, is not installable here (not on PyPI; its source needs Go and
//! GitHub), so this registry implements the endpoint a reader uses, `GET /schemas/ids/{id}`,
//! as Confluent documents it: `{"schema": "<text>"}` (with `schemaType` for non-Avro ones), 404
//! with error code 40403 for an unknown id.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// Serves `schemas` (id to schema text, with its type when not Avro) on a free port; the first
/// `outage` requests get 503. Returns the URL and the count of requests.
fn registry(schemas: HashMap<u32, (&'static str, &'static str)>, outage: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            {
                use std::io::BufRead as _;
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                r.read_line(&mut line).unwrap();
                // The rest of the head.
                let mut h = String::new();
                while r.read_line(&mut h).unwrap() > 0 && h != "\r\n" {
                    h.clear();
                }
            }
            let n = a.fetch_add(1, Ordering::SeqCst);
            let id = line
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.strip_prefix("/schemas/ids/"))
                .and_then(|i| i.parse().ok());
            let (status, body) = match id.and_then(|i: u32| schemas.get(&i)) {
                _ if n < outage => {
                    ("503 Service Unavailable", "{\"error_code\":50003,\"message\":\"starting\"}".to_string())
                }
                Some((text, kind)) => {
                    let mut v = serde_json::json!({ "schema": text });
                    if *kind != "AVRO" {
                        v["schemaType"] = (*kind).into();
                    }
                    ("200 OK", v.to_string())
                }
                None => ("404 Not Found", "{\"error_code\":40403,\"message\":\"Schema not found\"}".to_string()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, asked)
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
    let (url, asked) = registry(
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
