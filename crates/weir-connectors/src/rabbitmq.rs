//! RabbitMQ (AMQP 0-9-1) as a source: a queue consumed with a prefetch limit, acknowledged
//! after the checkpoint.
//!
//! Guarantees with checkpoints: deliveries are acknowledged (`basic.ack`, multiple, up to the
//! last delivery handed on before the barrier) only once the checkpoint completed, so a crash
//! makes the broker deliver them again instead of losing them. A delivery has no position to
//! tell a repeat by, so the checkpoint records a digest (the `message_id` when the publisher
//! set one, else a hash of routing key and body) of each delivery handed on and not yet
//! acknowledged. After a restart, a delivery the broker marks as redelivered whose digest the
//! checkpoint holds was handed on already: it is acknowledged, not processed. The broker
//! delivers requeued messages again at once, so the digests left a minute after the first
//! delivery (a message somebody else took meanwhile) are forgotten.
//!
//! A malformed message is dead-lettered by Weir and acknowledged with the rest, never
//! requeued.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;
use weir_core::checkpoint::Epoch;
use weir_core::linger::Linger;
use weir_core::metrics::{Registry, StepMetrics};
use weir_core::task::SpawnedTask;
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{Decoder, FormatSpec};

use crate::decode::decode_records_with;
use crate::inbox::{Inbox, Next};
use crate::reconnect::Reconnect;
use crate::topic::MetaColumns;

/// Settings of a RabbitMQ source.
#[derive(Clone)]
pub struct RabbitMqSourceConfig {
    /// `amqp://user:password@host:5672/%2f` (or `amqps://`).
    pub url: String,
    /// The queue.
    pub queue: String,
    /// Deliveries unacknowledged at most (`basic.qos`); at least what arrives in a checkpoint
    /// interval, or reading waits for the checkpoint.
    pub prefetch: u16,
    /// Declare the queue (durable) when it does not exist.
    pub declare: bool,
    /// With `declare`: bind the queue to this exchange with `binding_key`.
    pub bind: Option<(String, String)>,
    /// The consumer tag; each worker appends `-<worker>`.
    pub consumer_tag: String,
    /// Payload format.
    pub format: FormatSpec,
    /// Schema of the decoded payload.
    pub payload_schema: SchemaRef,
    /// Columns of each delivery's routing key, of fields from its words, and of its headers as
    /// a JSON object text.
    pub meta: MetaColumns,
    /// Event time.
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest a partial batch waits.
    pub max_linger: Duration,
    /// End after this long without a delivery (backfills, tests); `None` runs until stopped.
    pub end_when_idle: Option<Duration>,
    /// Acknowledge only once the checkpoint covering a delivery completed; otherwise as soon
    /// as its batch is handed on.
    pub ack_on_checkpoint: bool,
}

impl std::fmt::Debug for RabbitMqSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSourceConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("bind", &self.bind)
            .finish_non_exhaustive()
    }
}

/// Builds the RabbitMQ source.
#[derive(Debug)]
pub struct RabbitMqSourceFactory {
    cfg: Arc<RabbitMqSourceConfig>,
    schema: SchemaRef,
}

impl RabbitMqSourceFactory {
    /// Checks the settings; connects on the first poll.
    ///
    /// # Errors
    /// A URL that is not `amqp://`, no queue, a zero prefetch, or a column name clash.
    pub fn new(cfg: RabbitMqSourceConfig) -> Result<Self> {
        weir_core::ensure_config!(
            cfg.url.parse::<lapin::uri::AMQPUri>().is_ok(),
            "rabbitmq `url: {}`: write it like amqp://guest:guest@127.0.0.1:5672/%2f",
            crate::redis_streams::redact_url(&cfg.url)
        );
        weir_core::ensure_config!(!cfg.queue.is_empty(), "rabbitmq: name the `queue`");
        weir_core::ensure_config!(cfg.prefetch > 0, "rabbitmq `prefetch: 0`: take at least one delivery at a time");
        weir_core::ensure_config!(
            cfg.bind.is_none() || cfg.declare,
            "rabbitmq: `exchange` binds the queue Weir declares; set `declare: true` or bind it yourself"
        );
        let mut fields: Vec<Field> = cfg.payload_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        cfg.meta.extend_schema(&mut fields, "rabbitmq")?;
        Ok(Self { schema: Arc::new(Schema::new(fields)), cfg: Arc::new(cfg) })
    }
}

impl SourceFactory for RabbitMqSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Source>> {
        Ok(Box::new(RabbitMqSource {
            decoder: self.cfg.format.decoder(self.cfg.payload_schema.clone()).map_err(crate::fmt_err)?,
            cfg: self.cfg.clone(),
            schema: self.schema.clone(),
            worker,
            reads: worker == 0,
            conn: None,
            channel: None,
            generation: 0,
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            pending: Pending::default(),
            book: Book::default(),
            covered: HashMap::new(),
            forget_covered_at: None,
            ended: false,
        }))
    }

    fn resumable(&self) -> bool {
        true
    }
}

/// One delivery as read.
#[derive(Debug)]
struct Delivery {
    generation: u64,
    tag: u64,
    redelivered: bool,
    routing_key: String,
    headers: Option<String>,
    digest: u64,
    data: Vec<u8>,
}

#[derive(Debug)]
enum Incoming {
    /// A new channel: acknowledgements of this generation's tags go through it.
    Connected(lapin::Channel, u64),
    Deliveries(Vec<Delivery>),
    /// The connection is gone; the task is getting another.
    Lost,
    Failed(CoreError),
}

/// A delivery handed on (or skipped as a repeat) and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Handed {
    generation: u64,
    tag: u64,
    digest: u64,
}

/// Deliveries handed on and not yet acknowledged, by checkpoint.
#[derive(Debug, Default)]
struct Book {
    unacked: VecDeque<Handed>,
    handed: u64,
    released: u64,
    marks: VecDeque<(Epoch, u64)>,
    /// Released, to acknowledge.
    to_send: Vec<Handed>,
}

impl Book {
    fn handed_on(&mut self, h: Handed) {
        self.unacked.push_back(h);
        self.handed += 1;
    }

    fn release(&mut self, upto: u64) {
        while self.released < upto {
            let Some(h) = self.unacked.pop_front() else { break };
            self.to_send.push(h);
            self.released += 1;
        }
    }

    fn complete(&mut self, epoch: Epoch) {
        let mut upto = None;
        while self.marks.front().is_some_and(|(e, _)| *e <= epoch) {
            upto = self.marks.pop_front().map(|(_, n)| n);
        }
        if let Some(n) = upto {
            self.release(n);
        }
    }

    /// Every delivery handed on and not acknowledged.
    fn open(&self) -> impl Iterator<Item = &Handed> {
        self.to_send.iter().chain(&self.unacked)
    }
}

/// Deliveries received and not yet cut into a batch, with the repeats among them (kept in
/// order, so a multiple acknowledgement never covers a delivery not handed on).
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    routing_keys: Vec<String>,
    headers: Vec<Option<String>>,
    tags: Vec<u64>,
    /// Every delivery in arrival order, repeats included.
    order: Vec<Handed>,
    /// The digests of the repeats among them.
    repeats: Vec<u64>,
    first_at: Option<Instant>,
}

#[derive(Debug)]
struct RabbitMqSource {
    cfg: Arc<RabbitMqSourceConfig>,
    schema: SchemaRef,
    decoder: Box<dyn Decoder>,
    worker: usize,
    reads: bool,
    conn: Option<Inbox<Incoming>>,
    /// The channel of the current generation, for acknowledgements.
    channel: Option<lapin::Channel>,
    generation: u64,
    linger: Linger,
    pending: Pending,
    book: Book,
    /// Digests (with their counts) of deliveries handed on before a restart or a lost
    /// channel and not acknowledged: their redeliveries are repeats.
    covered: HashMap<u64, u32>,
    /// When `covered` is forgotten: a minute after the channel's first delivery.
    forget_covered_at: Option<Instant>,
    ended: bool,
}

/// How often the queue's ready count is read.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// Reads the connection task may hold for the source before it waits.
const INBOX: usize = 8;
/// How long after a channel's first delivery the digests of repeats still expected are kept.
const FORGET_COVERED: Duration = Duration::from_secs(60);

/// The connection task's state.
struct Reader {
    cfg: Arc<RabbitMqSourceConfig>,
    tx: mpsc::Sender<Incoming>,
    registry: Arc<Registry>,
    worker: usize,
    generation: u64,
}

/// A failed session: fatal ones end the source with the error, others are retried.
enum SessionError {
    Retry(String),
    Fatal(CoreError),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
        if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
            let fatal = match p.kind() {
                AMQPErrorKind::Soft(s) => {
                    matches!(
                        s,
                        AMQPSoftError::ACCESSREFUSED | AMQPSoftError::NOTFOUND | AMQPSoftError::PRECONDITIONFAILED
                    )
                }
                AMQPErrorKind::Hard(h) => matches!(h, AMQPHardError::INVALIDPATH | AMQPHardError::NOTALLOWED),
            };
            if fatal {
                return Self::Fatal(CoreError::Config(format!("rabbitmq: the broker refused: {}", p.get_message())));
            }
        }
        Self::Retry(e.to_string())
    }
}

impl Reader {
    fn server(&self) -> String {
        crate::redis_streams::redact_url(&self.cfg.url)
    }

    async fn run(mut self) {
        let mut retry = Reconnect::new(
            "RabbitMQ",
            "weir_rabbitmq_reconnects_total",
            "Times the RabbitMQ source lost or could not open its connection and tried again.",
            &self.server(),
            self.registry.clone(),
        );
        loop {
            self.generation += 1;
            match self.session(&mut retry).await {
                Ok(()) => return,
                Err(SessionError::Fatal(e)) => {
                    let _ = self.tx.send(Incoming::Failed(e)).await;
                    return;
                }
                Err(SessionError::Retry(e)) => {
                    if self.tx.send(Incoming::Lost).await.is_err() {
                        return;
                    }
                    retry.failed(e).await;
                }
            }
        }
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let headers = match (&self.cfg.meta.headers, d.properties.headers()) {
            (Some(_), Some(h)) => {
                let o: serde_json::Map<String, serde_json::Value> =
                    h.inner().iter().map(|(k, v)| (k.to_string(), json(v))).collect();
                Some(serde_json::Value::Object(o).to_string())
            }
            _ => None,
        };
        let digest = match d.properties.message_id() {
            Some(id) => xxhash_rust::xxh3::xxh3_64(id.as_str().as_bytes()),
            None => {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                h.update(d.routing_key.as_str().as_bytes());
                h.update(&[0]);
                h.update(&d.data);
                h.digest()
            }
        };
        Delivery {
            generation: self.generation,
            tag: d.delivery_tag,
            redelivered: d.redelivered,
            routing_key: d.routing_key.to_string(),
            headers,
            digest,
            data: d.data,
        }
    }

    /// One connection's life; `Ok` when the source is gone.
    async fn session(&mut self, retry: &mut Reconnect) -> std::result::Result<(), SessionError> {
        let props = lapin::ConnectionProperties::default()
            .with_connection_name(format!("weir-{}-{}", self.cfg.consumer_tag, self.worker).into());
        let conn = lapin::Connection::connect(&self.cfg.url, props).await?;
        retry.connected();
        let channel = conn.create_channel().await?;
        channel.basic_qos(self.cfg.prefetch, BasicQosOptions { global: false }).await?;
        let queue = self.cfg.queue.as_str();
        if self.cfg.declare {
            channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
            if let Some((exchange, key)) = &self.cfg.bind {
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        // A queue that is not there fails here with the broker's NOT_FOUND (fatal).
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("{}-{}", self.cfg.consumer_tag, self.worker).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        if self.tx.send(Incoming::Connected(channel.clone(), self.generation)).await.is_err() {
            return Ok(());
        }
        // Lag: the ready count, on a channel of its own (a failed passive declare closes it).
        let lag_channel = conn.create_channel().await?;
        let mut last_lag = Instant::now() - LAG_EVERY;
        loop {
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                if let Ok(q) = lag_channel
                    .queue_declare(
                        queue.into(),
                        QueueDeclareOptions { passive: true, ..Default::default() },
                        FieldTable::default(),
                    )
                    .await
                {
                    self.registry.connectors.set(
                        "weir_rabbitmq_queue_ready",
                        "Messages in the queue ready to be delivered (not yet delivered to a consumer).",
                        &[("queue", queue)],
                        f64::from(q.message_count()),
                    );
                }
            }
            let Ok(first) = tokio::time::timeout(LAG_EVERY, consumer.next()).await else { continue };
            let mut batch = Vec::new();
            let mut next = first;
            loop {
                match next {
                    Some(Ok(d)) => batch.push(self.delivery(d)),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(SessionError::Retry("the broker ended the consumer".into())),
                }
                if batch.len() >= self.cfg.batch_size {
                    break;
                }
                match consumer.next().now_or_never() {
                    Some(n) => next = n,
                    None => break,
                }
            }
            if self.tx.send(Incoming::Deliveries(batch)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A header value as JSON: numbers, booleans and text as such, anything else as its text.
fn json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(i) => J::from(*i),
        AMQPValue::ShortShortUInt(i) => J::from(*i),
        AMQPValue::ShortInt(i) => J::from(*i),
        AMQPValue::ShortUInt(i) => J::from(*i),
        AMQPValue::LongInt(i) => J::from(*i),
        AMQPValue::LongUInt(i) => J::from(*i),
        AMQPValue::LongLongInt(i) => J::from(*i),
        AMQPValue::Timestamp(t) => J::from(*t),
        AMQPValue::Float(f) => J::from(*f),
        AMQPValue::Double(f) => J::from(*f),
        AMQPValue::ShortString(s) => J::String(s.to_string()),
        AMQPValue::LongString(s) => J::String(s.to_string()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(t) => J::Object(t.inner().iter().map(|(k, v)| (k.to_string(), json(v))).collect()),
        other => J::String(format!("{other:?}")),
    }
}

impl RabbitMqSource {
    fn connect(&mut self, cx: &SourceContext) {
        if self.conn.is_some() || !self.reads {
            return;
        }
        let (tx, rx) = mpsc::channel(INBOX);
        let reader =
            Reader { cfg: self.cfg.clone(), tx, registry: cx.registry.clone(), worker: self.worker, generation: 0 };
        tracing::info!(server = %crate::redis_streams::redact_url(&self.cfg.url), queue = %self.cfg.queue, "RabbitMQ source connecting.");
        self.conn = Some(Inbox::new(rx, SpawnedTask::spawn(reader.run())));
    }

    /// A new channel: what the old one delivered and nobody acknowledged comes again, so
    /// what was handed on becomes a repeat to recognise, and what was not yet handed on is
    /// dropped here (it comes again).
    fn new_generation(&mut self, channel: lapin::Channel, generation: u64) {
        self.new_generation_without_channel(generation);
        self.channel = Some(channel);
    }

    fn new_generation_without_channel(&mut self, generation: u64) {
        let handed: Vec<u64> = self.book.open().map(|h| h.digest).chain(self.pending.repeats.iter().copied()).collect();
        for d in handed {
            *self.covered.entry(d).or_default() += 1;
        }
        // Nothing of the old channel can be acknowledged any more.
        self.book.released += self.book.unacked.len() as u64;
        self.book.unacked.clear();
        self.book.to_send.clear();
        self.pending = Pending::default();
        self.forget_covered_at = None;
        self.generation = generation;
    }

    fn take(&mut self, deliveries: Vec<Delivery>) {
        let now = Instant::now();
        if *self.forget_covered_at.get_or_insert(now + FORGET_COVERED) <= now {
            self.covered.clear();
        }
        for d in deliveries {
            if d.generation != self.generation {
                continue;
            }
            let h = Handed { generation: d.generation, tag: d.tag, digest: d.digest };
            if d.redelivered {
                if let Some(n) = self.covered.get_mut(&d.digest) {
                    *n -= 1;
                    if *n == 0 {
                        self.covered.remove(&d.digest);
                    }
                    self.pending.order.push(h);
                    self.pending.repeats.push(d.digest);
                    continue;
                }
            }
            self.linger.arrived(1, now);
            let p = &mut self.pending;
            p.first_at.get_or_insert(now);
            let start = p.buf.len();
            p.buf.extend_from_slice(&d.data);
            if !matches!(self.cfg.format, FormatSpec::MsgPack) && !d.data.ends_with(b"\n") {
                p.buf.push(b'\n');
            }
            p.ranges.push(start..p.buf.len());
            p.routing_keys.push(d.routing_key);
            p.headers.push(d.headers);
            p.tags.push(d.tag);
            p.order.push(h);
        }
        // Repeats alone are handed on at once (no batch to wait for).
        if self.pending.ranges.is_empty() {
            for h in std::mem::take(&mut self.pending.order) {
                self.book.handed_on(h);
            }
            self.release_unless_checkpointing();
        }
    }

    fn release_unless_checkpointing(&mut self) {
        if !self.cfg.ack_on_checkpoint {
            self.book.release(self.book.handed);
        }
    }

    fn cut(&mut self, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let p = std::mem::take(&mut self.pending);
        for h in &p.order {
            self.book.handed_on(*h);
        }
        self.release_unless_checkpointing();
        StepMetrics::add(&cx.registry.source_bytes, p.buf.len() as u64);
        let schema = self.schema.clone();
        let meta = &self.cfg.meta;
        let (keys, headers) = (&p.routing_keys, &p.headers);
        let rows = |d: &weir_formats::Decoded| -> Result<RecordBatch> {
            if meta.is_empty() {
                return Ok(d.batch.clone());
            }
            let mut cols: Vec<ArrayRef> = d.batch.columns().to_vec();
            meta.append(
                &mut cols,
                d.batch.num_rows(),
                |r| keys[d.record_of_row(r)].as_str(),
                |r| headers[d.record_of_row(r)].as_deref(),
            );
            Ok(RecordBatch::try_new(schema.clone(), cols)?)
        };
        decode_records_with(
            self.decoder.as_mut(),
            self.cfg.event_time.as_ref(),
            &p.buf,
            &p.ranges,
            &format!("rabbitmq {}", self.cfg.queue),
            |i| format!("routing key {}, delivery tag {}", p.routing_keys[i], p.tags[i]),
            cx,
            rows,
        )
    }

    /// One multiple acknowledgement up to the last released delivery of the current channel.
    async fn send_acks(&mut self) -> Result<()> {
        let last = self.book.to_send.iter().rev().find(|h| h.generation == self.generation).map(|h| h.tag);
        let (Some(tag), Some(channel)) = (last, &self.channel) else {
            self.book.to_send.retain(|h| h.generation == self.generation);
            return Ok(());
        };
        match channel.basic_ack(tag, BasicAckOptions { multiple: true }).await {
            Ok(()) => self.book.to_send.clear(),
            // The channel is gone: its deliveries come again, and the next channel's
            // generation turns these into repeats.
            Err(e) => {
                tracing::warn!(error = %e, "Acknowledging RabbitMQ deliveries failed; they will be delivered again.")
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for RabbitMqSource {
    fn partitions(&self) -> usize {
        usize::from(self.reads)
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        if self.ended || !self.reads {
            return Ok(SourcePoll::End);
        }
        self.send_acks().await?;
        self.connect(cx);
        loop {
            let Some(inbox) = self.conn.as_mut() else { return Ok(SourcePoll::End) };
            let (n, first_at) = (self.pending.ranges.len(), self.pending.first_at);
            // A broker that is away is retried, not taken for the end of the input.
            let idle_end = self.cfg.end_when_idle.filter(|_| self.channel.is_some());
            match inbox.next(cx, &self.linger, n, first_at, idle_end, "RabbitMQ").await? {
                Next::Cut => {
                    if let Some(batch) = self.cut(cx)? {
                        return Ok(SourcePoll::Rows { partition: 0, batch });
                    }
                }
                Next::Stopped => return Ok(SourcePoll::End),
                Next::Idle => {
                    self.ended = true;
                    return Ok(SourcePoll::End);
                }
                Next::Waiting => return Ok(SourcePoll::Waiting),
                Next::Got(Incoming::Deliveries(d)) => self.take(d),
                Next::Got(Incoming::Connected(channel, generation)) => self.new_generation(channel, generation),
                Next::Got(Incoming::Lost) => self.channel = None,
                Next::Got(Incoming::Failed(e)) => return Err(e),
            }
        }
    }

    /// The digests of the deliveries handed on and not acknowledged, and of those still to
    /// be recognised as repeats, one row each.
    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let mut digests: Vec<u64> = self.book.open().map(|h| h.digest).collect();
        for (d, n) in &self.covered {
            digests.extend(std::iter::repeat_n(*d, *n as usize));
        }
        let schema = Arc::new(Schema::new(vec![Field::new("digest", DataType::UInt64, false)]));
        Ok(Some(RecordBatch::try_new(schema, vec![Arc::new(UInt64Array::from(digests))])?))
    }

    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<RecordBatch>> {
        self.book.marks.push_back((epoch, self.book.handed));
        self.snapshot()
    }

    async fn checkpoint_complete(&mut self, epoch: Epoch) -> Result<()> {
        self.book.complete(epoch);
        self.send_acks().await
    }

    fn restore(&mut self, tables: &[RecordBatch]) -> Result<()> {
        for t in tables {
            let digests = t
                .column_by_name("digest")
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned())
                .ok_or_else(|| CoreError::Internal("rabbitmq positions lack `digest`".into()))?;
            for d in digests.values() {
                *self.covered.entry(*d).or_default() += 1;
            }
        }
        Ok(())
    }
}

/// Declares durable queue `queue` on the broker at `url` unless it exists.
///
/// # Errors
/// The broker cannot be reached or refuses the declaration (a queue of other settings).
pub async fn declare_queue(url: &str, queue: &str) -> Result<()> {
    let err = |e: lapin::Error| {
        CoreError::Internal(format!("rabbitmq declare `{queue}` at {}: {e}", crate::redis_streams::redact_url(url)))
    };
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.map_err(err)?;
    let channel = conn.create_channel().await.map_err(err)?;
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.map_err(err)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Publishes `messages` (routing key, body) to `exchange` ("" is the default exchange, whose
/// routing keys are queue names) with publisher confirms, persistent, at `rate` a second when
/// given; returns once the broker confirmed all. For benchmarks and tests.
///
/// # Errors
/// The broker cannot be reached or refuses a message.
pub async fn publish(url: &str, exchange: &str, messages: Vec<(String, Vec<u8>)>, rate: Option<f64>) -> Result<u64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let err = |e: lapin::Error| {
        CoreError::Internal(format!("rabbitmq publish to {}: {e}", crate::redis_streams::redact_url(url)))
    };
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.map_err(err)?;
    let channel = conn.create_channel().await.map_err(err)?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(err)?;
    let started = Instant::now();
    let total = messages.len() as u64;
    let paced = rate.filter(|r| *r > 0.0);
    // Unpaced, a chunk's publishes go out together (each waits for the I/O thread otherwise).
    let chunk = if paced.is_some() { 1 } else { 1000 };
    for (i, part) in messages.chunks(chunk).enumerate() {
        let sends = part.iter().map(|(key, body)| {
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            channel.basic_publish(exchange.into(), key.as_str().into(), BasicPublishOptions::default(), body, props)
        });
        let confirms = futures::future::try_join_all(sends).await.map_err(err)?;
        for c in futures::future::try_join_all(confirms).await.map_err(err)? {
            if c.is_nack() {
                return Err(CoreError::Internal(format!(
                    "rabbitmq publish to {}: the broker refused a message",
                    crate::redis_streams::redact_url(url)
                )));
            }
        }
        if let Some(r) = paced {
            tokio::time::sleep_until((started + Duration::from_secs_f64((i + 1) as f64 / r)).into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> RabbitMqSource {
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, true)]));
        let cfg = RabbitMqSourceConfig {
            url: "amqp://127.0.0.1".into(),
            queue: "q".into(),
            prefetch: 10,
            declare: false,
            bind: None,
            consumer_tag: "t".into(),
            format: FormatSpec::Json,
            payload_schema: schema,
            meta: MetaColumns::default(),
            event_time: None,
            batch_size: 100,
            max_linger: Duration::from_millis(1),
            end_when_idle: None,
            ack_on_checkpoint: true,
        };
        let f = RabbitMqSourceFactory::new(cfg).unwrap();
        RabbitMqSource {
            decoder: f.cfg.format.decoder(f.cfg.payload_schema.clone()).unwrap(),
            cfg: f.cfg.clone(),
            schema: f.schema.clone(),
            worker: 0,
            reads: true,
            conn: None,
            channel: None,
            generation: 1,
            linger: Linger::new(100, Duration::from_millis(1)),
            pending: Pending::default(),
            book: Book::default(),
            covered: HashMap::new(),
            forget_covered_at: None,
            ended: false,
        }
    }

    fn delivery(tag: u64, redelivered: bool, digest: u64) -> Delivery {
        Delivery {
            generation: 1,
            tag,
            redelivered,
            routing_key: "q".into(),
            headers: None,
            digest,
            data: format!("{{\"seq\":{tag}}}").into_bytes(),
        }
    }

    /// A redelivery the checkpoint covers is only acknowledged (kept in order with the rest);
    /// a fresh delivery with the same digest, or a redelivery of another, is processed.
    #[test]
    fn covered_redeliveries_are_repeats_and_the_rest_is_processed() {
        let mut s = source();
        let table = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("digest", DataType::UInt64, false)])),
            vec![Arc::new(UInt64Array::from(vec![7, 7, 9]))],
        )
        .unwrap();
        s.restore(&[table]).unwrap();
        s.take(vec![delivery(1, true, 7), delivery(2, false, 7), delivery(3, true, 8), delivery(4, true, 7)]);
        assert_eq!(s.pending.tags, [2, 3], "1 and 4 are repeats");
        assert_eq!(s.pending.order.iter().map(|h| h.tag).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(s.covered, HashMap::from([(9, 1)]));
        // A lost channel: what was handed on or taken as a repeat is now expected again.
        s.new_generation_without_channel(2);
        assert!(s.pending.order.is_empty());
        assert_eq!(s.covered.get(&7), Some(&2), "the two repeats come again");
    }

    #[test]
    fn acknowledgements_wait_for_the_checkpoint_of_their_barrier() {
        let h = |tag| Handed { generation: 1, tag, digest: tag };
        let mut b = Book::default();
        b.handed_on(h(1));
        b.handed_on(h(2));
        b.marks.push_back((Epoch(1), b.handed));
        b.handed_on(h(3));
        b.marks.push_back((Epoch(2), b.handed));
        b.complete(Epoch(1));
        assert_eq!(b.to_send.iter().map(|h| h.tag).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.open().count(), 3, "released and not yet sent is still open");
        b.to_send.clear();
        b.complete(Epoch(2));
        assert_eq!(b.to_send.iter().map(|h| h.tag).collect::<Vec<_>>(), [3]);
    }
}
