//! Getting a connection back after a server went away: the sinks' backoff
//! ([`RetryPolicy::delay`]), each failure counted in a metric and logged (the first, then at
//! powers of two, so a long outage does not flood the log).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weir_core::metrics::Registry;
use weir_core::runtime::RetryPolicy;

/// One connection task's retry bookkeeping.
pub(crate) struct Reconnect {
    /// What is connecting, for logs: `MQTT`, `Redis`.
    what: &'static str,
    /// The counter of failures, labelled by server.
    metric: &'static str,
    help: &'static str,
    server: String,
    registry: Arc<Registry>,
    policy: RetryPolicy,
    failures: u32,
    /// Whether the connection is up now, for the source (its `end_when_idle` counts only
    /// then).
    up: Arc<AtomicBool>,
}

impl Reconnect {
    pub(crate) fn new(
        what: &'static str,
        metric: &'static str,
        help: &'static str,
        server: &str,
        registry: Arc<Registry>,
    ) -> Self {
        let policy = RetryPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        };
        Self { what, metric, help, server: server.to_string(), registry, policy, failures: 0, up: Arc::default() }
    }

    /// Keeps `up` telling whether the connection is up.
    pub(crate) fn telling(mut self, up: Arc<AtomicBool>) -> Self {
        self.up = up;
        self
    }

    /// The connection is up: the next failure starts the backoff over.
    pub(crate) fn connected(&mut self) {
        self.up.store(true, Ordering::Relaxed);
        if self.failures > 0 {
            tracing::info!(server = %self.server, failures = self.failures, "{} connection back.", self.what);
        }
        self.failures = 0;
    }

    /// The connection failed: count it, log it, and wait before the next try.
    pub(crate) async fn failed(&mut self, error: String) {
        self.up.store(false, Ordering::Relaxed);
        self.failures += 1;
        self.registry.connectors.add(self.metric, self.help, &[("server", &self.server)], 1.0);
        let wait = self.policy.delay(self.failures);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(server = %self.server, error = %error, failures = self.failures, retry_in_ms = wait.as_millis() as u64, "{} connection failed; retrying.", self.what);
        }
        tokio::time::sleep(wait).await;
    }
}
