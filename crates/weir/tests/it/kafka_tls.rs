//! Kafka over TLS: a Tansu broker of the test's own behind a TLS listener served by the test
//! (rustls, with a certificate of a CA made in the test by the `openssl` command), advertised
//! as the broker's address, so every connection the clients make is TLS. Weir's source and sink
//! verify the broker against that CA (`ssl.ca.location`); a source or sink that trusts another
//! CA fails its run, saying so. Tansu's own TLS listener and SASL cannot be used (its TLS settings
//! leave the acceptor unused; SCRAM needs a storage engine that keeps credentials), and
//! librdkafka's mock cluster has neither; SASL stays untested (docs/pipelines.md says so).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::ClientConfig;
use weir::prelude::*;
use weir_core::runtime::Job;

use crate::common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn certificates(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (ca_key, ca) = (dir.join(format!("{name}-ca.key")), dir.join(format!("{name}-ca.pem")));
    let (key, csr, cert) =
        (dir.join(format!("{name}.key")), dir.join(format!("{name}.csr")), dir.join(format!("{name}.pem")));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("the openssl command (Debian's openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let p = |p: &Path| p.display().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", &p(&key), "-out", &p(&csr)]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// Tansu listening in plaintext on one port, advertising the TLS port the test serves.
struct Broker {
    child: Child,
    tls: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the broker and the TLS listener (on `rt`) that forwards to it.
fn tls_broker(rt: &tokio::runtime::Runtime, cert: &Path, key: &Path) -> Broker {
    let (plain, tls) = (free_port(), free_port());
    let child = Command::new("tansu")
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{plain}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{tls}"),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu (scripts/services.sh builds it)");
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert).unwrap()))
        .map(Result::unwrap)
        .collect();
    let key =
        rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key).unwrap())).unwrap().unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", tls))).unwrap();
    rt.spawn(async move {
        // The connections live as long as the listener's task (the runtime's).
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((conn, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                // A client that does not trust the certificate ends its handshake here.
                let Ok(mut secure) = acceptor.accept(conn).await else { return };
                let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", plain)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut secure, &mut broker).await;
            });
        }
    });
    poll(|| std::net::TcpStream::connect(("127.0.0.1", plain)).ok().map(|_| ()));
    Broker { child, tls: format!("127.0.0.1:{tls}") }
}

fn tls_properties(ca: &Path) -> String {
    format!("{{ security.protocol: SSL, ssl.ca.location: \"{}\" }}", ca.display())
}

#[test]
fn the_kafka_source_and_sink_work_over_tls_and_a_broker_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "weir");
    let rt = rt();
    let broker = tls_broker(&rt, &cert, &key);
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &broker.tls)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", ca.display().to_string())
        .create()
        .unwrap();
    let created = rt
        .block_on(admin.create_topics(&[NewTopic::new("tls", 2, TopicReplication::Fixed(1))], &AdminOptions::new()))
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let input = dir.path().join("in.jsonl");
    events(&input, 0, 3_000);
    let writer = format!(
        r#"name: tls-writer
source:
  id: file
  file: {{ path: "{input}", format: json }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
sink:
  id: out
  kafka: {{ brokers: "{brokers}", topic: tls, properties: {props} }}
dead_letters: {{ path: "{dead}" }}
"#,
        input = input.display(),
        brokers = broker.tls,
        props = tls_properties(&ca),
        dead = dir.path().join("dead-w.jsonl").display(),
    );
    let run = |yaml: &str| -> weir_core::Result<RunSummary> {
        let cfg = weir::yaml::parse_with("tls.yaml", yaml, |_| None).unwrap();
        rt.block_on(
            Pipeline::from_config(cfg).build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() }),
        )
    };
    run(&writer).unwrap();
    let out = dir.path().join("back.jsonl");
    let reader = |ca: &Path, bounded: bool| {
        format!(
            r#"name: tls-reader
source:
  id: back
  kafka: {{ brokers: "{brokers}", topics: [tls], stop_at_end: {bounded}, properties: {props} }}
  schema: {{ fields: [ {{ name: seq, type: int64 }}, {{ name: ts, type: int64 }}, {{ name: temp, type: float64 }} ] }}
sink: {{ id: o, file: {{ path: "{out}", format: json }} }}
dead_letters: {{ path: "{dead}" }}
"#,
            brokers = broker.tls,
            props = tls_properties(ca),
            out = out.display(),
            dead = dir.path().join("dead-r.jsonl").display(),
        )
    };
    // Read until every row is back, then stopped: not to the partitions' ends, which Tansu
    // reports wrongly (docs/benchmarks.md), so a bounded run could stop short of them.
    let cfg = weir::yaml::parse_with("tls.yaml", &reader(&ca, false), |_| None).unwrap();
    let spec = Pipeline::from_config(cfg).build().unwrap().plan(&RunOptions { workers: Some(2), ..Default::default() });
    let job = Job::new(spec.unwrap()).unwrap();
    let (reg, stop) = (job.registry(), job.shutdown_handle());
    let handle = rt.spawn(job.run());
    poll(|| (reg.sink_rows.load(std::sync::atomic::Ordering::Relaxed) >= 3_000).then_some(()));
    stop.stop();
    rt.block_on(handle).unwrap().unwrap();
    assert_seqs(&read_jsonl(&out), 0..3_000, "read back over TLS");
    // A client that trusts another CA never gets past the handshake: the run fails, saying
    // why, instead of waiting for ever.
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let started = std::time::Instant::now();
    let e = run(&reader(&other_ca, true)).unwrap_err().to_string();
    assert!(e.contains("TLS: the broker's certificate is not trusted") && e.contains("ssl.ca.location"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(120), "the refused handshake ended the run");
    // So does a writer that trusts another CA, instead of holding its records for ever.
    let started = std::time::Instant::now();
    let e = run(&writer.replace(&ca.display().to_string(), &other_ca.display().to_string())).unwrap_err().to_string();
    assert!(e.contains("kafka sink") && e.contains("TLS: the broker's certificate is not trusted"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(120), "the refused handshake ended the run");
    // And an exactly-once writer, whose transactional producer is the first to connect.
    let exactly_once = writer
        .replace(&ca.display().to_string(), &other_ca.display().to_string())
        .replace("topic: tls,", "topic: tls, mode: exactly_once, transactional_id: tls-eo,")
        + &format!("checkpoints: {{ dir: \"{}\", interval: 1s }}\n", dir.path().join("ck").display());
    let started = std::time::Instant::now();
    let e = run(&exactly_once).unwrap_err().to_string();
    assert!(e.contains("kafka sink") && e.contains("TLS: the broker's certificate is not trusted"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "the refused handshake ended the run at once");
}
