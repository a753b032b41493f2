//! Cutting batches: by row count, or by linger time, whichever comes first; the linger adapts
//! to the arrival rate.
//!
//! Waiting for more records only pays when more records are coming. [`Linger`] keeps an
//! exponentially weighted mean of the gap between records; the time a partial batch may wait is
//! the expected time to fill it, capped by the configured maximum, and zero when the next
//! record is not expected within that maximum. A quiet stream is therefore flushed at once
//! (latency = processing time), and a burst is batched wide (throughput).

use std::time::{Duration, Instant};

/// Adaptive batch cutter. Pure: the caller passes the clock in, so tests need no sleeping.
#[derive(Debug, Clone)]
pub struct Linger {
    max_rows: usize,
    max_linger: Duration,
    gap_ns: Option<f64>,
    last: Option<Instant>,
}

/// Weight of the newest gap in the mean: about the last 20 arrivals matter.
const ALPHA: f64 = 0.05;

impl Linger {
    /// A cutter for batches of at most `max_rows`, waiting at most `max_linger`.
    pub fn new(max_rows: usize, max_linger: Duration) -> Self {
        Self { max_rows: max_rows.max(1), max_linger, gap_ns: None, last: None }
    }

    /// Notes that `n` records arrived together at `now`.
    pub fn arrived(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        if let Some(last) = self.last {
            // n records in the time since the previous arrival: n gaps, the first of them long.
            let per = now.duration_since(last).as_nanos() as f64 / n as f64;
            // n arrivals at once weigh like n single ones.
            let w = 1.0 - (1.0 - ALPHA).powi(n.min(1000) as i32);
            self.gap_ns = Some(match self.gap_ns {
                None => per,
                Some(g) => g + w * (per - g),
            });
        }
        self.last = Some(now);
    }

    /// Mean gap between records, if known.
    pub fn mean_gap(&self) -> Option<Duration> {
        self.gap_ns.map(|g| Duration::from_nanos(g as u64))
    }

    /// How long a batch of `pending` rows may still wait for more.
    pub fn linger(&self, pending: usize) -> Duration {
        if pending >= self.max_rows {
            return Duration::ZERO;
        }
        let Some(gap) = self.gap_ns else {
            return Duration::ZERO;
        };
        if gap >= self.max_linger.as_nanos() as f64 {
            return Duration::ZERO;
        }
        let fill = gap * (self.max_rows - pending) as f64;
        Duration::from_nanos(fill.min(self.max_linger.as_nanos() as f64) as u64)
    }

    /// Whether a batch of `pending` rows whose first row arrived at `first` should be cut at
    /// `now`.
    pub fn should_cut(&self, pending: usize, first: Instant, now: Instant) -> bool {
        pending > 0 && (pending >= self.max_rows || now.duration_since(first) >= self.linger(pending))
    }

    /// The row cap.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_stream_is_not_held_back() {
        let t0 = Instant::now();
        let mut l = Linger::new(1000, Duration::from_millis(10));
        for i in 0..10 {
            l.arrived(1, t0 + Duration::from_secs(i));
        }
        assert_eq!(l.linger(1), Duration::ZERO);
        assert!(l.should_cut(1, t0, t0));
    }

    #[test]
    fn burst_is_batched_wide_up_to_the_cap() {
        let t0 = Instant::now();
        let mut l = Linger::new(1000, Duration::from_millis(10));
        for i in 0..100u64 {
            l.arrived(1, t0 + Duration::from_micros(i));
        }
        // 1 us per record: filling 900 more takes 0.9 ms, under the 10 ms cap.
        let d = l.linger(100);
        assert!(d > Duration::from_micros(500) && d < Duration::from_millis(2), "{d:?}");
        assert!(!l.should_cut(100, t0, t0 + Duration::from_micros(100)));
        assert!(l.should_cut(1000, t0, t0));
    }

    #[test]
    fn linger_is_capped() {
        let t0 = Instant::now();
        let mut l = Linger::new(100_000, Duration::from_millis(5));
        for i in 0..100u64 {
            l.arrived(1, t0 + Duration::from_micros(i * 100));
        }
        assert_eq!(l.linger(1), Duration::from_millis(5));
    }
}
