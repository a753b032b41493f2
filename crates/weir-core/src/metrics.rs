//! Counters per step and per worker, read by the progress line, the end-of-run summary and the
//! Prometheus endpoint.
//!
//! Counters are plain atomics bumped once per batch (never per row). Queue depth is a
//! pushed/popped pair, so a reader computes fill without the hot path keeping a gauge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::ids::StepId;

/// What a step did with its rows. The invariant the tests check:
/// `rows_in = rows_out + filtered + aggregated + dead_lettered + late_dropped`, where
/// `rows_out` counts rows passed through for row-preserving steps; for steps that aggregate,
/// `aggregated` counts the input rows folded into state and `results_out` the rows they emit.
#[derive(Debug, Default)]
pub struct StepMetrics {
    /// Rows received.
    pub rows_in: AtomicU64,
    /// Rows passed on unchanged in number (maps, projections, filters' survivors).
    pub rows_out: AtomicU64,
    /// Rows emitted from state (window results, anomalies).
    pub results_out: AtomicU64,
    /// Rows removed by a predicate.
    pub filtered: AtomicU64,
    /// Rows folded into state.
    pub aggregated: AtomicU64,
    /// Rows sent to the dead-letter output.
    pub dead_lettered: AtomicU64,
    /// Rows dropped as late (policy `drop`).
    pub late_dropped: AtomicU64,
    /// Late rows written to the side output.
    pub late_side: AtomicU64,
    /// Rows diverted because their key is quarantined.
    pub quarantined: AtomicU64,
    /// Rows dropped by load shedding.
    pub shed: AtomicU64,
    /// Batches received.
    pub batches_in: AtomicU64,
    /// Nanoseconds spent inside the step's hooks.
    pub busy_ns: AtomicU64,
    /// How long each batch took.
    pub batch_time: BatchTimes,
    /// Keys the step holds state for, at its last check (steps with `state_ttl`).
    pub state_keys: AtomicU64,
    /// Keys the step forgot because they were not seen within `state_ttl`.
    pub state_evicted: AtomicU64,
}

impl StepMetrics {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> StepSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StepSnapshot {
            rows_in: g(&self.rows_in),
            rows_out: g(&self.rows_out),
            results_out: g(&self.results_out),
            filtered: g(&self.filtered),
            aggregated: g(&self.aggregated),
            dead_lettered: g(&self.dead_lettered),
            late_dropped: g(&self.late_dropped),
            late_side: g(&self.late_side),
            quarantined: g(&self.quarantined),
            shed: g(&self.shed),
            batches_in: g(&self.batches_in),
            busy_ns: g(&self.busy_ns),
        }
    }
}

/// A copy of [`StepMetrics`], summed over workers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StepSnapshot {
    pub rows_in: u64,
    pub rows_out: u64,
    pub results_out: u64,
    pub filtered: u64,
    pub aggregated: u64,
    pub dead_lettered: u64,
    pub late_dropped: u64,
    pub late_side: u64,
    pub quarantined: u64,
    pub shed: u64,
    pub batches_in: u64,
    pub busy_ns: u64,
}

impl StepSnapshot {
    fn add(&mut self, o: &StepSnapshot) {
        self.rows_in += o.rows_in;
        self.rows_out += o.rows_out;
        self.results_out += o.results_out;
        self.filtered += o.filtered;
        self.aggregated += o.aggregated;
        self.dead_lettered += o.dead_lettered;
        self.late_dropped += o.late_dropped;
        self.late_side += o.late_side;
        self.quarantined += o.quarantined;
        self.shed += o.shed;
        self.batches_in += o.batches_in;
        self.busy_ns += o.busy_ns;
    }

    /// Whether every input row is accounted for.
    pub fn balanced(&self) -> bool {
        self.rows_in
            == self.rows_out
                + self.filtered
                + self.aggregated
                + self.dead_lettered
                + self.late_dropped
                + self.late_side
                + self.quarantined
                + self.shed
    }
}

/// Counters of one channel (all senders into one receiving task).
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    /// Batches pushed.
    pub pushed: AtomicU64,
    /// Batches popped.
    pub popped: AtomicU64,
    /// Capacity in messages.
    pub capacity: AtomicU64,
}

/// Per-worker progress of event time.
#[derive(Debug)]
pub struct WorkerClock {
    /// Current output watermark of the worker's source, ms (i64::MIN before the first).
    pub watermark: AtomicI64,
}

impl Default for WorkerClock {
    fn default() -> Self {
        Self { watermark: AtomicI64::new(i64::MIN) }
    }
}

/// A counter's name, help text and getter.
type Counter = (&'static str, &'static str, fn(&StepSnapshot) -> u64);

/// All metrics of one running job.
#[derive(Debug, Default)]
pub struct Registry {
    steps: Mutex<Vec<(StepId, usize, Arc<StepMetrics>)>>,
    channels: Mutex<Vec<(String, Arc<ChannelMetrics>)>>,
    clocks: Mutex<Vec<Arc<WorkerClock>>>,
    /// Records read by sources (before decoding).
    pub source_records: AtomicU64,
    /// Bytes read by sources.
    pub source_bytes: AtomicU64,
    /// Rows written by sinks.
    pub sink_rows: AtomicU64,
    /// Creation-to-sink latency, when the job names a creation-time column: measured when
    /// the sink has taken the row (after its write returns).
    pub latency: LatencyHistogram,
    /// The part of [`Registry::latency`] before the sink's write began: with it, the time a
    /// row waited and was processed upstream is told apart from the time the sink's write of
    /// its batch took (encoding, handing to the client), which every row of the batch pays.
    pub latency_to_sink_entry: LatencyHistogram,
    /// The adaptive linger of the last batch a streaming source cut, µs (see
    /// [`crate::linger::Linger`]): near zero for a quiet stream, up to `max_linger` in a burst.
    pub linger_us: AtomicU64,
    /// Sink writes retried after a transient failure.
    pub sink_retries: AtomicU64,
    /// Times a sink started failing (each outage counts once).
    pub sink_outages: AtomicU64,
    /// 1 while a sink is failing and being retried.
    pub sink_down: AtomicU64,
    /// Checkpoint progress, when the job takes checkpoints.
    pub checkpoints: CheckpointMetrics,
    /// Series that connectors report (Kafka consumer lag per partition, rebalances, ...).
    pub connectors: ConnectorMetrics,
    /// Where the job is in its life: what `/readyz` answers.
    pub phase: Phase,
    /// Inputs of stage tasks not read right now because their checkpoint barrier came before
    /// the others' (barrier alignment); their senders wait meanwhile.
    pub inputs_held: AtomicU64,
    /// The job's quarantine, for its figures.
    pub quarantine: std::sync::OnceLock<Arc<crate::quarantine::Quarantine>>,
}

/// Where a job is in its life, for readiness probes. A job is ready only while it is
/// [`JobPhase::Running`] and its sink is not failing: before that it recovers from a
/// checkpoint or waits for its partitions, and after a rebalance it does both again.
#[derive(Debug, Default)]
pub struct Phase(std::sync::atomic::AtomicU8);

/// The phases of [`Phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobPhase {
    /// Built, not started.
    Starting,
    /// Settling the sink and loading the newest checkpoint.
    Recovering,
    /// Waiting for the consumer group to assign partitions.
    Assigning,
    /// Every task runs.
    Running,
    /// The partitions moved; the job starts again from its last checkpoint.
    Rebalancing,
    /// The input ended, or the job was stopped or failed.
    Finished,
}

impl JobPhase {
    const ALL: [JobPhase; 6] = [
        JobPhase::Starting,
        JobPhase::Recovering,
        JobPhase::Assigning,
        JobPhase::Running,
        JobPhase::Rebalancing,
        JobPhase::Finished,
    ];

    /// The phase's name, as `/readyz` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Starting => "starting",
            JobPhase::Recovering => "recovering",
            JobPhase::Assigning => "waiting for partitions",
            JobPhase::Running => "running",
            JobPhase::Rebalancing => "rebalancing",
            JobPhase::Finished => "finished",
        }
    }
}

impl Phase {
    /// Moves the job to `p`.
    pub fn set(&self, p: JobPhase) {
        let i = JobPhase::ALL.iter().position(|x| *x == p).unwrap_or(0);
        self.0.store(u8::try_from(i).unwrap_or(0), Ordering::Relaxed);
    }

    /// The current phase.
    pub fn get(&self) -> JobPhase {
        JobPhase::ALL.get(usize::from(self.0.load(Ordering::Relaxed))).copied().unwrap_or(JobPhase::Starting)
    }
}

impl Registry {
    /// Whether the job can take traffic, and if not, why: it must be running (recovered, its
    /// partitions assigned) with its sink answering.
    pub fn readiness(&self) -> Result<(), String> {
        match self.phase.get() {
            JobPhase::Running if self.sink_down.load(Ordering::Relaxed) == 1 => {
                Err("the sink is failing; writes are being retried".into())
            }
            JobPhase::Running => Ok(()),
            p => Err(format!("the job is {}", p.as_str())),
        }
    }
}

/// Metric series reported by connectors, by name and label set. Label sets must stay
/// bounded (a partition number is fine, a key is not). Updated per batch or per statistics
/// interval, never per row, so a mutex is cheap enough.
#[derive(Debug, Default)]
pub struct ConnectorMetrics {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
}

/// A series' metric name and labels.
type SeriesKey = (&'static str, Vec<(String, String)>);
/// A series' help text, Prometheus type and value.
type Series = (&'static str, &'static str, f64);

impl ConnectorMetrics {
    fn labels(labels: &[(&str, &str)]) -> Vec<(String, String)> {
        labels.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let mut m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.insert((name, Self::labels(labels)), (help, "gauge", value));
    }

    /// Sets a counter to a total kept elsewhere (a connector's own atomics).
    pub fn set_total(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let mut m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.insert((name, Self::labels(labels)), (help, "counter", value));
    }

    /// Adds to a counter.
    pub fn add(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], by: f64) {
        let mut m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry((name, Self::labels(labels))).or_insert((help, "counter", 0.0)).2 += by;
    }

    /// Every series of a metric: its labels and value.
    pub fn series(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        let m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter().filter(|((n, _), _)| *n == name).map(|((_, l), v)| (l.clone(), v.2)).collect()
    }

    /// The value of a series, if it was reported.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = Self::labels(labels);
        m.iter().find(|((n, l), _)| *n == name && *l == key).map(|(_, v)| v.2)
    }

    fn collect(&self, fams: &mut Families) {
        let m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((name, labels), (help, kind, v)) in m.iter() {
            let kind = if *kind == "counter" { Kind::Counter } else { Kind::Gauge };
            fams.push(name, help, kind, vec![(labels.clone(), Value::Number(*v))]);
        }
    }
}

/// Counters and gauges of checkpointing.
#[derive(Debug, Default)]
pub struct CheckpointMetrics {
    /// 1 when the job takes checkpoints (the other figures are only shown then).
    pub enabled: AtomicU64,
    /// Checkpoints completed (manifest written).
    pub completed: AtomicU64,
    /// Checkpoints that failed (a store write failed) and were abandoned.
    pub failed: AtomicU64,
    /// Epoch of the last complete checkpoint.
    pub last_epoch: AtomicU64,
    /// Barrier injection to manifest written, of the last complete checkpoint, µs.
    pub last_duration_us: AtomicU64,
    /// Longest time a task waited for barriers to line up in the last checkpoint, µs.
    pub last_alignment_us: AtomicU64,
    /// Bytes of state in the last complete checkpoint.
    pub last_bytes: AtomicU64,
    /// When the last checkpoint completed, ms since the epoch.
    pub last_completed_ms: AtomicU64,
}

impl Registry {
    /// Registers (or returns) the metrics of `step` on `worker`. Steps keep registration order,
    /// which is pipeline order.
    pub fn step(&self, step: &StepId, worker: usize) -> Arc<StepMetrics> {
        let mut steps = self.steps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, m)) = steps.iter().find(|(s, w, _)| s == step && *w == worker) {
            return m.clone();
        }
        let m = Arc::new(StepMetrics::default());
        steps.push((step.clone(), worker, m.clone()));
        m
    }

    /// Registers a channel.
    pub fn channel(&self, name: String, capacity: usize) -> Arc<ChannelMetrics> {
        let m = Arc::new(ChannelMetrics::default());
        m.capacity.store(capacity as u64, Ordering::Relaxed);
        self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((name, m.clone()));
        m
    }

    /// Registers a worker's watermark cell.
    pub fn clock(&self) -> Arc<WorkerClock> {
        let c = Arc::new(WorkerClock::default());
        self.clocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(c.clone());
        c
    }

    /// Per-step totals over workers, in pipeline order.
    pub fn steps(&self) -> Vec<(StepId, StepSnapshot)> {
        let steps = self.steps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(StepId, StepSnapshot)> = Vec::new();
        for (id, _, m) in steps.iter() {
            let snap = m.snapshot();
            match out.iter_mut().find(|(s, _)| s == id) {
                Some((_, total)) => total.add(&snap),
                None => out.push((id.clone(), snap)),
            }
        }
        out
    }

    /// The job's event-time watermark: the minimum over workers that have one.
    pub fn watermark(&self) -> Option<i64> {
        let clocks = self.clocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        clocks.iter().map(|c| c.watermark.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN).min()
    }

    /// Fill of each channel (queued messages over capacity, 0..=1) at this instant.
    pub fn channel_fill(&self) -> Vec<(String, f64)> {
        let chans = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        chans
            .iter()
            .map(|(n, c)| {
                let pushed = c.pushed.load(Ordering::Relaxed);
                let popped = c.popped.load(Ordering::Relaxed);
                let cap = c.capacity.load(Ordering::Relaxed).max(1);
                (n.clone(), pushed.saturating_sub(popped) as f64 / cap as f64)
            })
            .collect()
    }

    /// Per step, keys held and keys forgotten, summed over workers, for the steps that
    /// forget keys (`state_ttl`).
    pub fn step_state(&self) -> Vec<(StepId, (u64, u64))> {
        let steps = self.steps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(StepId, (u64, u64))> = Vec::new();
        for (id, _, m) in steps.iter() {
            let v = (m.state_keys.load(Ordering::Relaxed), m.state_evicted.load(Ordering::Relaxed));
            match out.iter_mut().find(|(s, _)| s == id) {
                Some((_, t)) => {
                    t.0 += v.0;
                    t.1 += v.1;
                }
                None => out.push((id.clone(), v)),
            }
        }
        out
    }

    /// Per-step batch-time histograms summed over workers, in pipeline order.
    pub fn step_times(&self) -> Vec<(StepId, HistogramSnapshot)> {
        let steps = self.steps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(StepId, HistogramSnapshot)> = Vec::new();
        for (id, _, m) in steps.iter() {
            let snap = m.batch_time.snapshot();
            match out.iter_mut().find(|(s, _)| s == id) {
                Some((_, total)) => total.add(&snap),
                None => out.push((id.clone(), snap)),
            }
        }
        out
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4), through
    /// `prometheus-client`'s encoder: names, label escaping and histogram series are its job.
    pub fn render_prometheus(&self, job: &str) -> String {
        let mut fams = Families { job: job.to_string(), list: Vec::new() };
        let steps = self.steps();
        let counters: [Counter; 12] = [
            ("weir_step_rows_shed", "Rows dropped by load shedding.", |x| x.shed),
            ("weir_step_rows_quarantined", "Rows diverted because their key is quarantined.", |x| x.quarantined),
            ("weir_step_rows_in", "Rows received by a step.", |x| x.rows_in),
            ("weir_step_rows_out", "Rows passed on by a step.", |x| x.rows_out),
            ("weir_step_results_out", "Rows emitted from a step's state.", |x| x.results_out),
            ("weir_step_rows_filtered", "Rows removed by a predicate.", |x| x.filtered),
            ("weir_step_rows_aggregated", "Rows folded into state.", |x| x.aggregated),
            ("weir_step_dead_letters", "Rows sent to the dead-letter output.", |x| x.dead_lettered),
            ("weir_step_late_dropped", "Late rows dropped.", |x| x.late_dropped),
            ("weir_step_late_side", "Late rows sent to the side output.", |x| x.late_side),
            ("weir_step_batches_in", "Batches received by a step.", |x| x.batches_in),
            ("weir_step_busy_seconds", "Time spent in a step, seconds (ns resolution).", |x| x.busy_ns),
        ];
        for (name, help, get) in counters {
            let samples = steps
                .iter()
                .map(|(id, snap)| {
                    let v = get(snap);
                    let v = if name == "weir_step_busy_seconds" { v as f64 / 1e9 } else { v as f64 };
                    (vec![("step".to_string(), id.to_string())], Value::Number(v))
                })
                .collect();
            fams.push(name, help, Kind::Counter, samples);
        }
        let times = self
            .step_times()
            .into_iter()
            .map(|(id, h)| (vec![("step".to_string(), id.to_string())], Value::Histogram(h.seconds())))
            .collect();
        fams.push(
            "weir_step_batch_duration_seconds",
            "Time a step (or the sink) took for one batch.",
            Kind::Histogram,
            times,
        );
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let (mut keys, mut evicted) = (Vec::new(), Vec::new());
        for (id, m) in self.step_state() {
            let label = vec![("step".to_string(), id.to_string())];
            keys.push((label.clone(), Value::Number(m.0 as f64)));
            evicted.push((label, Value::Number(m.1 as f64)));
        }
        fams.push("weir_state_keys", "Keys a step holds state for (steps with state_ttl).", Kind::Gauge, keys);
        fams.push(
            "weir_state_evicted_total",
            "Keys a step forgot because they were not seen within state_ttl.",
            Kind::Counter,
            evicted,
        );
        fams.one("weir_source_records", "Records read by sources.", Kind::Counter, g(&self.source_records));
        fams.one("weir_source_bytes", "Bytes read by sources.", Kind::Counter, g(&self.source_bytes));
        fams.one("weir_sink_rows", "Rows written by sinks.", Kind::Counter, g(&self.sink_rows));
        let fill = self
            .channel_fill()
            .into_iter()
            .map(|(name, fill)| (vec![("channel".to_string(), name)], Value::Number(fill)))
            .collect();
        fams.push("weir_channel_fill_ratio", "Messages queued over capacity.", Kind::Gauge, fill);
        fams.one(
            "weir_sink_retries",
            "Sink writes retried after a transient failure.",
            Kind::Counter,
            g(&self.sink_retries),
        );
        fams.one("weir_sink_outages", "Times a sink started failing.", Kind::Counter, g(&self.sink_outages));
        fams.one("weir_sink_down", "1 while a sink is failing and being retried.", Kind::Gauge, g(&self.sink_down));
        fams.one(
            "weir_ready",
            "1 while the job is running with its sink answering (what /readyz says).",
            Kind::Gauge,
            if self.readiness().is_ok() { 1.0 } else { 0.0 },
        );
        let c = &self.checkpoints;
        if c.enabled.load(Ordering::Relaxed) == 1 {
            let age = if c.last_completed_ms.load(Ordering::Relaxed) == 0 {
                f64::NAN
            } else {
                (crate::deadletter::now_ms() as f64 - g(&c.last_completed_ms)) / 1000.0
            };
            fams.one("weir_checkpoints_completed", "Checkpoints completed.", Kind::Counter, g(&c.completed));
            fams.one("weir_checkpoints_failed", "Checkpoints abandoned after a failure.", Kind::Counter, g(&c.failed));
            fams.one("weir_checkpoint_epoch", "Epoch of the last complete checkpoint.", Kind::Gauge, g(&c.last_epoch));
            fams.one(
                "weir_checkpoint_duration_seconds",
                "Barrier injection to manifest, last complete checkpoint.",
                Kind::Gauge,
                g(&c.last_duration_us) / 1e6,
            );
            fams.one(
                "weir_checkpoint_alignment_seconds",
                "Longest barrier alignment wait in the last checkpoint.",
                Kind::Gauge,
                g(&c.last_alignment_us) / 1e6,
            );
            fams.one(
                "weir_checkpoint_inputs_held",
                "Stage inputs held back right now until every input's checkpoint barrier has come.",
                Kind::Gauge,
                g(&self.inputs_held),
            );
            fams.one(
                "weir_checkpoint_size_bytes",
                "State bytes of the last complete checkpoint.",
                Kind::Gauge,
                g(&c.last_bytes),
            );
            fams.one("weir_checkpoint_age_seconds", "Time since the last checkpoint completed.", Kind::Gauge, age);
        }
        fams.one(
            "weir_source_linger_seconds",
            "Adaptive linger of the last batch cut by a streaming source.",
            Kind::Gauge,
            g(&self.linger_us) / 1e6,
        );
        if self.latency.count() > 0 {
            fams.push(
                "weir_sink_latency_seconds",
                "End-to-end latency at the sink (creation column to write).",
                Kind::Histogram,
                vec![(Vec::new(), Value::Histogram(self.latency.histogram()))],
            );
            fams.push(
                "weir_sink_entry_latency_seconds",
                "Latency from the creation column to the start of the sink's write (the rest is the write).",
                Kind::Histogram,
                vec![(Vec::new(), Value::Histogram(self.latency_to_sink_entry.histogram()))],
            );
        }
        if let Some(q) = self.quarantine.get() {
            fams.one("weir_quarantine_keys", "Keys quarantined right now.", Kind::Gauge, q.active() as f64);
            fams.one(
                "weir_quarantine_keys_quarantined_total",
                "Keys taken out of the pipeline for failing too often.",
                Kind::Counter,
                g(&q.quarantined_keys),
            );
            fams.one(
                "weir_quarantine_keys_released_total",
                "Keys let back in (cool-down over, or released through the API).",
                Kind::Counter,
                g(&q.released_keys),
            );
        }
        if let Some(wm) = self.watermark() {
            let lag = crate::deadletter::now_ms().saturating_sub(wm) as f64 / 1000.0;
            fams.one("weir_watermark_ms", "Event-time watermark, ms since epoch.", Kind::Gauge, wm as f64);
            fams.one("weir_watermark_lag_seconds", "Wall clock minus watermark.", Kind::Gauge, lag);
        }
        self.connectors.collect(&mut fams);
        fams.encode()
    }
}

/// The content type of [`Registry::render_prometheus`]'s text.
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A sample's value.
#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    /// Sum, count and per-bucket (not cumulative) counts by upper bound.
    Histogram((f64, u64, Vec<(f64, u64)>)),
}

/// Label pairs of one series.
type Labels = Vec<(String, String)>;

/// One metric family: the name as Prometheus shows it, less `_total` for counters.
#[derive(Debug)]
struct Family {
    name: String,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, Value)>,
}

/// One scrape's families, read from the atomics, then handed to the encoder.
#[derive(Debug)]
struct Families {
    job: String,
    list: Vec<Family>,
}

impl Families {
    fn push(&mut self, name: &str, help: &'static str, kind: Kind, samples: Vec<(Labels, Value)>) {
        let name = match kind {
            Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        match self.list.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.extend(samples),
            None => self.list.push(Family { name: name.to_string(), help, kind, samples }),
        }
    }

    fn one(&mut self, name: &str, help: &'static str, kind: Kind, v: f64) {
        self.push(name, help, kind, vec![(Vec::new(), Value::Number(v))]);
    }

    fn encode(self) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(self));
        let mut s = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &reg);
        s
    }
}

impl prometheus_client::collector::Collector for Families {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::metrics::MetricType;
        for f in &self.list {
            let t = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut m = enc.encode_descriptor(&f.name, f.help, None, t)?;
            for (labels, v) in &f.samples {
                let mut all: Vec<(&str, &str)> = vec![("job", self.job.as_str())];
                all.extend(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let mut e = m.encode_family(&all)?;
                // Whole numbers print as such (`15`, not `15.0`): most of ours are counts.
                let whole = |x: f64| (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64);
                match (f.kind, v) {
                    (Kind::Counter, Value::Number(x)) => match whole(*x).and_then(|n| u64::try_from(n).ok()) {
                        Some(n) => e.encode_counter::<prometheus_client::encoding::NoLabelSet, u64, f64>(&n, None)?,
                        None => e.encode_counter::<prometheus_client::encoding::NoLabelSet, f64, f64>(x, None)?,
                    },
                    (_, Value::Number(x)) => match whole(*x) {
                        Some(n) => e.encode_gauge(&n)?,
                        None => e.encode_gauge(x)?,
                    },
                    (_, Value::Histogram((sum, count, buckets))) => {
                        e.encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Upper bounds of [`BatchTimes`] buckets, ns: 10 µs to 10 s.
const BATCH_BOUNDS_NS: [u64; 16] = [
    10_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// How long one batch took in a step: fixed buckets, one atomic add per batch.
#[derive(Debug, Default)]
pub struct BatchTimes {
    buckets: [AtomicU64; BATCH_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A copy of [`BatchTimes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Counts per bucket of [`BATCH_BOUNDS_NS`], the last one past the largest bound.
    pub buckets: [u64; BATCH_BOUNDS_NS.len() + 1],
    /// Sum of the recorded durations, ns.
    pub sum_ns: u64,
}

impl BatchTimes {
    /// Records one batch.
    pub fn record(&self, ns: u64) {
        let i = BATCH_BOUNDS_NS.partition_point(|b| *b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A plain copy.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    fn add(&mut self, o: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
    }

    /// Batches recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn seconds(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut b: Vec<(f64, u64)> =
            BATCH_BOUNDS_NS.iter().zip(self.buckets).map(|(ub, n)| (*ub as f64 / 1e9, n)).collect();
        b.push((f64::INFINITY, self.buckets[BATCH_BOUNDS_NS.len()]));
        (self.sum_ns as f64 / 1e9, self.count(), b)
    }
}

/// End-to-end latency of rows at the sink, in buckets of 10 µs up to 1 s (and one overflow
/// bucket): fixed memory, lock-free recording, percentiles exact to the bucket width.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
    sum_us: AtomicU64,
}

/// Upper bounds, seconds, of the buckets `/metrics` shows for [`LatencyHistogram`].
const LATENCY_BOUNDS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

const LAT_BUCKET_US: u64 = 10;
const LAT_BUCKETS: usize = 100_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..=LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records latencies in microseconds (negative values, from clock skew, count as 0).
    pub fn record(&self, latencies_us: impl Iterator<Item = i64>) {
        let (mut max, mut sum) = (0u64, 0u64);
        for l in latencies_us {
            let l = u64::try_from(l).unwrap_or(0);
            max = max.max(l);
            sum = sum.saturating_add(l);
            let b = usize::try_from(l / LAT_BUCKET_US).unwrap_or(LAT_BUCKETS).min(LAT_BUCKETS);
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.max_us.fetch_max(max, Ordering::Relaxed);
        self.sum_us.fetch_add(sum, Ordering::Relaxed);
    }

    /// Sum, count and per-bucket counts over [`LATENCY_BOUNDS_S`] (the 10 µs buckets folded
    /// into coarser ones), for `/metrics`.
    fn histogram(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut out: Vec<(f64, u64)> = LATENCY_BOUNDS_S.iter().map(|b| (*b, 0)).collect();
        out.push((f64::INFINITY, 0));
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            count += n;
            // The fine bucket's upper edge decides where it falls; the overflow bucket is +Inf.
            let upper_s = if i == LAT_BUCKETS { f64::INFINITY } else { ((i as u64 + 1) * LAT_BUCKET_US) as f64 / 1e6 };
            let slot = LATENCY_BOUNDS_S.partition_point(|b| *b < upper_s);
            out[slot].1 += n;
        }
        (self.sum_us.load(Ordering::Relaxed) as f64 / 1e6, count, out)
    }

    /// Sum of the latencies recorded, µs (with [`LatencyHistogram::count`], a mean over any
    /// stretch of time).
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Number of rows recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in microseconds: the upper edge of its bucket.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(if i == LAT_BUCKETS {
                    self.max_us.load(Ordering::Relaxed)
                } else {
                    (i as u64 + 1) * LAT_BUCKET_US
                });
            }
        }
        None
    }

    /// Largest latency recorded, µs.
    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        h.record((1..=100).map(|i| i * 100));
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_us(0.5), Some(5010));
        assert_eq!(h.quantile_us(0.99), Some(9910));
        h.record([5_000_000].into_iter());
        assert_eq!(h.quantile_us(1.0), Some(5_000_000));
        assert_eq!(h.max_us(), 5_000_000);
    }

    #[test]
    fn accounting_identity() {
        let s = StepSnapshot {
            rows_in: 10,
            rows_out: 4,
            filtered: 3,
            dead_lettered: 2,
            late_dropped: 1,
            ..Default::default()
        };
        assert!(s.balanced());
        assert!(!StepSnapshot { rows_in: 1, ..Default::default() }.balanced());
    }
}
