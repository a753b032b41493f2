//! The Kafka sink: one record per row, keyed and partitioned from columns, with headers from
//! columns. At least once, with an idempotent producer (no duplicates from the producer's own
//! retries; rows since the last checkpoint again after a crash), or exactly once, with a
//! Kafka transaction per checkpoint (see [`super::txn`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use weir_core::checkpoint::Epoch;
use weir_core::metrics::ConnectorMetrics;
use weir_core::time::column_by_path;
use weir_core::{Committer, CoreError, Result, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

use super::client::{kafka_err, KafkaClientConfig, Logging};
use super::txn::{ProduceStats, Transactions};

/// Delivery guarantee of the Kafka sink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KafkaSinkMode {
    /// Idempotent producer: every row is delivered; after a crash, rows since the last
    /// checkpoint (or since the start, without checkpoints) are delivered again.
    #[default]
    AtLeastOnce,
    /// A transaction per checkpoint: rows are produced inside it as they come, and become
    /// readable (to `read_committed` consumers) when the checkpoint completes. Needs
    /// checkpoints.
    ExactlyOnce(KafkaTransactionSettings),
}

/// Settings of the exactly-once mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTransactionSettings {
    /// Prefix of the producers' `transactional.id`s. It must be the same each time the
    /// pipeline restarts (so a restarted process fences off its earlier self) and differ
    /// between processes running side by side.
    pub transactional_id: String,
    /// Topic where each committed transaction records its checkpoint (created, with one
    /// partition and compaction, when missing). Recovery reads it to learn how far the
    /// output got.
    pub commit_topic: String,
    /// `transaction.timeout.ms`: the broker aborts a transaction open longer than this. A
    /// transaction stays open for a checkpoint interval plus the checkpoint itself, and the
    /// broker refuses a timeout above its `transaction.max.timeout.ms` (15 minutes by
    /// default).
    pub timeout: Duration,
    /// A header naming each record's transaction, `<run>:<checkpoint>`, as the commit topic
    /// names committed ones: lets an audit match records to commits (and the tests check
    /// exactly-once output on a broker that does not hide aborted transactions).
    pub checkpoint_header: Option<String>,
    /// Several processes share the input (`checkpoints.member`): being fenced means another
    /// member took partitions over from this one, so the run starts again from its last
    /// checkpoint ([`weir_core::CoreError::Rebalanced`]) instead of failing.
    pub handoff: bool,
}

/// Settings of a Kafka sink.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    /// Brokers and passed-through properties.
    pub client: KafkaClientConfig,
    /// The topic written to.
    pub topic: String,
    /// Value format: `json` or `msgpack` (one record per row).
    pub format: FormatSpec,
    /// Schema of the rows.
    pub schema: SchemaRef,
    /// Column whose text is the record key (librdkafka's murmur2 partitioner then keeps a
    /// key on one partition, as Java clients do).
    pub key: Option<String>,
    /// Integer column naming the partition explicitly.
    pub partition: Option<String>,
    /// Header name to column; each row's value as text.
    pub headers: BTreeMap<String, String>,
    /// Delivery guarantee.
    pub mode: KafkaSinkMode,
    /// Exactly once, with a Kafka source on the same cluster: the source's positions, which
    /// each transaction commits to the source's consumer group.
    pub source_offsets: Option<Arc<super::txn::TransactionalOffsets>>,
    /// Create the topic before the run when it does not exist (a repartition topic).
    pub create: Option<KafkaTopicSpec>,
    /// Avro or Protobuf in the Confluent wire format instead of `format`, the schema
    /// registered in (or looked up from) a schema registry before the run.
    pub registry: Option<RegistrySinkConfig>,
}

/// How a Kafka sink writes through a schema registry.
#[derive(Debug, Clone)]
pub struct RegistrySinkConfig {
    /// The registry.
    pub registry: Arc<crate::schema_registry::SchemaRegistry>,
    /// Avro (`false`) or Protobuf (`true`).
    pub protobuf: bool,
    /// The record's (message's) name and namespace (package) in the schema derived from the
    /// rows.
    pub record_name: String,
    /// See `record_name`.
    pub namespace: Option<String>,
    /// The subject; default by `strategy`.
    pub subject: Option<String>,
    /// How the subject is named when not given.
    pub strategy: crate::schema_registry::SubjectStrategy,
    /// Register the schema (a new version of the subject if it is new), or only look it up.
    pub register: bool,
}

/// The sink's schema, its subject and, once the run is prepared, its id.
#[derive(Debug)]
struct RegistryOut {
    cfg: RegistrySinkConfig,
    schema: OutSchema,
    /// The schema's text as registered, and its type.
    text: String,
    subject: String,
    id: Arc<std::sync::OnceLock<u32>>,
}

#[derive(Debug)]
enum OutSchema {
    Avro(weir_formats::avro::Schema),
    Protobuf(weir_formats::protobuf::ProtoSchema),
}

impl RegistryOut {
    fn new(a: &RegistrySinkConfig, columns: &arrow_schema::Schema, topic: &str) -> Result<Self> {
        let full = match &a.namespace {
            Some(ns) => format!("{ns}.{}", a.record_name),
            None => a.record_name.clone(),
        };
        let (schema, text) = if a.protobuf {
            let text = weir_formats::protobuf::proto_for(columns, &a.record_name, a.namespace.as_deref())
                .map_err(|e| CoreError::Config(format!("kafka sink protobuf: {e}")))?;
            let schema = weir_formats::protobuf::ProtoSchema::parse(&text, &[]).map_err(|e| {
                CoreError::Internal(format!("kafka sink protobuf: the derived schema does not compile: {e}"))
            })?;
            (OutSchema::Protobuf(schema), text)
        } else {
            let schema = weir_formats::avro::schema_for(columns, &a.record_name, a.namespace.as_deref())
                .map_err(|e| CoreError::Config(format!("kafka sink avro: {e}")))?;
            let text = schema.canonical_form();
            (OutSchema::Avro(schema), text)
        };
        let subject = a.subject.clone().unwrap_or_else(|| a.strategy.subject(topic, &full));
        Ok(Self { cfg: a.clone(), schema, text, subject, id: Arc::default() })
    }

    fn kind(&self) -> &'static str {
        match self.schema {
            OutSchema::Avro(_) => "AVRO",
            OutSchema::Protobuf(_) => "PROTOBUF",
        }
    }

    fn encoder(&self) -> Result<Box<dyn Encoder>> {
        Ok(match &self.schema {
            OutSchema::Avro(s) => Box::new(weir_formats::avro::AvroEncoder::new(s.clone(), self.id.clone())),
            OutSchema::Protobuf(s) => {
                Box::new(weir_formats::protobuf::ProtobufEncoder::new(s, self.id.clone()).map_err(crate::fmt_err)?)
            }
        })
    }
}

/// How to create a topic the sink writes (see [`KafkaSinkConfig::create`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KafkaTopicSpec {
    /// Partitions; without it, as many as `like` has, else the brokers' default.
    pub partitions: Option<i32>,
    /// A topic whose partition count to copy (the pipeline's source topic).
    pub like: Option<String>,
}

/// Builds the sinks of a process's workers, which share one producer (at least once), or the
/// two transactional producers and their committer (exactly once).
#[derive(Debug)]
pub struct KafkaSinkFactory {
    cfg: Arc<KafkaSinkConfig>,
    txn: Option<Arc<Transactions>>,
    stats: Arc<ProduceStats>,
    registry: Option<RegistryOut>,
    /// At least once: the producer the workers of the current run share, while one of them
    /// holds it (the next run, after a failure, starts with a new one).
    producer: std::sync::Mutex<std::sync::Weak<SharedProducer>>,
}

/// The producer of a process's workers (at least once). One per process rather than per
/// worker: the workers' records to a partition go out in the same requests, and the process
/// runs one set of the client's threads (docs/benchmarks.md, "Every core decodes").
struct SharedProducer {
    /// Always set; taken only by `drop`.
    producer: Option<FutureProducer<Logging>>,
    fatal: super::client::Fatal,
}

impl Drop for SharedProducer {
    /// Closing a producer waits for its poll thread's next tick (rust-rdkafka joins a thread
    /// that polls 100 ms at a time), which added up to 100 ms to the end of every bounded
    /// run. Every record is acknowledged before the last sink lets go (`close` drains), so it
    /// is closed on a thread of its own, off the job's way out.
    fn drop(&mut self) {
        if let Some(p) = self.producer.take() {
            // If no thread can be started, the closure and the producer are dropped here.
            let _ = std::thread::Builder::new().name("weir-kafka-close".into()).spawn(move || drop(p));
        }
    }
}

impl std::fmt::Debug for SharedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedProducer").finish_non_exhaustive()
    }
}

impl KafkaSinkFactory {
    /// Checks the settings against the schema (no I/O).
    ///
    /// # Errors
    /// CSV, or a key, partition or header column the rows do not have.
    pub fn new(mut cfg: KafkaSinkConfig) -> Result<Self> {
        if cfg.key.is_some() {
            // Changes of a table, keyed: `_op` is not written; a delete is a tombstone.
            cfg.schema = weir_core::changes::without_change_column(&cfg.schema);
        }
        weir_core::ensure_config!(
            !matches!(cfg.format, FormatSpec::Csv(_)),
            "kafka sink: one record per row needs `json` or `msgpack`, not csv"
        );
        weir_core::ensure_config!(!cfg.topic.is_empty(), "kafka sink: `topic` is empty");
        let empty = RecordBatch::new_empty(cfg.schema.clone());
        for (what, col) in cfg
            .key
            .iter()
            .map(|c| ("key", c))
            .chain(cfg.partition.iter().map(|c| ("partition", c)))
            .chain(cfg.headers.values().map(|c| ("header", c)))
        {
            column_by_path(&empty, col).map_err(|e| CoreError::Config(format!("kafka sink {what}: {e}")))?;
        }
        let registry = match &cfg.registry {
            None => {
                cfg.format.encoder(cfg.schema.clone()).map_err(crate::fmt_err)?;
                None
            }
            Some(a) => Some(RegistryOut::new(a, &cfg.schema, &cfg.topic)?),
        };
        let stats = Arc::new(ProduceStats::default());
        let txn = match &cfg.mode {
            KafkaSinkMode::AtLeastOnce => None,
            KafkaSinkMode::ExactlyOnce(t) => Some(Arc::new(Transactions::new(
                &cfg.client,
                &cfg.topic,
                t.clone(),
                stats.clone(),
                cfg.source_offsets.clone(),
            )?)),
        };
        Ok(Self { cfg: Arc::new(cfg), txn, stats, registry, producer: Default::default() })
    }

    /// The producer the workers share, created by the first that asks.
    fn shared_producer(&self) -> Result<Arc<SharedProducer>> {
        let mut slot = self.producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = slot.upgrade() {
            return Ok(p);
        }
        let ours = [
            ("enable.idempotence", "true".to_string()),
            ("acks", "all".to_string()),
            ("partitioner", "murmur2_random".to_string()),
        ];
        let log = Logging::new(format!("kafka sink {}", self.cfg.topic));
        let fatal = log.watch();
        let producer: FutureProducer<Logging> = self
            .cfg
            .client
            .producer_config(&ours)
            .create_with_context(log)
            .map_err(|e| kafka_err("kafka sink: cannot create the producer", &e))?;
        let p = Arc::new(SharedProducer { producer: Some(producer), fatal });
        *slot = Arc::downgrade(&p);
        Ok(p)
    }
}

impl SinkFactory for KafkaSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        let shared = match &self.txn {
            Some(_) => None,
            None => Some(self.shared_producer()?),
        };
        let producer = shared.as_ref().and_then(|s| s.producer.clone());
        let fatal = shared.as_ref().map(|s| s.fatal.clone());
        let encoder: Box<dyn Encoder> = match &self.registry {
            Some(r) => r.encoder()?,
            None => self.cfg.format.encoder(self.cfg.schema.clone()).map_err(crate::fmt_err)?,
        };
        Ok(Box::new(KafkaSink {
            cfg: self.cfg.clone(),
            producer,
            txn: self.txn.clone(),
            epoch: None,
            encoder,
            buf: Vec::new(),
            stats: self.stats.clone(),
            in_flight: Default::default(),
            failed: Vec::new(),
            last_failure: None,
            traceparent: None,
            fatal,
            _shared: shared,
        }))
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        self.txn.clone().map(|t| t as Arc<dyn Committer>)
    }

    fn prepare(&self) -> futures::future::BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if let Some(r) = &self.registry {
                let id = r.cfg.registry.id_of(&r.subject, &r.text, r.kind(), r.cfg.register).await?;
                let _ = r.id.set(id);
                tracing::info!(topic = %self.cfg.topic, subject = %r.subject, schema_id = id, format = r.kind(), "Kafka sink writes with this schema id.");
            }
            let Some(c) = &self.cfg.create else { return Ok(()) };
            let partitions = match (c.partitions, &c.like) {
                (Some(n), _) => Some(n),
                (None, Some(like)) => super::client::partition_count(&self.cfg.client, like).await?.map(|n| n as i32),
                (None, None) => None,
            };
            let n = super::client::ensure_topic(&self.cfg.client, &self.cfg.topic, partitions, &[]).await?;
            tracing::info!(topic = %self.cfg.topic, partitions = n, "Kafka sink topic ready.");
            Ok(())
        })
    }

    /// Exactly once, another member taking partitions over needs this process's
    /// transactional id (to fence it) and commit topic (to read how far it committed).
    fn member_record(&self) -> Option<serde_json::Value> {
        let KafkaSinkMode::ExactlyOnce(t) = &self.cfg.mode else { return None };
        Some(serde_json::json!({ "transactional_id": t.transactional_id, "commit_topic": t.commit_topic }))
    }

    fn peer_committer(&self, record: &serde_json::Value) -> Result<Option<Arc<dyn Committer>>> {
        let KafkaSinkMode::ExactlyOnce(mine) = &self.cfg.mode else { return Ok(None) };
        if record.is_null() {
            // The member wrote at least once: its checkpoints count as they are.
            return Ok(None);
        }
        let field = |k: &str| {
            record[k].as_str().map(str::to_string).ok_or_else(|| {
                CoreError::Config(format!("kafka sink: another member's record has no `{k}` (it is {record})"))
            })
        };
        let theirs = KafkaTransactionSettings {
            transactional_id: field("transactional_id")?,
            commit_topic: field("commit_topic")?,
            ..mine.clone()
        };
        weir_core::ensure_config!(
            theirs.transactional_id != mine.transactional_id,
            "kafka sink: another member uses this process's `transactional_id` `{}`; each process needs its own (e.g. `w1-${{HOSTNAME}}`)",
            mine.transactional_id
        );
        let peer =
            Transactions::new(&self.cfg.client, &self.cfg.topic, theirs, Arc::new(ProduceStats::default()), None)?;
        Ok(Some(Arc::new(peer)))
    }
}

struct KafkaSink {
    cfg: Arc<KafkaSinkConfig>,
    /// At least once: this worker's producer. Exactly once: the shared producer of the
    /// current checkpoint's transaction, set by `begin`.
    producer: Option<FutureProducer<Logging>>,
    /// Exactly once: the shared transactional producers.
    txn: Option<Arc<Transactions>>,
    /// The checkpoint the rows written now belong to.
    epoch: Option<Epoch>,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
    stats: Arc<ProduceStats>,
    /// Written batches whose deliveries are not all reported yet, oldest first.
    in_flight: std::collections::VecDeque<InFlight>,
    /// Records whose delivery failed for a reason that may pass, to be sent again.
    failed: Vec<OwnedMessage>,
    /// The error of the latest such failure, not yet reported.
    last_failure: Option<CoreError>,
    /// The `traceparent` of the write in progress, when it is traced.
    traceparent: Option<String>,
    /// At least once: the producer's client errors no retry will cure.
    fatal: Option<super::client::Fatal>,
    /// At least once: holds the process's producer for this run (see
    /// [`KafkaSinkFactory::shared_producer`]). Declared after `producer`, so dropped after
    /// it: the last holder closes it off the job's path.
    _shared: Option<Arc<SharedProducer>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.cfg.topic).finish_non_exhaustive()
    }
}

/// Each row's value as text, `None` where null.
fn texts(rows: &RecordBatch, col: &str) -> Result<Vec<Option<String>>> {
    let c: ArrayRef = column_by_path(rows, col)?;
    let fmt = arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &Default::default())?;
    Ok((0..rows.num_rows()).map(|i| (!c.is_null(i)).then(|| fmt.value(i).to_string())).collect())
}

/// The delivery reports of one written batch, awaited by a task of their own so that the
/// next batch is produced meanwhile; the task records the batch's produce latency when its
/// last report arrives, and hands back the records that failed and how many reports the
/// producer dropped.
type InFlight = weir_core::task::SpawnedTask<(Vec<(KafkaError, OwnedMessage)>, usize)>;

fn await_deliveries(futures: Vec<DeliveryFuture>, records: usize, bytes: usize, stats: Arc<ProduceStats>) -> InFlight {
    let started = Instant::now();
    weir_core::task::SpawnedTask::spawn(async move {
        let (mut failed, mut dropped) = (Vec::new(), 0);
        for f in futures {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failed.push(e),
                Err(_) => dropped += 1,
            }
        }
        // Only what the brokers acknowledged counts as produced; a failed record counts when
        // it is sent again and acknowledged.
        let failed_bytes: usize = failed.iter().map(|(_, m)| m.payload().map_or(0, <[u8]>::len)).sum();
        stats.batch(records - failed.len() - dropped, bytes.saturating_sub(failed_bytes), started.elapsed());
        (failed, dropped)
    })
}

/// A failed record made sendable again.
fn record_of(m: &OwnedMessage) -> FutureRecord<'_, [u8], [u8]> {
    let mut rec = FutureRecord::<[u8], [u8]>::to(m.topic());
    if let Some(p) = m.payload() {
        rec = rec.payload(p);
    }
    if let Some(k) = m.key() {
        rec = rec.key(k);
    }
    if m.partition() >= 0 {
        rec = rec.partition(m.partition());
    }
    if let Some(h) = m.headers() {
        rec = rec.headers(h.clone());
    }
    rec
}

/// What became of one record handed to the producer.
enum Sent {
    /// Queued; its delivery report comes later.
    Queued(DeliveryFuture),
    /// Refused at once for a reason of its own (too large, no such partition).
    Refused(String),
}

impl KafkaSink {
    /// Hands a record to the producer; a full local queue is backpressure: wait for the brokers
    /// to take some, then try again.
    async fn send<'a, K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        producer: &FutureProducer<Logging>,
        mut rec: FutureRecord<'a, K, P>,
        topic: &str,
        txn: Option<&Transactions>,
    ) -> Result<Sent> {
        loop {
            match producer.send_result(rec) {
                Ok(f) => return Ok(Sent::Queued(f)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // The record itself is wrong (too large, a partition the topic does not have):
                // it never entered the producer, so the rest of the batch (and any open
                // transaction) is unaffected.
                Err((
                    e @ KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::UnknownPartition
                        | RDKafkaErrorCode::InvalidMessage
                        | RDKafkaErrorCode::InvalidRecord,
                    ),
                    _,
                )) => return Ok(Sent::Refused(format!("kafka sink: producing to `{topic}`: {e}"))),
                Err((e, _)) => return Err(in_txn(format!("kafka sink: producing to `{topic}`"), &e, txn)),
            }
        }
    }

    /// Takes in the reports of the batches already acknowledged (`wait`: of all of them).
    /// Records that failed for a reason that may pass are kept to be sent again; a failure
    /// that will not pass, or any failure inside a transaction, is the error.
    async fn settle(&mut self, wait: bool) -> Result<()> {
        let txn = self.txn.clone();
        while let Some(mut h) = self.in_flight.pop_front() {
            if !wait && !h.is_finished() {
                self.in_flight.push_front(h);
                break;
            }
            // While waiting, a client error no retry will cure (an untrusted certificate: the
            // records would wait for `message.timeout.ms` and be sent again for ever) ends it.
            let reports = match &self.fatal {
                Some(f) => f.or_fatal(&mut h).await?,
                None => (&mut h).await,
            };
            let (failed, dropped) =
                reports.map_err(|e| CoreError::Task(format!("kafka sink: delivery reports: {e}")))?;
            if dropped > 0 {
                return Err(CoreError::Task(format!("kafka sink: the producer dropped {dropped} delivery reports")));
            }
            for (e, m) in failed {
                let err = in_txn(format!("kafka sink: delivery to `{}`", self.cfg.topic), &e, txn.as_deref());
                if err.retry() != weir_core::Retry::Backoff {
                    return Err(err);
                }
                self.failed.push(m);
                self.last_failure = Some(err);
            }
        }
        Ok(())
    }

    /// Sends the records whose delivery failed again, ahead of anything newer.
    async fn resend(&mut self) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        let Some(producer) = self.producer.clone() else { return Ok(()) };
        let failed = std::mem::take(&mut self.failed);
        let mut futures = Vec::with_capacity(failed.len());
        let mut bytes = 0;
        for m in &failed {
            bytes += m.payload().map_or(0, <[u8]>::len);
            match Self::send(&producer, record_of(m), &self.cfg.topic, None).await? {
                Sent::Queued(f) => futures.push(f),
                // It was accepted once; refused now, it has no row to go to the dead letters
                // with, so the run fails rather than lose it.
                Sent::Refused(reason) => {
                    return Err(CoreError::Other {
                        message: reason,
                        blame: weir_core::Blame::External,
                        retry: weir_core::Retry::Never,
                    })
                }
            }
        }
        tracing::info!(topic = %self.cfg.topic, records = failed.len(), "Kafka sink: sending records again after a failed delivery.");
        self.in_flight.push_back(await_deliveries(futures, failed.len(), bytes, self.stats.clone()));
        Ok(())
    }

    /// Waits until every record written so far is acknowledged, sending failed ones again
    /// with backoff: a checkpoint (or the end) must not count rows the brokers do not have.
    async fn drain(&mut self) -> Result<()> {
        let mut attempt = 0u32;
        loop {
            self.settle(true).await?;
            let Some(err) = self.last_failure.take() else { return Ok(()) };
            attempt += 1;
            let delay = Duration::from_millis(100 * 2u64.pow(attempt.min(8))).min(Duration::from_secs(30));
            tracing::warn!(topic = %self.cfg.topic, attempt, error = %err, "Kafka sink: deliveries failed; sending them again before the checkpoint.");
            tokio::time::sleep(delay).await;
            self.resend().await?;
        }
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        let Some(producer) = self.producer.clone() else {
            weir_core::bail_internal!("kafka sink: a transactional write before begin")
        };
        let txn = self.txn.clone();
        if let Some(e) = self.fatal.as_ref().and_then(super::client::Fatal::error) {
            return Err(e);
        }
        // A failure of an earlier batch is reported here, before this batch is sent: the
        // runtime backs off and calls again with this batch, and the failed records go first.
        self.settle(false).await?;
        if let Some(err) = self.last_failure.take() {
            return Err(err);
        }
        self.resend().await?;
        // Changes of a table on a keyed topic: the rows without `_op`, and which are deletes
        // (tombstones: the key with no value, which compaction ends the key with).
        let (rows, deletes) = match self.cfg.key {
            Some(_) => weir_core::changes::split(rows)?,
            None => (rows.clone(), vec![false; rows.num_rows()]),
        };
        let rows = &rows;
        let lines = self.cfg.registry.is_none() && matches!(self.cfg.format, FormatSpec::Json);
        let spans = crate::sink::encode_rows(self.encoder.as_mut(), lines, rows, &mut self.buf)?;
        let keys = self.cfg.key.as_deref().map(|k| texts(rows, k)).transpose()?;
        let parts = self.cfg.partition.as_deref().map(|p| texts(rows, p)).transpose()?;
        let headers: Vec<(&str, Vec<Option<String>>)> =
            self.cfg.headers.iter().map(|(h, c)| Ok((h.as_str(), texts(rows, c)?))).collect::<Result<_>>()?;
        let audit = match (&self.txn, self.epoch) {
            (Some(t), Some(e)) => t.checkpoint_header().map(|h| (h.to_string(), format!("{}:{}", t.run(), e.0))),
            _ => None,
        };
        let mut futures = Vec::with_capacity(spans.len());
        let mut refused = Vec::new();
        for (i, (s, e)) in spans.iter().enumerate() {
            let mut rec = FutureRecord::<str, [u8]>::to(&self.cfg.topic);
            if !deletes[i] {
                rec = rec.payload(&self.buf[*s..*e]);
            }
            if let Some(k) = keys.as_ref().and_then(|k| k[i].as_deref()) {
                rec = rec.key(k);
            }
            if let Some(p) = parts.as_ref().and_then(|p| p[i].as_deref()) {
                match p.parse::<i32>() {
                    Ok(p) if p >= 0 => rec = rec.partition(p),
                    _ => {
                        let reason = format!("kafka sink: partition column value `{p}` is not a partition number");
                        refused.push(weir_core::RefusedRow { row: i, reason });
                        continue;
                    }
                }
            }
            if !headers.is_empty() || audit.is_some() || self.traceparent.is_some() {
                let mut h = OwnedHeaders::new_with_capacity(headers.len() + 2);
                for (name, vals) in &headers {
                    h = h.insert(Header { key: name, value: vals[i].as_deref() });
                }
                if let Some((name, value)) = &audit {
                    h = h.insert(Header { key: name, value: Some(value.as_str()) });
                }
                if let Some(tp) = &self.traceparent {
                    h = h.insert(Header { key: weir_core::trace::TRACEPARENT, value: Some(tp.as_str()) });
                }
                rec = rec.headers(h);
            }
            match Self::send(&producer, rec, &self.cfg.topic, txn.as_deref()).await? {
                Sent::Queued(f) => futures.push(f),
                Sent::Refused(reason) => refused.push(weir_core::RefusedRow { row: i, reason }),
            }
        }
        let n = futures.len();
        self.in_flight.push_back(await_deliveries(futures, n, self.buf.len(), self.stats.clone()));
        if refused.is_empty() {
            Ok(())
        } else {
            Err(CoreError::Refused(refused))
        }
    }

    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        self.epoch = Some(epoch);
        if let Some(t) = &self.txn {
            // Opened now rather than at the first write, so the committer finds every epoch
            // open, also one in which this worker wrote nothing.
            self.producer = Some(t.producer_for(epoch).await?);
        }
        Ok(())
    }

    async fn pre_commit(&mut self, _epoch: Epoch) -> Result<()> {
        // Writes do not wait for their deliveries; the checkpoint does. Then the epoch's rows
        // are on the brokers (inside the open transaction, in exactly-once mode, which the
        // committer commits once the checkpoint completes).
        self.drain().await
    }

    async fn close(&mut self) -> Result<()> {
        // Every record this worker wrote is acknowledged then. No flush: the producer is the
        // other workers' too, and would wait for what they are still writing. A transactional
        // producer's transaction is ended by the committer, not the sink.
        self.drain().await
    }

    fn report(&self, m: &ConnectorMetrics) {
        self.stats.report(&self.cfg.topic, m);
    }

    fn trace(&mut self, cx: Option<&weir_core::trace::SpanContext>) {
        self.traceparent = cx.map(weir_core::trace::traceparent);
    }
}

/// In a transaction, a failed record cannot be sent again (the retry could land twice): the
/// job fails, and recovery aborts the transaction and replays from the checkpoint.
/// A producer error; inside a transaction it cannot be retried (see [`Transactions::error`]).
fn in_txn(what: String, e: &KafkaError, txn: Option<&Transactions>) -> CoreError {
    match txn.map(|t| t.error(what.clone(), e)) {
        Some(CoreError::Other { message, blame, .. }) => CoreError::Other {
            message: format!("{message} (inside a transaction: the job restarts from its last checkpoint)"),
            blame,
            retry: weir_core::Retry::Never,
        },
        Some(other) => other,
        None => kafka_err(what, e),
    }
}

#[cfg(test)]
mod tests {
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    fn factory() -> KafkaSinkFactory {
        KafkaSinkFactory::new(KafkaSinkConfig {
            // Nothing listens there: a producer is made without reaching a broker.
            client: KafkaClientConfig { brokers: "127.0.0.1:9".into(), properties: Default::default() },
            topic: "out".into(),
            format: FormatSpec::Json,
            schema: Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)])),
            key: None,
            partition: None,
            headers: BTreeMap::new(),
            mode: KafkaSinkMode::AtLeastOnce,
            source_offsets: None,
            create: None,
            registry: None,
        })
        .unwrap()
    }

    #[test]
    fn the_workers_of_a_run_share_one_producer_and_the_next_run_gets_a_new_one() {
        let f = factory();
        let (a, b) = (f.shared_producer().unwrap(), f.shared_producer().unwrap());
        assert!(Arc::ptr_eq(&a, &b), "two workers of one run got producers of their own");
        let first = Arc::as_ptr(&a);
        let sinks = [f.create(0, 2).unwrap(), f.create(1, 2).unwrap()];
        drop((a, b));
        assert!(std::ptr::eq(Arc::as_ptr(&f.shared_producer().unwrap()), first), "the sinks hold the run's producer");
        drop(sinks);
        assert!(f.producer.lock().unwrap().upgrade().is_none(), "the last sink of the run let its producer go");
        let next = f.shared_producer().unwrap();
        assert!(next.producer.is_some(), "the next run gets a producer");
    }
}
