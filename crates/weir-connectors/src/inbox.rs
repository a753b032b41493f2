//! The wait at the heart of the sources that read through a connection task of their own
//! (NATS, RabbitMQ): cut the pending batch when the linger says so (or the job stops), end
//! after `end_when_idle`, report the source waiting after a quiet [`IDLE_POLL`], or take what
//! the task sent. Its state lives here, not in the poll, because the runtime drops a source's
//! poll at every barrier.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weir_core::linger::Linger;
use weir_core::task::SpawnedTask;
use weir_core::{CoreError, Result, SourceContext};

/// How long a poll waits for something before it reports the source waiting.
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(100);

/// What the connection task sends, and the task itself.
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    rx: mpsc::Receiver<T>,
    _task: SpawnedTask<()>,
    /// Since when polls found nothing (kept across polls the runtime drops).
    idle_since: Option<Instant>,
    quiet: crate::quiet::Quiet,
}

/// What a source does next.
#[derive(Debug)]
pub(crate) enum Next<T> {
    /// Cut the pending records into a batch.
    Cut,
    /// The job stops and nothing is pending.
    Stopped,
    /// Nothing came for `end_when_idle`: the source ends.
    Idle,
    /// Nothing came for a while: report the source waiting.
    Waiting,
    /// The task sent this.
    Got(T),
}

impl<T> Inbox<T> {
    pub(crate) fn new(rx: mpsc::Receiver<T>, task: SpawnedTask<()>) -> Self {
        Self { rx, _task: task, idle_since: None, quiet: crate::quiet::Quiet::default() }
    }

    /// Waits for the next thing to do. `pending` records wait to be cut, the first since
    /// `first_at`; `end_when_idle` ends the source after that long without anything from the
    /// task (`None` while it should not count, say with the server away). `what` names the
    /// source in the log and errors.
    ///
    /// # Errors
    /// The connection task stopped.
    pub(crate) async fn next(
        &mut self,
        cx: &SourceContext,
        linger: &Linger,
        pending: usize,
        first_at: Option<Instant>,
        end_when_idle: Option<Duration>,
        what: &str,
    ) -> Result<Next<T>> {
        let mut stop = cx.shutdown.clone();
        loop {
            let now = Instant::now();
            if pending > 0 && (cx.stopping() || first_at.is_some_and(|f| linger.should_cut(pending, f, now))) {
                return Ok(Next::Cut);
            }
            if cx.stopping() {
                return Ok(Next::Stopped);
            }
            if let Some(idle) = end_when_idle {
                if pending == 0 && self.quiet.lasted(now, idle) {
                    tracing::info!(
                        idle_ms = idle.as_millis() as u64,
                        "{what} source ends: nothing arrived for `end_when_idle`."
                    );
                    return Ok(Next::Idle);
                }
            }
            let wait = match first_at {
                Some(f) => (f + linger.linger(pending)).saturating_duration_since(now),
                None => IDLE_POLL.saturating_sub(now - *self.idle_since.get_or_insert(now)),
            };
            tokio::select! {
                m = self.rx.recv() => {
                    let Some(m) = m else {
                        return Err(CoreError::Internal(format!("{what}: the connection task stopped")));
                    };
                    self.idle_since = None;
                    self.quiet.reset();
                    return Ok(Next::Got(m));
                }
                () = tokio::time::sleep(wait) => {
                    if pending == 0 {
                        self.idle_since = None;
                        return Ok(Next::Waiting);
                    }
                }
                _ = stop.changed() => {}
            }
        }
    }
}
