//! Event time: reading it from a column, and watermarks (per partition, and combined over
//! inputs).

use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float64Type, Int64Type, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StructArray};
use arrow_schema::{DataType, TimeUnit};

use crate::batch::{Watermark, END_OF_TIME};
use crate::error::{CoreError, Result};

/// How an event-time column encodes time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Integer (or float) seconds since the epoch.
    #[serde(alias = "s", alias = "epoch_s")]
    Seconds,
    /// Milliseconds since the epoch.
    #[serde(alias = "ms", alias = "epoch_ms")]
    Millis,
    /// Microseconds since the epoch.
    #[serde(alias = "us", alias = "epoch_us")]
    Micros,
    /// Nanoseconds since the epoch.
    #[serde(alias = "ns", alias = "epoch_ns")]
    Nanos,
    /// An RFC 3339 string such as `2026-11-22T10:00:00.123Z`.
    Rfc3339,
}

/// Where a source finds event time: a column path (dots address struct children) and its
/// format. Timestamp-typed columns ignore the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTimeSpec {
    /// Column path, e.g. `ts` or `meta.time`.
    pub column: String,
    /// Encoding of the column.
    pub format: TimeFormat,
    /// Rows more than this far ahead of the wall clock are implausible (ms); `None` for no
    /// limit.
    pub max_future_ms: Option<i64>,
    /// Rows older than this (ms before the wall clock) are implausible; `None` for no limit.
    pub max_age_ms: Option<i64>,
}

impl EventTimeSpec {
    /// A spec with no clock-sanity limits.
    pub fn new(column: impl Into<String>, format: TimeFormat) -> Self {
        Self { column: column.into(), format, max_future_ms: None, max_age_ms: None }
    }

    /// Rows whose time is implausible against the wall clock `now_ms`, with a reason each.
    /// Sources dead-letter them before they reach a watermark: one device whose clock says
    /// 2038 must not close every window.
    pub fn check_clock(&self, times: &Int64Array, now_ms: i64) -> Vec<(usize, String)> {
        let hi = self.max_future_ms.map_or(i64::MAX, |m| now_ms.saturating_add(m));
        let lo = self.max_age_ms.map_or(i64::MIN, |m| now_ms.saturating_sub(m));
        let mut bad = Vec::new();
        if self.max_future_ms.is_none() && self.max_age_ms.is_none() {
            return bad;
        }
        for (i, &t) in times.values().iter().enumerate() {
            if t > hi {
                bad.push((
                    i,
                    format!(
                        "event time {} is {} ahead of the wall clock (max_future_skew {})",
                        render_ms(t),
                        human_ms(t - now_ms),
                        human_ms(self.max_future_ms.unwrap_or(0))
                    ),
                ));
            } else if t < lo {
                bad.push((
                    i,
                    format!(
                        "event time {} is {} old (max_age {})",
                        render_ms(t),
                        human_ms(now_ms - t),
                        human_ms(self.max_age_ms.unwrap_or(0))
                    ),
                ));
            }
        }
        bad
    }
}

fn render_ms(t: i64) -> String {
    chrono::DateTime::from_timestamp_millis(t)
        .map_or_else(|| format!("{t} ms"), |d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn human_ms(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 86_400 * 365 => format!("{:.1} years", s as f64 / (86_400.0 * 365.25)),
        s if s >= 86_400 => format!("{:.1} days", s as f64 / 86_400.0),
        s if s >= 3600 => format!("{:.1} h", s as f64 / 3600.0),
        s if s >= 60 => format!("{:.1} min", s as f64 / 60.0),
        _ => format!("{:.3} s", ms as f64 / 1000.0),
    }
}

/// Looks a dotted column path up in a batch, descending into struct columns.
///
/// # Errors
/// If a segment does not exist; the message lists the available top-level names.
pub fn column_by_path(batch: &RecordBatch, path: &str) -> Result<ArrayRef> {
    let mut parts = path.split('.');
    let first = parts.next().unwrap_or_default();
    let mut col = batch.column_by_name(first).cloned().ok_or_else(|| {
        let names: Vec<_> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
        CoreError::Config(format!("unknown column `{path}`; available: {}", names.join(", ")))
    })?;
    for p in parts {
        let s: &StructArray = col
            .as_any()
            .downcast_ref::<StructArray>()
            .ok_or_else(|| CoreError::Config(format!("column path `{path}`: `{p}` is inside a non-struct column")))?;
        let child = s
            .column_by_name(p)
            .ok_or_else(|| CoreError::Config(format!("unknown column `{path}`: no field `{p}`")))?
            .clone();
        // A null parent struct makes the child null too.
        col = match s.nulls() {
            Some(n) if n.null_count() > 0 => {
                let merged = arrow_buffer::NullBuffer::union(Some(n), child.nulls());
                arrow_array::make_array(child.to_data().into_builder().nulls(merged).build()?)
            }
            _ => child,
        };
    }
    Ok(col)
}

/// A row [`stamp`] left out: its index, the dead-letter kind and the reason.
pub type BadTime = (usize, crate::deadletter::ErrorKind, String);

/// Pairs a source's decoded `rows` with their event times: read from the column of `spec`, or
/// the wall clock `now_ms` for every row without one. Rows whose time is missing, unparseable
/// or implausible ([`EventTimeSpec::check_clock`]) are left out of the batch and returned with
/// their index in `rows`, the dead-letter kind and the reason, for the source to dead-letter.
///
/// # Errors
/// As [`EventTimeSpec::extract`]: the column is missing or cannot hold a time.
pub fn stamp(spec: Option<&EventTimeSpec>, rows: RecordBatch, now_ms: i64) -> Result<(crate::Batch, Vec<BadTime>)> {
    use crate::deadletter::ErrorKind;
    let Some(spec) = spec else {
        let n = rows.num_rows();
        return Ok((crate::Batch::new(rows, Int64Array::from(vec![now_ms; n]))?, Vec::new()));
    };
    let (times, bad) = spec.extract(&rows)?;
    let insane = spec.check_clock(&times, now_ms);
    if bad.is_empty() && insane.is_empty() {
        return Ok((crate::Batch::new(rows, times)?, Vec::new()));
    }
    let mut keep = vec![true; rows.num_rows()];
    let mut out = Vec::new();
    let bad = bad.into_iter().map(|(r, m)| (r, ErrorKind::EventTime, m));
    // A row with an unparseable time has 0 in `times` and may show up in both.
    for (row, kind, reason) in bad.chain(insane.into_iter().map(|(r, m)| (r, ErrorKind::Clock, m))) {
        if std::mem::replace(&mut keep[row], false) {
            out.push((row, kind, reason));
        }
    }
    let batch = crate::Batch::new(rows, times)?.filter(&arrow_array::BooleanArray::from(keep))?;
    Ok((batch, out))
}

impl EventTimeSpec {
    /// Reads event times (ms) for every row. Rows whose time is null or unparseable are
    /// returned in the second vector with a reason; their slot in the first holds 0.
    ///
    /// # Errors
    /// If the column is missing or of a type that cannot hold a time: a config error.
    pub fn extract(&self, batch: &RecordBatch) -> Result<(Int64Array, Vec<(usize, String)>)> {
        let col = column_by_path(batch, &self.column)?;
        let n = col.len();
        let mut bad = Vec::new();
        let scale = |v: i64| -> Option<i64> {
            match self.format {
                TimeFormat::Seconds => v.checked_mul(1000),
                TimeFormat::Millis => Some(v),
                TimeFormat::Micros => Some(v.div_euclid(1000)),
                TimeFormat::Nanos => Some(v.div_euclid(1_000_000)),
                TimeFormat::Rfc3339 => None,
            }
        };
        let mut out = Vec::with_capacity(n);
        match col.data_type() {
            DataType::Int64 if self.format != TimeFormat::Rfc3339 => {
                let a = col.as_primitive::<Int64Type>();
                if a.null_count() == 0 && self.format == TimeFormat::Millis {
                    return Ok((a.clone(), bad));
                }
                for i in 0..n {
                    match (a.is_valid(i)).then(|| scale(a.value(i))).flatten() {
                        Some(t) => out.push(t),
                        None => {
                            out.push(0);
                            bad.push((i, self.null_reason(a.is_valid(i))));
                        }
                    }
                }
            }
            DataType::Float64 if self.format != TimeFormat::Rfc3339 => {
                let a = col.as_primitive::<Float64Type>();
                let mult = match self.format {
                    TimeFormat::Seconds => 1000.0,
                    TimeFormat::Millis => 1.0,
                    TimeFormat::Micros => 1e-3,
                    _ => 1e-6,
                };
                for i in 0..n {
                    let v = a.value(i) * mult;
                    if a.is_valid(i) && v.is_finite() && v.abs() < 9.0e15 {
                        out.push(v.floor() as i64);
                    } else {
                        out.push(0);
                        bad.push((i, self.null_reason(a.is_valid(i))));
                    }
                }
            }
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                for i in 0..n {
                    if a.is_null(i) {
                        out.push(0);
                        bad.push((i, self.null_reason(false)));
                        continue;
                    }
                    let s = a.value(i);
                    let parsed = if self.format == TimeFormat::Rfc3339 {
                        chrono::DateTime::parse_from_rfc3339(s).map(|d| d.timestamp_millis()).map_err(|e| e.to_string())
                    } else {
                        s.trim()
                            .parse::<i64>()
                            .map_err(|e| e.to_string())
                            .and_then(|v| scale(v).ok_or_else(|| "out of range".into()))
                    };
                    match parsed {
                        Ok(t) => out.push(t),
                        Err(e) => {
                            out.push(0);
                            bad.push((
                                i,
                                format!(
                                    "event time `{}`: cannot parse {:?} as {:?}: {e}",
                                    self.column,
                                    truncate(s),
                                    self.format
                                ),
                            ));
                        }
                    }
                }
            }
            DataType::Timestamp(unit, _) => {
                for i in 0..n {
                    if col.is_null(i) {
                        out.push(0);
                        bad.push((i, self.null_reason(false)));
                        continue;
                    }
                    out.push(match unit {
                        TimeUnit::Second => col.as_primitive::<TimestampSecondType>().value(i).saturating_mul(1000),
                        TimeUnit::Millisecond => col.as_primitive::<TimestampMillisecondType>().value(i),
                        TimeUnit::Microsecond => {
                            col.as_primitive::<TimestampMicrosecondType>().value(i).div_euclid(1000)
                        }
                        TimeUnit::Nanosecond => {
                            col.as_primitive::<TimestampNanosecondType>().value(i).div_euclid(1_000_000)
                        }
                    });
                }
            }
            other => {
                return Err(CoreError::Config(format!(
                    "event-time column `{}` has type {other}, which cannot hold a time as {:?}",
                    self.column, self.format
                )))
            }
        }
        Ok((Int64Array::from(out), bad))
    }

    fn null_reason(&self, valid: bool) -> String {
        if valid {
            format!("event time `{}` is out of range", self.column)
        } else {
            format!("event time `{}` is null", self.column)
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Watermarks of one source partition: bounded out-of-orderness plus idle detection.
///
/// The watermark is `max event time seen - bound`: the promise that rows at most `bound`
/// behind the newest one seen still count. A partition with no data for `idle_timeout`
/// reports itself idle so it does not hold the minimum back.
#[derive(Debug, Clone)]
pub struct PartitionWatermark {
    bound_ms: i64,
    idle_timeout: Option<Duration>,
    max_seen: Option<i64>,
    last_data: Instant,
    idle: bool,
    ended: bool,
}

impl PartitionWatermark {
    /// A partition with the given out-of-orderness bound and idle timeout.
    pub fn new(bound: Duration, idle_timeout: Option<Duration>, now: Instant) -> Self {
        Self {
            bound_ms: i64::try_from(bound.as_millis()).unwrap_or(i64::MAX),
            idle_timeout,
            max_seen: None,
            last_data: now,
            idle: false,
            ended: false,
        }
    }

    /// Notes the newest event time of a batch.
    pub fn observe(&mut self, max_time: i64, now: Instant) {
        self.max_seen = Some(self.max_seen.map_or(max_time, |m| m.max(max_time)));
        self.last_data = now;
        self.idle = false;
    }

    /// Marks the partition idle now (its reader lost it): it holds nothing back until it
    /// observes data again.
    pub fn set_idle(&mut self) {
        if !self.ended {
            self.idle = true;
        }
    }

    /// Marks the partition finished: it no longer holds anything back.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// Re-evaluates idleness at `now`.
    pub fn check_idle(&mut self, now: Instant) {
        if let Some(t) = self.idle_timeout {
            if !self.ended && now.duration_since(self.last_data) >= t {
                self.idle = true;
            }
        }
    }

    /// The partition's current watermark: `None` before any data (which holds the minimum
    /// back, as an unknown partition must), `Some(Idle)` when idle.
    pub fn current(&self) -> Option<Watermark> {
        if self.ended {
            return Some(Watermark::At(END_OF_TIME));
        }
        if self.idle {
            return Some(Watermark::Idle);
        }
        self.max_seen.map(|m| Watermark::At(m.saturating_sub(self.bound_ms)))
    }
}

/// Combines the watermarks of several inputs (partitions or upstream tasks) into one, which
/// only moves forward.
///
/// Rules: ended inputs count as the end of time; idle inputs are left out; an input that has
/// not reported yet holds the result back; when every live input is idle, the result is idle.
#[derive(Debug, Clone)]
pub struct WatermarkCombiner {
    inputs: Vec<Option<Watermark>>,
    /// Each input's last time before it went idle: what it has promised, idle or not.
    last_at: Vec<Option<i64>>,
    emitted: Option<i64>,
    emitted_idle: bool,
}

impl WatermarkCombiner {
    /// A combiner over `n` inputs.
    pub fn new(n: usize) -> Self {
        Self { inputs: vec![None; n], last_at: vec![None; n], emitted: None, emitted_idle: false }
    }

    /// Records input `i`'s watermark and returns what to send downstream, if anything changed.
    pub fn update(&mut self, i: usize, wm: Option<Watermark>) -> Option<Watermark> {
        if let Some(slot) = self.inputs.get_mut(i) {
            match (wm, *slot) {
                // Never let an input's own watermark go back.
                (Some(Watermark::At(new)), Some(Watermark::At(old))) if new < old => {}
                _ => *slot = wm,
            }
            if let Some(Watermark::At(t)) = *slot {
                self.last_at[i] = Some(self.last_at[i].map_or(t, |l| l.max(t)));
            }
        }
        self.combined()
    }

    /// Adds an input that has not reported yet (it holds the result back until it does).
    pub fn add_input(&mut self) {
        self.inputs.push(None);
        self.last_at.push(None);
    }

    /// The number of inputs.
    pub fn inputs(&self) -> usize {
        self.inputs.len()
    }

    /// The last watermark emitted (ms).
    pub fn current(&self) -> Option<i64> {
        self.emitted
    }

    fn combined(&mut self) -> Option<Watermark> {
        let mut min: Option<i64> = None;
        let mut any_live = false;
        let mut any_idle = false;
        for w in &self.inputs {
            match w {
                None => return None,
                Some(Watermark::Idle) => any_idle = true,
                Some(Watermark::At(t)) => {
                    any_live = true;
                    min = Some(min.map_or(*t, |m| m.min(*t)));
                }
            }
        }
        // Only ended inputs reach the end of time. If the others are idle, they may still send
        // rows: the result is idle, not the end of time, or every window downstream would
        // close at once and their rows arrive late (a worker whose source has no partitions
        // next to one whose partitions are quiet).
        if any_idle && min == Some(END_OF_TIME) {
            any_live = false;
        }
        if !any_live {
            // Going idle all at once must not lose the progress the inputs made before: what
            // every input that had data has promised is emitted first (the next call says
            // idle). Inputs that never had data promise nothing and are left out.
            let promised = self.last_at.iter().zip(&self.inputs).filter(|(_, w)| **w == Some(Watermark::Idle));
            if let Some(p) = promised.filter_map(|(l, _)| *l).min() {
                if self.emitted.is_none_or(|e| p > e) && p != END_OF_TIME {
                    self.emitted = Some(p);
                    self.emitted_idle = false;
                    return Some(Watermark::At(p));
                }
            }
            if self.emitted_idle {
                return None;
            }
            self.emitted_idle = true;
            return Some(Watermark::Idle);
        }
        let m = min?;
        let was_idle = std::mem::replace(&mut self.emitted_idle, false);
        match self.emitted {
            Some(e) if m <= e => was_idle.then_some(Watermark::At(e)),
            _ => {
                self.emitted = Some(m);
                Some(Watermark::At(m))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    //  input 0: 10 -------------- 30 ---- (revoked: idle) ---------- 50
    //  input 1 (added):   (nothing) ---- 20 ---------- 40
    //  output:  10        (held)         20   20 (0 idle)     40       40
    //  input 0: 50 (held back by input 1) ... idle      input 1: (no data) ... idle
    //  output:  -                              50, then idle
    #[test]
    fn inputs_going_idle_together_keep_the_progress_made() {
        let mut c = WatermarkCombiner::new(2);
        assert_eq!(c.update(0, Some(Watermark::At(50))), None);
        assert_eq!(c.update(0, Some(Watermark::Idle)), None, "input 1 still unknown");
        assert_eq!(c.update(1, Some(Watermark::Idle)), Some(Watermark::At(50)));
        assert_eq!(c.update(1, Some(Watermark::Idle)), Some(Watermark::Idle));
        assert_eq!(c.update(1, Some(Watermark::Idle)), None, "idle is said once");
    }

    #[test]
    fn ended_and_idle_inputs_give_idle_not_the_end_of_time() {
        let mut c = WatermarkCombiner::new(2);
        assert_eq!(c.update(0, Some(Watermark::At(END_OF_TIME))), None, "input 1 has not reported");
        assert_eq!(c.update(1, Some(Watermark::Idle)), Some(Watermark::Idle));
        assert_eq!(c.update(1, Some(Watermark::At(5))), Some(Watermark::At(5)), "rows again: its time counts");
        assert_eq!(c.update(1, Some(Watermark::At(END_OF_TIME))), Some(Watermark::At(END_OF_TIME)), "both ended");
    }

    #[test]
    fn added_inputs_hold_back_and_idle_ones_do_not() {
        let at = |t| Some(Watermark::At(t));
        let mut c = WatermarkCombiner::new(1);
        assert_eq!(c.update(0, at(10)), at(10));
        c.add_input();
        assert_eq!(c.inputs(), 2);
        assert_eq!(c.update(0, at(30)), None, "a new input that has not reported holds the result back");
        assert_eq!(c.update(1, at(20)), at(20));
        let mut p = PartitionWatermark::new(Duration::ZERO, None, Instant::now());
        p.observe(30, Instant::now());
        p.set_idle();
        assert_eq!(c.update(0, p.current()), None, "an idle input is left out (20 stays)");
        assert_eq!(c.update(1, at(40)), at(40));
        p.observe(50, Instant::now());
        assert_eq!(p.current(), at(50), "data wakes it");
        assert_eq!(c.update(0, p.current()), None, "40 stays, the minimum of 50 and 40");
    }

    #[test]
    fn partition_watermark_is_max_minus_bound() {
        let t0 = Instant::now();
        let mut p = PartitionWatermark::new(Duration::from_millis(2000), None, t0);
        assert_eq!(p.current(), None);
        p.observe(10_000, t0);
        assert_eq!(p.current(), Some(Watermark::At(8_000)));
        p.observe(9_000, t0);
        assert_eq!(p.current(), Some(Watermark::At(8_000)), "an older batch must not move it back");
        p.end();
        assert_eq!(p.current(), Some(Watermark::At(END_OF_TIME)));
    }

    #[test]
    fn idle_partition_reports_idle_and_wakes_on_data() {
        let t0 = Instant::now();
        let mut p = PartitionWatermark::new(Duration::ZERO, Some(Duration::from_secs(5)), t0);
        p.observe(100, t0);
        p.check_idle(t0 + Duration::from_secs(4));
        assert_eq!(p.current(), Some(Watermark::At(100)));
        p.check_idle(t0 + Duration::from_secs(5));
        assert_eq!(p.current(), Some(Watermark::Idle));
        p.observe(200, t0 + Duration::from_secs(6));
        assert_eq!(p.current(), Some(Watermark::At(200)));
    }

    //  input 0: 10 ---------- 30 ------- idle ------ 50
    //  input 1: ---- 20 --------------- 40 -------------- end
    //  output:  -    10       20         30 (0 idle) 40   50
    #[test]
    fn combiner_takes_minimum_over_live_inputs() {
        let mut c = WatermarkCombiner::new(2);
        assert_eq!(c.update(0, Some(Watermark::At(10))), None, "input 1 unknown holds back");
        assert_eq!(c.update(1, Some(Watermark::At(20))), Some(Watermark::At(10)));
        assert_eq!(c.update(0, Some(Watermark::At(30))), Some(Watermark::At(20)));
        assert_eq!(c.update(1, Some(Watermark::At(40))), Some(Watermark::At(30)));
        assert_eq!(c.update(0, Some(Watermark::Idle)), Some(Watermark::At(40)));
        assert_eq!(c.update(0, Some(Watermark::At(50))), None, "min is 40 again: no change");
        assert_eq!(c.update(1, Some(Watermark::At(END_OF_TIME))), Some(Watermark::At(50)));
    }

    #[test]
    fn combiner_all_idle_is_idle_once() {
        let mut c = WatermarkCombiner::new(2);
        c.update(0, Some(Watermark::At(5)));
        c.update(1, Some(Watermark::At(7)));
        assert_eq!(c.update(0, Some(Watermark::Idle)), Some(Watermark::At(7)));
        assert_eq!(c.update(1, Some(Watermark::Idle)), Some(Watermark::Idle));
        assert_eq!(c.update(1, Some(Watermark::Idle)), None);
        assert_eq!(c.update(1, Some(Watermark::At(9))), Some(Watermark::At(9)));
    }

    #[test]
    fn combiner_never_goes_back() {
        let mut c = WatermarkCombiner::new(1);
        assert_eq!(c.update(0, Some(Watermark::At(10))), Some(Watermark::At(10)));
        assert_eq!(c.update(0, Some(Watermark::At(5))), None);
        assert_eq!(c.current(), Some(10));
    }

    #[test]
    fn clock_sanity_flags_future_and_stale_times() {
        let now = 1_800_000_000_000;
        let spec = EventTimeSpec {
            max_future_ms: Some(3_600_000),
            max_age_ms: Some(86_400_000),
            ..EventTimeSpec::new("t", TimeFormat::Millis)
        };
        let times = Int64Array::from(vec![now, now + 3_600_000, now + 3_600_001, 2_147_483_647_000, now - 86_400_001]);
        let bad = spec.check_clock(&times, now);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(
            bad[1].1.starts_with("event time 2038-01-19T03:14:07.000Z is 11.0 years ahead of the wall clock"),
            "{}",
            bad[1].1
        );
        assert!(bad[2].1.contains("old (max_age 1.0 days)"), "{}", bad[2].1);
        assert!(EventTimeSpec::new("t", TimeFormat::Millis).check_clock(&times, now).is_empty());
    }

    #[test]
    fn extracts_units_and_rfc3339() {
        use arrow_array::StringArray;
        use std::sync::Arc;
        let b = RecordBatch::try_from_iter([
            ("s", Arc::new(Int64Array::from(vec![Some(2), None])) as ArrayRef),
            ("r", Arc::new(StringArray::from(vec!["2026-11-22T00:00:01.5Z", "yesterday"])) as ArrayRef),
        ])
        .unwrap();
        let spec = EventTimeSpec::new("s", TimeFormat::Seconds);
        let (t, bad) = spec.extract(&b).unwrap();
        assert_eq!(t.value(0), 2000);
        assert_eq!(bad, vec![(1, "event time `s` is null".to_string())]);
        let spec = EventTimeSpec::new("r", TimeFormat::Rfc3339);
        let (t, bad) = spec.extract(&b).unwrap();
        assert_eq!(t.value(0), 1_795_305_601_500);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].1.contains("cannot parse \"yesterday\""), "{}", bad[0].1);
        let spec = EventTimeSpec::new("nope", TimeFormat::Millis);
        assert!(spec.extract(&b).unwrap_err().to_string().contains("available: s, r"));
    }
}
