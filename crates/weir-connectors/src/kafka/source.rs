//! The Kafka source: one consumer per process, in a consumer group, reading the partitions
//! Kafka assigns to the process, decoded on every worker.
//!
//! The consumer's records are split by partition into their own queues before any partition is
//! assigned ([`PartitionQueue`], read a batch at a time), and each partition belongs to one
//! worker of the process for the life of the process ([`owner`]): that worker reads its queue,
//! decodes, and keeps its position and watermark. Worker 0 also serves the consumer's own
//! queue, which carries the group protocol's callbacks and client errors. A partition never
//! moves between the workers of one process, so its read position is always the one its
//! worker handed out; several processes split the partitions through the group protocol,
//! whose rebalances are incremental (`cooperative-sticky`): a callback names only the
//! partitions that move. With `handoff`, a change ends the job's run at a checkpoint and the
//! next run starts from it, and partitions taken back are handed to the group only once a
//! checkpoint of that next run, which parks their state, has completed
//! ([`KafkaGroup::release_parked`]).
//!
//! Positions (the offset of the next record to hand out, per topic and partition) are the
//! source's checkpoint state; on restore the consumer starts each assigned partition there.
//! They are also committed to Kafka when the next checkpoint starts, as a progress hint for
//! lag monitors only: Weir never reads them back unless `start: committed` and there is no
//! checkpoint.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{Array as _, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::FutureExt as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use weir_core::checkpoint::Epoch;
use weir_core::linger::Linger;
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{Decoder, FormatSpec};

use super::client::{kafka_err, KafkaClientConfig, Logging};
use super::queue::{Fetched, PartitionQueue, Record};
use crate::decode::{decode_records_with, Position};

/// Where a partition starts when no checkpoint names a position for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaStart {
    /// The oldest record the broker keeps.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// The group's committed offset (earliest where there is none).
    Committed,
    /// The first record with a broker timestamp at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// Which Kafka metadata to add as columns, and their names; `None` leaves one out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaMetadataColumns {
    /// The record key, as UTF-8 text (invalid bytes replaced); null without a key.
    pub key: Option<String>,
    /// The topic.
    pub topic: Option<String>,
    /// The partition (int32).
    pub partition: Option<String>,
    /// The offset (int64).
    pub offset: Option<String>,
    /// The broker timestamp, ms since the epoch (int64); usable as the event time.
    pub timestamp: Option<String>,
    /// The headers as a JSON object of strings (utf8); null without headers.
    pub headers: Option<String>,
    /// When this source took the record from its consumer, µs since the epoch (int64): with
    /// the sink's `latency_column`, the time rows spend inside the job.
    pub received: Option<String>,
}

impl KafkaMetadataColumns {
    /// The source's schema: the payload's columns, then these.
    ///
    /// # Errors
    /// A metadata column named like a payload column.
    pub fn extend(&self, payload: &SchemaRef) -> Result<SchemaRef> {
        let mut fields: Vec<Field> = payload.fields().iter().map(|f| f.as_ref().clone()).collect();
        for m in self.fields() {
            weir_core::ensure_config!(
                fields.iter().all(|f| f.name() != m.name()),
                "kafka: metadata column `{}` has the name of a payload column; rename it",
                m.name()
            );
            fields.push(m);
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    fn fields(&self) -> Vec<Field> {
        let mut f = Vec::new();
        let mut add = |name: &Option<String>, t: DataType| {
            if let Some(n) = name {
                f.push(Field::new(n, t, true));
            }
        };
        add(&self.key, DataType::Utf8);
        add(&self.topic, DataType::Utf8);
        add(&self.partition, DataType::Int32);
        add(&self.offset, DataType::Int64);
        add(&self.timestamp, DataType::Int64);
        add(&self.headers, DataType::Utf8);
        add(&self.received, DataType::Int64);
        f
    }
}

/// Payloads in the Confluent wire format whose writer schemas are in a schema registry.
#[derive(Debug, Clone)]
pub struct RegistryPayload {
    /// The registry, shared by every worker's decoder.
    pub registry: Arc<crate::schema_registry::SchemaRegistry>,
    /// Avro or Protobuf.
    pub format: RegistryFormat,
}

/// What a registry's schemas describe.
#[derive(Debug, Clone)]
pub enum RegistryFormat {
    /// Avro, resolved to the reader schema (defaults of added fields) if there is one.
    Avro {
        /// The reader schema.
        reader_schema: Option<weir_formats::avro::Schema>,
    },
    /// Protobuf.
    Protobuf,
}

impl RegistryPayload {
    fn decoder(&self, schema: SchemaRef) -> Result<Box<dyn Decoder>> {
        let registry = self.registry.clone();
        Ok(match &self.format {
            RegistryFormat::Avro { reader_schema } => Box::new(
                weir_formats::avro::AvroDecoder::new(schema, registry, reader_schema.clone())
                    .map_err(crate::fmt_err)?,
            ),
            RegistryFormat::Protobuf => {
                Box::new(weir_formats::protobuf::ProtobufDecoder::new(schema, registry).map_err(crate::fmt_err)?)
            }
        })
    }
}

/// The payload decoder of a source's settings.
fn payload_decoder(cfg: &KafkaSourceConfig) -> Result<Box<dyn Decoder>> {
    let decoder = match &cfg.registry {
        Some(r) => r.decoder(cfg.payload_schema.clone())?,
        None => cfg.format.decoder(cfg.payload_schema.clone()).map_err(crate::fmt_err)?,
    };
    Ok(match &cfg.json_schema {
        Some(s) => {
            weir_core::ensure_config!(
                cfg.registry.is_none() && matches!(cfg.format, FormatSpec::Json),
                "kafka: `json_schema` checks JSON payloads; this source reads {}",
                if cfg.registry.is_some() { "Avro or Protobuf".to_string() } else { cfg.format.to_string() }
            );
            Box::new(weir_formats::json_schema::Validating::new(decoder, s.clone()))
        }
        None => decoder,
    })
}

/// Settings of a Kafka source.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// Brokers and passed-through properties.
    pub client: KafkaClientConfig,
    /// Topics to read; a name starting with `^` is a regular expression.
    pub topics: Vec<String>,
    /// The consumer group.
    pub group_id: String,
    /// Where partitions without a checkpointed position start.
    pub start: KafkaStart,
    /// Payload format.
    pub format: FormatSpec,
    /// Avro or Protobuf in the Confluent wire format instead of `format`, with the writer
    /// schemas from a registry.
    pub registry: Option<RegistryPayload>,
    /// JSON payloads are checked against this JSON Schema before they are decoded.
    pub json_schema: Option<Arc<weir_formats::json_schema::JsonSchema>>,
    /// Schema of the decoded payload.
    pub payload_schema: SchemaRef,
    /// Metadata columns appended after the payload's.
    pub metadata: KafkaMetadataColumns,
    /// Event time.
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Longest a partial batch waits.
    pub max_linger: Duration,
    /// End once every assigned partition has been read up to where it ended when it was
    /// assigned (bounded runs: tests, backfills, benchmarks).
    pub stop_at_end: bool,
    /// Set when an exactly-once Kafka sink on the same cluster commits this source's positions
    /// inside its transactions; the source then commits no progress hint of its own.
    pub transactional_offsets: Option<Arc<super::txn::TransactionalOffsets>>,
    /// Several processes share the topic and keyed state follows its partitions between
    /// them ([`weir_core::handoff`]): the job starts only once the group has assigned this
    /// process its partitions, and starts again whenever they move. One topic only.
    pub handoff: bool,
    /// Reading a repartition topic: once this is set (the side writing the topic finished),
    /// end at where each partition ends then, as `stop_at_end` does.
    pub until: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What to do when a restored position is no longer on the broker.
    pub on_missing_position: MissingPosition,
}

/// What a source does when a position restored from a checkpoint is no longer on the broker
/// (retention deleted the records while Weir was down). Either
/// way it is logged as an error with the topic, partition and the records skipped, and
/// counted (`weir_kafka_records_skipped_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingPosition {
    /// Go on from the earliest record the broker still has.
    #[default]
    Earliest,
    /// Fail the run.
    Fail,
}

/// A restored position the broker no longer has.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Missing {
    topic: String,
    partition: i32,
    position: i64,
    low: i64,
    high: i64,
}

impl Missing {
    /// Records lost: those between the position and the earliest one kept.
    fn skipped(&self) -> i64 {
        (self.low - self.position).max(0)
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}: the checkpointed position {} is no longer on the broker (it holds {}..{}); {} records were skipped",
            self.topic,
            self.partition,
            self.position,
            self.low,
            self.high,
            self.skipped()
        )
    }
}

/// Builds the Kafka source: one consumer per process, its partitions read by every worker.
#[derive(Debug)]
pub struct KafkaSourceFactory {
    cfg: Arc<KafkaSourceConfig>,
    schema: SchemaRef,
    /// With `handoff`: the consumer, kept across the job's runs so that starting again after
    /// a rebalance does not make the process join the group anew (and rebalance again).
    group: Arc<KafkaGroup>,
    /// The run whose instances are being made: the runtime makes worker 0's first, so that
    /// one starts a new run and the others join it.
    run: Mutex<Option<Arc<Run>>>,
    /// Where this process got to in each partition, across the job's runs: what a run hands
    /// out below it is read again (`weir_kafka_records_reread_total`).
    handed: Arc<Handed>,
}

/// The offset after the last record handed out, per partition.
type Handed = Mutex<HashMap<(String, i32), i64>>;

impl KafkaSourceFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// No topics, a metadata column named like a payload column, or an unknown format.
    pub fn new(cfg: KafkaSourceConfig) -> Result<Self> {
        weir_core::ensure_config!(!cfg.topics.is_empty(), "kafka: `topics` is empty");
        weir_core::ensure_config!(!cfg.client.brokers.is_empty(), "kafka: `brokers` is empty");
        let schema = cfg.metadata.extend(&cfg.payload_schema)?;
        // Fails early on a format this source cannot decode.
        payload_decoder(&cfg)?;
        weir_core::ensure_config!(
            !cfg.handoff || (cfg.topics.len() == 1 && !cfg.topics[0].starts_with('^')),
            "kafka: state can follow partitions between processes for one topic only (`topics` is {:?})",
            cfg.topics
        );
        let cfg = Arc::new(cfg);
        let group = Arc::new(KafkaGroup {
            cfg: cfg.clone(),
            shared: Arc::new(Shared::default()),
            reader: Arc::new(Mutex::new(None)),
            partition_count: Mutex::new(None),
            leader: Mutex::new(None),
        });
        Ok(Self { schema, cfg, group, run: Mutex::new(None), handed: Arc::default() })
    }
}

impl SourceFactory for KafkaSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>> {
        let decoder = payload_decoder(&self.cfg)?;
        let mut slot = lock(&self.run);
        let run = match slot.as_ref() {
            Some(r) if worker > 0 => r.clone(),
            _ => {
                // Without a handoff every run has a consumer of its own; with one, the group's.
                let r = Arc::new(if self.cfg.handoff {
                    Run { shared: self.group.shared.clone(), reader: self.group.reader.clone() }
                } else {
                    Run { shared: Arc::new(Shared::default()), reader: Arc::new(Mutex::new(None)) }
                });
                *slot = Some(r.clone());
                r
            }
        };
        drop(slot);
        let workers = workers.max(1);
        run.shared.workers.store(workers, std::sync::atomic::Ordering::Relaxed);
        Ok(Box::new(KafkaSource {
            worker,
            workers,
            cfg: self.cfg.clone(),
            schema: self.schema.clone(),
            decoder,
            wake: run.shared.waker(worker),
            run,
            handed: self.handed.clone(),
            reader: None,
            queues: Vec::new(),
            taken: Fetched::default(),
            turn: 0,
            group: self.cfg.handoff.then(|| self.group.clone()),
            started: false,
            seen_assignment: false,
            until_armed: false,
            parts: Vec::new(),
            index: HashMap::new(),
            linger: Linger::new(self.cfg.batch_size, self.cfg.max_linger),
            fetched_at: None,
            pending_idle: Vec::new(),
            last_snapshot: None,
            warned_at: None,
            idle_since: None,
        }))
    }

    fn resumable(&self) -> bool {
        true
    }

    fn group(&self) -> Option<Arc<dyn weir_core::handoff::GroupMember>> {
        self.cfg.handoff.then(|| self.group.clone() as Arc<dyn weir_core::handoff::GroupMember>)
    }
}

/// What the instances of one run of the job share: the consumer and what its callbacks tell.
#[derive(Debug)]
struct Run {
    shared: Arc<Shared>,
    reader: Arc<Mutex<Option<Reader>>>,
}

/// The queues split off a consumer, by topic and partition. Kept as long as the consumer:
/// a partition whose queue is dropped keeps its records to itself, read by nobody.
type Queues = Mutex<HashMap<(String, i32), Arc<PartitionQueue>>>;

/// A consumer and its partitions' queues.
#[derive(Clone)]
struct Reader {
    consumer: Arc<StreamConsumer<SourceCtx>>,
    queues: Arc<Queues>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("queues", &lock(&self.queues).len()).finish_non_exhaustive()
    }
}

impl Reader {
    /// Creates the consumer (subscribed unless it reads partitions another source's group
    /// assigned), ready to split each partition's records off before it is assigned.
    fn open(
        cfg: &KafkaSourceConfig,
        shared: &Arc<Shared>,
        registry: &Arc<weir_core::metrics::Registry>,
        subscribe: bool,
    ) -> Result<Self> {
        let consumer = Arc::new(new_consumer(cfg, shared, registry)?);
        let queues: Arc<Queues> = Arc::default();
        // Weak: the consumer's context holds `shared`, and a queue holds the consumer.
        *lock(&shared.splitter) = Some((Arc::downgrade(&consumer), Arc::downgrade(&queues)));
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        if subscribe {
            consumer
                .subscribe(&topics)
                .map_err(|e| kafka_err(format!("kafka source: cannot subscribe to {topics:?}"), &e))?;
            tracing::info!(topics = ?topics, group = %cfg.group_id, brokers = %cfg.client.brokers, "Kafka consumer subscribed.");
        } else {
            tracing::info!(topics = ?topics, brokers = %cfg.client.brokers, "Kafka consumer reading the partitions of another source's group.");
        }
        Ok(Self { consumer, queues })
    }

    /// The reader in `slot`, opened on first use.
    fn get_or_open(
        slot: &Mutex<Option<Reader>>,
        cfg: &KafkaSourceConfig,
        shared: &Arc<Shared>,
        registry: &Arc<weir_core::metrics::Registry>,
        subscribe: bool,
    ) -> Result<Self> {
        let mut r = lock(slot);
        if let Some(r) = r.as_ref() {
            return Ok(r.clone());
        }
        let opened = Self::open(cfg, shared, registry, subscribe)?;
        *r = Some(opened.clone());
        Ok(opened)
    }
}

/// The worker of a process's `workers` that reads `partition` of `topic`: fixed for the life
/// of the process, so a partition given back after a rebalance returns to the worker that
/// knows its position. Partitions of one topic go round the workers in order (the group
/// hands a process runs of consecutive partitions), each topic starting at its own worker.
fn owner(topic: &str, partition: i32, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    let start = weir_core::keys::kafka_partition(topic.as_bytes(), workers as u32) as usize;
    (start + partition.max(0) as usize) % workers
}

/// The consumer of a source whose state follows partitions between processes, shared by
/// the job's successive runs.
struct KafkaGroup {
    cfg: Arc<KafkaSourceConfig>,
    shared: Arc<Shared>,
    reader: Arc<Mutex<Option<Reader>>>,
    /// The topic's partition count when the assignment was last read: which partition a key
    /// is in depends on it.
    partition_count: Mutex<Option<u32>>,
    /// Set when this source follows another's assignment ([`GroupMember::follow`]): the
    /// leader's consumer, the one member of the group. This source's consumer then joins no
    /// group, and its progress hints are committed through the leader's (the group refuses
    /// commits from a consumer that is not a member).
    ///
    /// [`GroupMember::follow`]: weir_core::handoff::GroupMember::follow
    leader: Mutex<Option<Arc<StreamConsumer<SourceCtx>>>>,
}

impl std::fmt::Debug for KafkaGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaGroup").field("group", &self.cfg.group_id).field("topics", &self.cfg.topics).finish()
    }
}

impl Drop for KafkaGroup {
    /// The consumer's close waits until every partition is given up, also those held back
    /// for a checkpoint that will not come now.
    fn drop(&mut self) {
        self.shared.closing.store(true, std::sync::atomic::Ordering::Release);
        let mut held = std::mem::take(&mut *lock(&self.shared.releasing));
        held.append(&mut lock(&self.shared.parked));
        if let (false, Some(r)) = (held.is_empty(), lock(&self.reader).as_ref()) {
            if let Err(e) = r.consumer.incremental_unassign(&partition_list(&held)) {
                tracing::warn!(error = %e, "Kafka incremental unassign on close failed.");
            }
        }
    }
}

/// A partition list of `tps` (no offsets).
fn partition_list(tps: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in tps {
        tpl.add_partition(t, *p);
    }
    tpl
}

impl KafkaGroup {
    /// Gives the partitions the current run parked back to the group: a checkpoint holding
    /// their state has completed.
    fn release_parked(&self) {
        let parked = std::mem::take(&mut *lock(&self.shared.parked));
        if parked.is_empty() {
            return;
        }
        let Some(reader) = lock(&self.reader).clone() else { return };
        match weir_core::runtime::blocking(|| reader.consumer.incremental_unassign(&partition_list(&parked))) {
            Ok(()) => {
                tracing::info!(partitions = ?parked, "Kafka partitions handed back to the group; a checkpoint holds their state.")
            }
            Err(e) => tracing::warn!(error = %e, partitions = ?parked, "Kafka incremental unassign failed."),
        }
    }

    /// The consumer kept across runs (and its queues), opened on first use.
    fn reader(&self, registry: &Arc<weir_core::metrics::Registry>) -> Result<Reader> {
        let following = lock(&self.leader).is_some();
        Reader::get_or_open(&self.reader, &self.cfg, &self.shared, registry, !following)
    }

    fn consumer(&self, registry: &Arc<weir_core::metrics::Registry>) -> Result<Arc<StreamConsumer<SourceCtx>>> {
        Ok(self.reader(registry)?.consumer)
    }

    fn topic(&self) -> &str {
        &self.cfg.topics[0]
    }
}

#[async_trait::async_trait]
impl weir_core::handoff::GroupMember for KafkaGroup {
    async fn assignment(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        registry: &Arc<weir_core::metrics::Registry>,
    ) -> Result<weir_core::handoff::Assignment> {
        let consumer = self.consumer(registry)?;
        let waited = Instant::now();
        let mut warned = Instant::now();
        loop {
            // The callbacks keep what the group gives this process (`owned`); the events only
            // say that it changed (and end a run).
            let events = std::mem::take(&mut *lock(&self.shared.events));
            for ev in events {
                if let Assignment::Failed(why) = ev {
                    return Err(assignment_failed(why));
                }
            }
            // A run starts once the group has made an assignment and no change is pending.
            if self.shared.known.load(std::sync::atomic::Ordering::Acquire) && lock(&self.shared.events).is_empty() {
                let list: Vec<(String, i32)> = lock(&self.shared.owned).iter().cloned().collect();
                return self.settle(&consumer, list).await;
            }
            if *stop.borrow() {
                return self.settle(&consumer, Vec::new()).await;
            }
            if warned.elapsed() >= Duration::from_secs(10) {
                warned = Instant::now();
                tracing::warn!(group = %self.cfg.group_id, waited_s = waited.elapsed().as_secs(), "Waiting for the consumer group to assign this process its partitions.");
            }
            // Polling serves the group protocol's callbacks. Records go to the partitions'
            // own queues, where the run's assignment at the restored positions makes
            // librdkafka drop what was fetched before it.
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()) => {}
                Ok(()) = stop.changed() => {}
            }
        }
    }

    fn positions(&self, tables: &[RecordBatch]) -> Result<HashMap<i32, i64>> {
        let mut out = HashMap::new();
        for ((t, p), o) in read_positions(tables)? {
            if t == self.topic() {
                out.insert(p, o);
            }
        }
        Ok(out)
    }

    fn position_table(&self, positions: &std::collections::BTreeMap<i32, i64>) -> Result<RecordBatch> {
        let rows: Vec<((String, i32), i64)> =
            positions.iter().map(|(p, o)| ((self.topic().to_string(), *p), *o)).collect();
        position_table(&rows)
    }

    fn partitions_of(&self, key: &ArrayRef) -> Result<Vec<Option<i32>>> {
        let Some(n) = *lock(&self.partition_count) else {
            weir_core::bail_internal!("kafka: partitions of keys asked before the assignment")
        };
        let part = |b: &[u8]| Some(weir_core::keys::kafka_partition(b, n) as i32);
        let rows = 0..key.len();
        Ok(match key.data_type() {
            DataType::Utf8 => {
                let a = key.as_string::<i32>();
                rows.map(|i| if a.is_null(i) { None } else { part(a.value(i).as_bytes()) }).collect()
            }
            DataType::LargeUtf8 => {
                let a = key.as_string::<i64>();
                rows.map(|i| if a.is_null(i) { None } else { part(a.value(i).as_bytes()) }).collect()
            }
            DataType::Int64 => {
                let a = key.as_primitive::<Int64Type>();
                rows.map(|i| if a.is_null(i) { None } else { part(a.value(i).to_string().as_bytes()) }).collect()
            }
            DataType::Int32 => {
                let a = key.as_primitive::<Int32Type>();
                rows.map(|i| if a.is_null(i) { None } else { part(a.value(i).to_string().as_bytes()) }).collect()
            }
            other => {
                return Err(CoreError::Config(format!(
                    "kafka: state follows partitions by the record key, so the first key must be text or an integer (it is {other})"
                )))
            }
        })
    }

    fn releasing(&self) -> bool {
        !lock(&self.shared.parked).is_empty()
    }

    async fn follow(
        &self,
        leader: &dyn weir_core::handoff::GroupMember,
        assignment: &weir_core::handoff::Assignment,
        registry: &Arc<weir_core::metrics::Registry>,
    ) -> Result<()> {
        let any: &dyn std::any::Any = leader;
        let Some(lead) = any.downcast_ref::<KafkaGroup>() else {
            return Err(CoreError::Config(format!(
                "kafka: a Kafka source shares partitions only with another Kafka source (not {leader:?})"
            )));
        };
        let Some(theirs) = lock(&lead.reader).as_ref().map(|r| r.consumer.clone()) else {
            weir_core::bail_internal!("kafka: a source followed another before that one joined its group")
        };
        *lock(&self.leader) = Some(theirs);
        let consumer = self.consumer(registry)?;
        let list = assignment.partitions.iter().map(|&p| (self.topic().to_string(), p)).collect();
        self.settle(&consumer, list).await?;
        let (n_lead, n_mine) = (*lock(&lead.partition_count), *lock(&self.partition_count));
        weir_core::ensure_config!(
            n_lead == n_mine,
            "kafka: topics `{}` ({} partitions) and `{}` ({} partitions) are read by processes that share them, so they must be partitioned alike: the same partition count, and the same key in each record",
            lead.topic(),
            n_lead.unwrap_or(0),
            self.topic(),
            n_mine.unwrap_or(0)
        );
        Ok(())
    }
}

impl KafkaGroup {
    /// Records the assignment the run starts with, and the topic's partition count.
    async fn settle(
        &self,
        consumer: &Arc<StreamConsumer<SourceCtx>>,
        mut list: Vec<(String, i32)>,
    ) -> Result<weir_core::handoff::Assignment> {
        list.sort();
        let c = consumer.clone();
        let topic = self.topic().to_string();
        let meta = tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&topic), Duration::from_secs(30)))
            .await
            .map_err(|e| CoreError::Task(e.to_string()))?
            .map_err(|e| kafka_err(format!("kafka source: reading the partitions of `{}`", self.topic()), &e))?;
        let count = meta.topics().iter().find(|t| t.name() == self.topic()).map_or(0, |t| t.partitions().len()) as u32;
        weir_core::ensure_config!(count > 0, "kafka source: topic `{}` has no partitions", self.topic());
        let mut known = lock(&self.partition_count);
        if known.is_some_and(|k| k != count) {
            tracing::warn!(topic = %self.topic(), was = known.unwrap_or(0), now = count,
                "The topic's partition count changed: keys now map to other partitions, and state moved between processes follows the new mapping.");
        }
        *known = Some(count);
        drop(known);
        *lock(&self.shared.current) = list.clone();
        // Positions come from the restored checkpoint of each run, not from an earlier one,
        // and what an earlier run's instances were told is over.
        lock(&self.shared.resume).clear();
        lock(&self.shared.inbox).clear();
        // Partitions taken back are not in `list`: this run parks their state.
        let releasing = std::mem::take(&mut *lock(&self.shared.releasing));
        lock(&self.shared.parked).extend(releasing);
        Ok(weir_core::handoff::Assignment { partitions: list.into_iter().map(|(_, p)| p).collect() })
    }
}

/// What the rebalance callback and the source's instances share.
#[derive(Default)]
struct Shared {
    /// Where to start a partition when it is assigned: restored positions, and the positions
    /// of partitions this process handed out before they were revoked.
    resume: Mutex<HashMap<(String, i32), i64>>,
    /// With `handoff`: assignment changes, for the group to start the job's next run on
    /// ([`KafkaGroup::assignment`]); while a run goes on, any of them ends it.
    events: Mutex<Vec<Assignment>>,
    /// Each worker's share of the assignment changes, for it to act on, with whether the
    /// process holds any partition after the change.
    inbox: Mutex<Vec<Vec<(Assignment, bool)>>>,
    /// The partitions the group gives this process, as of the latest rebalance callback.
    owned: Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// The group has made this process an assignment (possibly of nothing) since it joined.
    known: std::sync::atomic::AtomicBool,
    /// With `handoff`: partitions the group took back that this process still holds for it,
    /// until the job's next run has parked their state ([`KafkaGroup::settle`]).
    releasing: Mutex<Vec<(String, i32)>>,
    /// With `handoff`: partitions taken back whose state the current run parks; they go
    /// back to the group (`incremental_unassign`) once one of its checkpoints completed, so
    /// the member taking them finds their state in a checkpoint and need not fence this one.
    parked: Mutex<Vec<(String, i32)>>,
    /// The consumer is closing: partitions taken back are given up at once (its close waits
    /// for that).
    closing: std::sync::atomic::AtomicBool,
    /// With `handoff`: where each partition's queue goes on after the last run, when that
    /// run ended at a checkpoint with everything it took handed out; a next run starting
    /// there need not seek.
    continues: Mutex<HashMap<(String, i32), i64>>,
    /// Wakes each worker when its inbox gets something.
    wakers: Mutex<Vec<Arc<tokio::sync::Notify>>>,
    /// The process's workers, among which the partitions are divided.
    workers: std::sync::atomic::AtomicUsize,
    /// The consumer and where its partitions' queues go, to split each partition off before
    /// it is assigned (weak: the consumer holds this, and its queues hold the consumer).
    #[allow(clippy::type_complexity)]
    splitter: Mutex<Option<(std::sync::Weak<StreamConsumer<SourceCtx>>, std::sync::Weak<Queues>)>>,
    /// Each partition's end offset, from the client's statistics.
    ends: Mutex<HashMap<(String, i32), i64>>,
    /// With `handoff`: the partitions the group assigned, as the job's run starts.
    current: Mutex<Vec<(String, i32)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("current", &*lock(&self.current)).finish_non_exhaustive()
    }
}

impl Shared {
    fn workers(&self) -> usize {
        self.workers.load(std::sync::atomic::Ordering::Relaxed).max(1)
    }

    fn waker(&self, worker: usize) -> Arc<tokio::sync::Notify> {
        let mut w = lock(&self.wakers);
        while w.len() <= worker {
            w.push(Arc::new(tokio::sync::Notify::new()));
        }
        w[worker].clone()
    }

    fn wake_all(&self) {
        for w in lock(&self.wakers).iter() {
            w.notify_one();
        }
    }

    /// Hands each worker its share of an assignment change (partitions added or taken
    /// away; an empty share still tells it the change), or a failure to every one. `holding`:
    /// whether the process holds any partition after the change.
    fn post(&self, ev: &Assignment, holding: bool) {
        let n = self.workers();
        let mut inbox = lock(&self.inbox);
        let len = n.max(inbox.len());
        inbox.resize_with(len, Vec::new);
        for (w, mine) in inbox.iter_mut().enumerate().take(n) {
            let share = match ev {
                // The group can give a process nothing for a while (an assignment made before
                // the topic's partitions were known, or a member that just joined): that is
                // not an assignment a bounded run's worker may end on.
                Assignment::Assigned(l) if l.is_empty() && !holding => Assignment::Revoked(Vec::new()),
                Assignment::Assigned(l) => {
                    Assignment::Assigned(l.iter().filter(|(t, p, _)| owner(t, *p, n) == w).cloned().collect())
                }
                Assignment::Revoked(l) | Assignment::Lost(l) => {
                    Assignment::Revoked(l.iter().filter(|(t, p)| owner(t, *p, n) == w).cloned().collect())
                }
                Assignment::Failed(why) => Assignment::Failed(why.clone()),
            };
            mine.push((share, holding));
        }
        drop(inbox);
        self.wake_all();
    }

    /// The group took `tps` from this process.
    fn disown(&self, tps: &[(String, i32)]) {
        let mut owned = lock(&self.owned);
        for tp in tps {
            owned.remove(tp);
        }
    }

    /// Gives each of `tps` not split off yet a queue of its own. Done before the partitions
    /// are assigned, so that none of their records ever reaches the consumer's own queue (the
    /// split lasts through later assignments: librdkafka keeps a queue the application
    /// redirected).
    fn split(&self, tps: &[(String, i32)]) -> std::result::Result<(), String> {
        let (consumer, queues) = match lock(&self.splitter).as_ref() {
            Some((c, q)) => (c.upgrade(), q.upgrade()),
            None => (None, None),
        };
        let (Some(consumer), Some(queues)) = (consumer, queues) else {
            return Err("the consumer is gone".into());
        };
        let mut queues = lock(&queues);
        for (t, p) in tps {
            if queues.contains_key(&(t.clone(), *p)) {
                continue;
            }
            let wake = self.waker(owner(t, *p, self.workers()));
            let q = PartitionQueue::split(&consumer, t, *p, wake)
                .ok_or_else(|| format!("could not give partition {t}/{p} a queue of its own"))?;
            queues.insert((t.clone(), *p), Arc::new(q));
        }
        Ok(())
    }
}

/// A partition added, with the offset where it ended then (`None` when not asked or not
/// known).
type PartitionEnd = (String, i32, Option<i64>);

/// A change of the partitions a process reads: the group's rebalances are incremental
/// (`cooperative-sticky`), so each names only what moves.
#[derive(Debug, Clone)]
enum Assignment {
    /// Partitions added, with the offset where each ended at that moment (for
    /// `stop_at_end`; `None` when it could not be read).
    Assigned(Vec<PartitionEnd>),
    /// Partitions the group takes back.
    Revoked(Vec<(String, i32)>),
    /// Partitions the group gave another member already (this one missed its session):
    /// with `handoff` the run stops where it is, as its output may no longer be committed.
    Lost(Vec<(String, i32)>),
    /// The assignment could not be carried out (see `retried`): the run fails with this.
    Failed(String),
}

fn assignment_failed(message: String) -> CoreError {
    CoreError::Other { message, blame: weir_core::Blame::External, retry: weir_core::Retry::Never }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The consumer's context: logs, and the rebalance callback that starts each partition at
/// the right offset.
#[derive(Debug)]
struct SourceCtx {
    log: Logging,
    shared: Arc<Shared>,
    start: KafkaStart,
    stop_at_end: bool,
    registry: Arc<weir_core::metrics::Registry>,
    /// The consumer group, labelling the consumer's own metrics.
    group: String,
    /// Partitions moving end the job's run (see [`KafkaSourceConfig::handoff`]).
    handoff: bool,
    on_missing: MissingPosition,
}

/// Logs and counts restored positions the broker no longer has; with
/// [`MissingPosition::Fail`], the error that fails the run.
fn report_missing(
    missing: &[Missing],
    policy: MissingPosition,
    registry: &weir_core::metrics::Registry,
) -> std::result::Result<(), String> {
    for m in missing {
        tracing::error!(
            topic = %m.topic,
            partition = m.partition,
            position = m.position,
            earliest = m.low,
            end = m.high,
            skipped = m.skipped(),
            "Kafka source: a checkpointed position is no longer on the broker; records were skipped."
        );
        let partition = m.partition.to_string();
        registry.connectors.add(
            "weir_kafka_records_skipped_total",
            "Records skipped because a checkpointed position was no longer on the broker.",
            &[("topic", m.topic.as_str()), ("partition", partition.as_str())],
            m.skipped() as f64,
        );
    }
    match (policy, missing.first()) {
        (MissingPosition::Fail, Some(m)) => Err(format!("{} (on_missing_position: fail)", m.describe())),
        _ => Ok(()),
    }
}

impl ClientContext for SourceCtx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each partition's end
    /// offset (`hi_offset`); the source turns it into lag against its own position. Read from
    /// the raw JSON: only the fields used are read, and brokers differ in the rest.
    ///
    /// They also carry what is fetched ahead (`fetchq_size`: the partitions' queues feed the
    /// consumer's one queue, so each reports that queue's bytes). The statistics are taken
    /// every interval but handed over only when the source polls, so a stall shows once it
    /// ends: hence the peak next to the latest figure.
    fn stats_raw(&self, raw: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else { return };
        let Some(topics) = v["topics"].as_object() else { return };
        let mut ends = lock(&self.shared.ends);
        let mut queued: Option<i64> = None;
        for (topic, t) in topics {
            let Some(parts) = t["partitions"].as_object() else { continue };
            for (p, part) in parts {
                // Partition -1 is librdkafka's internal "unassigned" one.
                let Ok(p) = p.parse::<i32>() else { continue };
                if p < 0 {
                    continue;
                }
                if let Some(hi) = part["hi_offset"].as_i64().filter(|&hi| hi >= 0) {
                    ends.insert((topic.clone(), p), hi);
                }
                if let Some(q) = part["fetchq_size"].as_i64() {
                    queued = Some(queued.unwrap_or(0).max(q));
                }
            }
        }
        drop(ends);
        if let Some(q) = queued {
            let group = [("group", self.group.as_str())];
            let m = &self.registry.connectors;
            let peak = m.get("weir_kafka_fetch_queue_peak_bytes", &group).unwrap_or(0.0).max(q as f64);
            m.set(
                "weir_kafka_fetch_queue_bytes",
                "Bytes fetched ahead of the source and waiting in the client, at the latest statistics.",
                &group,
                q as f64,
            );
            m.set(
                "weir_kafka_fetch_queue_peak_bytes",
                "The most bytes fetched ahead of the source at once since the start (bounded by queued.max.messages.kbytes plus a fetch).",
                &group,
                peak,
            );
        }
    }
}

impl SourceCtx {
    /// With a handoff, a change is the group's, ending the run; else each worker acts on its
    /// share.
    fn tell(&self, ev: Assignment) {
        if self.handoff {
            lock(&self.shared.events).push(ev);
            self.shared.wake_all();
        } else {
            let holding = !lock(&self.shared.owned).is_empty();
            self.shared.post(&ev, holding);
        }
    }

    fn count_rebalance(&self, event: &str) {
        let help = "Partition assignments and revocations seen by the consumer.";
        self.registry.connectors.add("weir_kafka_rebalances_total", help, &[("event", event)], 1.0);
    }
}

impl ConsumerContext for SourceCtx {
    // Overridden (not pre_rebalance) because only here is the list mutable: offsets set on it
    // take effect with the assignment itself, before any fetch, so no record before a
    // checkpointed position is ever read. The group rebalances incrementally
    // (`cooperative-sticky`, set in `new_consumer`): each callback names only the partitions
    // that move, and the others go on being read.
    fn rebalance(&self, base: &BaseConsumer<Self>, err: rdkafka::types::RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        use rdkafka::types::RDKafkaRespErr as E;
        let tps: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS if tps.is_empty() => {
                // A round of the rebalance that gives this member nothing more; the protocol
                // still waits for the (empty) call.
                if let Err(e) = base.incremental_assign(tpl) {
                    tracing::warn!(error = %e, "Kafka incremental assign (of nothing) failed.");
                }
                if !self.shared.known.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    self.tell(Assignment::Assigned(Vec::new()));
                }
            }
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // A partition must never start somewhere else than asked, nor go unread: the
                // lookups and the assignment are tried a few times, then the run fails. With a
                // handoff this start is provisional: the run that reads the partitions seeks
                // them to the positions it restored.
                let resume = lock(&self.shared.resume).clone();
                // The callback runs inside the consumer's poll, on a runtime worker: the lookups
                // below wait on the brokers, so the worker's other tasks move off this thread
                // while they do.
                let started = weir_core::runtime::blocking(|| {
                    let mut missing = Vec::new();
                    self.shared.split(&tps)?;
                    retried("looking up the start offsets", || {
                        missing = start_offsets(base, tpl, &resume, self.start)?;
                        Ok(())
                    })
                    .and_then(|()| report_missing(&missing, self.on_missing, &self.registry))
                    .and_then(|()| {
                        retried("assigning the partitions", || base.incremental_assign(tpl).map_err(|e| e.to_string()))
                    })
                });
                if let Err(e) = started {
                    tracing::error!(error = %e, partitions = ?tps, "Kafka partition assignment failed; the run stops.");
                    self.tell(Assignment::Failed(format!(
                        "kafka source: {e} (partitions {})",
                        tps.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(", ")
                    )));
                    return;
                }
                let ends = weir_core::runtime::blocking(|| {
                    tps.iter()
                        .map(|(t, p)| {
                            // With a handoff the run that reads them asks again.
                            let end = (self.stop_at_end && !self.handoff)
                                .then(|| base.fetch_watermarks(t, *p, Duration::from_secs(10)).ok().map(|(_, h)| h))
                                .flatten();
                            (t.clone(), *p, end)
                        })
                        .collect::<Vec<_>>()
                });
                lock(&self.shared.owned).extend(tps);
                self.shared.known.store(true, std::sync::atomic::Ordering::Release);
                tracing::info!(partitions = ends.len(), "Kafka partitions assigned.");
                tracing::debug!(?ends, "Where the assigned partitions end (bounded runs).");
                self.count_rebalance("assigned");
                self.tell(Assignment::Assigned(ends));
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = base.assignment_lost();
                self.shared.disown(&tps);
                self.count_rebalance("revoked");
                if self.handoff && !lost && !self.shared.closing.load(std::sync::atomic::Ordering::Acquire) {
                    // Held for the group until a checkpoint carries their state: the next run
                    // parks it, and gives them up once one of its checkpoints completed
                    // (`KafkaSource::checkpoint_complete`). The group waits meanwhile.
                    tracing::info!(partitions = ?tps, "Kafka partitions taken back; handed on once a checkpoint carries their state.");
                    lock(&self.shared.releasing).extend(tps.iter().cloned());
                    self.tell(Assignment::Revoked(tps));
                    return;
                }
                if let Err(e) = base.incremental_unassign(tpl) {
                    tracing::warn!(error = %e, "Kafka incremental unassign failed.");
                }
                if lost {
                    tracing::warn!(partitions = ?tps, "Kafka partitions lost: the group gave them to another member (this one missed its session).");
                    self.tell(Assignment::Lost(tps));
                } else {
                    tracing::info!(partitions = tps.len(), "Kafka partitions revoked.");
                    self.tell(Assignment::Revoked(tps));
                }
            }
            other => {
                tracing::warn!(error = ?other, partitions = ?tps, "Kafka rebalance failed; dropping these partitions until the next one.");
                let _ = base.incremental_unassign(tpl);
                self.shared.disown(&tps);
                self.tell(Assignment::Lost(tps));
            }
        }
    }
}

/// Arrivals closer than this are taken as one fetch's records (see `KafkaSource::poll`).
const FETCH_APART: Duration = Duration::from_micros(200);

/// How often a rebalance step is tried before the run fails, and the pause between tries.
const REBALANCE_TRIES: u32 = 3;
const REBALANCE_PAUSE: Duration = Duration::from_millis(500);

/// Runs `f` up to [`REBALANCE_TRIES`] times (it runs in the consumer's rebalance callback, so
/// it may block); the last error, naming `what`, when every try failed.
fn retried(what: &str, mut f: impl FnMut() -> std::result::Result<(), String>) -> std::result::Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=REBALANCE_TRIES {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "Kafka source: {what} failed.");
                last = e;
            }
        }
        if attempt < REBALANCE_TRIES {
            std::thread::sleep(REBALANCE_PAUSE);
        }
    }
    Err(format!("{what} failed {REBALANCE_TRIES} times: {last}"))
}

/// Sets where each partition of `tpl` starts: its position in `resume`, or where `start`
/// says (a timestamp is looked up: a partition with no record at or after it starts at its
/// end, as the broker answers). A restored position the broker no longer has (before its
/// earliest record: retention deleted them) starts at the earliest record and is returned. A lookup
/// that fails is the error.
fn start_offsets<C: Consumer<SourceCtx>>(
    c: &C,
    tpl: &mut TopicPartitionList,
    resume: &HashMap<(String, i32), i64>,
    start: KafkaStart,
) -> std::result::Result<Vec<Missing>, String> {
    let tps: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
    let mut by_time = TopicPartitionList::new();
    let mut missing = Vec::new();
    for (t, p) in &tps {
        let offset = match (resume.get(&(t.clone(), *p)), start) {
            (Some(&o), _) => {
                // librdkafka would reset such a position quietly (a warning at most).
                let (low, high) = c
                    .fetch_watermarks(t, *p, Duration::from_secs(10))
                    .map_err(|e| format!("the offsets {t}/{p} holds: {e}"))?;
                // Only records gone from the start count: a position past the end may just be
                // ahead of a stale answer, and resetting it would read records twice.
                if o < low {
                    missing.push(Missing { topic: t.clone(), partition: *p, position: o, low, high });
                    Offset::Offset(low)
                } else {
                    Offset::Offset(o)
                }
            }
            (None, KafkaStart::Earliest) => Offset::Beginning,
            (None, KafkaStart::Latest) => Offset::End,
            (None, KafkaStart::Committed) => Offset::Stored,
            (None, KafkaStart::Timestamp(ms)) => {
                let _ = by_time.add_partition_offset(t, *p, Offset::Offset(ms));
                Offset::End
            }
        };
        let _ = tpl.set_partition_offset(t, *p, offset);
    }
    if by_time.count() > 0 {
        let found = c.offsets_for_times(by_time, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        for e in found.elements() {
            if let Err(err) = e.error() {
                return Err(format!("{}/{}: {err}", e.topic(), e.partition()));
            }
            let _ = tpl.set_partition_offset(e.topic(), e.partition(), e.offset());
        }
    }
    Ok(missing)
}

/// Moves assigned partitions to the offsets of `tpl` (a seek: what was fetched before is
/// dropped). A seek takes no "committed" offset, so those are looked up (a partition
/// without one starts as `auto.offset.reset` says).
fn seek_to<C: Consumer<SourceCtx>>(
    c: &C,
    tpl: &TopicPartitionList,
    start: KafkaStart,
) -> std::result::Result<(), String> {
    if tpl.count() == 0 {
        return Ok(());
    }
    let mut tpl = tpl.clone();
    let stored: Vec<(String, i32)> = tpl
        .elements()
        .iter()
        .filter(|e| e.offset() == Offset::Stored)
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    if !stored.is_empty() {
        let committed =
            c.committed_offsets(partition_list(&stored), Duration::from_secs(10)).map_err(|e| e.to_string())?;
        for e in committed.elements() {
            let o = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ if start == KafkaStart::Latest => Offset::End,
                _ => Offset::Beginning,
            };
            let _ = tpl.set_partition_offset(e.topic(), e.partition(), o);
        }
    }
    let done = c.seek_partitions(tpl, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    for e in done.elements() {
        if let Err(err) = e.error() {
            return Err(format!("{}/{}: {err}", e.topic(), e.partition()));
        }
    }
    Ok(())
}

/// One partition's records waiting to be handed out.
#[derive(Debug, Default)]
struct Part {
    topic: String,
    partition: i32,
    assigned: bool,
    /// Offset of the next record to hand out (`None` before the first record).
    next: Option<i64>,
    /// With `stop_at_end`: the offset where the partition ended when assigned.
    end: Option<i64>,
    /// Where this process had got to in the partition before this run: records below it
    /// are read again.
    before: Option<i64>,
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    offsets: Vec<i64>,
    keys: Vec<Option<String>>,
    times: Vec<Option<i64>>,
    headers: Vec<Option<String>>,
    received: Vec<i64>,
    first_at: Option<Instant>,
    /// The trace context of the first buffered record that had one (traces on only).
    trace: Option<weir_core::trace::SpanContext>,
}

impl Part {
    fn done(&self) -> bool {
        match self.end {
            Some(end) => self.ranges.is_empty() && self.next.unwrap_or(0) >= end,
            None => false,
        }
    }
}

struct KafkaSource {
    worker: usize,
    workers: usize,
    cfg: Arc<KafkaSourceConfig>,
    schema: SchemaRef,
    decoder: Box<dyn Decoder>,
    run: Arc<Run>,
    /// The run's consumer, once this instance has polled.
    reader: Option<Reader>,
    /// The queues of the partitions this worker reads now, with their local index.
    queues: Vec<(usize, Arc<PartitionQueue>)>,
    /// Records taken off a queue, kept for its allocation (empty between drains).
    taken: Fetched,
    /// Which queue the next drain starts with: they take turns, so that a partition with
    /// records always waiting does not starve the others.
    turn: usize,
    /// Woken when the inbox gets something.
    wake: Arc<tokio::sync::Notify>,
    /// Where this process got to in each partition in earlier runs.
    handed: Arc<Handed>,
    /// With `handoff`: the consumer kept across runs.
    group: Option<Arc<KafkaGroup>>,
    /// With `handoff`, on worker 0: the assignment was applied at the restored positions.
    started: bool,
    /// The latest change this worker heard of was an assignment (not a revocation): a bounded
    /// run may end once what it holds is read.
    seen_assignment: bool,
    /// `until` was seen set and each assigned partition's end read.
    until_armed: bool,
    /// Partitions by local index (the runtime's watermark slot); never removed, so indices
    /// stay stable across rebalances.
    parts: Vec<Part>,
    index: HashMap<(String, i32), usize>,
    linger: Linger,
    /// When the linger last counted a fetch's arrival.
    fetched_at: Option<Instant>,
    pending_idle: Vec<usize>,
    last_snapshot: Option<TopicPartitionList>,
    warned_at: Option<Instant>,
    /// Since when nothing has arrived: kept across polls, because the runtime drops a poll
    /// for every barrier and completed checkpoint, and a wait restarted each time would never
    /// reach its end (and the source never report itself waiting) under frequent checkpoints.
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("worker", &self.worker)
            .field("topics", &self.cfg.topics)
            .field("partitions", &self.parts.len())
            .finish_non_exhaustive()
    }
}

/// Creates the consumer (not subscribed yet).
fn new_consumer(
    cfg: &KafkaSourceConfig,
    shared: &Arc<Shared>,
    registry: &Arc<weir_core::metrics::Registry>,
) -> Result<StreamConsumer<SourceCtx>> {
    let reset = if cfg.start == KafkaStart::Latest { "latest" } else { "earliest" };
    let ours = [
        ("group.id", cfg.group_id.clone()),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", reset.into()),
        // Incremental rebalances: only the partitions that move stop.
        ("partition.assignment.strategy", "cooperative-sticky".into()),
        ("enable.partition.eof", "false".into()),
        // Lag metrics come with the statistics; a pipeline may choose another interval.
        (
            "statistics.interval.ms",
            cfg.client.properties.get("statistics.interval.ms").cloned().unwrap_or_else(|| "5000".into()),
        ),
        // How long a broker may hold a fetch when it has nothing new. Kafka answers as soon
        // as data arrives, but some brokers (Tansu, librdkafka's mock) wait out the whole
        // time, and librdkafka's 500 ms then becomes the latency. 10 ms costs an idle
        // consumer about a hundred small requests a second per broker.
        ("fetch.wait.max.ms", cfg.client.properties.get("fetch.wait.max.ms").cloned().unwrap_or_else(|| "10".into())),
        // Backpressure: when the job stops taking records, librdkafka stops fetching once
        // this much is read ahead (its default, 64 MiB, is a lot to hold for a stalled job).
        (
            "queued.max.messages.kbytes",
            cfg.client.properties.get("queued.max.messages.kbytes").cloned().unwrap_or_else(|| "16384".into()),
        ),
    ];
    let ctx = SourceCtx {
        log: Logging::new(format!("kafka source (group {})", cfg.group_id)),
        shared: shared.clone(),
        start: cfg.start,
        stop_at_end: cfg.stop_at_end,
        registry: registry.clone(),
        group: cfg.group_id.clone(),
        handoff: cfg.handoff,
        on_missing: cfg.on_missing_position,
    };
    cfg.client
        .client_config(&ours)
        .create_with_context(ctx)
        .map_err(|e| kafka_err("kafka source: cannot create the consumer", &e))
}

impl KafkaSource {
    /// With a handoff, on worker 0: starts the partitions of the run at the positions it
    /// restored, then tells every worker its share. A group member's partitions are assigned
    /// already (by the rebalance callback, provisionally): each moves to its restored
    /// position (a seek drops what was fetched before), except those whose queue goes on
    /// exactly there because the last run ended at a checkpoint: they are left alone, so
    /// nothing of theirs is fetched twice. A follower, in no group, assigns them all.
    async fn start_assigned(&mut self, consumer: &Arc<StreamConsumer<SourceCtx>>) -> Result<()> {
        let shared = self.run.shared.clone();
        let current = lock(&shared.current).clone();
        let resume = lock(&shared.resume).clone();
        let continues = std::mem::take(&mut *lock(&shared.continues));
        let member = self.group.as_ref().is_some_and(|g| lock(&g.leader).is_none());
        let (start, stop_at_end, on_missing) = (self.cfg.start, self.cfg.stop_at_end, self.cfg.on_missing_position);
        let c = consumer.clone();
        let registry = c.context().registry.clone();
        let sh = shared.clone();
        let (ends, moved) = tokio::task::spawn_blocking(move || -> Result<(Vec<PartitionEnd>, usize)> {
            let moving: Vec<(String, i32)> = current
                .iter()
                .filter(|tp| !member || !resume.contains_key(*tp) || continues.get(*tp) != resume.get(*tp))
                .cloned()
                .collect();
            let mut tpl = partition_list(&moving);
            let mut missing = Vec::new();
            sh.split(&current)
                .and_then(|()| {
                    retried("looking up the start offsets", || {
                        missing = start_offsets(c.as_ref(), &mut tpl, &resume, start)?;
                        Ok(())
                    })
                })
                .and_then(|()| report_missing(&missing, on_missing, &registry))
                .and_then(|()| {
                    if member {
                        retried("moving the partitions to their positions", || seek_to(c.as_ref(), &tpl, start))
                    } else {
                        retried("assigning the partitions", || c.assign(&tpl).map_err(|e| e.to_string()))
                    }
                })
                .map_err(|e| assignment_failed(format!("kafka source: {e}")))?;
            let ends = current
                .into_iter()
                .map(|(t, p)| {
                    let end = stop_at_end
                        .then(|| c.fetch_watermarks(&t, p, Duration::from_secs(10)).ok().map(|(_, h)| h))
                        .flatten();
                    (t, p, end)
                })
                .collect();
            Ok((ends, moving.len()))
        })
        .await
        .map_err(|e| CoreError::Task(e.to_string()))??;
        tracing::info!(
            partitions = ends.len(),
            moved_to_their_positions = moved,
            "Kafka partitions read from their restored positions."
        );
        let holding = !ends.is_empty();
        shared.post(&Assignment::Assigned(ends), holding);
        Ok(())
    }

    fn reader(&mut self, registry: &Arc<weir_core::metrics::Registry>) -> Result<Reader> {
        if let Some(r) = &self.reader {
            return Ok(r.clone());
        }
        let r = match &self.group {
            Some(g) => g.reader(registry)?,
            None => Reader::get_or_open(&self.run.reader, &self.cfg, &self.run.shared, registry, true)?,
        };
        self.reader = Some(r.clone());
        Ok(r)
    }

    fn slot(&mut self, topic: &str, partition: i32) -> usize {
        if let Some(&i) = self.index.get(&(topic.to_string(), partition)) {
            return i;
        }
        let i = self.parts.len();
        let before = lock(&self.handed).get(&(topic.to_string(), partition)).copied();
        self.parts.push(Part { topic: topic.to_string(), partition, before, ..Part::default() });
        self.index.insert((topic.to_string(), partition), i);
        i
    }

    /// Acts on this worker's share of the assignment changes.
    fn apply_events(&mut self) -> Result<()> {
        let events = {
            let mut inbox = lock(&self.run.shared.inbox);
            match inbox.get_mut(self.worker) {
                Some(mine) => std::mem::take(mine),
                None => return Ok(()),
            }
        };
        let Some(reader) = self.reader.clone() else {
            weir_core::bail_internal!("kafka: assignment changes before the consumer was opened")
        };
        for (ev, holding) in events {
            match ev {
                Assignment::Failed(why) => return Err(assignment_failed(why)),
                Assignment::Assigned(list) => {
                    if list.is_empty() && self.parts.is_empty() {
                        // The placeholder partition: this worker has nothing to read.
                        self.pending_idle.push(0);
                    }
                    for (t, p, end) in list {
                        let i = self.slot(&t, p);
                        let Some(q) = lock(&reader.queues).get(&(t.clone(), p)).cloned() else {
                            weir_core::bail_internal!(
                                "kafka: partition {t}/{p} was assigned without a queue of its own"
                            )
                        };
                        if !self.queues.iter().any(|(j, _)| *j == i) {
                            self.queues.push((i, q));
                        }
                        let resumed = lock(&self.run.shared.resume).get(&(t, p)).copied();
                        let part = &mut self.parts[i];
                        part.assigned = true;
                        part.end = end;
                        // Never back: records may have been taken from the queue already.
                        part.next = part.next.max(resumed);
                    }
                    self.seen_assignment = holding;
                }
                Assignment::Revoked(list) | Assignment::Lost(list) => {
                    self.seen_assignment = holding;
                    for (t, p) in list {
                        let i = self.slot(&t, p);
                        self.queues.retain(|(j, _)| *j != i);
                        let part = &mut self.parts[i];
                        part.assigned = false;
                        // Read ahead but never handed out: the partition's next owner reads
                        // them again from the position.
                        part.buf.clear();
                        part.ranges.clear();
                        part.offsets.clear();
                        part.keys.clear();
                        part.times.clear();
                        part.headers.clear();
                        part.received.clear();
                        part.first_at = None;
                        part.trace = None;
                        if let Some(n) = part.next {
                            lock(&self.run.shared.resume).insert((t, p), n);
                        }
                        self.pending_idle.push(i);
                    }
                }
            }
        }
        Ok(())
    }

    /// Buffers a record unless it is not new to this source: one below the partition's next
    /// position was handed out or buffered already (a partition came back, or was assigned
    /// again at its restored position, while the fetcher still held older records), and with
    /// a handoff one of a partition this run does not hold was fetched before the run began.
    /// Returns whether it was kept.
    fn add(&mut self, i: usize, m: Record<'_>) -> bool {
        let p = &self.parts[i];
        let expected = p.offsets.last().map(|o| o + 1).or(p.next);
        if (self.group.is_some() && !p.assigned) || expected.is_some_and(|e| m.offset() < e) {
            return false;
        }
        let md = &self.cfg.metadata;
        let part = &mut self.parts[i];
        let payload = m.payload().unwrap_or_default();
        let start = part.buf.len();
        part.buf.extend_from_slice(payload);
        part.ranges.push(start..part.buf.len());
        part.offsets.push(m.offset());
        if md.key.is_some() {
            part.keys.push(m.key().map(|k| String::from_utf8_lossy(k).into_owned()));
        }
        if md.timestamp.is_some() {
            part.times.push(m.timestamp());
        }
        if md.received.is_some() {
            part.received.push(now_us());
        }
        if md.headers.is_some() {
            let h = m.headers();
            // A record without headers has none (null), as with no header block at all.
            part.headers.push((!h.is_empty()).then(|| {
                let obj: serde_json::Map<String, serde_json::Value> = h
                    .into_iter()
                    .map(|(k, v)| {
                        let v = v.map(|v| String::from_utf8_lossy(v).into_owned());
                        (k.into_owned(), v.map_or(serde_json::Value::Null, serde_json::Value::String))
                    })
                    .collect();
                serde_json::Value::Object(obj).to_string()
            }));
        }
        if part.first_at.is_none() {
            part.first_at = Some(Instant::now());
        }
        if part.trace.is_none() && weir_core::trace::enabled() {
            part.trace = m
                .headers()
                .into_iter()
                .find(|(k, _)| k == weir_core::trace::TRACEPARENT)
                .and_then(|(_, v)| v.and_then(weir_core::trace::parse_traceparent));
        }
        true
    }

    /// A partition whose batch is due: full, or lingered long enough, or every batch when
    /// the source is stopping.
    fn due(&self, now: Instant, flush: bool) -> Option<usize> {
        self.parts.iter().position(|p| {
            !p.ranges.is_empty()
                && (flush || p.first_at.is_some_and(|f| self.linger.should_cut(p.ranges.len(), f, now)))
        })
    }

    fn cut(&mut self, i: usize, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let part = &mut self.parts[i];
        let buf = std::mem::take(&mut part.buf);
        let ranges = std::mem::take(&mut part.ranges);
        let offsets = std::mem::take(&mut part.offsets);
        let keys = std::mem::take(&mut part.keys);
        let times = std::mem::take(&mut part.times);
        let headers = std::mem::take(&mut part.headers);
        let received = std::mem::take(&mut part.received);
        let trace = part.trace.take();
        part.first_at = None;
        if let Some(last) = offsets.last() {
            part.next = Some(last + 1);
        }
        let (topic, partition) = (part.topic.clone(), part.partition);
        let again = part.before.map_or(0, |b| offsets.iter().take_while(|&&o| o < b).count());
        if let Some(next) = part.next {
            let mut handed = lock(&self.handed);
            let h = handed.entry((topic.clone(), partition)).or_insert(next);
            *h = (*h).max(next);
        }
        if again > 0 {
            cx.registry.connectors.add(
                "weir_kafka_records_reread_total",
                "Records this process handed out again: a run started over from a checkpoint behind where an earlier one had got (a crash of the run, a fenced producer, a lost partition).",
                &[("topic", &topic), ("partition", &partition.to_string())],
                again as f64,
            );
        }
        self.publish_lag(cx);
        let md = self.cfg.metadata.clone();
        let schema = self.schema.clone();
        let rows = |d: &weir_formats::Decoded| -> Result<RecordBatch> {
            if md.fields().is_empty() {
                return Ok(d.batch.clone());
            }
            let n = d.batch.num_rows();
            let rec = |r: usize| d.record_of_row(r);
            let mut cols: Vec<ArrayRef> = d.batch.columns().to_vec();
            if md.key.is_some() {
                cols.push(Arc::new(StringArray::from((0..n).map(|r| keys[rec(r)].clone()).collect::<Vec<_>>())));
            }
            if md.topic.is_some() {
                cols.push(Arc::new(StringArray::from(vec![topic.as_str(); n])));
            }
            if md.partition.is_some() {
                cols.push(Arc::new(Int32Array::from(vec![partition; n])));
            }
            if md.offset.is_some() {
                cols.push(Arc::new(Int64Array::from((0..n).map(|r| offsets[rec(r)]).collect::<Vec<_>>())));
            }
            if md.timestamp.is_some() {
                cols.push(Arc::new(Int64Array::from((0..n).map(|r| times[rec(r)]).collect::<Vec<_>>())));
            }
            if md.headers.is_some() {
                cols.push(Arc::new(StringArray::from((0..n).map(|r| headers[rec(r)].clone()).collect::<Vec<_>>())));
            }
            if md.received.is_some() {
                cols.push(Arc::new(Int64Array::from((0..n).map(|r| received[rec(r)]).collect::<Vec<_>>())));
            }
            Ok(RecordBatch::try_new(schema.clone(), cols)?)
        };
        weir_core::metrics::StepMetrics::add(&cx.registry.source_bytes, buf.len() as u64);
        let batch = decode_records_with(
            self.decoder.as_mut(),
            self.cfg.event_time.as_ref(),
            &buf,
            &ranges,
            &format!("kafka {topic}[{partition}]"),
            |r| Position { offset: u64::try_from(offsets[r]).unwrap_or(0), line: None }.render(),
            cx,
            rows,
        )?;
        Ok(batch.map(|b| b.traced(trace)))
    }

    /// A bounded run's worker has read all it holds (nothing, when the assignment gave it
    /// nothing).
    fn finished(&self) -> bool {
        (self.cfg.stop_at_end || self.until_armed)
            && self.seen_assignment
            && self.parts.iter().filter(|p| p.assigned).all(Part::done)
    }

    /// Once the writer of a repartition topic has finished: reads where each assigned
    /// partition ends now, so the source ends there.
    async fn arm_until(&mut self, consumer: &Arc<StreamConsumer<SourceCtx>>) -> Result<()> {
        let held: Vec<(usize, String, i32)> = self
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.assigned)
            .map(|(i, p)| (i, p.topic.clone(), p.partition))
            .collect();
        let c = consumer.clone();
        let ends = tokio::task::spawn_blocking(move || -> Result<Vec<(usize, i64)>> {
            held.into_iter()
                .map(|(i, t, p)| {
                    let (_, hi) = c
                        .fetch_watermarks(&t, p, Duration::from_secs(30))
                        .map_err(|e| kafka_err(format!("kafka source: reading where `{t}`[{p}] ends"), &e))?;
                    Ok((i, hi))
                })
                .collect()
        })
        .await
        .map_err(|e| CoreError::Task(e.to_string()))??;
        for (i, hi) in ends {
            self.parts[i].end = Some(hi);
        }
        self.until_armed = true;
        tracing::info!(topics = ?self.cfg.topics, "The repartition topic's writer finished; reading to its end.");
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for KafkaSource {
    fn partitions(&self) -> usize {
        // Partitions join as Kafka assigns them; until the first assignment each worker has
        // one placeholder (it becomes the first partition the worker is given, or goes idle
        // when the assignment gives it none), which holds the watermark back until then.
        self.parts.len().max(1)
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        let reader = self.reader(&cx.registry)?;
        let consumer = reader.consumer.clone();
        if self.worker == 0 && self.group.is_some() && !self.started {
            self.start_assigned(&consumer).await?;
            self.started = true;
        }
        loop {
            // A client error no retry will cure (an untrusted certificate) ends the run.
            if let Some(e) = consumer.context().log.fatal() {
                return Err(e);
            }
            if self.worker == 0 {
                // The consumer's own queue carries the group protocol's callbacks and the
                // client's errors; served here under load too.
                if let Some(r) = consumer.recv().now_or_never() {
                    self.unexpected(r)?;
                }
            }
            if self.group.is_some() && !cx.stopping() {
                // The events stay for the next run's `assignment`.
                let events = lock(&self.run.shared.events);
                let lost = events.iter().any(|e| matches!(e, Assignment::Lost(_)));
                let moved = !events.is_empty();
                drop(events);
                let why = format!("consumer group `{}` moved partitions of {:?}", self.cfg.group_id, self.cfg.topics);
                if lost {
                    // Another member reads them already: stop where the run is, committing
                    // nothing more.
                    return Err(CoreError::Rebalanced(why));
                }
                if moved {
                    // The run ends at a checkpoint and the next starts from it with the new
                    // partitions: the ones that stay go on where they are, nothing read again.
                    cx.start_again(why);
                }
            }
            self.apply_events()?;
            // Armed once the assignment is known: before, there is no end to reach yet.
            if !self.until_armed
                && self.seen_assignment
                && self.cfg.until.as_ref().is_some_and(|u| u.load(std::sync::atomic::Ordering::Acquire))
            {
                self.arm_until(&consumer).await?;
            }
            if let Some(i) = self.pending_idle.pop() {
                return Ok(SourcePoll::PartitionIdle(i));
            }
            let stopping = cx.stopping();
            if let Some(i) = self.due(Instant::now(), stopping || self.finished_reading()) {
                // The writer schemas of the batch's records, fetched before decoding (an
                // outage of the registry waits here, and the barrier can still pass).
                if let Some(reg) = &self.cfg.registry {
                    let p = &self.parts[i];
                    let ids: Vec<u32> =
                        p.ranges.iter().filter_map(|r| weir_formats::avro::schema_id(&p.buf[r.clone()]).ok()).collect();
                    reg.registry.prefetch(ids).await?;
                }
                if let Some(batch) = self.cut(i, cx)? {
                    return Ok(SourcePoll::Rows { partition: i, batch });
                }
                continue;
            }
            if stopping {
                if self.group.is_some() {
                    // Everything taken is handed out: each queue goes on at the position the
                    // final checkpoint records.
                    let mut continues = lock(&self.run.shared.continues);
                    for p in self.parts.iter().filter(|p| p.assigned) {
                        if let Some(n) = p.next {
                            continues.insert((p.topic.clone(), p.partition), n);
                        }
                    }
                }
                return Ok(SourcePoll::End);
            }
            // Take what is already fetched, up to a batch.
            self.turn = self.turn.wrapping_add(1);
            let k = self.queues.len().max(1);
            let queues: Vec<(usize, Arc<PartitionQueue>)> =
                (0..self.queues.len()).map(|j| self.queues[(self.turn + j) % k].clone()).collect();
            // A bounded run ends once nothing fetched is left either: with a broker whose
            // answer about a partition's end is too low (Tansu's is one past the first offset
            // of the partition's last record batch), the rest of that batch is still read, as
            // a fetch brings a batch whole.
            let finished = self.finished();
            if self.drain(&queues, self.cfg.batch_size) > 0 {
                self.idle_since = None;
                self.fetched();
                continue;
            }
            if finished {
                return Ok(SourcePoll::End);
            }
            // Wait for a record, at most until the oldest partial batch is due.
            let now = Instant::now();
            let wait = self
                .parts
                .iter()
                .filter_map(|p| p.first_at.map(|f| self.linger.linger(p.ranges.len()).saturating_sub(now - f)))
                .min()
                .unwrap_or_else(|| IDLE_POLL.saturating_sub(now - *self.idle_since.get_or_insert(now)));
            let mut shutdown = cx.shutdown.clone();
            let wake = self.wake.clone();
            // The consumer's own queue, on worker 0 (polling it serves the group's callbacks).
            let (worker, main_queue) = (self.worker, &consumer);
            let main = async move {
                match worker {
                    0 => main_queue.recv().await,
                    _ => std::future::pending().await,
                }
            };
            // Cancel safety: a dropped `recv` loses nothing (a record is taken off a queue
            // only when it is returned). A record on one of this worker's queues wakes `wake`
            // (so does a change of assignment); the loop then takes it. If the job's stop
            // signal is gone, that branch is disabled rather than spinning.
            let got = tokio::select! {
                r = tokio::time::timeout(wait, main) => r,
                Ok(()) = shutdown.changed() => continue,
                () = wake.notified() => continue,
            };
            match got {
                Err(_) => {
                    if self.parts.iter().all(|p| p.ranges.is_empty()) {
                        self.idle_since = None;
                        self.publish_lag(cx);
                        return Ok(SourcePoll::Waiting);
                    }
                }
                Ok(r) => self.unexpected(r)?,
            }
        }
    }

    fn snapshot_for(&mut self, epoch: Epoch) -> Result<Option<RecordBatch>> {
        let table = self.snapshot()?;
        if let (Some(o), Some(r), Some(tpl)) =
            (&self.cfg.transactional_offsets, &self.reader, self.last_snapshot.as_ref())
        {
            let c = &r.consumer;
            // The membership as of now: the brokers fence a commit from a member that has
            // since lost the partitions.
            if let Some(group) = c.group_metadata() {
                o.record(epoch, tpl.clone(), group);
            }
        }
        Ok(table)
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        // Positions handed out, plus the remembered ones of this worker's partitions not read
        // right now (restored or revoked), so a checkpoint never forgets a position.
        let (me, n) = (self.worker, self.workers);
        let mut pos: HashMap<(String, i32), i64> = lock(&self.run.shared.resume)
            .iter()
            .filter(|((t, p), _)| owner(t, *p, n) == me)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for p in &self.parts {
            if let Some(n) = p.next {
                pos.insert((p.topic.clone(), p.partition), n);
            }
        }
        let mut rows: Vec<_> = pos.into_iter().collect();
        rows.sort();
        // The positions of the previous checkpoint are committed to Kafka now, for lag
        // monitors: that checkpoint has most likely completed by the time the next starts.
        // Only partitions this consumer holds: a commit for others is refused by the group.
        // With the positions in the output's transactions, those commits are the only ones.
        let hint = self.cfg.transactional_offsets.is_none();
        // A follower's go through the leader's consumer, the group's member.
        let committer = self
            .group
            .as_ref()
            .and_then(|g| lock(&g.leader).clone())
            .or_else(|| self.reader.as_ref().map(|r| r.consumer.clone()));
        if let (Some(c), Some(tpl), true) = (committer, self.last_snapshot.take(), hint) {
            if tpl.count() > 0 {
                if let Err(e) = c.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %e, "Could not commit progress offsets to Kafka (a hint only).");
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for p in self.parts.iter().filter(|p| p.assigned) {
            if let Some(n) = p.next {
                let _ = tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(n));
            }
        }
        self.last_snapshot = Some(tpl);
        Ok(Some(position_table(&rows)?))
    }

    async fn checkpoint_complete(&mut self, _epoch: Epoch) -> Result<()> {
        // Partitions given up are parked in every checkpoint of this run: with one complete,
        // the member taking them over finds their state.
        if let (0, Some(g)) = (self.worker, &self.group) {
            g.release_parked();
        }
        Ok(())
    }

    fn restore(&mut self, positions: &[RecordBatch]) -> Result<()> {
        // Every worker is given every table; the positions go where all of them look.
        let mut resume = lock(&self.run.shared.resume);
        for (key, o) in read_positions(positions)? {
            let e = resume.entry(key).or_insert(o);
            *e = (*e).max(o);
        }
        if self.worker == 0 {
            tracing::info!(partitions = resume.len(), "Kafka positions restored from the checkpoint.");
        }
        Ok(())
    }
}

/// The wall clock in µs since the epoch (0 before it).
fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The source's position table: topic, partition, offset of the next record to hand out.
fn position_table(rows: &[((String, i32), i64)]) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(rows.iter().map(|((t, _), _)| t.as_str()).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(rows.iter().map(|((_, p), _)| *p).collect::<Vec<_>>())),
        Arc::new(Int64Array::from(rows.iter().map(|(_, o)| *o).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// The rows of position tables written by [`position_table`].
fn read_positions(tables: &[RecordBatch]) -> Result<Vec<((String, i32), i64)>> {
    let bad = || CoreError::Config("the checkpoint's Kafka positions have an unexpected shape".into());
    let mut out = Vec::new();
    for t in tables {
        let topic = t.column_by_name("topic").and_then(|c| c.as_string_opt::<i32>()).ok_or_else(bad)?;
        let part = t.column_by_name("partition").and_then(|c| c.as_primitive_opt::<Int32Type>()).ok_or_else(bad)?;
        let off = t.column_by_name("offset").and_then(|c| c.as_primitive_opt::<Int64Type>()).ok_or_else(bad)?;
        out.extend((0..t.num_rows()).map(|i| ((topic.value(i).to_string(), part.value(i)), off.value(i))));
    }
    Ok(out)
}

/// How many records a drain takes off a queue at once: enough to pay librdkafka's per-call
/// bookkeeping rarely, few enough to keep the array of them in cache.
const TAKE_AT_ONCE: usize = 1024;

/// How long a poll waits for a record before it reports the source waiting.
const IDLE_POLL: Duration = Duration::from_millis(100);

impl KafkaSource {
    /// Exports each assigned partition's lag: its end offset (from the last statistics) minus
    /// the position handed out. Called per batch and while waiting, never per record.
    fn publish_lag(&self, cx: &SourceContext) {
        let ends = lock(&self.run.shared.ends);
        for p in self.parts.iter().filter(|p| p.assigned) {
            let Some(end) = ends.get(&(p.topic.clone(), p.partition)) else { continue };
            let lag = (end - p.next.unwrap_or(0)).max(0);
            cx.registry.connectors.set(
                "weir_kafka_consumer_lag",
                "Records between the source's position and the partition's end.",
                &[("topic", &p.topic), ("partition", &p.partition.to_string())],
                lag as f64,
            );
        }
    }

    /// Every assigned partition reached its end: flush what is buffered.
    fn finished_reading(&self) -> bool {
        (self.cfg.stop_at_end || self.until_armed)
            && self.parts.iter().any(|p| p.assigned)
            && self
                .parts
                .iter()
                .filter(|p| p.assigned)
                .all(|p| p.end.is_some_and(|e| p.offsets.last().map_or(p.next.unwrap_or(0), |o| o + 1) >= e))
    }

    /// Takes up to `budget` records already fetched into `queues`, without waiting; returns
    /// how many were kept. Never under a timeout: tokio fires a timer on its next tick, so a
    /// zero timeout on an empty queue waits about a millisecond, and every batch paid it
    /// (docs/benchmarks.md, Kafka latency).
    fn drain(&mut self, queues: &[(usize, Arc<PartitionQueue>)], budget: usize) -> usize {
        let mut n = 0;
        let mut fetched = std::mem::take(&mut self.taken);
        for (i, q) in queues {
            while n < budget {
                let want = (budget - n).min(TAKE_AT_ONCE);
                let got = q.take(want, &mut fetched);
                for m in fetched.records() {
                    match m.error() {
                        None => n += usize::from(self.add(*i, m)),
                        Some(e) => self.report(&e),
                    }
                }
                fetched.clear();
                if got < want {
                    break;
                }
            }
        }
        self.taken = fetched;
        n
    }

    /// Records came: the linger learns the gap between fetches, not between records (tiny
    /// within one), so a partial batch waits only when the next fetch is expected within
    /// `max_linger`. The client hands a fetch's records over one by one, so a drain can find
    /// the queue empty in the middle of one: arrivals closer than `FETCH_APART` to the last
    /// counted are the same fetch.
    fn fetched(&mut self) {
        let now = Instant::now();
        if self.fetched_at.is_none_or(|t| now - t >= FETCH_APART) {
            self.linger.arrived(1, now);
            self.fetched_at = Some(now);
        }
    }

    /// What came on the consumer's own queue: an error is reported (the client retries); a
    /// record cannot come there, as every partition is split off before it is assigned.
    fn unexpected(&mut self, r: KafkaResult<BorrowedMessage<'_>>) -> Result<()> {
        match r {
            Err(e) => {
                self.report(&e);
                Ok(())
            }
            Ok(m) => Err(CoreError::Internal(format!(
                "kafka source: a record of {}/{} at offset {} came outside its partition's queue",
                m.topic(),
                m.partition(),
                m.offset()
            ))),
        }
    }

    /// Logs a consumer error, at most every 10 s: librdkafka retries by itself.
    fn report(&mut self, e: &KafkaError) {
        if self.warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            self.warned_at = Some(Instant::now());
            tracing::warn!(error = %e, topics = ?self.cfg.topics, "Kafka consumer error; it keeps retrying.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{owner, Assignment, Shared};

    fn told(s: &Shared, worker: usize) -> Vec<String> {
        std::mem::take(&mut super::lock(&s.inbox)[worker])
            .iter()
            .map(|(e, holding)| format!("{e:?} {holding}"))
            .collect()
    }

    #[test]
    fn each_worker_is_told_its_share_and_nothing_is_not_an_assignment() {
        let s = Shared::default();
        s.workers.store(2, std::sync::atomic::Ordering::Relaxed);
        let wakers: Vec<_> = (0..2).map(|w| s.waker(w)).collect();
        let list: Vec<(String, i32, Option<i64>)> = (0..4).map(|p| ("t".to_string(), p, Some(10))).collect();
        s.post(&Assignment::Assigned(list), true);
        for (w, waker) in wakers.iter().enumerate() {
            let mine: Vec<i32> = (0..4).filter(|&p| owner("t", p, 2) == w).collect();
            assert_eq!(mine.len(), 2);
            let want = format!(
                "Assigned([{}]) true",
                mine.iter().map(|p| format!("(\"t\", {p}, Some(10))")).collect::<Vec<_>>().join(", ")
            );
            assert_eq!(told(&s, w), vec![want]);
            // Woken: the permit is there without waiting.
            assert!(futures::FutureExt::now_or_never(waker.notified()).is_some());
        }
        // A worker none of whose partitions moved is still told: it learns the assignment,
        // and that the process still holds partitions (its own may all be gone).
        s.post(&Assignment::Revoked(vec![("t".to_string(), 0)]), true);
        assert_eq!(told(&s, owner("t", 0, 2)), vec!["Revoked([(\"t\", 0)]) true"]);
        assert_eq!(told(&s, 1 - owner("t", 0, 2)), vec!["Revoked([]) true"]);
        // A lost partition is taken away like a revoked one.
        s.post(&Assignment::Lost(vec![("t".to_string(), 1)]), true);
        assert_eq!(told(&s, owner("t", 1, 2)), vec!["Revoked([(\"t\", 1)]) true"]);
        assert_eq!(told(&s, 1 - owner("t", 1, 2)), vec!["Revoked([]) true"]);
        // The group giving the process nothing (yet) must not let a bounded run's workers end.
        s.post(&Assignment::Assigned(Vec::new()), false);
        assert_eq!(told(&s, 0), vec!["Revoked([]) false"]);
        assert_eq!(told(&s, 1), vec!["Revoked([]) false"]);
        // Nothing more for a process that holds partitions is no change for its workers.
        s.post(&Assignment::Assigned(Vec::new()), true);
        assert_eq!(told(&s, 0), vec!["Assigned([]) true"]);
        assert_eq!(told(&s, 1), vec!["Assigned([]) true"]);
        s.post(&Assignment::Failed("no".into()), true);
        assert_eq!(told(&s, 1), vec!["Failed(\"no\") true"]);
    }

    #[test]
    fn a_process_s_partitions_go_round_its_workers() {
        // One worker reads everything.
        assert!((0..16).all(|p| owner("t", p, 1) == 0));
        // Any run of consecutive partitions (what the range assignor hands a process) is
        // spread evenly, whatever topic.
        for topic in ["sensors", "orders", "a"] {
            for workers in [2, 3, 4] {
                for first in 0..8 {
                    let mut per = vec![0; workers];
                    for p in first..first + 2 * workers as i32 {
                        per[owner(topic, p, workers)] += 1;
                    }
                    assert!(per.iter().all(|&n| n == 2), "{topic} at {workers} workers from {first}: {per:?}");
                }
            }
        }
    }
}
