//! Counters per step and per worker, read by the progress line, the end-of-run summary and the
//! Prometheus endpoint.
//!
//! Counters are plain atomics bumped once per batch (never per row). Queue depth is a
//! pushed/popped pair, so a reader computes fill without the hot path keeping a gauge.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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
    /// Creation-to-sink latency, when the job names a creation-time column.
    pub latency: LatencyHistogram,
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
}

/// Metric series reported by connectors, by name and label set. Label sets must stay
/// bounded (a partition number is fine, a key is not). Updated per batch or per statistics
/// interval, never per row, so a mutex is cheap enough.
#[derive(Debug, Default)]
pub struct ConnectorMetrics {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
}

/// A series' metric name and rendered labels.
type SeriesKey = (&'static str, String);
/// A series' help text, Prometheus type and value.
type Series = (&'static str, &'static str, f64);

impl ConnectorMetrics {
    fn labels(labels: &[(&str, &str)]) -> String {
        labels.iter().map(|(k, v)| format!(",{k}=\"{}\"", v.replace('"', "'"))).collect()
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

    /// The value of a series, if it was reported.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = Self::labels(labels);
        m.iter().find(|((n, l), _)| *n == name && *l == key).map(|(_, v)| v.2)
    }

    fn render(&self, job: &str, s: &mut String) {
        let m = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut last = "";
        for ((name, labels), (help, kind, v)) in m.iter() {
            if *name != last {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
                last = name;
            }
            let _ = writeln!(s, "{name}{{job=\"{job}\"{labels}}} {v}");
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

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render_prometheus(&self, job: &str) -> String {
        let mut s = String::with_capacity(4096);
        let steps = self.steps();
        let counters: [Counter; 12] = [
            ("weir_step_rows_shed_total", "Rows dropped by load shedding.", |x| x.shed),
            ("weir_step_rows_quarantined_total", "Rows diverted because their key is quarantined.", |x| x.quarantined),
            ("weir_step_rows_in_total", "Rows received by a step.", |x| x.rows_in),
            ("weir_step_rows_out_total", "Rows passed on by a step.", |x| x.rows_out),
            ("weir_step_results_out_total", "Rows emitted from a step's state.", |x| x.results_out),
            ("weir_step_rows_filtered_total", "Rows removed by a predicate.", |x| x.filtered),
            ("weir_step_rows_aggregated_total", "Rows folded into state.", |x| x.aggregated),
            ("weir_step_dead_letters_total", "Rows sent to the dead-letter output.", |x| x.dead_lettered),
            ("weir_step_late_dropped_total", "Late rows dropped.", |x| x.late_dropped),
            ("weir_step_late_side_total", "Late rows sent to the side output.", |x| x.late_side),
            ("weir_step_batches_in_total", "Batches received by a step.", |x| x.batches_in),
            ("weir_step_busy_seconds_total", "Time spent in a step, seconds (ns resolution).", |x| x.busy_ns),
        ];
        for (name, help, get) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (id, snap) in &steps {
                let v = get(snap);
                if name.ends_with("busy_seconds_total") {
                    let _ = writeln!(s, "{name}{{job=\"{job}\",step=\"{id}\"}} {}", v as f64 / 1e9);
                } else {
                    let _ = writeln!(s, "{name}{{job=\"{job}\",step=\"{id}\"}} {v}");
                }
            }
        }
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP weir_source_records_total Records read by sources.\n# TYPE weir_source_records_total counter"
        );
        let _ = writeln!(s, "weir_source_records_total{{job=\"{job}\"}} {}", g(&self.source_records));
        let _ = writeln!(
            s,
            "# HELP weir_source_bytes_total Bytes read by sources.\n# TYPE weir_source_bytes_total counter"
        );
        let _ = writeln!(s, "weir_source_bytes_total{{job=\"{job}\"}} {}", g(&self.source_bytes));
        let _ = writeln!(s, "# HELP weir_sink_rows_total Rows written by sinks.\n# TYPE weir_sink_rows_total counter");
        let _ = writeln!(s, "weir_sink_rows_total{{job=\"{job}\"}} {}", g(&self.sink_rows));
        let _ = writeln!(
            s,
            "# HELP weir_channel_fill_ratio Messages queued over capacity.\n# TYPE weir_channel_fill_ratio gauge"
        );
        for (name, fill) in self.channel_fill() {
            let _ = writeln!(s, "weir_channel_fill_ratio{{job=\"{job}\",channel=\"{name}\"}} {fill}");
        }
        for (name, help, kind, v) in [
            (
                "weir_sink_retries_total",
                "Sink writes retried after a transient failure.",
                "counter",
                &self.sink_retries,
            ),
            ("weir_sink_outages_total", "Times a sink started failing.", "counter", &self.sink_outages),
            ("weir_sink_down", "1 while a sink is failing and being retried.", "gauge", &self.sink_down),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{job=\"{job}\"}} {}", g(v));
        }
        let c = &self.checkpoints;
        if g(&c.enabled) == 1 {
            let age = if g(&c.last_completed_ms) == 0 {
                f64::NAN
            } else {
                (crate::deadletter::now_ms() as f64 - g(&c.last_completed_ms) as f64) / 1000.0
            };
            for (name, help, kind, v) in [
                ("weir_checkpoints_completed_total", "Checkpoints completed.", "counter", g(&c.completed) as f64),
                (
                    "weir_checkpoints_failed_total",
                    "Checkpoints abandoned after a failure.",
                    "counter",
                    g(&c.failed) as f64,
                ),
                ("weir_checkpoint_epoch", "Epoch of the last complete checkpoint.", "gauge", g(&c.last_epoch) as f64),
                (
                    "weir_checkpoint_duration_seconds",
                    "Barrier injection to manifest, last complete checkpoint.",
                    "gauge",
                    g(&c.last_duration_us) as f64 / 1e6,
                ),
                (
                    "weir_checkpoint_alignment_seconds",
                    "Longest barrier alignment wait in the last checkpoint.",
                    "gauge",
                    g(&c.last_alignment_us) as f64 / 1e6,
                ),
                (
                    "weir_checkpoint_size_bytes",
                    "State bytes of the last complete checkpoint.",
                    "gauge",
                    g(&c.last_bytes) as f64,
                ),
                ("weir_checkpoint_age_seconds", "Time since the last checkpoint completed.", "gauge", age),
            ] {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{job=\"{job}\"}} {v}");
            }
        }
        let _ = writeln!(s, "# HELP weir_source_linger_seconds Adaptive linger of the last batch cut by a streaming source.\n# TYPE weir_source_linger_seconds gauge");
        let _ = writeln!(s, "weir_source_linger_seconds{{job=\"{job}\"}} {}", g(&self.linger_us) as f64 / 1e6);
        if let Some(p99) = self.latency.quantile_us(0.99) {
            let _ = writeln!(s, "# HELP weir_sink_latency_seconds End-to-end latency at the sink (creation column to write).\n# TYPE weir_sink_latency_seconds summary");
            for q in [0.5, 0.9, 0.99] {
                let v = self.latency.quantile_us(q).unwrap_or(p99);
                let _ = writeln!(s, "weir_sink_latency_seconds{{job=\"{job}\",quantile=\"{q}\"}} {}", v as f64 / 1e6);
            }
            let _ = writeln!(s, "weir_sink_latency_seconds_count{{job=\"{job}\"}} {}", self.latency.count());
        }
        if let Some(wm) = self.watermark() {
            let lag = crate::deadletter::now_ms().saturating_sub(wm) as f64 / 1000.0;
            let _ = writeln!(
                s,
                "# HELP weir_watermark_ms Event-time watermark, ms since epoch.\n# TYPE weir_watermark_ms gauge"
            );
            let _ = writeln!(s, "weir_watermark_ms{{job=\"{job}\"}} {wm}");
            let _ = writeln!(s, "# HELP weir_watermark_lag_seconds Wall clock minus watermark.\n# TYPE weir_watermark_lag_seconds gauge");
            let _ = writeln!(s, "weir_watermark_lag_seconds{{job=\"{job}\"}} {lag}");
        }
        self.connectors.render(job, &mut s);
        s
    }
}

/// End-to-end latency of rows at the sink, in buckets of 10 µs up to 1 s (and one overflow
/// bucket): fixed memory, lock-free recording, percentiles exact to the bucket width.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

const LAT_BUCKET_US: u64 = 10;
const LAT_BUCKETS: usize = 100_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { buckets: (0..=LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(), max_us: AtomicU64::new(0) }
    }
}

impl LatencyHistogram {
    /// Records latencies in microseconds (negative values, from clock skew, count as 0).
    pub fn record(&self, latencies_us: impl Iterator<Item = i64>) {
        let mut max = 0u64;
        for l in latencies_us {
            let l = u64::try_from(l).unwrap_or(0);
            max = max.max(l);
            let b = usize::try_from(l / LAT_BUCKET_US).unwrap_or(LAT_BUCKETS).min(LAT_BUCKETS);
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.max_us.fetch_max(max, Ordering::Relaxed);
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
