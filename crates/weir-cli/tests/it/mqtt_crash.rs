//! W1 from MQTT (`examples/w1-mqtt.yaml`: QoS 1, persistent session, acknowledgements after
//! checkpoints) into the exactly-once file sink, killed with SIGKILL at random moments and
//! restarted until the broker has nothing left for it: the committed output must equal an
//! uninterrupted run's over the same events, row for row. The broker is a Mosquitto of the
//! test's own, which keeps the session's messages while Weir is down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir::connectors::testing::Mosquitto;

use super::crash::{assert_same, committed, rows, seed, Rng};
use super::{stderr, weir};

const W1: &str = "examples/w1-sensor-window.yaml";
const W1_MQTT: &str = "examples/w1-mqtt.yaml";

/// The example as shipped, ending once nothing arrives for 3 s (so the last run finishes).
fn pipeline(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(super::repo().join(W1_MQTT)).unwrap();
    let bounded = text.replace("    format: json\n", "    format: json\n    end_when_idle: 3s\n");
    assert_ne!(bounded, text, "the example's mqtt section changed shape");
    let p = dir.join("w1-mqtt.yaml");
    std::fs::write(&p, bounded).unwrap();
    p
}

fn spawn(pipeline: &Path, dir: &Path, broker: &Mosquitto, workers: usize, run: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", pipeline.to_str().unwrap(), "--workers", &workers.to_string(), "--no-progress"])
        .env("MQTT_URL", broker.url())
        .env("OUTPUT", dir.join("out"))
        .env("CHECKPOINTS", dir.join("ck"))
        .env("CHECKPOINT_INTERVAL", "100ms")
        .env("DEAD_LETTERS", dir.join("dead.jsonl"))
        .env("WEIR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("run-{run}.log"))).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn mqtt_w1_survives_kill_9_exactly_once() {
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir(&broker_dir).unwrap();
    let broker = Mosquitto::start(&broker_dir);
    let input = dir.path().join("input.jsonl");
    super::kafka_crash::input(&input, 40_000);
    let reference = dir.path().join("reference.jsonl");
    let o = weir(
        &["run", W1, "--workers", "2", "--quiet"],
        &[("INPUT", &input), ("OUTPUT", &reference), ("DEAD_LETTERS", &dir.path().join("ref-dead.jsonl"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rows(&std::fs::read_to_string(&reference).unwrap());

    // The session Weir's worker 0 resumes (client id `weir-w1-mqtt-0`), holding every event.
    broker.open_session("weir-w1-mqtt-0", "sensors");
    broker.publish_lines("sensors", &input);
    let p = pipeline(dir.path());
    let kills: u32 = std::env::var("KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(5);
    let (mut killed, mut runs) = (0u32, 0usize);
    let started = Instant::now();
    let log = |r: usize| std::fs::read_to_string(dir.path().join(format!("run-{r}.log"))).unwrap_or_default();
    loop {
        assert!(started.elapsed() < Duration::from_secs(300), "no progress after {runs} runs (seed {seed})");
        let workers = 1 + runs % 2;
        runs += 1;
        let mut child = spawn(&p, dir.path(), &broker, workers, runs);
        if killed < kills {
            let waited = Instant::now();
            while !log(runs).contains("MQTT source connecting") && child.try_wait().unwrap().is_none() {
                assert!(waited.elapsed() < Duration::from_secs(30), "run {runs} never connected: {}", log(runs));
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(100 + rng.below(600)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                continue;
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "run {runs} failed (seed {seed}): {}", log(runs));
        break;
    }
    assert!(killed >= 1.min(kills), "the input was consumed before any kill; make it larger (seed {seed})");
    eprintln!("{killed} kills in {runs} runs");
    let got = rows(&committed(&dir.path().join("out")));
    assert_same(&want, &got, &format!("MQTT W1 after {killed} kills in {runs} runs (seed {seed})"));
}
