//! Load shedding, opt-in: while the job is overloaded, sources drop the rows a predicate picks
//! (say `NOT critical`), and may pause between batches.
//!
//! Overload is lag (wall clock minus the job's watermark) or the fullest channel's fill
//! staying above a bound for a while. Nothing is dropped silently: shed rows are counted per
//! source step (`shed`), and the start and end of overload are logged.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow_array::BooleanArray;

use crate::batch::Batch;
use crate::deadletter::now_ms;
use crate::error::Result;
use crate::metrics::Registry;

/// Picks the rows to shed: true means drop.
pub trait ShedPredicate: Send + Sync + fmt::Debug {
    /// Evaluates on a batch.
    fn evaluate(&self, batch: &Batch) -> Result<BooleanArray>;
}

/// When the job counts as overloaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverloadSpec {
    /// Lag (wall clock minus watermark) above which the job is behind.
    pub max_lag: Option<Duration>,
    /// Channel fill (0..=1) above which the job is behind.
    pub max_queue_fill: Option<f64>,
    /// How long it must stay behind before shedding starts.
    pub sustained: Duration,
    /// Sleep between source batches while overloaded.
    pub pause: Option<Duration>,
}

/// The shedding state of one source task.
#[derive(Debug)]
pub struct Shedder {
    spec: OverloadSpec,
    predicate: std::sync::Arc<dyn ShedPredicate>,
    behind_since: Option<Instant>,
    overloaded: bool,
    /// Times overload began.
    pub episodes: AtomicU64,
}

impl Shedder {
    /// A shedder dropping what `predicate` picks while `spec` says the job is overloaded.
    pub fn new(spec: OverloadSpec, predicate: std::sync::Arc<dyn ShedPredicate>) -> Self {
        Self { spec, predicate, behind_since: None, overloaded: false, episodes: AtomicU64::new(0) }
    }

    /// Re-evaluates overload from the job's metrics at `now`.
    pub fn update(&mut self, reg: &Registry, now: Instant) -> bool {
        let lag_ms = reg.watermark().filter(|w| *w != crate::batch::END_OF_TIME).map(|w| now_ms().saturating_sub(w));
        let lagging = self
            .spec
            .max_lag
            .is_some_and(|m| lag_ms.is_some_and(|l| l > i64::try_from(m.as_millis()).unwrap_or(i64::MAX)));
        let fill = reg.channel_fill().iter().map(|(_, f)| *f).fold(0.0, f64::max);
        let full = self.spec.max_queue_fill.is_some_and(|m| fill > m);
        if lagging || full {
            let since = *self.behind_since.get_or_insert(now);
            if !self.overloaded && now.duration_since(since) >= self.spec.sustained {
                self.overloaded = true;
                self.episodes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    lag_ms,
                    queue_fill = fill,
                    "Overloaded: shedding rows picked by the load-shedding predicate."
                );
            }
        } else {
            self.behind_since = None;
            if self.overloaded {
                self.overloaded = false;
                tracing::warn!(lag_ms, queue_fill = fill, "Overload over: no more shedding.");
            }
        }
        self.overloaded
    }

    /// Drops the picked rows while overloaded; returns the rest and how many were shed.
    ///
    /// # Errors
    /// If the predicate fails on the batch.
    pub fn shed(&self, batch: Batch) -> Result<(Batch, u64)> {
        if !self.overloaded {
            return Ok((batch, 0));
        }
        let drop = self.predicate.evaluate(&batch)?;
        let n = drop.true_count() as u64;
        if n == 0 {
            return Ok((batch, 0));
        }
        let keep = arrow_arith_not(&drop);
        Ok((batch.filter(&keep)?, n))
    }

    /// How long to pause before the next batch (while overloaded).
    pub fn pause(&self) -> Option<Duration> {
        self.spec.pause.filter(|_| self.overloaded)
    }
}

fn arrow_arith_not(b: &BooleanArray) -> BooleanArray {
    // Nulls from the predicate mean "do not drop".
    b.iter().map(|v| Some(v != Some(true))).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};

    use super::*;

    #[derive(Debug)]
    struct Odd;
    impl ShedPredicate for Odd {
        fn evaluate(&self, b: &Batch) -> Result<BooleanArray> {
            Ok(b.time.values().iter().map(|t| Some(t % 2 == 1)).collect())
        }
    }

    fn batch() -> Batch {
        let rows = RecordBatch::try_from_iter([("t", Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as _)]).unwrap();
        Batch::new(rows, Int64Array::from(vec![1, 2, 3, 4])).unwrap()
    }

    //  lag:  high ---- high ---- high (>= sustained) ---- low
    //  shed:  no        no        yes                      no
    #[test]
    fn sheds_only_while_overload_is_sustained() {
        let reg = Registry::default();
        let clock = reg.clock();
        clock.watermark.store(now_ms() - 60_000, Ordering::Relaxed);
        let spec = OverloadSpec {
            max_lag: Some(Duration::from_secs(10)),
            max_queue_fill: None,
            sustained: Duration::from_secs(2),
            pause: None,
        };
        let mut s = Shedder::new(spec, Arc::new(Odd));
        let t0 = Instant::now();
        assert!(!s.update(&reg, t0));
        assert_eq!(s.shed(batch()).unwrap().1, 0);
        assert!(!s.update(&reg, t0 + Duration::from_secs(1)));
        assert!(s.update(&reg, t0 + Duration::from_secs(2)));
        let (kept, n) = s.shed(batch()).unwrap();
        assert_eq!((kept.time.values().to_vec(), n), (vec![2, 4], 2));
        clock.watermark.store(now_ms(), Ordering::Relaxed);
        assert!(!s.update(&reg, t0 + Duration::from_secs(3)));
        assert_eq!(s.shed(batch()).unwrap().1, 0);
        assert_eq!(s.episodes.load(Ordering::Relaxed), 1);
    }
}
