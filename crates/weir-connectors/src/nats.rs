//! NATS as a source: a JetStream durable pull consumer, acknowledged after the checkpoint, or
//! core NATS subjects (at most once).
//!
//! JetStream guarantees, with checkpoints: the checkpoint holds the stream sequence of the last
//! message handed on, and the consumer is acknowledged (`AckAll`, or each message when the
//! consumer was made with explicit acks) only once that checkpoint completed. A message the
//! server delivers again (after `ack_wait`, or after a restart) at or below that sequence was
//! handed on already: it is acknowledged, not processed. After a crash the messages delivered
//! to the dead process and not acknowledged would come back only once `ack_wait` passed, after
//! newer ones and so behind the watermark; so a starting source first reads them again in
//! stream order with an ordered consumer, from just after the restored sequence up to the last
//! one the durable consumer delivered, and only then pulls from the durable consumer.
//!
//! Core NATS keeps nothing for an absent subscriber: messages published while Weir is down or
//! disconnected are lost, and the checkpoint holds no position.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
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

/// Where a new JetStream consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsDeliver {
    /// From the first message the stream holds.
    All,
    /// From messages published after the consumer is made.
    New,
}

/// JetStream settings of a NATS source.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// The stream.
    pub stream: String,
    /// The durable consumer's name. Weir owns it: keep it stable across restarts.
    pub consumer: String,
    /// Make the stream (file storage, over the source's subjects) when it does not exist.
    pub create_stream: bool,
    /// Where a consumer made now starts.
    pub deliver: NatsDeliver,
    /// How long the server waits for an acknowledgement before delivering again; longer than
    /// the checkpoint interval.
    pub ack_wait: Duration,
    /// Messages delivered and not acknowledged at most; at least a checkpoint interval's worth.
    pub max_ack_pending: i64,
}

/// Settings of a NATS source.
#[derive(Clone)]
pub struct NatsSourceConfig {
    /// `nats://[user:password@]host:port` (or `tls://`); several comma-separated for a cluster.
    pub url: String,
    /// Subjects (wildcards `*` and `>`): subscribed to in core NATS, the consumer's filter in
    /// JetStream (several need NATS 2.10).
    pub subjects: Vec<String>,
    /// JetStream; `None` reads core NATS (at most once).
    pub jetstream: Option<JetStreamConfig>,
    /// Core NATS: a queue group, so the workers (and processes) of the group split the messages;
    /// without one, worker 0 subscribes.
    pub queue: Option<String>,
    /// A token to authenticate with.
    pub token: Option<String>,
    /// Payload format.
    pub format: FormatSpec,
    /// Schema of the decoded payload.
    pub payload_schema: SchemaRef,
    /// Columns of each message's subject, of fields from its tokens, and of its headers as a
    /// JSON object text.
    pub meta: MetaColumns,
    /// A column holding each message's stream sequence (JetStream; null in core NATS).
    pub sequence_column: Option<String>,
    /// Event time.
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest a partial batch waits.
    pub max_linger: Duration,
    /// End after this long without a message (backfills, tests); `None` runs until stopped.
    pub end_when_idle: Option<Duration>,
    /// Acknowledge only once the checkpoint covering a message completed (set when the
    /// pipeline has checkpoints); otherwise as soon as its batch is handed on.
    pub ack_on_checkpoint: bool,
}

impl std::fmt::Debug for NatsSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSourceConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("subjects", &self.subjects)
            .field("jetstream", &self.jetstream)
            .field("queue", &self.queue)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Builds the NATS source.
#[derive(Debug)]
pub struct NatsSourceFactory {
    cfg: Arc<NatsSourceConfig>,
    schema: SchemaRef,
}

impl NatsSourceFactory {
    /// Checks the settings; connects on the first poll.
    ///
    /// # Errors
    /// No subject, a bad subject, a queue group with JetStream, or a column name clash.
    pub fn new(cfg: NatsSourceConfig) -> Result<Self> {
        weir_core::ensure_config!(!cfg.subjects.is_empty(), "nats: name at least one subject in `subjects`");
        for s in &cfg.subjects {
            check_subject(s)?;
        }
        weir_core::ensure_config!(
            cfg.queue.is_none() || cfg.jetstream.is_none(),
            "nats: `queue` is for core NATS; a JetStream consumer is read by worker 0"
        );
        if let Some(js) = &cfg.jetstream {
            weir_core::ensure_config!(!js.stream.is_empty(), "nats: `stream` is empty");
            weir_core::ensure_config!(
                !js.consumer.is_empty() && !js.consumer.contains(['.', '*', '>', ' ']),
                "nats `consumer: {}`: a consumer name is not empty and has no `.`, `*`, `>` or space",
                js.consumer
            );
        }
        let mut fields: Vec<Field> = cfg.payload_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        cfg.meta.extend_schema(&mut fields, "nats")?;
        if let Some(name) = &cfg.sequence_column {
            weir_core::ensure_config!(
                fields.iter().all(|f| f.name() != name),
                "nats: column `{name}` has the name of another column; rename it"
            );
            fields.push(Field::new(name, DataType::UInt64, true));
        }
        Ok(Self { schema: Arc::new(Schema::new(fields)), cfg: Arc::new(cfg) })
    }
}

/// A subject is tokens separated by `.`, none empty; `*` is a whole token and `>` the last.
fn check_subject(s: &str) -> Result<()> {
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        let ok = !t.is_empty()
            && !t.contains(char::is_whitespace)
            && (*t == "*" || *t == ">" || !t.contains(['*', '>']))
            && (*t != ">" || i + 1 == tokens.len());
        weir_core::ensure_config!(
            ok,
            "nats subject `{s}`: tokens are separated by `.` and not empty; `*` stands for one whole token, `>` for the rest at the end"
        );
    }
    Ok(())
}

impl SourceFactory for NatsSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Source>> {
        let reads = worker == 0 || (self.cfg.jetstream.is_none() && self.cfg.queue.is_some());
        let acks = match &self.cfg.jetstream {
            Some(_) => Acks::All,
            None => Acks::None,
        };
        Ok(Box::new(NatsSource {
            decoder: self.cfg.format.decoder(self.cfg.payload_schema.clone()).map_err(crate::fmt_err)?,
            cfg: self.cfg.clone(),
            schema: self.schema.clone(),
            worker,
            reads,
            conn: None,
            client: None,
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            pending: Pending::default(),
            book: Book { acks, ..Book::default() },
            handed_max: None,
            handed_upto: None,
            restored: None,
            ended: false,
        }))
    }

    fn resumable(&self) -> bool {
        true
    }
}

/// One message as read.
#[derive(Debug)]
struct Msg {
    subject: async_nats::Subject,
    payload: Bytes,
    /// The headers as a JSON object text, when a column asks for them.
    headers: Option<String>,
    /// JetStream: the stream sequence.
    seq: Option<u64>,
    /// JetStream: where the acknowledgement goes.
    reply: Option<async_nats::Subject>,
}

#[derive(Debug)]
enum Incoming {
    /// The connection is up: acknowledgements go through this client, with this policy.
    Connected(async_nats::Client, Acks),
    Messages(Vec<Msg>),
    Failed(CoreError),
}

/// How the consumer takes acknowledgements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Acks {
    /// Core NATS, or a consumer without acknowledgements.
    #[default]
    None,
    /// One acknowledgement covers every message delivered before it.
    All,
    /// Each message is acknowledged.
    Explicit,
}

/// Messages handed on and not yet acknowledged, by checkpoint.
#[derive(Debug, Default)]
struct Book {
    acks: Acks,
    /// Explicit: each message's reply subject, in order.
    unacked: VecDeque<async_nats::Subject>,
    /// All: the newest message's.
    last: Option<async_nats::Subject>,
    handed: u64,
    released: u64,
    marks: VecDeque<(Epoch, u64, Option<async_nats::Subject>)>,
    to_send: Vec<async_nats::Subject>,
}

impl Book {
    fn handed_on(&mut self, reply: async_nats::Subject) {
        self.handed += 1;
        match self.acks {
            Acks::Explicit => self.unacked.push_back(reply),
            Acks::All => self.last = Some(reply),
            Acks::None => {}
        }
    }

    /// [`Book::handed_on`] for many; with `AckAll` only the last reply is kept.
    fn handed_all<'a>(&mut self, replies: impl Iterator<Item = &'a async_nats::Subject>) {
        match self.acks {
            Acks::All => {
                let mut n = 0;
                let mut last = None;
                for r in replies {
                    n += 1;
                    last = Some(r);
                }
                self.handed += n;
                if let Some(r) = last {
                    self.last = Some(r.clone());
                }
            }
            _ => replies.for_each(|r| self.handed_on(r.clone())),
        }
    }

    fn mark(&mut self, epoch: Epoch) {
        self.marks.push_back((epoch, self.handed, self.last.clone()));
    }

    fn release(&mut self, upto: u64, last: Option<async_nats::Subject>) {
        match self.acks {
            Acks::Explicit => {
                while self.released < upto {
                    let Some(r) = self.unacked.pop_front() else { break };
                    self.to_send.push(r);
                    self.released += 1;
                }
            }
            Acks::All if upto > self.released => {
                self.released = upto;
                self.to_send.extend(last);
            }
            _ => {}
        }
    }

    fn complete(&mut self, epoch: Epoch) {
        let mut upto = None;
        while self.marks.front().is_some_and(|(e, _, _)| *e <= epoch) {
            upto = self.marks.pop_front().map(|(_, n, last)| (n, last));
        }
        if let Some((n, last)) = upto {
            self.release(n, last);
        }
    }
}

/// Messages received and not yet cut into a batch.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    subjects: Vec<async_nats::Subject>,
    headers: Vec<Option<String>>,
    seqs: Vec<Option<u64>>,
    replies: Vec<async_nats::Subject>,
    first_at: Option<Instant>,
}

#[derive(Debug)]
struct NatsSource {
    cfg: Arc<NatsSourceConfig>,
    schema: SchemaRef,
    decoder: Box<dyn Decoder>,
    worker: usize,
    /// Whether this worker reads at all.
    reads: bool,
    conn: Option<Inbox<Incoming>>,
    /// Where acknowledgements go, once connected.
    client: Option<async_nats::Client>,
    linger: Linger,
    pending: Pending,
    book: Book,
    /// JetStream: the highest stream sequence taken in (handed on, pending, or covered by the
    /// restored checkpoint); a message at or below it is a repeat.
    handed_max: Option<u64>,
    /// JetStream: the highest stream sequence handed on (or covered by the restored
    /// checkpoint): what a checkpoint covers.
    handed_upto: Option<u64>,
    /// JetStream: the sequence the restored checkpoint covers.
    restored: Option<u64>,
    ended: bool,
}

/// How often the consumer's pending counts are read.
/// How long a pull request waits on the server for messages, and how often it says it is alive.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
const LAG_EVERY: Duration = Duration::from_secs(5);
/// Reads the connection task may hold for the source before it waits.
const INBOX: usize = 8;

/// The connection task's state.
struct Reader {
    cfg: Arc<NatsSourceConfig>,
    /// Where the restored checkpoint left the stream (JetStream).
    restored: Option<u64>,
    /// The highest stream sequence sent to the source in this process (JetStream), so that a
    /// second session's catch-up starts after it.
    sent_max: Option<u64>,
    tx: mpsc::Sender<Incoming>,
    registry: Arc<Registry>,
    worker: usize,
}

/// A failed session: fatal ones end the source with the error, others are retried.
enum SessionError {
    Retry(String),
    Fatal(CoreError),
}

impl<E: std::fmt::Display> From<E> for SessionError {
    fn from(e: E) -> Self {
        Self::Retry(e.to_string())
    }
}

impl Reader {
    fn server(&self) -> String {
        crate::redis_streams::redact_url(&self.cfg.url)
    }

    /// A client, and a channel that changes when its connection is lost.
    async fn connect(
        &self,
    ) -> std::result::Result<(async_nats::Client, tokio::sync::watch::Receiver<u64>), SessionError> {
        let registry = self.registry.clone();
        let server = self.server();
        let (lost_tx, lost) = tokio::sync::watch::channel(0u64);
        let lost_tx = Arc::new(lost_tx);
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("weir-{}", self.worker))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |ev| {
                let (registry, server, lost_tx) = (registry.clone(), server.clone(), lost_tx.clone());
                async move {
                    match ev {
                        async_nats::Event::Disconnected => {
                            lost_tx.send_modify(|n| *n += 1);
                            registry.connectors.add(
                                "weir_nats_reconnects_total",
                                "Times the NATS source lost its connection (the client reconnects by itself).",
                                &[("server", &server)],
                                1.0,
                            );
                            tracing::warn!(server = %server, "NATS connection lost; reconnecting.");
                        }
                        async_nats::Event::Connected => tracing::info!(server = %server, "NATS connection up."),
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!(server = %server, "NATS dropped messages: Weir reads slower than they arrive (core NATS).")
                        }
                        _ => {}
                    }
                }
            });
        if let Some(t) = &self.cfg.token {
            opts = opts.token(t.clone());
        }
        match opts.connect(self.cfg.url.as_str()).await {
            Ok(c) => Ok((c, lost)),
            Err(e) => match e.kind() {
                async_nats::ConnectErrorKind::Authentication | async_nats::ConnectErrorKind::AuthorizationViolation => {
                    Err(SessionError::Fatal(CoreError::Config(format!(
                        "nats: the server at {} refused the credentials: {e}",
                        self.server()
                    ))))
                }
                async_nats::ConnectErrorKind::ServerParse | async_nats::ConnectErrorKind::Dns => {
                    Err(SessionError::Fatal(CoreError::Config(format!("nats `url: {}`: {e}", self.server()))))
                }
                _ => Err(SessionError::Retry(e.to_string())),
            },
        }
    }

    async fn run(mut self) {
        let mut retry = Reconnect::new(
            "NATS",
            "weir_nats_connect_failures_total",
            "Times the NATS source could not open its connection or consumer and tried again.",
            &self.server(),
            self.registry.clone(),
        );
        loop {
            match self.session(&mut retry).await {
                Ok(()) => return,
                Err(SessionError::Fatal(e)) => {
                    let _ = self.tx.send(Incoming::Failed(e)).await;
                    return;
                }
                Err(SessionError::Retry(e)) => retry.failed(e).await,
            }
        }
    }

    /// Hands messages to the source; false when it is gone.
    async fn send(&mut self, msgs: Vec<Msg>) -> bool {
        if msgs.is_empty() {
            return true;
        }
        if let Some(m) = msgs.iter().filter_map(|m| m.seq).max() {
            self.sent_max = Some(self.sent_max.map_or(m, |s| s.max(m)));
        }
        self.tx.send(Incoming::Messages(msgs)).await.is_ok()
    }

    fn msg(&self, m: async_nats::Message, js: Option<(u64, async_nats::Subject)>) -> Msg {
        let headers = match (&self.cfg.meta.headers, &m.headers) {
            (Some(_), Some(h)) => {
                let mut o = serde_json::Map::new();
                for (k, vs) in h.iter() {
                    if let Some(v) = vs.last() {
                        o.insert(k.to_string(), serde_json::Value::String(v.to_string()));
                    }
                }
                Some(serde_json::Value::Object(o).to_string())
            }
            _ => None,
        };
        let (seq, reply) = js.map_or((None, None), |(s, r)| (Some(s), Some(r)));
        Msg { subject: m.subject, payload: m.payload, headers, seq, reply }
    }

    /// One connection's life; `Ok` when the source is gone.
    async fn session(&mut self, retry: &mut Reconnect) -> std::result::Result<(), SessionError> {
        // A lost connection ends the session: the client would reconnect by itself, but what
        // the server had sent and the client never read would then come only after `ack_wait`,
        // behind the watermark; a new session reads it again first.
        let (client, mut lost) = self.connect().await?;
        retry.connected();
        let Some(js_cfg) = self.cfg.jetstream.clone() else {
            if self.tx.send(Incoming::Connected(client.clone(), Acks::None)).await.is_err() {
                return Ok(());
            }
            let mut subs = Vec::new();
            for s in &self.cfg.subjects {
                subs.push(match &self.cfg.queue {
                    Some(q) => client.queue_subscribe(s.clone(), q.clone()).await?,
                    None => client.subscribe(s.clone()).await?,
                });
            }
            let mut all = futures::stream::select_all(subs);
            while let Some(m) = all.next().await {
                let mut msgs = vec![self.msg(m, None)];
                while msgs.len() < self.cfg.batch_size {
                    match all.next().now_or_never() {
                        Some(Some(m)) => msgs.push(self.msg(m, None)),
                        _ => break,
                    }
                }
                if !self.send(msgs).await {
                    return Ok(());
                }
            }
            return Err(SessionError::Retry("the subscriptions ended".into()));
        };
        let js = jetstream::new(client.clone());
        let stream = self.stream(&js, &js_cfg).await?;
        let durable = self.consumer(&stream, &js_cfg).await?;
        let info = durable.get_info().await?;
        let acks = match info.config.ack_policy {
            consumer::AckPolicy::All => Acks::All,
            consumer::AckPolicy::Explicit => Acks::Explicit,
            consumer::AckPolicy::None => {
                tracing::warn!(consumer = %js_cfg.consumer, "The NATS consumer takes no acknowledgements: a crash may lose messages.");
                Acks::None
            }
        };
        if self.tx.send(Incoming::Connected(client.clone(), acks)).await.is_err() {
            return Ok(());
        }
        // Messages the durable consumer delivered before and nobody acknowledged: read them
        // again now, in order, so they are not left to `ack_wait` and the watermark.
        let from = self.sent_max.or(self.restored).unwrap_or(info.ack_floor.stream_sequence);
        let upto = info.delivered.stream_sequence;
        if upto > from {
            tracing::info!(stream = %js_cfg.stream, from = from + 1, upto, "Reading again what the NATS consumer delivered and nobody acknowledged.");
            if !self.catch_up(&stream, from + 1, upto).await? {
                return Ok(());
            }
        }
        self.pull(&client, &durable, &js_cfg, &mut lost).await
    }

    /// Reads the durable consumer by asking for batches on an inbox of its own, with plain
    /// subscriptions: the client's pull stream wraps every message with a clone of its
    /// JetStream context and parses the whole reply subject, which cost a fifth of the
    /// source's time. Two batches are asked for ahead, so the server never waits for a request;
    /// the server's status messages (heartbeats, expired requests with what they had left) keep
    /// the count of what is still coming.
    async fn pull(
        &mut self,
        client: &async_nats::Client,
        durable: &consumer::PullConsumer,
        js: &JetStreamConfig,
        lost: &mut tokio::sync::watch::Receiver<u64>,
    ) -> std::result::Result<(), SessionError> {
        use async_nats::StatusCode;
        let batch = self.cfg.batch_size.clamp(1, 10_000);
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await?;
        let api = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", js.stream, js.consumer);
        let request = Bytes::from(
            serde_json::json!({ "batch": batch, "expires": PULL_EXPIRES.as_nanos() as u64, "idle_heartbeat": PULL_HEARTBEAT.as_nanos() as u64 })
                .to_string(),
        );
        // Messages asked for and not yet come (nor given up by the server).
        let mut outstanding = 0usize;
        let mut last_lag = Instant::now() - LAG_EVERY;
        loop {
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                self.report_lag(durable, js).await;
            }
            while outstanding <= batch {
                client.publish_with_reply(api.clone(), inbox.clone(), request.clone()).await?;
                outstanding += batch;
            }
            if lost.has_changed().unwrap_or(true) {
                return Err(SessionError::Retry("the connection was lost".into()));
            }
            // Waiting (with a timer) only when nothing is there yet.
            let first = match sub.next().now_or_never() {
                Some(m) => Ok(m),
                None => tokio::select! {
                    m = tokio::time::timeout(PULL_HEARTBEAT * 2 + Duration::from_secs(1), sub.next()) => m,
                    _ = lost.changed() => return Err(SessionError::Retry("the connection was lost".into())),
                },
            };
            let Ok(first) = first else {
                // No message and no heartbeat: the requests are gone (a server restarted in
                // between, say). Ask again.
                tracing::debug!(consumer = %js.consumer, "NATS pull: no heartbeat; asking again.");
                outstanding = 0;
                continue;
            };
            let mut msgs = Vec::new();
            let mut next = first;
            loop {
                let Some(mut m) = next else { return Err(SessionError::Retry("the pull subscription ended".into())) };
                match m.status {
                    None | Some(StatusCode::OK) => {
                        outstanding = outstanding.saturating_sub(1);
                        if let Some(seq) = m.reply.as_deref().and_then(stream_sequence) {
                            let reply = m.reply.take().unwrap_or_else(|| "".into());
                            msgs.push(self.msg(m, Some((seq, reply))));
                        }
                    }
                    Some(StatusCode::IDLE_HEARTBEAT) => {
                        // Flow control wants an answer; a heartbeat has no reply subject.
                        if let Some(r) = m.reply.take() {
                            client.publish(r, Bytes::new()).await?;
                        }
                    }
                    Some(StatusCode::NOT_FOUND | StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                        let what = m.description.as_deref().unwrap_or("");
                        if what == "Consumer Deleted" {
                            return Err(SessionError::Retry(format!("consumer `{}` was deleted", js.consumer)));
                        }
                        if what == "Consumer is push based" || what.starts_with("Exceeded MaxRequest") {
                            return Err(SessionError::Fatal(CoreError::Config(format!(
                                "nats consumer `{}` on stream `{}`: {what}",
                                js.consumer, js.stream
                            ))));
                        }
                        // A request ended (expired, or cut short): what it had left is not coming.
                        let left = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Pending-Messages"))
                            .and_then(|v| v.as_str().parse::<usize>().ok())
                            .unwrap_or(batch);
                        outstanding = outstanding.saturating_sub(left);
                    }
                    Some(StatusCode::NO_RESPONDERS) => {
                        return Err(SessionError::Retry("JetStream did not answer the pull request".into()));
                    }
                    Some(status) => {
                        tracing::debug!(%status, description = ?m.description, "NATS pull: a status message; asking again.");
                        outstanding = 0;
                    }
                }
                if msgs.len() >= self.cfg.batch_size {
                    break;
                }
                match sub.next().now_or_never() {
                    Some(n) => next = n,
                    None => break,
                }
            }
            if !self.send(msgs).await {
                return Ok(());
            }
        }
    }

    async fn stream(
        &self,
        js: &jetstream::Context,
        c: &JetStreamConfig,
    ) -> std::result::Result<stream::Stream, SessionError> {
        match js.get_stream(&c.stream).await {
            Ok(s) => Ok(s),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                if !c.create_stream {
                    return Err(SessionError::Fatal(CoreError::Config(format!(
                        "nats: JetStream stream `{}` on {}: {e}; create it, or set `create_stream: true`",
                        c.stream,
                        self.server()
                    ))));
                }
                let cfg = stream::Config {
                    name: c.stream.clone(),
                    subjects: self.cfg.subjects.clone(),
                    storage: stream::StorageType::File,
                    ..Default::default()
                };
                let s = js.get_or_create_stream(cfg).await?;
                tracing::info!(stream = %c.stream, subjects = ?self.cfg.subjects, "Created the JetStream stream.");
                Ok(s)
            }
            Err(e) => Err(SessionError::Retry(e.to_string())),
        }
    }

    /// The durable consumer: made when missing, read as it is when it exists (a NATS 2.9
    /// server that updates a consumer's settings can stop delivering to it), with a warning
    /// naming the settings that differ from the source's.
    async fn consumer(
        &self,
        s: &stream::Stream,
        c: &JetStreamConfig,
    ) -> std::result::Result<consumer::PullConsumer, SessionError> {
        let (filter_subject, filter_subjects) = match self.cfg.subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        match s.consumer_info(&c.consumer).await {
            Ok(info) => {
                let have = &info.config;
                let mut differ = Vec::new();
                if have.ack_wait != c.ack_wait {
                    differ.push(format!("ack_wait {:?}", have.ack_wait));
                }
                if have.max_ack_pending != c.max_ack_pending {
                    differ.push(format!("max_ack_pending {}", have.max_ack_pending));
                }
                if have.filter_subject != filter_subject || have.filter_subjects != filter_subjects {
                    differ.push(format!("subjects {:?}{:?}", have.filter_subject, have.filter_subjects));
                }
                if !differ.is_empty() {
                    tracing::warn!(consumer = %c.consumer, has = %differ.join(", "), "The NATS consumer exists with other settings than the source's; reading it as it is (delete it to start over).");
                }
                Ok(s.get_consumer(&c.consumer).await?)
            }
            Err(e)
                if matches!(e.kind(), jetstream::context::ConsumerInfoErrorKind::NotFound)
                    || matches!(e.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
            {
                let made = s
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(c.consumer.clone()),
                        ack_policy: consumer::AckPolicy::All,
                        ack_wait: c.ack_wait,
                        max_ack_pending: c.max_ack_pending,
                        deliver_policy: match c.deliver {
                            NatsDeliver::All => consumer::DeliverPolicy::All,
                            NatsDeliver::New => consumer::DeliverPolicy::New,
                        },
                        filter_subject,
                        filter_subjects,
                        ..Default::default()
                    })
                    .await?;
                tracing::info!(stream = %c.stream, consumer = %c.consumer, "Created the JetStream consumer.");
                Ok(made)
            }
            Err(e) => Err(SessionError::Retry(e.to_string())),
        }
    }

    /// Reads stream sequences `from..=upto` of the source's subjects with an ordered
    /// consumer; false when the source is gone.
    async fn catch_up(&mut self, s: &stream::Stream, from: u64, upto: u64) -> std::result::Result<bool, SessionError> {
        let mut cfg = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ..Default::default()
        };
        match self.cfg.subjects.as_slice() {
            [one] => cfg.filter_subject = one.clone(),
            many => cfg.filter_subjects = many.to_vec(),
        }
        let mut ordered = s.create_consumer(cfg).await?.messages().await?;
        let mut batch = Vec::new();
        loop {
            // Sequences past the stream's end never come; the info's `pending` says when done.
            let Ok(next) = tokio::time::timeout(Duration::from_secs(5), ordered.next()).await else {
                break;
            };
            let m = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "NATS catch-up read interrupted; the client retries it.");
                    continue;
                }
                None => break,
            };
            let Ok(info) = m.info() else { continue };
            let (seq, left) = (info.stream_sequence, info.pending);
            if seq > upto {
                break;
            }
            // The ordered consumer takes no acknowledgement: the durable one's redelivery of
            // this message is what gets acknowledged.
            batch.push(self.msg(m.message, Some((seq, "".into()))));
            let full = batch.len() >= self.cfg.batch_size || seq == upto || left == 0;
            if full && !self.send(std::mem::take(&mut batch)).await {
                return Ok(false);
            }
            if seq == upto || left == 0 {
                break;
            }
        }
        Ok(self.send(batch).await)
    }

    async fn report_lag(&self, c: &consumer::PullConsumer, js: &JetStreamConfig) {
        let Ok(info) = c.get_info().await else { return };
        let m = &self.registry.connectors;
        let labels = [("stream", js.stream.as_str()), ("consumer", js.consumer.as_str())];
        m.set(
            "weir_nats_consumer_pending",
            "Messages in the stream the consumer has not delivered yet.",
            &labels,
            info.num_pending as f64,
        );
        m.set(
            "weir_nats_consumer_ack_pending",
            "Messages delivered and not yet acknowledged.",
            &labels,
            info.num_ack_pending as f64,
        );
    }
}

impl NatsSource {
    fn connect(&mut self, cx: &SourceContext) {
        if self.conn.is_some() || !self.reads {
            return;
        }
        let (tx, rx) = mpsc::channel(INBOX);
        let reader = Reader {
            cfg: self.cfg.clone(),
            restored: self.restored,
            sent_max: None,
            tx,
            registry: cx.registry.clone(),
            worker: self.worker,
        };
        tracing::info!(server = %crate::redis_streams::redact_url(&self.cfg.url), subjects = ?self.cfg.subjects, jetstream = ?self.cfg.jetstream.as_ref().map(|j| &j.stream), "NATS source connecting.");
        self.conn = Some(Inbox::new(rx, SpawnedTask::spawn(reader.run())));
    }

    /// Takes messages in; in JetStream, one at or below the highest sequence taken already is
    /// a repeat, only to be acknowledged.
    fn take(&mut self, msgs: Vec<Msg>) {
        let now = Instant::now();
        for m in msgs {
            if let Some(seq) = m.seq {
                if self.handed_max.is_some_and(|h| seq <= h) {
                    // Acknowledged with what is handed on next, once handed on itself: a
                    // repeat of a message still pending here waits for it.
                    if self.handed_upto.is_some_and(|h| seq <= h) {
                        if let Some(r) = m.reply.filter(|r| !r.is_empty()) {
                            self.book.handed_on(r);
                        }
                    }
                    continue;
                }
                self.handed_max = Some(seq);
            }
            self.linger.arrived(1, now);
            let p = &mut self.pending;
            p.first_at.get_or_insert(now);
            let start = p.buf.len();
            p.buf.extend_from_slice(&m.payload);
            if !matches!(self.cfg.format, FormatSpec::MsgPack) && !m.payload.ends_with(b"\n") {
                p.buf.push(b'\n');
            }
            p.ranges.push(start..p.buf.len());
            p.subjects.push(m.subject);
            p.headers.push(m.headers);
            p.seqs.push(m.seq);
            p.replies.push(m.reply.unwrap_or_else(|| "".into()));
        }
    }

    fn cut(&mut self, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let p = std::mem::take(&mut self.pending);
        if let Some(m) = p.seqs.iter().flatten().max() {
            self.handed_upto = Some(self.handed_upto.map_or(*m, |h| h.max(*m)));
        }
        // A caught-up message has no reply: the durable consumer's redelivery of it is
        // acknowledged instead (it comes as a repeat).
        self.book.handed_all(p.replies.iter().filter(|r| !r.is_empty()));
        if !self.cfg.ack_on_checkpoint {
            self.book.release(self.book.handed, self.book.last.clone());
        }
        StepMetrics::add(&cx.registry.source_bytes, p.buf.len() as u64);
        let schema = self.schema.clone();
        let meta = &self.cfg.meta;
        let seq_col = self.cfg.sequence_column.is_some();
        let (subjects, headers, seqs) = (&p.subjects, &p.headers, &p.seqs);
        let rows = |d: &weir_formats::Decoded| -> Result<RecordBatch> {
            if meta.is_empty() && !seq_col {
                return Ok(d.batch.clone());
            }
            let n = d.batch.num_rows();
            let mut cols: Vec<ArrayRef> = d.batch.columns().to_vec();
            meta.append(
                &mut cols,
                n,
                |r| subjects[d.record_of_row(r)].as_str(),
                |r| headers[d.record_of_row(r)].as_deref(),
            );
            if seq_col {
                cols.push(Arc::new(UInt64Array::from_iter((0..n).map(|r| seqs[d.record_of_row(r)]))));
            }
            Ok(RecordBatch::try_new(schema.clone(), cols)?)
        };
        let origin = format!("nats {}", self.cfg.jetstream.as_ref().map_or("core", |j| j.stream.as_str()));
        decode_records_with(
            self.decoder.as_mut(),
            self.cfg.event_time.as_ref(),
            &p.buf,
            &p.ranges,
            &origin,
            |i| match p.seqs[i] {
                Some(s) => format!("subject {}, stream seq {s}", p.subjects[i]),
                None => format!("subject {}", p.subjects[i]),
            },
            cx,
            rows,
        )
    }

    /// Publishes the acknowledgements due. They queue in the client while it reconnects; one
    /// lost with a connection is made good by the server's redelivery (a repeat, acknowledged).
    async fn send_acks(&mut self) -> Result<()> {
        if self.book.to_send.is_empty() {
            return Ok(());
        }
        let Some(client) = &self.client else { return Ok(()) };
        for r in self.book.to_send.drain(..) {
            client
                .publish(r, Bytes::new())
                .await
                .map_err(|e| CoreError::Internal(format!("nats: cannot queue an acknowledgement: {e}")))?;
        }
        // Bounded: while the server is away the acknowledgements wait in the client.
        let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for NatsSource {
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
            match inbox.next(cx, &self.linger, n, first_at, self.cfg.end_when_idle, "NATS").await? {
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
                Next::Got(Incoming::Messages(m)) => self.take(m),
                Next::Got(Incoming::Connected(client, acks)) => {
                    self.client = Some(client);
                    if self.book.acks != acks && self.book.handed == self.book.released {
                        self.book.acks = acks;
                    }
                }
                Next::Got(Incoming::Failed(e)) => return Err(e),
            }
        }
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        // What is pending is not handed on: the checkpoint covers up to the last cut.
        let (streams, seqs): (Vec<String>, Vec<u64>) = match (&self.cfg.jetstream, self.handed_upto) {
            (Some(js), Some(s)) => (vec![js.stream.clone()], vec![s]),
            _ => (vec![], vec![]),
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("stream", DataType::Utf8, false),
            Field::new("seq", DataType::UInt64, false),
        ]));
        Ok(Some(RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(streams)), Arc::new(UInt64Array::from(seqs))],
        )?))
    }

    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<RecordBatch>> {
        self.book.mark(epoch);
        self.snapshot()
    }

    async fn checkpoint_complete(&mut self, epoch: Epoch) -> Result<()> {
        self.book.complete(epoch);
        self.send_acks().await
    }

    fn restore(&mut self, tables: &[RecordBatch]) -> Result<()> {
        let Some(js) = &self.cfg.jetstream else { return Ok(()) };
        for t in tables {
            let streams = t.column_by_name("stream").and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
            let seqs = t.column_by_name("seq").and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
            let (Some(streams), Some(seqs)) = (streams, seqs) else {
                return Err(CoreError::Internal("nats positions lack `stream` or `seq`".into()));
            };
            for r in 0..t.num_rows() {
                if streams.value(r) == js.stream {
                    let s = seqs.value(r);
                    self.restored = Some(self.restored.map_or(s, |x| x.max(s)));
                }
            }
        }
        self.handed_max = self.restored;
        self.handed_upto = self.restored;
        Ok(())
    }
}

/// The stream sequence in a JetStream message's `$JS.ACK.` reply subject, which is all the
/// source needs of it: the client's full parse (timestamps, names) was a tenth of the source's
/// time. Both layouts of ADR-15: 7 tokens after the prefix (stream, consumer, delivered,
/// stream sequence, consumer sequence, time, pending) or 9 and more (domain and account hash
/// first).
fn stream_sequence(reply: &str) -> Option<u64> {
    let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
    // Where each of the first ten tokens starts, and how many tokens there are.
    let mut starts = [0usize; 10];
    let mut n = 1;
    for (i, b) in rest.iter().enumerate() {
        if *b == b'.' {
            if n < starts.len() {
                starts[n] = i + 1;
            }
            n += 1;
        }
    }
    let at = match n {
        7 => 3,
        n if n >= 9 => 5,
        _ => return None,
    };
    let digits = &rest[starts[at]..starts[at + 1] - 1];
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |v, d| {
        if d.is_ascii_digit() {
            v.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Publishes `messages` (subject, payload) to the NATS server at `url`, at `rate` messages a
/// second when given; with `jetstream`, each is confirmed by the stream that stores it, and
/// the call returns once all are. For `weir gen --nats`, benchmarks and tests.
///
/// # Errors
/// The server cannot be reached, or refuses a message (no stream for its subject).
pub async fn publish(url: &str, messages: Vec<(String, Vec<u8>)>, jetstream: bool, rate: Option<f64>) -> Result<u64> {
    let err = |e: &dyn std::fmt::Display| {
        CoreError::Internal(format!("nats publish to {}: {e}", crate::redis_streams::redact_url(url)))
    };
    let client = async_nats::connect(url).await.map_err(|e| err(&e))?;
    let js = jetstream::new(client.clone());
    let started = Instant::now();
    let total = messages.len() as u64;
    let mut acks = Vec::new();
    for (i, (subject, payload)) in messages.into_iter().enumerate() {
        if jetstream {
            acks.push(js.publish(subject, payload.into()).await.map_err(|e| err(&e))?);
            // The client refuses more than a few thousand confirmations in flight.
            if acks.len() >= 2000 {
                for a in acks.drain(..) {
                    a.await.map_err(|e| err(&e))?;
                }
            }
        } else {
            client.publish(subject, payload.into()).await.map_err(|e| err(&e))?;
        }
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            tokio::time::sleep_until((started + Duration::from_secs_f64((i + 1) as f64 / r)).into()).await;
        }
    }
    for a in acks {
        a.await.map_err(|e| err(&e))?;
    }
    client.flush().await.map_err(|e| err(&e))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_sequence_is_read_from_both_reply_layouts() {
        assert_eq!(stream_sequence("$JS.ACK.SENSORS.weir.1.4711.12.1796000000000000000.3"), Some(4711));
        assert_eq!(stream_sequence("$JS.ACK._.ACCHASH.SENSORS.weir.2.99.12.1796000000000000000.0"), Some(99));
        assert_eq!(
            stream_sequence("$JS.ACK.hub.ACCHASH.SENSORS.weir.2.99.12.1796000000000000000.0.tok.more"),
            Some(99)
        );
        assert_eq!(stream_sequence("$JS.ACK.SENSORS.weir.1"), None);
        assert_eq!(stream_sequence("_INBOX.x"), None);
        assert_eq!(stream_sequence("$JS.ACK.S.c.1.x.1.2.3"), None);
    }

    #[test]
    fn subjects_follow_the_protocol() {
        for ok in ["a", "a.b", "a.*.c", "a.>", ">", "*"] {
            check_subject(ok).unwrap();
        }
        for bad in ["", "a..b", "a.>.c", "a.b*", "a b", ".a"] {
            assert!(check_subject(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn acknowledgements_wait_for_the_checkpoint_of_their_barrier() {
        let mut b = Book { acks: Acks::All, ..Book::default() };
        b.handed_on("r1".into());
        b.handed_on("r2".into());
        b.mark(Epoch(1));
        b.handed_on("r3".into());
        b.mark(Epoch(2));
        assert!(b.to_send.is_empty());
        b.complete(Epoch(1));
        assert_eq!(b.to_send, vec![async_nats::Subject::from("r2")]);
        b.to_send.clear();
        b.complete(Epoch(2));
        assert_eq!(b.to_send, vec![async_nats::Subject::from("r3")]);
        // Many at once: with AckAll only the newest reply is kept, and all are counted.
        let mut m = Book { acks: Acks::All, ..Book::default() };
        let replies: Vec<async_nats::Subject> = vec!["a".into(), "b".into(), "c".into()];
        m.handed_all(replies.iter());
        m.mark(Epoch(1));
        m.complete(Epoch(1));
        assert_eq!((m.handed, m.to_send.clone()), (3, vec![async_nats::Subject::from("c")]));
        let mut e = Book { acks: Acks::Explicit, ..Book::default() };
        e.handed_on("r1".into());
        e.handed_on("r2".into());
        e.mark(Epoch(1));
        e.handed_on("r3".into());
        e.complete(Epoch(1));
        assert_eq!(e.to_send.len(), 2);
    }
}
