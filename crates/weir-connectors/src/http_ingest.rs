//! HTTP ingest: `POST /ingest/<source id>` on the API port hands its body to this source.
//!
//! The HTTP handler and the source meet in an [`IngestHub`]: a bounded queue of requests, each
//! with the channel its answer goes back on. When the queue is full the handler answers 503
//! with `Retry-After` at once, so a pipeline that cannot keep up pushes back on its clients
//! instead of buffering without bound. The source (worker 0) decodes a request's records,
//! dead-letters the bad ones, and answers once the good ones are in the pipeline (its next
//! poll, after the runtime has taken the batch), or, with `respond: checkpointed`, once the
//! checkpoint covering them has completed, so a 200 then means the rows survive a crash.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use tokio::sync::{mpsc, oneshot};
use weir_core::checkpoint::Epoch;
use weir_core::linger::Linger;
use weir_core::time::EventTimeSpec;
use weir_core::{Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{split_records, Decoder, FormatSpec};

use crate::decode::decode_records_noting;

/// A body's encoding, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// A JSON array of objects, or JSON Lines (told apart by the first character).
    Json,
    /// MessagePack: a sequence of maps.
    MsgPack,
}

/// What the source answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestAnswer {
    /// Records taken into the pipeline.
    pub accepted: usize,
    /// Records refused (dead-lettered), by their 0-based index in the body, with the reason.
    pub rejected: Vec<(usize, String)>,
}

/// One request waiting for the source.
#[derive(Debug)]
struct Request {
    body: Vec<u8>,
    format: BodyFormat,
    /// The caller's trace context (`traceparent`), when traces are on.
    trace: Option<weir_core::trace::SpanContext>,
    answer: oneshot::Sender<std::result::Result<IngestAnswer, String>>,
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestRefusal {
    /// The queue is full: try again later (503 with `Retry-After`).
    Busy,
    /// No source is reading (the job is starting, ending or over).
    Closed,
    /// The body is malformed as a whole (400).
    BadBody(String),
}

/// Where the HTTP handler and the source meet.
#[derive(Debug)]
pub struct IngestHub {
    tx: mpsc::Sender<Request>,
    rx: Mutex<Option<mpsc::Receiver<Request>>>,
    /// The bearer token requests must carry.
    token: String,
    /// The largest body taken, in bytes.
    max_body: usize,
}

impl IngestHub {
    /// A hub queueing at most `queue` requests of at most `max_body` bytes.
    pub fn new(queue: usize, token: String, max_body: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        Arc::new(Self { tx, rx: Mutex::new(Some(rx)), token, max_body })
    }

    /// The bearer token requests must carry.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The largest body taken, in bytes.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Hands a body to the source and waits for its answer; its rows go on in `trace` (the
    /// caller's `traceparent`), if given.
    ///
    /// # Errors
    /// [`IngestRefusal`]: the queue is full, no source reads, or the body cannot be split.
    pub async fn submit(
        &self,
        body: Vec<u8>,
        format: BodyFormat,
        trace: Option<weir_core::trace::SpanContext>,
    ) -> std::result::Result<IngestAnswer, IngestRefusal> {
        let (answer, answered) = oneshot::channel();
        self.tx.try_send(Request { body, format, trace, answer }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => IngestRefusal::Busy,
            mpsc::error::TrySendError::Closed(_) => IngestRefusal::Closed,
        })?;
        match answered.await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(IngestRefusal::BadBody(e)),
            Err(_) => Err(IngestRefusal::Closed),
        }
    }
}

/// When the source answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Respond {
    /// Once the rows are in the pipeline.
    Accepted,
    /// Once the checkpoint covering them has completed.
    Checkpointed,
}

/// Builds the HTTP ingest source.
#[derive(Debug)]
pub struct HttpIngestFactory {
    hub: Arc<IngestHub>,
    schema: SchemaRef,
    event_time: Option<EventTimeSpec>,
    batch_size: usize,
    max_linger: Duration,
    respond: Respond,
}

impl HttpIngestFactory {
    /// A source reading what `hub` receives, with rows of `schema`.
    pub fn new(
        hub: Arc<IngestHub>,
        schema: SchemaRef,
        event_time: Option<EventTimeSpec>,
        batch_size: usize,
        max_linger: Duration,
        respond: Respond,
    ) -> Self {
        Self { hub, schema, event_time, batch_size, max_linger, respond }
    }
}

impl SourceFactory for HttpIngestFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Source>> {
        // Worker 0 takes the queue; after a `key_by` every worker shares the work.
        let rx = if worker == 0 {
            self.hub.rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
        } else {
            None
        };
        Ok(Box::new(HttpIngestSource {
            json: FormatSpec::Json.decoder(self.schema.clone()).map_err(crate::fmt_err)?,
            msgpack: FormatSpec::MsgPack.decoder(self.schema.clone()).map_err(crate::fmt_err)?,
            rx,
            event_time: self.event_time.clone(),
            linger: Linger::new(self.batch_size, self.max_linger),
            respond: self.respond,
            waiting: Vec::new(),
            by_checkpoint: VecDeque::new(),
            idle_since: None,
        }))
    }

    fn resumable(&self) -> bool {
        // Nothing to resume: what was answered is in the checkpoint; what was not, the client
        // sends again.
        true
    }
}

type Answer = (oneshot::Sender<std::result::Result<IngestAnswer, String>>, IngestAnswer);

#[derive(Debug)]
struct HttpIngestSource {
    json: Box<dyn Decoder>,
    msgpack: Box<dyn Decoder>,
    rx: Option<mpsc::Receiver<Request>>,
    event_time: Option<EventTimeSpec>,
    linger: Linger,
    respond: Respond,
    /// Answers for rows handed on at the last poll: sent at the next one.
    waiting: Vec<Answer>,
    /// With `Respond::Checkpointed`: answers by the checkpoint whose barrier follows them.
    by_checkpoint: VecDeque<(Option<Epoch>, Answer)>,
    idle_since: Option<Instant>,
}

const IDLE_POLL: Duration = Duration::from_millis(100);

impl HttpIngestSource {
    /// Splits a body into records: a JSON array's elements, JSON Lines, or MessagePack maps.
    fn records(body: &[u8], format: BodyFormat) -> std::result::Result<(Vec<u8>, Vec<std::ops::Range<usize>>), String> {
        let mut ranges = Vec::new();
        match format {
            BodyFormat::MsgPack => {
                split_records(&FormatSpec::MsgPack, body, true, &mut ranges).map_err(|e| e.to_string())?;
                Ok((body.to_vec(), ranges))
            }
            BodyFormat::Json if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') => {
                let items: Vec<serde_json::Value> =
                    serde_json::from_slice(body).map_err(|e| format!("the body is not a JSON array: {e}"))?;
                let mut buf = Vec::with_capacity(body.len());
                for item in items {
                    let start = buf.len();
                    serde_json::to_writer(&mut buf, &item).map_err(|e| e.to_string())?;
                    buf.push(b'\n');
                    ranges.push(start..buf.len());
                }
                Ok((buf, ranges))
            }
            BodyFormat::Json => {
                let mut buf = body.to_vec();
                if !buf.ends_with(b"\n") {
                    buf.push(b'\n');
                }
                split_records(&FormatSpec::Json, &buf, true, &mut ranges).map_err(|e| e.to_string())?;
                Ok((buf, ranges))
            }
        }
    }

    fn send_answers(&mut self) {
        for (tx, a) in self.waiting.drain(..) {
            match self.respond {
                Respond::Accepted => {
                    let _ = tx.send(Ok(a));
                }
                Respond::Checkpointed => self.by_checkpoint.push_back((None, (tx, a))),
            }
        }
    }
}

#[async_trait::async_trait]
impl Source for HttpIngestSource {
    fn partitions(&self) -> usize {
        usize::from(self.rx.is_some())
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        // The rows answered for were taken by the runtime before it polled again.
        self.send_answers();
        let Some(rx) = self.rx.as_mut() else { return Ok(SourcePoll::End) };
        let mut stop = cx.shutdown.clone();
        loop {
            if cx.stopping() {
                rx.close();
                // Requests still queued get a refusal they can retry, not silence.
                while let Ok(r) = rx.try_recv() {
                    let _ = r.answer.send(Err("the pipeline is stopping; send it again later".into()));
                }
                return Ok(SourcePoll::End);
            }
            let now = Instant::now();
            let wait = IDLE_POLL.saturating_sub(now - *self.idle_since.get_or_insert(now));
            let req = tokio::select! {
                r = rx.recv() => r,
                () = tokio::time::sleep(wait) => {
                    self.idle_since = None;
                    return Ok(SourcePoll::Waiting);
                }
                _ = stop.changed() => continue,
            };
            self.idle_since = None;
            let Some(req) = req else { return Ok(SourcePoll::End) };
            let (buf, ranges) = match Self::records(&req.body, req.format) {
                Ok(r) => r,
                Err(e) => {
                    let _ = req.answer.send(Err(e));
                    continue;
                }
            };
            self.linger.arrived(ranges.len(), now);
            weir_core::metrics::StepMetrics::add(&cx.registry.source_bytes, req.body.len() as u64);
            let mut rejected = Vec::new();
            let decoder = match req.format {
                BodyFormat::Json => self.json.as_mut(),
                BodyFormat::MsgPack => self.msgpack.as_mut(),
            };
            let batch = decode_records_noting(
                decoder,
                self.event_time.as_ref(),
                &buf,
                &ranges,
                "http ingest",
                |i| format!("record {i} of the request"),
                cx,
                |d| Ok(d.batch.clone()),
                &mut rejected,
            )?;
            rejected.sort();
            let answer = IngestAnswer { accepted: ranges.len() - rejected.len(), rejected };
            match batch {
                Some(b) => {
                    self.waiting.push((req.answer, answer));
                    return Ok(SourcePoll::Rows { partition: 0, batch: b.traced(req.trace) });
                }
                // Every record refused: nothing enters the pipeline to wait for.
                None => match self.respond {
                    Respond::Accepted => {
                        let _ = req.answer.send(Ok(answer));
                    }
                    Respond::Checkpointed => self.by_checkpoint.push_back((None, (req.answer, answer))),
                },
            }
        }
    }

    fn snapshot(&mut self) -> Result<Option<arrow_array::RecordBatch>> {
        Ok(None)
    }

    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<arrow_array::RecordBatch>> {
        // Rows handed on before this barrier are covered by checkpoint `epoch`.
        self.send_answers();
        for (e, _) in self.by_checkpoint.iter_mut() {
            e.get_or_insert(epoch);
        }
        Ok(None)
    }

    async fn checkpoint_complete(&mut self, epoch: Epoch) -> Result<()> {
        while self.by_checkpoint.front().is_some_and(|(e, _)| e.is_some_and(|e| e <= epoch)) {
            if let Some((_, (tx, a))) = self.by_checkpoint.pop_front() {
                let _ = tx.send(Ok(a));
            }
        }
        Ok(())
    }

    fn restore(&mut self, _positions: &[arrow_array::RecordBatch]) -> Result<()> {
        Ok(())
    }
}

impl Drop for HttpIngestSource {
    fn drop(&mut self) {
        // Rows answered for are in the pipeline; those waiting for a checkpoint that will not
        // come get no answer, and their clients see the connection end (and send again).
        self.send_answers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_records() {
        let (buf, r) = HttpIngestSource::records(b" [{\"a\":1}, {\"a\":2}]", BodyFormat::Json).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(&buf[r[1].clone()], b"{\"a\":2}\n");
        let (_, r) = HttpIngestSource::records(b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}", BodyFormat::Json).unwrap();
        assert_eq!(r.len(), 3);
        assert!(HttpIngestSource::records(b"[{\"a\":1}", BodyFormat::Json).unwrap_err().contains("not a JSON array"));
    }
}
