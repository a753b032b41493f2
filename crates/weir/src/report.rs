//! Human-readable progress and the end-of-run summary.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use weir_core::metrics::Registry;
use weir_core::runtime::RunSummary;

/// One progress line: events/s since the last call, rows out, watermark and lag.
pub fn progress_line(reg: &Registry, last_records: &mut u64, every: Duration) -> String {
    let records = reg.source_records.load(Ordering::Relaxed);
    let rate = (records - *last_records) as f64 / every.as_secs_f64();
    *last_records = records;
    let out = reg.sink_rows.load(Ordering::Relaxed);
    let wm = reg.watermark().filter(|w| *w != weir_core::batch::END_OF_TIME);
    let (wm_s, lag) = match wm.and_then(chrono_ms) {
        Some((s, lag)) => (s, format!("{lag:.1}s")),
        None => ("-".to_string(), "-".to_string()),
    };
    let fill = reg.channel_fill().iter().map(|(_, f)| *f).fold(0.0, f64::max);
    format!(
        "{} ev/s | in {} | out {} | watermark {wm_s} | lag {lag} | max queue {:.0}%",
        human(rate),
        human(records as f64),
        human(out as f64),
        fill * 100.0
    )
}

/// The watermark as an RFC 3339 time and its lag behind the wall clock in seconds.
fn chrono_ms(ms: i64) -> Option<(String, f64)> {
    let t = chrono::DateTime::from_timestamp_millis(ms)?;
    let lag = (weir_core::deadletter::now_ms() - ms) as f64 / 1000.0;
    Some((t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), lag))
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The end-of-run summary: one line per step with where its rows went, then totals.
pub fn summary(s: &RunSummary, workers: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>12} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10}",
        "step", "rows in", "rows out", "filtered", "aggregated", "results", "dead", "late", "quarantined", "shed"
    );
    for (id, m) in &s.steps {
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10}",
            id.as_str(),
            m.rows_in,
            m.rows_out,
            m.filtered,
            m.aggregated,
            m.results_out,
            m.dead_lettered,
            m.late_dropped + m.late_side,
            m.quarantined,
            m.shed
        );
    }
    let secs = s.elapsed.as_secs_f64();
    let _ = writeln!(
        out,
        "{} events in {:.3}s with {workers} worker{}: {} events/s; {} rows written",
        s.source_records,
        secs,
        if workers == 1 { "" } else { "s" },
        human(s.source_records as f64 / secs.max(1e-9)),
        s.sink_rows
    );
    let latencies = [("sink", s.latency_us), ("the sink's entry (before its write)", s.latency_to_sink_entry_us)];
    for (to, quantiles) in latencies {
        if let Some((p50, p99, max)) = quantiles {
            let ms = |us: u64| us as f64 / 1e3;
            let _ = writeln!(
                out,
                "latency from creation to {to}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(p50),
                ms(p99),
                ms(max)
            );
        }
    }
    out
}
