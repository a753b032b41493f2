//! MQTT 5 and 3.1.1 subscriptions as a source.
//!
//! One client per worker (`<client_id>-<worker>`). Without a shared subscription
//! (`$share/<group>/<filter>`) only worker 0 subscribes, since every subscriber of a plain
//! filter gets every message; with one, every worker subscribes and the broker splits the
//! messages between them, and between processes using the same group.
//!
//! Guarantees with QoS 1 and checkpoints: a message is acknowledged (PUBACK) only once the
//! checkpoint covering it has completed, so a crash or a lost connection makes the broker send
//! it again; with `clean_session: false` and a stable client id the broker also keeps what is
//! published while Weir is down. Messages handed out but not yet acknowledged are recorded in
//! the checkpoint by packet id and a digest of topic and payload; when the broker sends one of
//! them again after a restart (flagged as a duplicate), it is acknowledged and not processed a
//! second time. Packet ids are 16-bit and reused once acknowledged, so the digest tells a
//! re-sent message from a new one under a reused id. With QoS 0 the broker never re-sends:
//! what is in flight at a crash is lost (at most once).
//!
//! Acknowledging per checkpoint keeps up to a checkpoint interval of messages in flight. An
//! MQTT 5 client tells the broker how many it takes (receive maximum, 65535 here); with 3.1.1
//! the broker's own limit applies (Mosquitto's `max_inflight_messages`, 20 by default), which
//! then bounds the rate to that many messages per checkpoint interval. Hence MQTT 5 is the
//! default.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::sync::mpsc;
use weir_core::checkpoint::Epoch;
use weir_core::linger::Linger;
use weir_core::task::SpawnedTask;
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{Decoder, FormatSpec};

use crate::decode::decode_records_with;
use crate::reconnect::Reconnect;
use crate::topic::MetaColumns;

/// Settings of an MQTT source.
#[derive(Clone)]
pub struct MqttSourceConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS, default 8883, the
    /// system's root certificates).
    pub url: String,
    /// Topic filters (`+` one level, `#` the rest); `$share/<group>/<filter>` splits the
    /// messages between the workers and processes of the group.
    pub topics: Vec<String>,
    /// 0 (at most once) or 1 (at least once; acknowledged after the checkpoint).
    pub qos: u8,
    /// The client id; each worker appends `-<worker>`. Keep it stable across restarts for a
    /// persistent session.
    pub client_id: String,
    /// Start without the broker's stored session (subscriptions and queued messages).
    pub clean_session: bool,
    /// The protocol version.
    pub protocol: MqttProtocol,
    /// MQTT 5: how long the broker keeps the session (and queues QoS 1 messages) after the
    /// client disconnects, unless `clean_session`.
    pub session_expiry: Duration,
    /// User name, when the broker asks for one.
    pub username: Option<String>,
    /// Password (never logged).
    pub password: Option<String>,
    /// Payload format.
    pub format: FormatSpec,
    /// Schema of the decoded payload.
    pub payload_schema: SchemaRef,
    /// Columns of each message's topic, of fields from its levels
    /// (`sensors/{site}/{device_id}/telemetry`), and (MQTT 5) of its user properties as a JSON
    /// object text (null without any; of a key given twice, the last value).
    pub meta: MetaColumns,
    /// Event time.
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest a partial batch waits.
    pub max_linger: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Largest message accepted, in bytes.
    pub max_packet_size: usize,
    /// End after this long without a message (backfills and tests); `None` runs until stopped.
    pub end_when_idle: Option<Duration>,
    /// Acknowledge QoS 1 messages only when a checkpoint covering them completes (set when
    /// the pipeline has checkpoints); otherwise as soon as their batch is handed on.
    pub ack_on_checkpoint: bool,
}

impl std::fmt::Debug for MqttSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSourceConfig")
            .field("url", &self.url)
            .field("topics", &self.topics)
            .field("qos", &self.qos)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The MQTT protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// Builds the MQTT source.
#[derive(Debug)]
pub struct MqttSourceFactory {
    cfg: Arc<MqttSourceConfig>,
    schema: SchemaRef,
    endpoint: Endpoint,
}

impl MqttSourceFactory {
    /// Checks the settings; connects on the first poll.
    ///
    /// # Errors
    /// A bad URL, QoS or topic filter, or a column name clash.
    pub fn new(cfg: MqttSourceConfig) -> Result<Self> {
        weir_core::ensure_config!(cfg.qos <= 1, "mqtt `qos: {}`: Weir reads with QoS 0 or 1", cfg.qos);
        weir_core::ensure_config!(!cfg.topics.is_empty(), "mqtt: name at least one topic filter in `topics`");
        for t in &cfg.topics {
            check_filter(t)?;
        }
        weir_core::ensure_config!(!cfg.client_id.is_empty(), "mqtt: `client_id` is empty");
        let endpoint = Endpoint::parse(&cfg.url)?;
        let mut fields: Vec<Field> = cfg.payload_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        cfg.meta.extend_schema(&mut fields, "mqtt")?;
        weir_core::ensure_config!(
            cfg.meta.headers.is_none() || cfg.protocol == MqttProtocol::V5,
            "mqtt `properties_column`: user properties are MQTT 5; remove it or use `protocol: 5`"
        );
        Ok(Self { schema: Arc::new(Schema::new(fields)), cfg: Arc::new(cfg), endpoint })
    }

    fn shared(&self) -> bool {
        self.cfg.topics.iter().all(|t| t.starts_with("$share/"))
    }
}

/// A topic filter as MQTT allows it: `+` and `#` alone in their level, `#` last.
fn check_filter(t: &str) -> Result<()> {
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let ok = match *l {
            "#" => i + 1 == levels.len(),
            "+" => true,
            l => !l.contains('+') && !l.contains('#'),
        };
        weir_core::ensure_config!(
            ok && !t.is_empty(),
            "mqtt topic filter `{t}`: `+` and `#` must fill a whole level, and `#` must be last"
        );
    }
    Ok(())
}

/// Where the broker is.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
}

impl Endpoint {
    pub(crate) fn parse(raw: &str) -> Result<Self> {
        let url = url::Url::parse(raw)
            .map_err(|e| CoreError::Config(format!("mqtt `url: {raw}`: {e}; write it like mqtt://127.0.0.1:1883")))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            s => return Err(CoreError::Config(format!("mqtt `url: {raw}`: scheme `{s}` is not mqtt:// or mqtts://"))),
        };
        let host = url.host_str().ok_or_else(|| CoreError::Config(format!("mqtt `url: {raw}`: no host")))?;
        Ok(Self { host: host.to_string(), port: url.port().unwrap_or(if tls { 8883 } else { 1883 }), tls })
    }
}

const ACK_CHANNEL: usize = 4096;
/// How long a poll waits for a message before it reports the source waiting.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Messages the connection task may hold for the source before it waits.
const INBOX: usize = 16 * 1024;

impl SourceFactory for MqttSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Source>> {
        let reads = worker == 0 || self.shared();
        Ok(Box::new(MqttSource {
            decoder: self.cfg.format.decoder(self.cfg.payload_schema.clone()).map_err(crate::fmt_err)?,
            cfg: self.cfg.clone(),
            schema: self.schema.clone(),
            client_id: format!("{}-{worker}", self.cfg.client_id),
            endpoint: reads.then(|| self.endpoint.clone()),
            conn: None,
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            pending: Pending::default(),
            book: AckBook::default(),
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

/// What the connection task hands the source.
#[derive(Debug)]
enum Incoming {
    Message(Message),
    Failed(CoreError),
}

/// A message as either protocol delivers it.
#[derive(Debug)]
struct Message {
    topic: String,
    payload: Bytes,
    pkid: u16,
    /// Sent before (a re-delivery).
    dup: bool,
    /// QoS 1: it needs an acknowledgement.
    qos1: bool,
    /// MQTT 5 user properties as a JSON object text, when it has any.
    properties: Option<String>,
}

/// The client of either protocol, for acknowledgements.
#[derive(Debug, Clone)]
enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues the acknowledgement of packet `pkid`; false when the channel is full.
    fn try_ack(&self, pkid: u16) -> Result<bool> {
        let full = match self {
            Self::V311(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                match c.try_ack(&p) {
                    Ok(()) => false,
                    Err(rumqttc::ClientError::TryRequest(_)) => true,
                    Err(e) => return Err(CoreError::Internal(format!("mqtt: acknowledging: {e}"))),
                }
            }
            Self::V5(c) => {
                let mut p = p5::Publish::new("", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, Vec::new(), None);
                p.pkid = pkid;
                match c.try_ack(&p) {
                    Ok(()) => false,
                    Err(rumqttc::v5::ClientError::TryRequest(_)) => true,
                    Err(e) => return Err(CoreError::Internal(format!("mqtt: acknowledging: {e}"))),
                }
            }
        };
        Ok(!full)
    }
}

#[derive(Debug)]
struct Conn {
    client: Client,
    rx: mpsc::Receiver<Incoming>,
    _task: SpawnedTask<()>,
}

/// Messages received and not yet cut into a batch.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    topics: Vec<String>,
    properties: Vec<Option<String>>,
    ids: Vec<Delivery>,
    first_at: Option<Instant>,
}

/// A QoS 1 message to acknowledge: its packet id, and a digest of topic and payload that tells
/// a re-sent message from a new one under a reused id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delivery {
    pkid: u16,
    digest: u64,
}

/// QoS 1 messages handed on and not yet acknowledged, and the checkpoints they belong to.
#[derive(Debug, Default)]
struct AckBook {
    /// In the order handed on.
    unacked: VecDeque<Delivery>,
    by_id: HashMap<u16, u64>,
    /// Messages handed on in all (the position of the next in `unacked` plus `acked`).
    handed: u64,
    acked: u64,
    /// `handed` at each checkpoint's barrier.
    marks: VecDeque<(Epoch, u64)>,
    /// Restored: messages an earlier run handed on under a checkpoint that completed, and
    /// may not have acknowledged. The broker sends them again; they are acknowledged, not
    /// processed.
    covered: HashMap<u16, u64>,
    /// Acknowledgements the client's channel had no room for yet.
    to_send: VecDeque<Delivery>,
    /// Acknowledged since the last checkpoint: the broker may not have them yet when the
    /// process dies, and would send those messages again.
    sent_recent: Vec<Delivery>,
    /// The last message acknowledged under each packet id, to recognise one the broker sends
    /// again after a reconnect because the acknowledgement did not reach it. At most 65536.
    acked_ids: HashMap<u16, u64>,
}

impl AckBook {
    fn handed_on(&mut self, d: Delivery) {
        self.unacked.push_back(d);
        self.by_id.insert(d.pkid, d.digest);
        self.handed += 1;
    }

    /// Queues the acknowledgement of everything handed on before the barrier of `epoch`.
    fn complete(&mut self, epoch: Epoch) {
        let mut upto = None;
        while self.marks.front().is_some_and(|(e, _)| *e <= epoch) {
            upto = self.marks.pop_front().map(|(_, n)| n);
        }
        if let Some(n) = upto {
            self.release(n);
        }
    }

    /// Queues the acknowledgement of the first `n` messages ever handed on.
    fn release(&mut self, n: u64) {
        while self.acked < n {
            let Some(d) = self.unacked.pop_front() else { break };
            // It stays in `by_id` until the acknowledgement is on its way.
            self.to_send.push_back(d);
            self.acked += 1;
        }
    }
}

/// 64-bit digest of a message's topic and payload.
fn digest(p: &Message) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(p.topic.as_bytes());
    h.update(&[0]);
    h.update(&p.payload);
    h.digest()
}

#[derive(Debug)]
struct MqttSource {
    cfg: Arc<MqttSourceConfig>,
    schema: SchemaRef,
    decoder: Box<dyn Decoder>,
    client_id: String,
    /// `None` for a worker that does not subscribe.
    endpoint: Option<Endpoint>,
    conn: Option<Conn>,
    linger: Linger,
    pending: Pending,
    book: AckBook,
    quiet: crate::quiet::Quiet,
    /// Whether the connection task is connected: quiet counts only then.
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Since when a poll has waited with nothing buffered: kept across polls, which the
    /// runtime drops at every barrier and completed checkpoint.
    idle_since: Option<Instant>,
    ended: bool,
}

fn refused(server: &str, why: &dyn std::fmt::Debug) -> Incoming {
    Incoming::Failed(CoreError::Config(format!(
        "mqtt: the broker at {server} refused the connection: {why:?}; check the credentials and client id"
    )))
}

fn refused_subscription(cfg: &MqttSourceConfig) -> Incoming {
    Incoming::Failed(CoreError::Config(format!(
        "mqtt: the broker at {} refused the subscription to {:?} (its access rules?)",
        cfg.url, cfg.topics
    )))
}

/// Keeps an MQTT 3.1.1 connection: polls the event loop (which reconnects after a failure),
/// subscribes when the broker has no session for the client, hands messages on.
async fn drive_v311(
    mut el: rumqttc::EventLoop,
    client: rumqttc::AsyncClient,
    cfg: Arc<MqttSourceConfig>,
    tx: mpsc::Sender<Incoming>,
    mut retry: Reconnect,
) {
    use rumqttc::{ConnectReturnCode as C, Event, Packet};
    let qos = if cfg.qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
    loop {
        let out = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Some(Incoming::Message(Message {
                qos1: p.qos != rumqttc::QoS::AtMostOnce,
                topic: p.topic,
                payload: p.payload,
                pkid: p.pkid,
                dup: p.dup,
                properties: None,
            })),
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                retry.connected();
                let filters = cfg.topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos));
                match ack.session_present {
                    true => None,
                    false => client
                        .try_subscribe_many(filters)
                        .err()
                        .map(|e| Incoming::Failed(CoreError::Internal(format!("mqtt: cannot subscribe: {e}")))),
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => s
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .then(|| refused_subscription(&cfg)),
            Ok(_) => None,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                code @ (C::BadUserNamePassword | C::NotAuthorized | C::BadClientId | C::RefusedProtocolVersion),
            )) => Some(refused(&cfg.url, &code)),
            Err(e) => {
                retry.failed(e.to_string()).await;
                None
            }
        };
        if let Some(m) = out {
            let last = matches!(m, Incoming::Failed(_));
            if tx.send(m).await.is_err() || last {
                return;
            }
        }
    }
}

/// [`drive_v311`] for MQTT 5.
async fn drive_v5(
    mut el: rumqttc::v5::EventLoop,
    client: rumqttc::v5::AsyncClient,
    cfg: Arc<MqttSourceConfig>,
    tx: mpsc::Sender<Incoming>,
    mut retry: Reconnect,
) {
    use p5::ConnectReturnCode as C;
    use rumqttc::v5::Event;
    let qos =
        if cfg.qos == 0 { rumqttc::v5::mqttbytes::QoS::AtMostOnce } else { rumqttc::v5::mqttbytes::QoS::AtLeastOnce };
    loop {
        let out = match el.poll().await {
            Ok(Event::Incoming(p5::Packet::Publish(p))) => Some(Incoming::Message(Message {
                qos1: p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                properties: p.properties.as_ref().filter(|pp| !pp.user_properties.is_empty()).map(|pp| {
                    let m: serde_json::Map<String, serde_json::Value> = pp
                        .user_properties
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect();
                    serde_json::Value::Object(m).to_string()
                }),
                payload: p.payload,
                pkid: p.pkid,
                dup: p.dup,
            })),
            Ok(Event::Incoming(p5::Packet::ConnAck(ack))) => {
                retry.connected();
                let filters = cfg.topics.iter().map(|t| p5::Filter::new(t.clone(), qos));
                match ack.session_present {
                    true => None,
                    false => client
                        .try_subscribe_many(filters)
                        .err()
                        .map(|e| Incoming::Failed(CoreError::Internal(format!("mqtt: cannot subscribe: {e}")))),
                }
            }
            Ok(Event::Incoming(p5::Packet::SubAck(s))) => s
                .return_codes
                .iter()
                .any(|c| !matches!(c, p5::SubscribeReasonCode::Success(_)))
                .then(|| refused_subscription(&cfg)),
            Ok(_) => None,
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(
                code @ (C::BadUserNamePassword
                | C::NotAuthorized
                | C::ClientIdentifierNotValid
                | C::UnsupportedProtocolVersion
                | C::Banned),
            )) => Some(refused(&cfg.url, &code)),
            Err(e) => {
                retry.failed(e.to_string()).await;
                None
            }
        };
        if let Some(m) = out {
            let last = matches!(m, Incoming::Failed(_));
            if tx.send(m).await.is_err() || last {
                return;
            }
        }
    }
}

impl MqttSource {
    fn connect(&mut self, cx: &SourceContext) -> Option<&mut Conn> {
        if self.conn.is_none() {
            let ep = self.endpoint.clone()?;
            let cfg = self.cfg.clone();
            let (tx, rx) = mpsc::channel(INBOX);
            let retry = Reconnect::new(
                "MQTT",
                "weir_mqtt_reconnects_total",
                "Times the MQTT source lost or could not open its connection and tried again.",
                &cfg.url,
                cx.registry.clone(),
            )
            .telling(self.up.clone());
            let keep_alive = cfg.keep_alive.max(Duration::from_secs(1));
            let (client, task) = match cfg.protocol {
                MqttProtocol::V311 => {
                    let mut o = rumqttc::MqttOptions::new(self.client_id.clone(), ep.host, ep.port);
                    o.set_keep_alive(keep_alive)
                        .set_clean_session(cfg.clean_session)
                        .set_manual_acks(true)
                        .set_max_packet_size(cfg.max_packet_size, cfg.max_packet_size);
                    if let Some(u) = &cfg.username {
                        o.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
                    }
                    if ep.tls {
                        o.set_transport(rumqttc::Transport::tls_with_default_config());
                    }
                    let (client, el) = rumqttc::AsyncClient::new(o, ACK_CHANNEL);
                    let task = SpawnedTask::spawn(drive_v311(el, client.clone(), cfg.clone(), tx, retry));
                    (Client::V311(client), task)
                }
                MqttProtocol::V5 => {
                    let mut o = rumqttc::v5::MqttOptions::new(self.client_id.clone(), ep.host, ep.port);
                    o.set_keep_alive(keep_alive)
                        .set_clean_start(cfg.clean_session)
                        .set_manual_acks(true)
                        .set_max_packet_size(u32::try_from(cfg.max_packet_size).ok())
                        // As many unacknowledged messages as the protocol allows: they wait for
                        // the checkpoint.
                        .set_receive_maximum(Some(u16::MAX));
                    if !cfg.clean_session {
                        o.set_session_expiry_interval(Some(
                            u32::try_from(cfg.session_expiry.as_secs()).unwrap_or(u32::MAX),
                        ));
                    }
                    if let Some(u) = &cfg.username {
                        o.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
                    }
                    if ep.tls {
                        o.set_transport(rumqttc::Transport::tls_with_default_config());
                    }
                    let (client, el) = rumqttc::v5::AsyncClient::new(o, ACK_CHANNEL);
                    let task = SpawnedTask::spawn(drive_v5(el, client.clone(), cfg.clone(), tx, retry));
                    (Client::V5(client), task)
                }
            };
            tracing::info!(server = %self.cfg.url, client = %self.client_id, topics = ?self.cfg.topics, "MQTT source connecting.");
            self.conn = Some(Conn { client, rx, _task: task });
        }
        self.conn.as_mut()
    }

    /// Takes a message in, unless it is one already handed on (the broker re-sent it after a
    /// reconnect) or covered by the restored checkpoint.
    fn take(&mut self, p: Message) {
        self.quiet.reset();
        let qos1 = p.qos1;
        let d = Delivery { pkid: p.pkid, digest: if qos1 { digest(&p) } else { 0 } };
        if qos1 && p.dup {
            // Handed on or about to be, and its acknowledgement not sent yet: that one covers it.
            if self.book.by_id.get(&d.pkid) == Some(&d.digest) || self.pending.ids.contains(&d) {
                return;
            }
            // Covered by the restored checkpoint, or acknowledged without the broker hearing it.
            let covered = self.book.covered.get(&d.pkid) == Some(&d.digest);
            if covered || self.book.acked_ids.get(&d.pkid) == Some(&d.digest) {
                self.book.covered.remove(&d.pkid);
                self.book.to_send.push_back(d);
                return;
            }
        }
        let now = Instant::now();
        self.linger.arrived(1, now);
        self.pending.first_at.get_or_insert(now);
        let start = self.pending.buf.len();
        self.pending.buf.extend_from_slice(&p.payload);
        if !matches!(self.cfg.format, FormatSpec::MsgPack) && !p.payload.ends_with(b"\n") {
            // Line formats take one record per line; a message is one record.
            self.pending.buf.push(b'\n');
        }
        self.pending.ranges.push(start..self.pending.buf.len());
        self.pending.topics.push(p.topic);
        if self.cfg.meta.headers.is_some() {
            self.pending.properties.push(p.properties);
        }
        if qos1 {
            self.pending.ids.push(d);
        }
    }

    fn cut(&mut self, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let p = std::mem::take(&mut self.pending);
        for d in &p.ids {
            self.book.handed_on(*d);
        }
        if !self.cfg.ack_on_checkpoint {
            self.book.release(self.book.handed);
        }
        weir_core::metrics::StepMetrics::add(&cx.registry.source_bytes, p.buf.len() as u64);
        let schema = self.schema.clone();
        let meta = &self.cfg.meta;
        let (topics, properties) = (&p.topics, &p.properties);
        let rows = |d: &weir_formats::Decoded| -> Result<RecordBatch> {
            if meta.is_empty() {
                return Ok(d.batch.clone());
            }
            let mut cols: Vec<ArrayRef> = d.batch.columns().to_vec();
            meta.append(
                &mut cols,
                d.batch.num_rows(),
                |r| topics[d.record_of_row(r)].as_str(),
                |r| properties[d.record_of_row(r)].as_deref(),
            );
            Ok(RecordBatch::try_new(schema.clone(), cols)?)
        };
        let origin = format!("mqtt {}", self.cfg.url);
        decode_records_with(
            self.decoder.as_mut(),
            self.cfg.event_time.as_ref(),
            &p.buf,
            &p.ranges,
            &origin,
            |i| match p.ids.get(i).filter(|_| p.ids.len() == p.ranges.len()) {
                Some(d) => format!("topic {}, packet {}", p.topics[i], d.pkid),
                None => format!("topic {}", p.topics[i]),
            },
            cx,
            rows,
        )
    }

    /// Sends queued acknowledgements as far as the client's channel takes them.
    fn send_acks(&mut self) -> Result<()> {
        let Some(conn) = &self.conn else { return Ok(()) };
        while let Some(&d) = self.book.to_send.front() {
            if !conn.client.try_ack(d.pkid)? {
                break;
            }
            self.book.to_send.pop_front();
            self.book.sent_recent.push(d);
            if self.book.by_id.get(&d.pkid) == Some(&d.digest) {
                self.book.by_id.remove(&d.pkid);
            }
            self.book.acked_ids.insert(d.pkid, d.digest);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for MqttSource {
    fn partitions(&self) -> usize {
        usize::from(self.endpoint.is_some())
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        if self.ended {
            return Ok(SourcePoll::End);
        }
        self.send_acks()?;
        if self.connect(cx).is_none() {
            return Ok(SourcePoll::End);
        }
        let mut stop = cx.shutdown.clone();
        loop {
            let n = self.pending.ranges.len();
            let now = Instant::now();
            let due = self.pending.first_at.is_some_and(|f| self.linger.should_cut(n, f, now));
            if n > 0 && (due || cx.stopping()) {
                if let Some(b) = self.cut(cx)? {
                    return Ok(SourcePoll::Rows { partition: 0, batch: b });
                }
                continue;
            }
            if cx.stopping() {
                return Ok(SourcePoll::End);
            }
            if let Some(idle) = self.cfg.end_when_idle {
                if n == 0 && self.quiet.lasted_while(self.up.load(std::sync::atomic::Ordering::Relaxed), now, idle) {
                    tracing::info!(
                        idle_ms = idle.as_millis() as u64,
                        "MQTT source ends: nothing arrived for `end_when_idle`."
                    );
                    self.ended = true;
                    return Ok(SourcePoll::End);
                }
            }
            // Wake for the batch's deadline, or now and then when nothing is buffered, so the
            // runtime can run idle detection and send acknowledgements.
            let wait = match self.pending.first_at {
                Some(f) => (f + self.linger.linger(n)).saturating_duration_since(now),
                None => IDLE_POLL.saturating_sub(now - *self.idle_since.get_or_insert(now)),
            };
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
                Some(Incoming::Message(p)) => {
                    self.idle_since = None;
                    self.take(p);
                    // Take what else is already here without waiting, up to a batch.
                    while self.pending.ranges.len() < self.linger.max_rows() {
                        let Some(conn) = self.conn.as_mut() else { break };
                        match conn.rx.try_recv() {
                            Ok(Incoming::Message(p)) => self.take(p),
                            Ok(Incoming::Failed(e)) => return Err(e),
                            Err(_) => break,
                        }
                    }
                }
                Some(Incoming::Failed(e)) => return Err(e),
                None => return Err(CoreError::Internal("mqtt: the connection task stopped".into())),
            }
        }
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let t = self.positions()?;
        self.book.sent_recent.clear();
        Ok(Some(t))
    }

    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<RecordBatch>> {
        self.book.marks.push_back((epoch, self.book.handed));
        self.snapshot()
    }

    async fn checkpoint_complete(&mut self, epoch: Epoch) -> Result<()> {
        self.book.complete(epoch);
        self.send_acks()
    }

    fn restore(&mut self, positions: &[RecordBatch]) -> Result<()> {
        for t in positions {
            let col = |name: &str| {
                t.column_by_name(name).ok_or_else(|| CoreError::Internal(format!("mqtt positions lack `{name}`")))
            };
            let clients = col("client_id")?.as_any().downcast_ref::<StringArray>().cloned();
            let pkids = col("pkid")?.as_any().downcast_ref::<Int32Array>().cloned();
            let digests = col("digest")?.as_any().downcast_ref::<Int64Array>().cloned();
            let (Some(c), Some(p), Some(d)) = (clients, pkids, digests) else {
                weir_core::bail_internal!("mqtt positions have unexpected column types");
            };
            for r in 0..t.num_rows() {
                if c.value(r) == self.client_id && !p.is_null(r) {
                    self.book.covered.insert(p.value(r) as u16, d.value(r) as u64);
                }
            }
        }
        if !self.book.covered.is_empty() {
            tracing::info!(client = %self.client_id, messages = self.book.covered.len(), "MQTT messages covered by the checkpoint will be acknowledged, not processed, if the broker sends them again.");
        }
        Ok(())
    }
}

impl MqttSource {
    /// The messages handed on and not known to be acknowledged, with the restored ones still
    /// unseen: what the broker may send again after a crash that the checkpoint covers.
    fn positions(&self) -> Result<RecordBatch> {
        let b = &self.book;
        let rows: Vec<Delivery> = (b.unacked.iter().chain(&b.to_send).chain(&b.sent_recent).copied())
            .chain(b.covered.iter().map(|(p, d)| Delivery { pkid: *p, digest: *d }))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("client_id", DataType::Utf8, false),
            Field::new("pkid", DataType::Int32, true),
            Field::new("digest", DataType::Int64, true),
        ]));
        // One row even without messages, so the table says which client it belongs to.
        let (ids, pkids, digests): (Vec<&str>, Vec<Option<i32>>, Vec<Option<i64>>) = if rows.is_empty() {
            (vec![self.client_id.as_str()], vec![None], vec![None])
        } else {
            (
                vec![self.client_id.as_str(); rows.len()],
                rows.iter().map(|d| Some(i32::from(d.pkid))).collect(),
                rows.iter().map(|d| Some(d.digest as i64)).collect(),
            )
        };
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids)),
                Arc::new(Int32Array::from(pkids)),
                Arc::new(Int64Array::from(digests)),
            ],
        )?)
    }
}

/// Publishes `messages` (topic, payload) to the broker at `url` (`mqtt://host:port`) with
/// QoS 1 over MQTT 5, paced to `rate` per second when given, and returns once the broker has
/// acknowledged every one: how many that was. The broker's receive maximum paces the client,
/// so a burst is never more than the broker takes. `weir gen --mqtt` and the tests publish so.
///
/// # Errors
/// A bad URL, or a broker that refuses or drops the connection.
pub async fn publish(url: &str, messages: Vec<(String, Vec<u8>)>, rate: Option<f64>) -> Result<u64> {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let ep = Endpoint::parse(url)?;
    let mut o =
        MqttOptions::new(format!("weir-publish-{}-{}", std::process::id(), rand::random::<u32>()), ep.host, ep.port);
    o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(Some(16 << 20));
    if ep.tls {
        o.set_transport(rumqttc::Transport::tls_with_default_config());
    }
    let (client, mut el) = AsyncClient::new(o, 1024);
    let total = messages.len() as u64;
    let acks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = acks.clone();
    // The event loop runs beside the publishing and counts the broker's acknowledgements.
    let driver = SpawnedTask::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p5::Packet::PubAck(_))) => {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => return Err::<(), String>(e.to_string()),
            }
        }
    });
    let started = Instant::now();
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        if driver.is_finished() {
            break;
        }
        client
            .publish(topic, qos, false, payload)
            .await
            .map_err(|e| CoreError::Internal(format!("mqtt publish: {e}")))?;
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            tokio::time::sleep_until((started + Duration::from_secs_f64((i + 1) as f64 / r)).into()).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    while acks.load(std::sync::atomic::Ordering::Relaxed) < total {
        if driver.is_finished() || Instant::now() > until {
            let why = match driver.await {
                Ok(Err(e)) => e,
                _ => "no acknowledgement within 60 s".into(),
            };
            return Err(CoreError::Internal(format!("mqtt broker at {url}: {why}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = client.disconnect().await;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_follow_the_protocol() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "$share/g/a/+"] {
            check_filter(ok).unwrap();
        }
        for bad in ["a/b#", "a/#/c", "a+/b", ""] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn acknowledgements_wait_for_the_checkpoint_of_their_barrier() {
        let mut b = AckBook::default();
        let d = |pkid| Delivery { pkid, digest: u64::from(pkid) * 7 };
        b.handed_on(d(1));
        b.handed_on(d(2));
        b.marks.push_back((Epoch(1), b.handed));
        b.handed_on(d(3));
        b.marks.push_back((Epoch(2), b.handed));
        b.handed_on(d(4));
        let ids = |b: &AckBook| b.to_send.iter().map(|d| d.pkid).collect::<Vec<_>>();
        b.complete(Epoch(1));
        assert_eq!(ids(&b), [1, 2]);
        // A later completion covers the earlier marks too.
        b.complete(Epoch(2));
        assert_eq!(ids(&b), [1, 2, 3]);
        assert_eq!(b.unacked.iter().map(|d| d.pkid).collect::<Vec<_>>(), [4]);
        // Until sent, an acknowledgement's message still counts as handed on.
        assert!(b.by_id.contains_key(&3) && b.by_id.contains_key(&4));
    }
}
