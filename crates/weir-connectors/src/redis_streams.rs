//! Redis Streams as a source: a consumer group (`XREADGROUP`, `XACK` after the checkpoint,
//! `XAUTOCLAIM` of a dead consumer's pending entries), or plain `XREAD` from stored ids.
//!
//! A connection task reads and hands entries to the source over a bounded channel, so a poll
//! the runtime drops never drops a reply that moved entries into the group's pending list.
//!
//! Guarantees with a group and checkpoints: an entry is acknowledged only once the checkpoint
//! covering it has completed. Entries handed on and not acknowledged are recorded in the
//! checkpoint by id; after a crash the consumer reads its pending entries again first, and
//! those the checkpoint covers are acknowledged, not processed. Stream ids are unique, so
//! nothing is mistaken. Without a group, the last id handed on per stream is the position in
//! the checkpoint, and a restarted run reads on from there.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use redis::Value;
use tokio::sync::mpsc;
use weir_core::checkpoint::Epoch;
use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::linger::Linger;
use weir_core::metrics::{Registry, StepMetrics};
use weir_core::task::SpawnedTask;
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{Decoder, FormatSpec};

use crate::decode::decode_records_with;
use crate::reconnect::Reconnect;

/// Where a stream without a stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisStart {
    /// From the first entry the stream holds.
    Earliest,
    /// From entries added after the source (or the group) starts.
    Latest,
}

/// Settings of a Redis Streams source.
#[derive(Clone)]
pub struct RedisStreamsConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS).
    pub url: String,
    /// Stream keys.
    pub streams: Vec<String>,
    /// Consumer group; `None` reads with plain `XREAD` from stored ids.
    pub group: Option<String>,
    /// The consumer name; each worker appends `-<worker>`. Keep it stable across restarts: a
    /// consumer's pending entries are read again under its name.
    pub consumer: String,
    /// Where a stream (or a group created now) starts.
    pub start: RedisStart,
    /// The entry field holding the payload. `None`: an entry's only field is its payload, and
    /// an entry of several fields is read as one JSON object of them (each value as JSON when
    /// it parses as JSON, else as text), so `XADD s * device_id d1 ts 17 temp 21.5` works too.
    pub field: Option<String>,
    /// Payload format.
    pub format: FormatSpec,
    /// Schema of the decoded payload.
    pub payload_schema: SchemaRef,
    /// A column to hold each entry's id.
    pub id_column: Option<String>,
    /// A column to hold each entry's stream key.
    pub stream_column: Option<String>,
    /// Event time.
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most (also the `COUNT` of each read).
    pub batch_size: usize,
    /// Longest a partial batch waits.
    pub max_linger: Duration,
    /// Group: claim pending entries of other consumers idle for this long (a consumer that
    /// died); `None` never claims.
    pub claim_after: Option<Duration>,
    /// End after this long without an entry (backfills and tests); `None` runs until stopped.
    pub end_when_idle: Option<Duration>,
    /// Acknowledge only when a checkpoint covering the entries completes (set when the
    /// pipeline has checkpoints); otherwise as soon as their batch is handed on.
    pub ack_on_checkpoint: bool,
}

impl std::fmt::Debug for RedisStreamsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsConfig")
            .field("url", &redact_url(&self.url))
            .field("streams", &self.streams)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// The URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A stream entry id, `<ms>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-')?;
        Some(Self(a.parse().ok()?, b.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Builds the Redis Streams source.
#[derive(Debug)]
pub struct RedisStreamsFactory {
    cfg: Arc<RedisStreamsConfig>,
    schema: SchemaRef,
    client: redis::Client,
}

impl RedisStreamsFactory {
    /// Checks the settings; connects on the first poll.
    ///
    /// # Errors
    /// A bad URL, no streams, or a column name clash.
    pub fn new(cfg: RedisStreamsConfig) -> Result<Self> {
        weir_core::ensure_config!(!cfg.streams.is_empty(), "redis_streams: name at least one stream in `streams`");
        weir_core::ensure_config!(!cfg.consumer.is_empty(), "redis_streams: `consumer` is empty");
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            CoreError::Config(format!(
                "redis_streams `url: {}`: {e}; write it like redis://127.0.0.1:6379",
                redact_url(&cfg.url)
            ))
        })?;
        let mut fields: Vec<Field> = cfg.payload_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for name in cfg.id_column.iter().chain(&cfg.stream_column) {
            weir_core::ensure_config!(
                fields.iter().all(|f| f.name() != name),
                "redis_streams: column `{name}` has the name of a payload column; rename it"
            );
            fields.push(Field::new(name, DataType::Utf8, false));
        }
        Ok(Self { schema: Arc::new(Schema::new(fields)), cfg: Arc::new(cfg), client })
    }
}

impl SourceFactory for RedisStreamsFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>> {
        // A group shares every stream between its consumers; without one, each stream is
        // read by one worker.
        let streams: Vec<usize> = match self.cfg.group {
            Some(_) => (0..self.cfg.streams.len()).collect(),
            None => (0..self.cfg.streams.len()).filter(|s| s % workers.max(1) == worker).collect(),
        };
        Ok(Box::new(RedisStreamsSource {
            decoder: self.cfg.format.decoder(self.cfg.payload_schema.clone()).map_err(crate::fmt_err)?,
            consumer: format!("{}-{worker}", self.cfg.consumer),
            adopts: (worker == 0).then_some(workers),
            cfg: self.cfg.clone(),
            schema: self.schema.clone(),
            client: self.client.clone(),
            positions: vec![None; streams.len()],
            conn: None,
            acker: None,
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            pending: streams.iter().map(|_| Pending::default()).collect(),
            pending_ids: HashSet::new(),
            streams,
            book: Book::default(),
            quiet: crate::quiet::Quiet::default(),
            up: Arc::default(),
            idle_since: None,
            ended: false,
        }))
    }

    fn resumable(&self) -> bool {
        true
    }
}

/// One entry as read.
#[derive(Debug)]
struct Entry {
    /// Index into the instance's streams.
    stream: usize,
    id: EntryId,
    /// The payload field's value; `Err` names the fields the entry has instead.
    payload: std::result::Result<Vec<u8>, Vec<String>>,
}

#[derive(Debug)]
enum Incoming {
    Entries(Vec<Entry>),
    Failed(CoreError),
}

#[derive(Debug)]
struct Conn {
    rx: mpsc::Receiver<Incoming>,
    _task: SpawnedTask<()>,
}

/// One stream's entries received and not yet cut into a batch (a batch holds one stream's
/// entries in order, so watermarks stay per stream).
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    ids: Vec<EntryId>,
    first_at: Option<Instant>,
}

/// Group mode: entries handed on and not yet acknowledged, by checkpoint.
#[derive(Debug, Default)]
struct Book {
    unacked: VecDeque<(usize, EntryId)>,
    unacked_ids: HashSet<(usize, EntryId)>,
    handed: u64,
    acked: u64,
    marks: VecDeque<(Epoch, u64)>,
    to_send: Vec<(usize, EntryId)>,
    /// Restored: entries a checkpoint covers that may still be pending (by stream key).
    covered: HashSet<(String, EntryId)>,
}

impl Book {
    fn handed_on(&mut self, e: (usize, EntryId)) {
        self.unacked.push_back(e);
        self.unacked_ids.insert(e);
        self.handed += 1;
    }

    fn release(&mut self, n: u64) {
        while self.acked < n {
            let Some(e) = self.unacked.pop_front() else { break };
            self.to_send.push(e);
            self.acked += 1;
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
}

#[derive(Debug)]
struct RedisStreamsSource {
    cfg: Arc<RedisStreamsConfig>,
    schema: SchemaRef,
    decoder: Box<dyn Decoder>,
    client: redis::Client,
    consumer: String,
    /// Worker 0 of `n` workers: takes over the pending entries of this job's consumers
    /// `-<n>` and above, which this run does not have.
    adopts: Option<usize>,
    /// Indexes into `cfg.streams` this instance reads; its partitions, in this order.
    streams: Vec<usize>,
    /// Without a group: the last id handed on per stream (restored or read).
    positions: Vec<Option<EntryId>>,
    conn: Option<Conn>,
    /// The connection acknowledgements go over (group mode).
    acker: Option<redis::aio::MultiplexedConnection>,
    linger: Linger,
    /// By the instance's stream index.
    pending: Vec<Pending>,
    /// Group mode: the ids in `pending`, to leave out an entry read twice.
    pending_ids: HashSet<(usize, EntryId)>,
    book: Book,
    quiet: crate::quiet::Quiet,
    /// Whether the connection task is connected: quiet counts only then.
    up: Arc<std::sync::atomic::AtomicBool>,
    idle_since: Option<Instant>,
    ended: bool,
}

/// How long a poll waits for an entry before it reports the source waiting.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long one blocking read waits at the server.
const BLOCK: Duration = Duration::from_millis(500);
/// How often the group's lag and pending count are read.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// Reads the connection task may hold for the source before it waits.
const INBOX: usize = 8;

/// The connection task's state.
struct Reader {
    cfg: Arc<RedisStreamsConfig>,
    client: redis::Client,
    consumer: String,
    /// See [`RedisStreamsSource::adopts`].
    adopts: Option<usize>,
    /// Stream keys, by the instance's index.
    keys: Vec<String>,
    /// Without a group: the id to read after, per stream.
    after: Vec<String>,
    /// Group: the highest id sent to the source per stream in this process. After a lost
    /// connection the consumer's pending entries are read again, and those up to here were
    /// sent already: the source may have acknowledged them meanwhile, and would then take
    /// the stale copy for a new entry.
    sent_max: Vec<Option<EntryId>>,
    /// Whether the connection is up (shared with the source).
    up: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Incoming>,
    registry: Arc<Registry>,
}

impl Reader {
    async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(10)));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }

    /// Exports each stream's group lag (entries not yet delivered to the group) and pending
    /// count (delivered, not acknowledged), from `XINFO GROUPS`.
    async fn report_lag(&self, c: &mut redis::aio::MultiplexedConnection, group: &str) -> redis::RedisResult<()> {
        for k in &self.keys {
            let v: Value = redis::cmd("XINFO").arg("GROUPS").arg(k).query_async(c).await?;
            for g in items(&v) {
                let fields = items(g);
                let get = |name: &str| {
                    fields.chunks(2).find(|p| p.first().and_then(bulk) == Some(name.as_bytes())).and_then(|p| p.get(1))
                };
                if get("name").and_then(bulk) != Some(group.as_bytes()) {
                    continue;
                }
                let m = &self.registry.connectors;
                if let Some(Value::Int(p)) = get("pending") {
                    m.set(
                        "weir_redis_stream_pending",
                        "Entries delivered to the group and not yet acknowledged.",
                        &[("stream", k.as_str()), ("group", group)],
                        *p as f64,
                    );
                }
                if let Some(Value::Int(l)) = get("lag") {
                    m.set(
                        "weir_redis_stream_lag",
                        "Entries in the stream not yet delivered to the group.",
                        &[("stream", k.as_str()), ("group", group)],
                        *l as f64,
                    );
                }
            }
        }
        Ok(())
    }

    /// Hands entries to the source; false when it is gone.
    async fn send(&mut self, entries: Vec<Entry>) -> bool {
        if entries.is_empty() {
            return true;
        }
        for e in &entries {
            let m = &mut self.sent_max[e.stream];
            if m.is_none_or(|m| e.id > m) {
                *m = Some(e.id);
            }
        }
        self.tx.send(Incoming::Entries(entries)).await.is_ok()
    }

    /// Creates the group on each stream (and the stream itself) unless it exists.
    async fn create_groups(&self, c: &mut redis::aio::MultiplexedConnection, group: &str) -> redis::RedisResult<()> {
        let from = match self.cfg.start {
            RedisStart::Earliest => "0",
            RedisStart::Latest => "$",
        };
        for k in &self.keys {
            let r: redis::RedisResult<Value> =
                redis::cmd("XGROUP").arg("CREATE").arg(k).arg(group).arg(from).arg("MKSTREAM").query_async(c).await;
            match r {
                Ok(_) => tracing::info!(stream = %k, group, from, "Created the Redis consumer group."),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves the pending entries of this job's consumers that this run does not have (a
    /// previous run had more workers) to this consumer, and removes those consumers. Their
    /// entries were read before the ones still in the stream, so they must be read now, in
    /// id order with this consumer's own: left for `claim_after`, they would come after the
    /// watermark passed them, and windows would close without them.
    async fn adopt_orphans(
        &self,
        c: &mut redis::aio::MultiplexedConnection,
        group: &str,
        workers: usize,
    ) -> redis::RedisResult<()> {
        let prefix = format!("{}-", self.cfg.consumer);
        for k in &self.keys {
            let v: Value = redis::cmd("XINFO").arg("CONSUMERS").arg(k).arg(group).query_async(c).await?;
            let orphans: Vec<String> = items(&v)
                .iter()
                .filter_map(|info| {
                    let fields = items(info);
                    let name = fields.chunks(2).find(|p| p.first().and_then(bulk) == Some(b"name"))?.get(1)?;
                    let name = std::str::from_utf8(bulk(name)?).ok()?;
                    let n: usize = name.strip_prefix(&prefix)?.parse().ok()?;
                    (n >= workers).then(|| name.to_string())
                })
                .collect();
            for name in orphans {
                let mut moved = 0usize;
                loop {
                    let v: Value = redis::cmd("XPENDING")
                        .arg(k)
                        .arg(group)
                        .arg("-")
                        .arg("+")
                        .arg(1000)
                        .arg(&name)
                        .query_async(c)
                        .await?;
                    let ids: Vec<&[u8]> = items(&v).iter().filter_map(|e| items(e).first().and_then(bulk)).collect();
                    if ids.is_empty() {
                        break;
                    }
                    moved += ids.len();
                    let mut claim = redis::cmd("XCLAIM");
                    claim.arg(k).arg(group).arg(&self.consumer).arg(0).arg(&ids).arg("JUSTID");
                    let claimed: Value = claim.query_async(c).await?;
                    if items(&claimed).is_empty() {
                        // Nothing moved (entries deleted meanwhile): do not ask again forever.
                        break;
                    }
                }
                let _: Value =
                    redis::cmd("XGROUP").arg("DELCONSUMER").arg(k).arg(group).arg(&name).query_async(c).await?;
                if moved > 0 {
                    tracing::info!(stream = %k, from = %name, to = %self.consumer, entries = moved, "Took over the pending entries of a consumer this run has no worker for.");
                }
            }
        }
        Ok(())
    }

    /// Reads until the source goes away: in a group, first this consumer's own pending
    /// entries (delivered before a crash or a lost connection), then new ones, claiming
    /// those of dead consumers now and then.
    async fn run(mut self) {
        let server = redact_url(&self.cfg.url);
        let mut retry = Reconnect::new(
            "Redis",
            "weir_redis_reconnects_total",
            "Times the Redis Streams source lost or could not open its connection and tried again.",
            &server,
            self.registry.clone(),
        )
        .telling(self.up.clone());
        loop {
            let r = self.session(&mut retry).await;
            let e = match r {
                Ok(()) => return,
                Err(e) => e,
            };
            if e.kind() == redis::ErrorKind::AuthenticationFailed {
                let msg = format!("redis_streams: the server at {server} refused the credentials: {e}");
                let _ = self.tx.send(Incoming::Failed(CoreError::Config(msg))).await;
                return;
            }
            if e.code() == Some("WRONGTYPE") {
                let msg = format!("redis_streams: a key of {:?} is not a stream: {e}", self.keys);
                let _ = self.tx.send(Incoming::Failed(CoreError::Config(msg))).await;
                return;
            }
            retry.failed(e.to_string()).await;
        }
    }

    /// One connection's life; `Ok` when the source is gone.
    async fn session(&mut self, retry: &mut Reconnect) -> redis::RedisResult<()> {
        let mut c = self.connect().await?;
        retry.connected();
        let count = self.cfg.batch_size.max(1);
        let Some(group) = self.cfg.group.clone() else {
            loop {
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT").arg(count).arg("BLOCK").arg(BLOCK.as_millis() as u64).arg("STREAMS");
                cmd.arg(&self.keys).arg(&self.after);
                let v: Value = cmd.query_async(&mut c).await?;
                let entries = parse_read(&v, &self.keys, self.cfg.field.as_deref());
                for e in &entries {
                    self.after[e.stream] = e.id.to_string();
                }
                if !entries.is_empty() && self.tx.send(Incoming::Entries(entries)).await.is_err() {
                    return Ok(());
                }
            }
        };
        self.create_groups(&mut c, &group).await?;
        if let Some(workers) = self.adopts {
            self.adopt_orphans(&mut c, &group, workers).await?;
        }
        // Own pending entries first: from id 0 on, until a read returns none for a stream.
        let mut own: Vec<Option<String>> = vec![Some("0".into()); self.keys.len()];
        let mut last_claim = Instant::now();
        let mut last_lag: Option<Instant> = None;
        let mut cursors: Vec<String> = vec!["0-0".into(); self.keys.len()];
        loop {
            if last_lag.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
                last_lag = Some(Instant::now());
                self.report_lag(&mut c, &group).await?;
            }
            let reading_own = own.iter().any(Option::is_some);
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(&group).arg(&self.consumer).arg("COUNT").arg(count);
            if !reading_own {
                cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(&self.keys);
            for o in &own {
                cmd.arg(o.as_deref().unwrap_or(">"));
            }
            let v: Value = cmd.query_async(&mut c).await?;
            let mut entries = parse_read(&v, &self.keys, self.cfg.field.as_deref());
            if reading_own {
                for (s, o) in own.iter_mut().enumerate() {
                    if o.is_none() {
                        continue;
                    }
                    match entries.iter().filter(|e| e.stream == s).map(|e| e.id).max() {
                        Some(id) => *o = Some(id.to_string()),
                        None => *o = None,
                    }
                }
                entries.retain(|e| self.sent_max[e.stream].is_none_or(|m| e.id > m));
            }
            if !self.send(entries).await {
                return Ok(());
            }
            if let Some(after) = self.cfg.claim_after {
                if !reading_own && last_claim.elapsed() >= (after / 2).max(Duration::from_millis(100)) {
                    last_claim = Instant::now();
                    for (s, cursor) in cursors.iter_mut().enumerate() {
                        let v: Value = redis::cmd("XAUTOCLAIM")
                            .arg(&self.keys[s])
                            .arg(&group)
                            .arg(&self.consumer)
                            .arg(after.as_millis() as u64)
                            .arg(&*cursor)
                            .arg("COUNT")
                            .arg(count)
                            .query_async(&mut c)
                            .await?;
                        let (next, claimed) = parse_autoclaim(&v, s, self.cfg.field.as_deref());
                        *cursor = next;
                        if !claimed.is_empty() {
                            tracing::info!(stream = %self.keys[s], entries = claimed.len(), "Claimed pending entries of a consumer idle too long.");
                            if !self.send(claimed).await {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Entries of an `[id, [field, value, ...]]` list; entries deleted from the stream (nil
/// fields) are skipped.
fn parse_entries(list: &Value, stream: usize, out: &mut Vec<Entry>, field: Option<&str>) {
    for e in items(list) {
        let parts = items(e);
        let Some(id) = parts.first().and_then(bulk).and_then(|b| std::str::from_utf8(b).ok()).and_then(EntryId::parse)
        else {
            continue;
        };
        let Some(kv) = parts.get(1).filter(|v| !matches!(v, Value::Nil)) else { continue };
        let pairs: Vec<(&[u8], &[u8])> =
            items(kv).chunks(2).filter_map(|p| Some((p.first().and_then(bulk)?, p.get(1).and_then(bulk)?))).collect();
        let payload =
            match field {
                Some(f) => pairs.iter().find(|(k, _)| *k == f.as_bytes()).map(|(_, v)| v.to_vec()).ok_or_else(|| {
                    pairs.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>()
                }),
                None if pairs.len() == 1 => Ok(pairs[0].1.to_vec()),
                None => Ok(fields_as_json(&pairs)),
            };
        out.push(Entry { stream, id, payload });
    }
}

/// An entry's fields as one JSON object: a value that parses as JSON is taken as such (numbers,
/// objects), anything else as a string.
fn fields_as_json(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    for (k, v) in pairs {
        let value = serde_json::from_slice::<serde_json::Value>(v)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()));
        m.insert(String::from_utf8_lossy(k).into_owned(), value);
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

/// An `XREAD`/`XREADGROUP` reply: `[[key, entries], ...]` (RESP2) or a map (RESP3).
fn parse_read(v: &Value, keys: &[String], field: Option<&str>) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut one = |k: &Value, list: &Value| {
        let Some(k) = bulk(k) else { return };
        if let Some(s) = keys.iter().position(|x| x.as_bytes() == k) {
            parse_entries(list, s, &mut out, field);
        }
    };
    match v {
        Value::Map(m) => m.iter().for_each(|(k, l)| one(k, l)),
        _ => {
            for pair in items(v) {
                let p = items(pair);
                if let (Some(k), Some(l)) = (p.first(), p.get(1)) {
                    one(k, l);
                }
            }
        }
    }
    out
}

/// An `XAUTOCLAIM` reply: `[next-cursor, entries, deleted-ids]`.
fn parse_autoclaim(v: &Value, stream: usize, field: Option<&str>) -> (String, Vec<Entry>) {
    let p = items(v);
    let next =
        p.first().and_then(bulk).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_else(|| "0-0".into());
    let mut out = Vec::new();
    if let Some(l) = p.get(1) {
        parse_entries(l, stream, &mut out, field);
    }
    (next, out)
}

impl RedisStreamsSource {
    fn keys(&self) -> Vec<String> {
        self.streams.iter().map(|s| self.cfg.streams[*s].clone()).collect()
    }

    fn connect(&mut self, cx: &SourceContext) {
        if self.conn.is_some() || self.streams.is_empty() {
            return;
        }
        let (tx, rx) = mpsc::channel(INBOX);
        let start = match self.cfg.start {
            RedisStart::Earliest => "0-0".to_string(),
            RedisStart::Latest => "$".to_string(),
        };
        let reader = Reader {
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            consumer: self.consumer.clone(),
            adopts: self.adopts,
            keys: self.keys(),
            after: self.positions.iter().map(|p| p.map_or_else(|| start.clone(), |id| id.to_string())).collect(),
            sent_max: vec![None; self.streams.len()],
            up: self.up.clone(),
            tx,
            registry: cx.registry.clone(),
        };
        let task = SpawnedTask::spawn(reader.run());
        tracing::info!(server = %redact_url(&self.cfg.url), consumer = %self.consumer, streams = ?self.keys(), group = ?self.cfg.group, "Redis Streams source connecting.");
        self.conn = Some(Conn { rx, _task: task });
    }

    /// Takes entries in, leaving out those already handed on (read again after a lost
    /// connection) and acknowledging those a restored checkpoint covers.
    fn take(&mut self, entries: Vec<Entry>, cx: &SourceContext) -> Result<()> {
        self.quiet.reset();
        let now = Instant::now();
        let mut letters = Vec::new();
        for e in entries {
            let key = (e.stream, e.id);
            if self.cfg.group.is_some() {
                if self.book.unacked_ids.contains(&key) || self.pending_ids.contains(&key) {
                    continue;
                }
                if self.book.covered.remove(&(self.cfg.streams[self.streams[e.stream]].clone(), e.id)) {
                    self.book.to_send.push(key);
                    continue;
                }
            }
            match e.payload {
                Ok(p) => {
                    self.linger.arrived(1, now);
                    let line = !matches!(self.cfg.format, FormatSpec::MsgPack);
                    let pend = &mut self.pending[e.stream];
                    pend.first_at.get_or_insert(now);
                    let start = pend.buf.len();
                    pend.buf.extend_from_slice(&p);
                    if line && !p.ends_with(b"\n") {
                        pend.buf.push(b'\n');
                    }
                    pend.ranges.push(start..pend.buf.len());
                    pend.ids.push(e.id);
                    if self.cfg.group.is_some() {
                        self.pending_ids.insert(key);
                    }
                }
                Err(names) => {
                    // No payload to decode: dead-lettered here, and acknowledged with the rest.
                    cx.count_records(1);
                    letters.push(DeadLetter {
                        payload: Payload::Raw(Vec::new()),
                        kind: ErrorKind::Decode,
                        reason: format!(
                            "the entry has no field `{}` (it has: {})",
                            self.cfg.field.as_deref().unwrap_or_default(),
                            names.join(", ")
                        ),
                        step: cx.step.clone(),
                        origin: format!("redis {}", self.cfg.streams[self.streams[e.stream]]),
                        position: Some(format!("id {}", e.id)),
                        time_ms: now_ms(),
                        attempts: 1,
                        first_failure_ms: None,
                    });
                    self.hand_on(key);
                }
            }
        }
        if !letters.is_empty() {
            StepMetrics::add(&cx.metrics.dead_lettered, letters.len() as u64);
            cx.dead_letters.write(letters)?;
        }
        Ok(())
    }

    fn hand_on(&mut self, key: (usize, EntryId)) {
        if self.cfg.group.is_some() {
            self.book.handed_on(key);
        }
        let p = &mut self.positions[key.0];
        if p.is_none_or(|p| key.1 > p) {
            *p = Some(key.1);
        }
    }

    fn cut(&mut self, stream: usize, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let p = std::mem::take(&mut self.pending[stream]);
        for id in &p.ids {
            self.pending_ids.remove(&(stream, *id));
            self.hand_on((stream, *id));
        }
        if !self.cfg.ack_on_checkpoint {
            self.book.release(self.book.handed);
        }
        StepMetrics::add(&cx.registry.source_bytes, p.buf.len() as u64);
        let schema = self.schema.clone();
        let (id_col, stream_col) = (self.cfg.id_column.is_some(), self.cfg.stream_column.is_some());
        let key = self.cfg.streams[self.streams[stream]].as_str();
        let ids = &p.ids;
        let rows = |d: &weir_formats::Decoded| -> Result<RecordBatch> {
            if !id_col && !stream_col {
                return Ok(d.batch.clone());
            }
            let n = d.batch.num_rows();
            let mut cols: Vec<ArrayRef> = d.batch.columns().to_vec();
            if id_col {
                cols.push(Arc::new(StringArray::from_iter_values((0..n).map(|r| ids[d.record_of_row(r)].to_string()))));
            }
            if stream_col {
                cols.push(Arc::new(StringArray::from_iter_values((0..n).map(|_| key))));
            }
            Ok(RecordBatch::try_new(schema.clone(), cols)?)
        };
        decode_records_with(
            self.decoder.as_mut(),
            self.cfg.event_time.as_ref(),
            &p.buf,
            &p.ranges,
            &format!("redis {key}"),
            |i| format!("id {}", ids[i]),
            cx,
            rows,
        )
    }

    async fn send_acks(&mut self) -> Result<()> {
        let Some(group) = self.cfg.group.clone() else {
            self.book.to_send.clear();
            return Ok(());
        };
        if self.book.to_send.is_empty() {
            return Ok(());
        }
        if self.acker.is_none() {
            match self.client.get_multiplexed_async_connection().await {
                Ok(c) => self.acker = Some(c),
                // Kept for the next try: the entries stay pending at the server meanwhile.
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot connect to acknowledge Redis entries; trying again later.");
                    return Ok(());
                }
            }
        }
        let Some(c) = self.acker.as_mut() else { return Ok(()) };
        let mut by_stream: Vec<Vec<String>> = vec![Vec::new(); self.streams.len()];
        for (s, id) in &self.book.to_send {
            by_stream[*s].push(id.to_string());
        }
        for (s, ids) in by_stream.iter().enumerate() {
            for chunk in ids.chunks(1000) {
                let r: redis::RedisResult<i64> = redis::cmd("XACK")
                    .arg(&self.cfg.streams[self.streams[s]])
                    .arg(&group)
                    .arg(chunk)
                    .query_async(c)
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "Acknowledging Redis entries failed; trying again later.");
                    self.acker = None;
                    return Ok(());
                }
            }
        }
        for e in self.book.to_send.drain(..) {
            self.book.unacked_ids.remove(&e);
        }
        Ok(())
    }

    /// The checkpoint's record: in a group, the entries handed on and not acknowledged
    /// (with restored ones not seen again); without, the last id handed on per stream.
    fn positions(&self) -> Result<RecordBatch> {
        let mut streams: Vec<String> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        let key = |s: usize| self.cfg.streams[self.streams[s]].clone();
        if self.cfg.group.is_some() {
            for (s, id) in self.book.unacked.iter().chain(&self.book.to_send) {
                streams.push(key(*s));
                ids.push(id.to_string());
            }
            for (k, id) in &self.book.covered {
                streams.push(k.clone());
                ids.push(id.to_string());
            }
        } else {
            for (s, p) in self.positions.iter().enumerate() {
                if let Some(id) = p {
                    streams.push(key(s));
                    ids.push(id.to_string());
                }
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("stream", DataType::Utf8, false),
            Field::new("id", DataType::Utf8, false),
        ]));
        Ok(RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(streams)), Arc::new(StringArray::from(ids))])?)
    }
}

#[async_trait::async_trait]
impl Source for RedisStreamsSource {
    fn partitions(&self) -> usize {
        self.streams.len()
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        if self.ended || self.streams.is_empty() {
            return Ok(SourcePoll::End);
        }
        self.send_acks().await?;
        self.connect(cx);
        let mut stop = cx.shutdown.clone();
        loop {
            let now = Instant::now();
            let stopping = cx.stopping();
            let due = self.pending.iter().position(|p| {
                !p.ranges.is_empty()
                    && (stopping || p.first_at.is_some_and(|f| self.linger.should_cut(p.ranges.len(), f, now)))
            });
            if let Some(i) = due {
                if let Some(batch) = self.cut(i, cx)? {
                    return Ok(SourcePoll::Rows { partition: i, batch });
                }
                continue;
            }
            let n: usize = self.pending.iter().map(|p| p.ranges.len()).sum();
            if cx.stopping() {
                return Ok(SourcePoll::End);
            }
            if let Some(idle) = self.cfg.end_when_idle {
                if n == 0 && self.quiet.lasted_while(self.up.load(std::sync::atomic::Ordering::Relaxed), now, idle) {
                    tracing::info!(
                        idle_ms = idle.as_millis() as u64,
                        "Redis Streams source ends: nothing arrived for `end_when_idle`."
                    );
                    self.ended = true;
                    return Ok(SourcePoll::End);
                }
            }
            let wait = self
                .pending
                .iter()
                .filter_map(|p| {
                    p.first_at.map(|f| (f + self.linger.linger(p.ranges.len())).saturating_duration_since(now))
                })
                .min()
                .unwrap_or_else(|| IDLE_POLL.saturating_sub(now - *self.idle_since.get_or_insert(now)));
            let Some(conn) = self.conn.as_mut() else { return Ok(SourcePoll::End) };
            let got = tokio::select! {
                m = conn.rx.recv() => m,
                () = tokio::time::sleep(wait) => {
                    if n == 0 {
                        self.idle_since = None;
                        return Ok(SourcePoll::Waiting);
                    }
                    continue;
                }
                _ = stop.changed() => continue,
            };
            match got {
                Some(Incoming::Entries(e)) => {
                    self.idle_since = None;
                    self.take(e, cx)?;
                }
                Some(Incoming::Failed(e)) => return Err(e),
                None => return Err(CoreError::Internal("redis_streams: the connection task stopped".into())),
            }
        }
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        Ok(Some(self.positions()?))
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
            let col = |name: &str| {
                t.column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
                    .ok_or_else(|| CoreError::Internal(format!("redis_streams positions lack `{name}`")))
            };
            let (streams, ids) = (col("stream")?, col("id")?);
            for r in 0..t.num_rows() {
                let Some(id) = EntryId::parse(ids.value(r)) else { continue };
                let key = streams.value(r);
                if self.cfg.group.is_some() {
                    // Ids are unique in a stream: any instance's covered entry may be claimed here.
                    self.book.covered.insert((key.to_string(), id));
                } else if let Some(s) = self.streams.iter().position(|s| self.cfg.streams[*s] == key) {
                    if self.positions[s].is_none_or(|p| id > p) {
                        self.positions[s] = Some(id);
                    }
                }
            }
        }
        Ok(())
    }
}
