//! `end_when_idle` of the sources that read through a connection task of their own.

use std::time::{Duration, Instant};

/// How long a source has had nothing to read, for `end_when_idle`: from the first poll that
/// found nothing since the last record, not from the record itself, so time the source was
/// not polled at all (its rows held up downstream: backpressure, a sink retrying) is not taken
/// for quiet. Kept in the source, since the runtime drops polls at barriers.
#[derive(Debug, Default)]
pub(crate) struct Quiet(Option<Instant>);

impl Quiet {
    /// Something arrived.
    pub(crate) fn reset(&mut self) {
        self.0 = None;
    }

    /// Nothing is pending at `now`: whether that has lasted `idle` (the stretch begins now if
    /// it had not begun).
    pub(crate) fn lasted(&mut self, now: Instant, idle: Duration) -> bool {
        now.saturating_duration_since(*self.0.get_or_insert(now)) >= idle
    }

    /// [`Quiet::lasted`], counting only while `connected`: time with the server away is not
    /// quiet (the stretch begins again once it is back).
    pub(crate) fn lasted_while(&mut self, connected: bool, now: Instant, idle: Duration) -> bool {
        if !connected {
            self.reset();
            return false;
        }
        self.lasted(now, idle)
    }
}
