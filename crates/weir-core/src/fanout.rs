//! One result, several sinks: PostgreSQL for history, Redis for the latest value, a live feed
//! for the dashboard, without running the job twice.
//!
//! [`FanOutSinkFactory`] makes each worker a [`Sink`] that writes every batch to each of its
//! parts in turn. A part that fails with a transient error fails the write; the runtime retries
//! it with backoff ([`Sink::write_attempt`]), and the parts that had taken the batch are not
//! written again. Rows a part refuses go to the dead-letter output with that part's name in the
//! reason, once per row even when several parts refuse it.
//!
//! Checkpoints: each part begins, pre-commits and commits with the checkpoint. At most one
//! part may be exactly once with transactions of its own that a crash loses (PostgreSQL,
//! Kafka: their committers say how far they got, [`Committer::visible`]); that part commits
//! first, then the others, whose commits can be repeated (the file sink). Recovery then
//! restores what that one part made visible, and repeats the others' commits up to it.

use std::fmt;
use std::sync::Arc;

use arrow_array::RecordBatch;

use crate::checkpoint::Epoch;
use crate::error::RefusedRow;
use crate::metrics::ConnectorMetrics;
use crate::operator::{Committer, Sink, SinkFactory, Visible};
use crate::{CoreError, Result};

/// A sink of the fan-out: its id (for messages) and its factory.
#[derive(Debug, Clone)]
pub struct FanOutPart {
    /// The sink's id.
    pub id: String,
    /// Its instances.
    pub factory: Arc<dyn SinkFactory>,
}

/// Builds the fan-out's instances and its committer.
#[derive(Debug)]
pub struct FanOutSinkFactory {
    parts: Vec<FanOutPart>,
    committer: Option<Arc<FanOutCommitter>>,
}

impl FanOutSinkFactory {
    /// Writes to every part.
    ///
    /// # Errors
    /// Two parts whose committers cannot both be repeated after a crash: their outputs could
    /// not be made visible together.
    pub fn new(parts: Vec<FanOutPart>) -> Result<Self> {
        let mut committers: Vec<(String, Arc<dyn Committer>)> =
            parts.iter().filter_map(|p| p.factory.committer().map(|c| (p.id.clone(), c))).collect();
        let keeping: Vec<&str> = committers.iter().filter(|c| c.1.records_progress()).map(|c| c.0.as_str()).collect();
        if keeping.len() > 1 {
            return Err(CoreError::Config(format!(
                "sinks {} are each exactly once with transactions of their own, which cannot be committed together; \
                 keep one of them exactly once and make the others `at_least_once` (idempotent with upserts)",
                keeping.iter().map(|id| format!("`{id}`")).collect::<Vec<_>>().join(" and ")
            )));
        }
        // The part that records its own progress commits first: a crash after it and before
        // the others leaves commits that recovery repeats.
        committers.sort_by_key(|c| !c.1.records_progress());
        let committer = (!committers.is_empty()).then(|| Arc::new(FanOutCommitter { parts: committers }));
        Ok(Self { parts, committer })
    }
}

impl SinkFactory for FanOutSinkFactory {
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Sink>> {
        let parts = self
            .parts
            .iter()
            .map(|p| Ok((p.id.clone(), p.factory.create(worker, workers)?)))
            .collect::<Result<Vec<_>>>()?;
        let done = vec![false; parts.len()];
        Ok(Box::new(FanOutSink { parts, done, refused: Vec::new() }))
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        self.committer.clone().map(|c| c as Arc<dyn Committer>)
    }

    fn prepare(&self) -> futures::future::BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for p in &self.parts {
                p.factory.prepare().await?;
            }
            Ok(())
        })
    }
}

/// One worker's instances of every part.
#[derive(Debug)]
struct FanOutSink {
    parts: Vec<(String, Box<dyn Sink>)>,
    /// The parts that took the batch being written (kept across its retries).
    done: Vec<bool>,
    /// What the parts that took it refused.
    refused: Vec<RefusedRow>,
}

#[async_trait::async_trait]
impl Sink for FanOutSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        self.write_attempt(rows, 1).await
    }

    async fn write_attempt(&mut self, rows: &RecordBatch, attempt: u32) -> Result<()> {
        if attempt <= 1 {
            self.done.iter_mut().for_each(|d| *d = false);
            self.refused.clear();
        }
        for (i, (id, part)) in self.parts.iter_mut().enumerate() {
            if self.done[i] {
                continue;
            }
            match part.write_attempt(rows, attempt).await {
                Ok(()) => {}
                Err(CoreError::Refused(rs)) => {
                    self.refused.extend(
                        rs.into_iter().map(|r| RefusedRow { row: r.row, reason: format!("sink `{id}`: {}", r.reason) }),
                    );
                }
                Err(e) => return Err(named(id, e)),
            }
            self.done[i] = true;
        }
        if self.refused.is_empty() {
            return Ok(());
        }
        // One dead letter per row: the reasons of every part that refused it.
        let mut refused = std::mem::take(&mut self.refused);
        refused.sort_by_key(|r| r.row);
        let mut merged: Vec<RefusedRow> = Vec::with_capacity(refused.len());
        for r in refused {
            match merged.last_mut() {
                Some(m) if m.row == r.row => {
                    m.reason.push_str("; ");
                    m.reason.push_str(&r.reason);
                }
                _ => merged.push(r),
            }
        }
        Err(CoreError::Refused(merged))
    }

    async fn close(&mut self) -> Result<()> {
        for (id, p) in &mut self.parts {
            p.close().await.map_err(|e| named(id, e))?;
        }
        Ok(())
    }

    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        for (id, p) in &mut self.parts {
            p.begin(epoch).await.map_err(|e| named(id, e))?;
        }
        Ok(())
    }

    async fn pre_commit(&mut self, epoch: Epoch) -> Result<()> {
        for (id, p) in &mut self.parts {
            p.pre_commit(epoch).await.map_err(|e| named(id, e))?;
        }
        Ok(())
    }

    fn report(&self, metrics: &ConnectorMetrics) {
        for (_, p) in &self.parts {
            p.report(metrics);
        }
    }

    fn trace(&mut self, cx: Option<&opentelemetry::trace::SpanContext>) {
        for (_, p) in &mut self.parts {
            p.trace(cx);
        }
    }
}

/// An error of part `id`, named, keeping whether it can be retried or restarts the run.
fn named(id: &str, e: CoreError) -> CoreError {
    match e {
        CoreError::Restart(m) => CoreError::Restart(format!("sink `{id}`: {m}")),
        CoreError::Rebalanced(m) => CoreError::Rebalanced(m),
        e => CoreError::Other { message: format!("sink `{id}`: {e}"), blame: e.blame(), retry: e.retry() },
    }
}

/// Commits every part's output, the one that records its own progress first.
struct FanOutCommitter {
    parts: Vec<(String, Arc<dyn Committer>)>,
}

impl fmt::Debug for FanOutCommitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOutCommitter").field("parts", &self.parts.iter().map(|p| &p.0).collect::<Vec<_>>()).finish()
    }
}

#[async_trait::async_trait]
impl Committer for FanOutCommitter {
    async fn commit(&self, epoch: Epoch) -> Result<()> {
        for (id, c) in &self.parts {
            c.commit(epoch).await.map_err(|e| named(id, e))?;
        }
        Ok(())
    }

    async fn abort_after(&self, epoch: Epoch) -> Result<()> {
        for (id, c) in &self.parts {
            c.abort_after(epoch).await.map_err(|e| named(id, e))?;
        }
        Ok(())
    }

    async fn visible(&self) -> Result<Visible> {
        match self.parts.first() {
            Some((id, c)) if c.records_progress() => c.visible().await.map_err(|e| named(id, e)),
            _ => Ok(Visible::Unknown),
        }
    }

    fn records_progress(&self) -> bool {
        self.parts.first().is_some_and(|c| c.1.records_progress())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    /// A part that fails its first write with the given error, then takes everything.
    #[derive(Debug)]
    struct Flaky(Option<CoreError>, Arc<std::sync::Mutex<usize>>);

    #[async_trait::async_trait]
    impl Sink for Flaky {
        async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
            match self.0.take() {
                Some(e) => Err(e),
                None => {
                    *self.1.lock().unwrap() += rows.num_rows();
                    Ok(())
                }
            }
        }
        async fn close(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef]).unwrap()
    }

    #[tokio::test]
    async fn a_retry_skips_parts_that_took_the_batch_and_a_lost_transaction_still_restarts() {
        let (a, b): (Arc<std::sync::Mutex<usize>>, Arc<std::sync::Mutex<usize>>) = (Arc::default(), Arc::default());
        let transient =
            CoreError::Other { message: "down".into(), blame: crate::Blame::External, retry: crate::Retry::Backoff };
        let mut sink = FanOutSink {
            parts: vec![
                ("a".into(), Box::new(Flaky(None, a.clone()))),
                ("b".into(), Box::new(Flaky(Some(transient), b.clone()))),
            ],
            done: vec![false; 2],
            refused: Vec::new(),
        };
        let e = sink.write_attempt(&batch(), 1).await.unwrap_err();
        assert_eq!((e.retry(), e.to_string()), (crate::Retry::Backoff, "sink `b`: down".to_string()));
        sink.write_attempt(&batch(), 2).await.unwrap();
        assert_eq!((*a.lock().unwrap(), *b.lock().unwrap()), (3, 3), "`a` took the batch once");
        let mut sink = FanOutSink {
            parts: vec![("pg".into(), Box::new(Flaky(Some(CoreError::Restart("lost".into())), Arc::default())))],
            done: vec![false],
            refused: Vec::new(),
        };
        let e = sink.write_attempt(&batch(), 1).await.unwrap_err();
        assert!(e.starts_again(), "a part's lost transaction starts the run again: {e}");
    }
}
