//! A generator of synthetic sensor events: the embedded demo source and a load generator.
//!
//! Rows have the shape of `shared/bench/gen_sensors.py`:
//! `device_id` (`dev-00042`), `ts` (event time, epoch ms) and a struct `readings` with `temp`,
//! `humidity`, `pressure`, `vibration`; optionally `created_us`, the wall-clock time the event
//! was due, for measuring end-to-end latency.
//!
//! With a rate, events are due on a fixed schedule and their event time is the wall clock at
//! that instant; batches are cut by size or by the adaptive linger (see
//! [`weir_core::linger::Linger`]). Without a rate, events come as fast as the pipeline takes
//! them and the event clock advances 1 ms every 10 events, as in the benchmark input.
//! Workers share the work: each makes `1/W` of the events at `1/W` of the rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use weir_core::deadletter::now_ms;
use weir_core::linger::Linger;
use weir_core::{Batch, Result, Source, SourceContext, SourceFactory, SourcePoll};

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Number of distinct devices.
    pub devices: u32,
    /// Events per second over all workers; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Stop after this many events (over all workers).
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Fraction of events whose time is set back, out of order.
    pub disorder: f64,
    /// How far back an out-of-order event goes at most, ms.
    pub max_delay_ms: u32,
    /// Fraction of events carrying an anomaly (temp + 15, vibration x 20).
    pub anomaly_rate: f64,
    /// Random seed; the same seed and settings give the same events.
    pub seed: u64,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest time a partial batch may wait for more events.
    pub max_linger: Duration,
    /// Add `created_us`.
    pub stamp_created: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            devices: 1000,
            rate: None,
            count: None,
            duration: None,
            disorder: 0.05,
            max_delay_ms: 2000,
            anomaly_rate: 0.0005,
            seed: 7,
            batch_size: 8192,
            max_linger: Duration::from_millis(1),
            stamp_created: false,
        }
    }
}

impl GeneratorConfig {
    /// The schema of generated rows.
    pub fn schema(&self) -> SchemaRef {
        let readings: Fields = ["temp", "humidity", "pressure", "vibration"]
            .iter()
            .map(|n| Field::new(*n, DataType::Float64, false))
            .collect();
        let mut fields = vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("readings", DataType::Struct(readings), false),
        ];
        if self.stamp_created {
            fields.push(Field::new("created_us", DataType::Int64, false));
        }
        Arc::new(Schema::new(fields))
    }
}

/// Builds generator instances.
#[derive(Debug)]
pub struct GeneratorFactory {
    cfg: Arc<GeneratorConfig>,
}

impl GeneratorFactory {
    /// Checks the settings.
    ///
    /// # Errors
    /// Zero devices, a non-positive rate, fractions outside [0, 1].
    pub fn new(cfg: GeneratorConfig) -> Result<Self> {
        weir_core::ensure_config!(cfg.devices > 0, "generator: devices must be at least 1");
        weir_core::ensure_config!(
            cfg.rate.is_none_or(|r| r > 0.0 && r.is_finite()),
            "generator: rate must be positive"
        );
        weir_core::ensure_config!((0.0..=1.0).contains(&cfg.disorder), "generator: disorder must be in [0, 1]");
        weir_core::ensure_config!((0.0..=1.0).contains(&cfg.anomaly_rate), "generator: anomaly_rate must be in [0, 1]");
        Ok(Self { cfg: Arc::new(cfg) })
    }
}

impl SourceFactory for GeneratorFactory {
    fn schema(&self) -> SchemaRef {
        self.cfg.schema()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>> {
        let w = workers as u64;
        let share = self.cfg.count.map(|c| c / w + u64::from((worker as u64) < c % w));
        let now = now_ms();
        Ok(Box::new(Generator {
            cfg: self.cfg.clone(),
            schema: self.cfg.schema(),
            rng: SmallRng::seed_from_u64(self.cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(worker as u64)),
            worker: worker as u64,
            workers: w,
            share,
            made: 0,
            rate: self.cfg.rate.map(|r| r / workers as f64),
            started: Instant::now(),
            started_us: chrono::Utc::now().timestamp_micros(),
            base_ms: now,
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            seen_due: 0,
        }))
    }
}

#[derive(Debug)]
struct Generator {
    cfg: Arc<GeneratorConfig>,
    schema: SchemaRef,
    rng: SmallRng,
    worker: u64,
    workers: u64,
    share: Option<u64>,
    made: u64,
    rate: Option<f64>,
    started: Instant,
    started_us: i64,
    base_ms: i64,
    linger: Linger,
    seen_due: u64,
}

impl Generator {
    fn gauss(&mut self, mean: f64, sd: f64) -> f64 {
        // Box-Muller; one value per call keeps the stream simple to reason about.
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Makes `n` events; with a rate, event `i` was due at `started + i / rate`.
    fn make(&mut self, n: usize) -> Result<Batch> {
        let mut dev = StringBuilder::with_capacity(n, n * 9);
        let mut ts = Int64Builder::with_capacity(n);
        let (mut temp, mut hum, mut pres, mut vib) = (
            Float64Builder::with_capacity(n),
            Float64Builder::with_capacity(n),
            Float64Builder::with_capacity(n),
            Float64Builder::with_capacity(n),
        );
        let mut created = Int64Builder::with_capacity(n);
        let mut name = String::with_capacity(9);
        for _ in 0..n {
            let i = self.made;
            self.made += 1;
            let (clock, created_us) = match self.rate {
                Some(r) => {
                    let off_us = (i as f64 / r * 1e6) as i64;
                    let c = self.started_us + off_us;
                    (c.div_euclid(1000), c)
                }
                None => (
                    self.base_ms + ((i * self.workers + self.worker) / 10) as i64,
                    chrono::Utc::now().timestamp_micros(),
                ),
            };
            let t = if self.rng.random::<f64>() < self.cfg.disorder && self.cfg.max_delay_ms > 0 {
                clock - i64::from(self.rng.random_range(0..self.cfg.max_delay_ms))
            } else {
                clock
            };
            let d = self.rng.random_range(0..self.cfg.devices);
            name.clear();
            use std::fmt::Write as _;
            let _ = write!(name, "dev-{d:05}");
            let mut tv = self.gauss(22.0 + f64::from(d % 10) * 0.3, 1.5);
            let mut vv = self.gauss(0.02, 0.005).abs();
            if self.rng.random::<f64>() < self.cfg.anomaly_rate {
                tv += 15.0;
                vv *= 20.0;
            }
            dev.append_value(&name);
            ts.append_value(t);
            temp.append_value((tv * 1000.0).round() / 1000.0);
            hum.append_value((self.gauss(45.0, 5.0) * 100.0).round() / 100.0);
            pres.append_value((self.gauss(1013.0, 2.0) * 100.0).round() / 100.0);
            vib.append_value((vv * 1e5).round() / 1e5);
            created.append_value(created_us);
        }
        let readings_fields = match self.schema.field(2).data_type() {
            DataType::Struct(f) => f.clone(),
            _ => weir_core::bail_internal!("generator schema lost its struct"),
        };
        let readings = StructArray::try_new(
            readings_fields,
            vec![
                Arc::new(temp.finish()) as ArrayRef,
                Arc::new(hum.finish()),
                Arc::new(pres.finish()),
                Arc::new(vib.finish()),
            ],
            None,
        )?;
        let ts = ts.finish();
        let mut cols: Vec<ArrayRef> = vec![Arc::new(dev.finish()), Arc::new(ts.clone()), Arc::new(readings)];
        if self.cfg.stamp_created {
            cols.push(Arc::new(created.finish()));
        }
        let rows = RecordBatch::try_new(self.schema.clone(), cols)?;
        Batch::new(rows, Int64Array::from(ts.values().to_vec()))
    }

    fn remaining(&self) -> u64 {
        self.share.map_or(u64::MAX, |s| s.saturating_sub(self.made))
    }
}

#[async_trait::async_trait]
impl Source for Generator {
    fn partitions(&self) -> usize {
        1
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        loop {
            if cx.stopping() || self.remaining() == 0 || self.cfg.duration.is_some_and(|d| self.started.elapsed() >= d)
            {
                return Ok(SourcePoll::End);
            }
            let n = match self.rate {
                None => {
                    // Let other tasks run between batches even when channels never fill.
                    tokio::task::yield_now().await;
                    self.cfg.batch_size.min(self.remaining() as usize)
                }
                Some(r) => {
                    let now = Instant::now();
                    let due = ((now.duration_since(self.started).as_secs_f64() * r) as u64)
                        .min(self.share.unwrap_or(u64::MAX));
                    if due > self.seen_due {
                        self.linger.arrived((due - self.seen_due) as usize, now);
                        self.seen_due = due;
                    }
                    let pending = (due - self.made) as usize;
                    let first_due = self.started + Duration::from_secs_f64(self.made as f64 / r);
                    if self.linger.should_cut(pending, first_due, now) {
                        let l = self.linger.linger(1).as_micros();
                        cx.registry
                            .linger_us
                            .store(u64::try_from(l).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
                        pending.min(self.cfg.batch_size)
                    } else {
                        // Sleep until the next event is due or the batch must go, whichever first.
                        let next_due = self.started + Duration::from_secs_f64((due + 1) as f64 / r);
                        let cut_at = if pending > 0 { first_due + self.linger.linger(pending) } else { next_due };
                        let wake = next_due.min(cut_at).max(now + Duration::from_micros(50));
                        let mut stop = cx.shutdown.clone();
                        tokio::select! {
                            () = tokio::time::sleep_until(wake.into()) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            };
            let batch = self.make(n)?;
            cx.count_records(n as u64);
            return Ok(SourcePoll::Rows { partition: 0, batch });
        }
    }
}
