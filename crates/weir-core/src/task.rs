//! Tasks owned by whoever started them.
//!
//! A bare `tokio::spawn` leaves a task running when the code that started it returns or fails,
//! holding whatever it captured (a consumer, a file, a port) until it ends by itself. Every task
//! Weir starts is a [`SpawnedTask`] instead, which aborts its task when dropped; `clippy.toml`
//! bans the bare spawn.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// A tokio task that is aborted when this handle is dropped. Awaiting the handle gives the
/// task's output, as with a `JoinHandle`.
#[derive(Debug)]
pub struct SpawnedTask<T> {
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> SpawnedTask<T> {
    /// Starts `fut` on the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does.
    #[allow(clippy::disallowed_methods)] // the one place the bare spawn is wrapped
    pub fn spawn(fut: impl Future<Output = T> + Send + 'static) -> Self {
        Self { handle: tokio::spawn(fut) }
    }
}

impl<T> SpawnedTask<T> {
    /// Whether the task has finished (awaiting it then does not wait).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the task at its next await point.
    pub fn abort(&self) {
        self.handle.abort();
    }
}

impl<T> Future for SpawnedTask<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx)
    }
}

impl<T> Drop for SpawnedTask<T> {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_task_is_aborted_and_a_kept_one_gives_its_output() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let t = SpawnedTask::spawn(async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        drop(t);
        // The task was aborted: its captured sender is dropped without a send.
        assert!(rx.await.is_err());
        assert_eq!(SpawnedTask::spawn(async { 7 }).await.unwrap(), 7);
    }
}
