//! The runtime with in-memory sources and sinks: windowed results equal a plain computation
//! for any stream whose disorder stays within the bound, at 1 and 2 workers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use proptest::prelude::*;
use weir_core::runtime::{Job, JobSpec, StageSpec, WatermarkSpec};
use weir_core::testing::{CollectSink, MemoryDeadLetters, VecSourceFactory};
use weir_core::{Batch, StepId};
use weir_ops::{AggFunc, AggSpec, LatePolicy, TimeDomain, WindowKind, WindowSpec};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Float64, false)]))
}

fn batch(rows: &[(String, f64, i64)]) -> Batch {
    let rb = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
        ],
    )
    .unwrap();
    Batch::new(rb, Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())).unwrap()
}

/// A job with the tests' defaults: 2 workers, no out-of-orderness, default retries, nothing
/// extra; callers override what they test.
fn test_job(
    source: Arc<dyn weir_core::SourceFactory>,
    stages: Vec<StageSpec>,
    sink: Arc<dyn weir_core::SinkFactory>,
) -> JobSpec {
    JobSpec {
        upstream: None,
        counts_input: true,
        counts_output: true,
        name: "test".into(),
        workers: 2,
        source_step: StepId::new("src"),
        source,
        stages,
        sink_step: StepId::new("sink"),
        sink,
        dead_letters: Arc::new(MemoryDeadLetters::default()),
        watermark: WatermarkSpec { bound: Duration::ZERO, idle_timeout: None },
        channel_capacity: 2,
        latency_column: None,
        sink_retry: weir_core::runtime::RetryPolicy::default(),
        quarantine: None,
        shedding: None,
        checkpoint: None,
    }
}

type Rows = BTreeMap<(String, i64), (i64, i64)>;

fn run(partitions: Vec<Vec<Batch>>, bound: i64, workers: usize) -> (Rows, u64) {
    let spec = WindowSpec {
        keys: vec!["k".into()],
        kind: WindowKind::Tumbling { size_ms: 100 },
        domain: TimeDomain::Event,
        aggs: vec![
            AggSpec { name: "n".into(), func: AggFunc::Count, column: None },
            AggSpec { name: "s".into(), func: AggFunc::Sum, column: Some("v".into()) },
        ],
        late: LatePolicy::Drop,
        state_ttl: None,
    };
    let (win, _) = spec.plan(&schema()).unwrap();
    let sink = CollectSink::default();
    let job = JobSpec {
        workers,
        watermark: WatermarkSpec { bound: Duration::from_millis(bound as u64), idle_timeout: None },
        ..test_job(
            Arc::new(VecSourceFactory::new(schema(), partitions)),
            vec![
                StageSpec { key: None, ops: vec![] },
                StageSpec { key: Some(vec!["k".into()]), ops: vec![(StepId::new("win"), win)] },
            ],
            Arc::new(sink.clone()),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let summary = rt.block_on(Job::new(job).unwrap().run()).unwrap();
    let late = summary.steps.iter().find(|(s, _)| s.as_str() == "win").unwrap().1.late_dropped;
    let mut out = Rows::new();
    for b in sink.batches() {
        for i in 0..b.num_rows() {
            let k = b.column(0).as_string::<i32>().value(i).to_string();
            let start = b.column(1).as_primitive::<Int64Type>().value(i);
            let n = b.column(3).as_primitive::<Int64Type>().value(i);
            let s = b.column(4).as_primitive::<Float64Type>().value(i) as i64;
            assert!(out.insert((k, start), (n, s)).is_none(), "a window was emitted twice");
        }
    }
    (out, late)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn windows_equal_reference_at_1_and_2_workers(
        parts in prop::collection::vec(prop::collection::vec((0u8..6, 0i64..1500, -20i32..20), 0..150), 1..4),
        bound in 0i64..200,
        cut in 1usize..40,
    ) {
        let mut expect = Rows::new();
        let mut partitions = Vec::new();
        for events in parts {
            // Each partition's disorder stays within the bound.
            let mut max = i64::MIN;
            let mut rows = Vec::new();
            for (k, t, v) in events {
                let t = if max != i64::MIN && t < max - bound { max - bound } else { t };
                max = max.max(t);
                rows.push((format!("k{k}"), f64::from(v), t));
                let e = expect.entry((format!("k{k}"), t - t.rem_euclid(100))).or_insert((0, 0));
                e.0 += 1;
                e.1 += i64::from(v);
            }
            partitions.push(rows.chunks(cut).map(batch).collect());
        }
        for workers in [1, 2] {
            let (got, late) = run(partitions.clone(), bound, workers);
            prop_assert_eq!(late, 0);
            prop_assert_eq!(&got, &expect, "workers {}", workers);
        }
    }
}

#[derive(Debug, Clone)]
struct GateSink(Arc<tokio::sync::Semaphore>, Arc<std::sync::atomic::AtomicU64>);

impl weir_core::SinkFactory for GateSink {
    fn create(&self, _: usize, _: usize) -> weir_core::Result<Box<dyn weir_core::Sink>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl weir_core::Sink for GateSink {
    async fn write(&mut self, rows: &RecordBatch) -> weir_core::Result<()> {
        // Each batch needs a permit: with none, the sink is stuck like a dead server.
        self.0.acquire().await.unwrap().forget();
        self.1.fetch_add(rows.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn close(&mut self) -> weir_core::Result<()> {
        Ok(())
    }
}

/// A sink that does not take rows stops the source within the channels' bounds; when it
/// resumes, everything arrives.
#[test]
fn a_blocked_sink_stops_the_source() {
    use weir_connectors::{GeneratorConfig, GeneratorFactory};
    let gen =
        GeneratorFactory::new(GeneratorConfig { count: Some(200_000), batch_size: 1000, ..GeneratorConfig::default() })
            .unwrap();
    let gate = GateSink(Arc::new(tokio::sync::Semaphore::new(0)), Arc::default());
    let job = test_job(
        Arc::new(gen),
        vec![StageSpec { key: None, ops: vec![] }, StageSpec { key: Some(vec!["device_id".into()]), ops: vec![] }],
        Arc::new(gate.clone()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let job = Job::new(job).unwrap();
    let reg = job.registry();
    let handle = rt.spawn(job.run());
    // Stuck: the source has read and then stopped (no new record for 200 ms).
    let records = || reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
    let mut last = (records(), std::time::Instant::now());
    crate::common::poll(|| {
        if records() != last.0 {
            last = (records(), std::time::Instant::now());
        }
        (last.0 > 0 && last.1.elapsed() >= Duration::from_millis(200)).then_some(())
    });
    let read = reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
    // Per worker: a batch in the source task, 2 x 2 queued for each receiver, one in the sink.
    assert!(read <= 16_000, "the source kept reading while the sink was stuck: {read} rows");
    assert!(read >= 2_000, "the pipeline should have filled its channels: {read}");
    gate.0.add_permits(1_000_000);
    let summary = rt.block_on(handle).unwrap().unwrap();
    assert_eq!(summary.sink_rows, 200_000);
    assert_eq!(gate.1.load(std::sync::atomic::Ordering::Relaxed), 200_000);
}

/// Fails its first `fail_first` writes with a transient I/O error (or every write, if
/// `always`), then takes rows.
#[derive(Debug, Clone, Default)]
struct FlakySink {
    fail_first: u64,
    always: bool,
    /// Fails with a permission error on the output file.
    denied: bool,
    /// Fails every write while set.
    down: Arc<std::sync::atomic::AtomicBool>,
    permanent: bool,
    calls: Arc<std::sync::atomic::AtomicU64>,
    rows: Arc<std::sync::atomic::AtomicU64>,
}

impl weir_core::SinkFactory for FlakySink {
    fn create(&self, _: usize, _: usize) -> weir_core::Result<Box<dyn weir_core::Sink>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl weir_core::Sink for FlakySink {
    async fn write(&mut self, rows: &RecordBatch) -> weir_core::Result<()> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.permanent {
            return Err(weir_core::CoreError::Config("table does not exist".into()));
        }
        if self.denied {
            return Err(weir_core::CoreError::io(
                "writing `/srv/out/part-0.jsonl`",
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ));
        }
        if self.always || call < self.fail_first || self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(weir_core::CoreError::io(
                "connecting to the sink",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            ));
        }
        self.rows.fetch_add(rows.num_rows() as u64, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    async fn close(&mut self) -> weir_core::Result<()> {
        Ok(())
    }
}

fn flaky_job(sink: FlakySink, retry: weir_core::runtime::RetryPolicy, dead: Arc<MemoryDeadLetters>) -> Job {
    use weir_connectors::{GeneratorConfig, GeneratorFactory};
    let gen =
        GeneratorFactory::new(GeneratorConfig { count: Some(20_000), batch_size: 1000, ..GeneratorConfig::default() })
            .unwrap();
    Job::new(JobSpec {
        dead_letters: dead,
        sink_retry: retry,
        ..test_job(Arc::new(gen), vec![StageSpec { key: None, ops: vec![] }], Arc::new(sink))
    })
    .unwrap()
}

/// A sink that is down for a while: its input waits and is retried, nothing is lost or
/// duplicated, and the outage shows in the metrics.
#[test]
fn a_sink_that_recovers_loses_and_duplicates_nothing() {
    let sink = FlakySink { fail_first: 6, ..Default::default() };
    let retry = weir_core::runtime::RetryPolicy {
        max_attempts: None,
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    };
    let job = flaky_job(sink.clone(), retry, Arc::default());
    let reg = job.registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(job.run()).unwrap();
    assert_eq!(sink.rows.load(std::sync::atomic::Ordering::SeqCst), 20_000);
    assert_eq!(summary.sink_rows, 20_000);
    assert_eq!(reg.sink_retries.load(std::sync::atomic::Ordering::Relaxed), 6);
    assert!(reg.sink_outages.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(reg.sink_down.load(std::sync::atomic::Ordering::Relaxed), 0, "back up at the end");
    let text = reg.render_prometheus("flaky");
    assert!(text.contains("weir_sink_retries_total{job=\"flaky\"} 6"), "{text}");
}

/// With a bounded number of attempts, a sink that stays down sends its rows to the
/// dead-letter output (kind `sink`) and the job ends; the counts still add up.
#[test]
fn exhausted_retries_dead_letter_the_rows() {
    let sink = FlakySink { always: true, ..Default::default() };
    let retry = weir_core::runtime::RetryPolicy {
        max_attempts: Some(3),
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    };
    let dead = Arc::new(MemoryDeadLetters::default());
    let summary =
        tokio::runtime::Runtime::new().unwrap().block_on(flaky_job(sink.clone(), retry, dead.clone()).run()).unwrap();
    let letters = dead.entries();
    assert_eq!(letters.len(), 20_000);
    assert!(letters.iter().all(|l| l.kind == weir_core::ErrorKind::Sink && l.reason.contains("failed 3 times")));
    assert!(letters.iter().all(|l| l.attempts == 3 && l.first_failure_ms.is_some_and(|f| f <= l.time_ms)));
    assert_eq!(sink.calls.load(std::sync::atomic::Ordering::SeqCst), 20 * 3, "20 batches, 3 attempts each");
    let m = summary.steps.iter().find(|(s, _)| s.as_str() == "sink").unwrap().1;
    assert_eq!((m.rows_in, m.dead_lettered, m.rows_out), (20_000, 20_000, 0));
    assert!(m.balanced());
}

/// A permanent error is not retried: the job fails and says why.
#[test]
fn a_permanent_sink_error_fails_the_job_at_once() {
    let sink = FlakySink { permanent: true, ..Default::default() };
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(flaky_job(sink.clone(), weir_core::runtime::RetryPolicy::default(), Arc::default()).run())
        .unwrap_err();
    assert!(err.to_string().contains("step `sink`: table does not exist"), "{err}");
    assert!(sink.calls.load(std::sync::atomic::Ordering::SeqCst) <= 2, "one try per worker at most");
}

/// A permission error is permanent: the job fails at once and names the path, instead of
/// retrying (by default, forever) a write that cannot succeed.
#[test]
fn a_permission_error_fails_the_job_at_once_with_the_path() {
    let sink = FlakySink { denied: true, ..Default::default() };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = flaky_job(sink.clone(), weir_core::runtime::RetryPolicy::default(), Arc::default());
    let err =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), job.run()).await }).unwrap().unwrap_err();
    assert!(err.to_string().contains("step `sink`: writing `/srv/out/part-0.jsonl`: permission denied"), "{err}");
    assert!(sink.calls.load(std::sync::atomic::Ordering::SeqCst) <= 2, "one try per worker at most");
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let p = weir_core::runtime::RetryPolicy {
        max_attempts: None,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    for (retry, base) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (30, 1000)] {
        let d = p.delay(retry).as_millis() as u64;
        assert!((base..=base + base / 4).contains(&d), "retry {retry}: {d} ms");
    }
}

/// `/readyz` answers 503 with the reason until the job runs, while its sink fails, and once it
/// has finished; 200 only while it runs with its sink answering.
#[test]
fn readiness_follows_the_job_and_its_sink() {
    use weir_connectors::{GeneratorConfig, GeneratorFactory};
    let sink = FlakySink::default();
    sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let gen =
        GeneratorFactory::new(GeneratorConfig { rate: Some(2000.0), batch_size: 50, ..GeneratorConfig::default() })
            .unwrap();
    let retry = weir_core::runtime::RetryPolicy {
        max_attempts: None,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    };
    let job = Job::new(JobSpec {
        sink_retry: retry,
        ..test_job(Arc::new(gen), vec![StageSpec { key: None, ops: vec![] }], Arc::new(sink.clone()))
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = weir::http::HttpState::metrics_only("ready".into(), job.registry());
    let server = rt.block_on(weir::http::MetricsServer::start("127.0.0.1:0", state)).unwrap();
    let readyz = || crate::common::http_get(server.addr(), "/readyz");
    let (status, body) = readyz();
    assert_eq!((status, body.contains("the job is starting")), (503, true), "{body}");
    let stop = job.shutdown_handle();
    let running = rt.spawn(job.run());
    let (_, body) = crate::common::poll(|| Some(readyz()).filter(|(s, b)| *s == 503 && b.contains("sink is failing")));
    assert!(body.contains("\"ready\":false"), "{body}");
    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);
    crate::common::poll(|| Some(readyz()).filter(|(s, _)| *s == 200));
    stop.stop();
    rt.block_on(running).unwrap().unwrap();
    let (status, body) = readyz();
    assert_eq!((status, body.contains("the job is finished")), (503, true), "{body}");
}

/// A resumable source of `per_worker` rows per worker (key `k{i % 5}`, value 1, event time
/// `10 * i` ms), in batches of 10, that asks once, after `restart_at` rows of worker 0, for the
/// run to end at a checkpoint and start again ([`weir_core::SourceContext::start_again`]).
#[derive(Debug, Clone)]
struct RestartingSource {
    per_worker: i64,
    restart_at: Option<i64>,
    asked: Arc<std::sync::atomic::AtomicBool>,
}

impl weir_core::SourceFactory for RestartingSource {
    fn schema(&self) -> SchemaRef {
        schema()
    }
    fn create(&self, worker: usize, _: usize) -> weir_core::Result<Box<dyn weir_core::Source>> {
        Ok(Box::new(RestartingInstance { f: self.clone(), worker: worker as i64, pos: 0, ended: false }))
    }
    fn resumable(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct RestartingInstance {
    f: RestartingSource,
    worker: i64,
    pos: i64,
    ended: bool,
}

fn position_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("w", DataType::Int64, false), Field::new("pos", DataType::Int64, false)]))
}

#[async_trait::async_trait]
impl weir_core::Source for RestartingInstance {
    fn partitions(&self) -> usize {
        1
    }
    async fn poll(&mut self, cx: &mut weir_core::SourceContext) -> weir_core::Result<weir_core::SourcePoll> {
        use weir_core::SourcePoll;
        if self.worker == 0
            && self.f.restart_at.is_some_and(|at| self.pos >= at)
            && !self.f.asked.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            cx.start_again("the test asks for it");
        }
        if cx.stopping() || self.ended {
            return Ok(SourcePoll::End);
        }
        if self.pos >= self.f.per_worker {
            self.ended = true;
            return Ok(SourcePoll::PartitionEnd(0));
        }
        let rows: Vec<(String, f64, i64)> = (self.pos..(self.pos + 10).min(self.f.per_worker))
            .map(|i| {
                let id = self.worker * self.f.per_worker + i;
                (format!("k{}", id % 5), 1.0, 10 * i)
            })
            .collect();
        self.pos += rows.len() as i64;
        cx.count_records(rows.len() as u64);
        Ok(SourcePoll::Rows { partition: 0, batch: batch(&rows) })
    }
    fn snapshot(&mut self) -> weir_core::Result<Option<RecordBatch>> {
        let t = RecordBatch::try_new(
            position_schema(),
            vec![Arc::new(Int64Array::from(vec![self.worker])), Arc::new(Int64Array::from(vec![self.pos]))],
        )?;
        Ok(Some(t))
    }
    fn restore(&mut self, positions: &[RecordBatch]) -> weir_core::Result<()> {
        for t in positions {
            let (w, p) = (t.column(0).as_primitive::<Int64Type>(), t.column(1).as_primitive::<Int64Type>());
            for i in 0..t.num_rows() {
                if w.value(i) == self.worker {
                    self.pos = p.value(i);
                }
            }
        }
        Ok(())
    }
}

/// A run ended at a checkpoint on a source's request starts again from that checkpoint at
/// once: nothing is read twice, and windows open at the end are neither flushed early nor
/// lost (the final checkpoint does not drain), so the output equals a run without the restart.
#[test]
fn a_run_ended_at_a_checkpoint_starts_again_from_it_reading_nothing_twice() {
    let outcome = |restart_at: Option<i64>| {
        let dir = tempfile::tempdir().unwrap();
        let spec = WindowSpec {
            keys: vec!["k".into()],
            kind: WindowKind::Tumbling { size_ms: 100 },
            domain: TimeDomain::Event,
            aggs: vec![AggSpec { name: "n".into(), func: AggFunc::Count, column: None }],
            late: LatePolicy::Drop,
            state_ttl: None,
        };
        let (win, _) = spec.plan(&schema()).unwrap();
        let sink = CollectSink::default();
        let source = RestartingSource { per_worker: 400, restart_at, asked: Arc::default() };
        let job = JobSpec {
            checkpoint: Some(weir_core::runtime::CheckpointSpec {
                store: weir_core::store::CheckpointStore::open(&dir.path().display().to_string(), "test").unwrap(),
                interval: None,
                keep: 2,
                fresh: false,
            }),
            ..test_job(
                Arc::new(source),
                vec![
                    StageSpec { key: None, ops: vec![] },
                    StageSpec { key: Some(vec!["k".into()]), ops: vec![(StepId::new("win"), win)] },
                ],
                Arc::new(sink.clone()),
            )
        };
        let job = Job::new(job).unwrap();
        let registry = job.registry();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(job.run()).unwrap();
        let mut windows = BTreeMap::new();
        for b in sink.batches() {
            for i in 0..b.num_rows() {
                let k = b.column(0).as_string::<i32>().value(i).to_string();
                let start = b.column(1).as_primitive::<Int64Type>().value(i);
                let n = b.column(3).as_primitive::<Int64Type>().value(i);
                assert!(windows.insert((k, start), n).is_none(), "a window was emitted twice");
            }
        }
        let read = registry.source_records.load(std::sync::atomic::Ordering::Relaxed);
        let restarts = registry.connectors.get("weir_job_restarts_total", &[("reason", "rebalance")]).unwrap_or(0.0);
        (windows, read, restarts)
    };
    let (plain, read, restarts) = outcome(None);
    assert_eq!((read, restarts), (800, 0.0));
    let (restarted, read, restarts) = outcome(Some(150));
    assert_eq!(restarts, 1.0, "the run started again once");
    assert_eq!(read, 800, "records read across both runs");
    assert_eq!(restarted, plain);
}

/// A sink that, before each run of the job (`prepare`), notes whether the job's checkpoints
/// are locked, by trying to take their lock itself.
#[derive(Debug, Clone)]
struct LockProbe {
    sink: CollectSink,
    dir: String,
    held: Arc<std::sync::Mutex<Vec<bool>>>,
}

impl weir_core::SinkFactory for LockProbe {
    fn create(&self, worker: usize, workers: usize) -> weir_core::Result<Box<dyn weir_core::Sink>> {
        weir_core::SinkFactory::create(&self.sink, worker, workers)
    }
    fn prepare(&self) -> futures::future::BoxFuture<'_, weir_core::Result<()>> {
        Box::pin(async move {
            let store = weir_core::store::CheckpointStore::open(&self.dir, "test")?;
            let held = store.lock().is_err();
            self.held.lock().unwrap().push(held);
            Ok(())
        })
    }
}

/// A job that starts again keeps its checkpoints locked in between: another run cannot take
/// them between two attempts, and the next attempt does not find the lock still held (a CI
/// run failed so, "another run of this pipeline is using the checkpoints", when the lock was
/// let go and taken again at each attempt).
#[test]
fn the_checkpoints_stay_locked_while_the_job_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().display().to_string();
    let probe = LockProbe { sink: CollectSink::default(), dir: location.clone(), held: Arc::default() };
    let source = RestartingSource { per_worker: 400, restart_at: Some(150), asked: Arc::default() };
    let job = JobSpec {
        checkpoint: Some(weir_core::runtime::CheckpointSpec {
            store: weir_core::store::CheckpointStore::open(&location, "test").unwrap(),
            interval: None,
            keep: 2,
            fresh: false,
        }),
        ..test_job(Arc::new(source), vec![StageSpec { key: None, ops: vec![] }], Arc::new(probe.clone()))
    };
    let job = Job::new(job).unwrap();
    let registry = job.registry();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(job.run()).unwrap();
    let restarts = registry.connectors.get("weir_job_restarts_total", &[("reason", "rebalance")]).unwrap_or(0.0);
    assert_eq!(restarts, 1.0, "the run started again once");
    assert_eq!(*probe.held.lock().unwrap(), [true, true], "locked before each of the two attempts");
    let store = weir_core::store::CheckpointStore::open(&location, "test").unwrap();
    assert!(store.lock().unwrap().is_some(), "let go when the job ends");
}
