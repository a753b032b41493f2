//! Exactly-once output to Kafka: a transaction per checkpoint.
//!
//! Every worker of the process produces through one of two shared transactional producers:
//! checkpoint `n` goes to producer `n % 2`, whose transaction opens when the first worker
//! begins `n` and commits when checkpoint `n` is complete, while checkpoint `n + 1` already
//! flows through the other producer. One transaction per checkpoint for the whole process
//! makes the commit atomic across workers.
//!
//! The crash to guard against is the one between a checkpoint completing and its transaction
//! committing: the transaction dies with its producer (a new producer with the same
//! `transactional.id` can only abort it), so the checkpoint's output is gone although the
//! checkpoint is complete. Each commit therefore also writes, inside the transaction, a
//! record naming its checkpoint to a small commit topic. Recovery first fences both
//! transactional ids (aborting whatever the dead process left open), reads the newest
//! committed record from that topic, and restores the checkpoint it names rather than a
//! newer one: the input after it is processed again, and its output committed once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use weir_core::checkpoint::Epoch;
use weir_core::metrics::ConnectorMetrics;
use weir_core::{Committer, CoreError, Result, Retry, Visible};

use super::client::{kafka_err, KafkaClientConfig, Logging};
use super::sink::KafkaTransactionSettings;

/// How long a blocking transaction call (init, commit, abort) may take before it is
/// reported as failed; librdkafka retries inside it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// One step of `init_transactions` (see `Transactions::ensure_producer`).
const INIT_STEP: Duration = Duration::from_secs(1);

/// Producer figures, shared by a sink's workers and its committer, reported as metrics.
#[derive(Debug, Default)]
pub(crate) struct ProduceStats {
    records: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    /// Sum of per-batch produce latencies (first send to last acknowledgement), µs.
    latency_us: AtomicU64,
    /// The largest since the last report, µs.
    latency_max_us: AtomicU64,
    commits: AtomicU64,
    aborts: AtomicU64,
    /// Sum of commit durations, µs.
    commit_us: AtomicU64,
    /// Transactions that carried the Kafka source's positions.
    offset_commits: AtomicU64,
}

impl ProduceStats {
    pub(crate) fn batch(&self, records: usize, bytes: usize, took: Duration) {
        let us = took.as_micros() as u64;
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.latency_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(crate) fn report(&self, topic: &str, m: &ConnectorMetrics) {
        let l = [("topic", topic)];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        m.set_total(
            "weir_kafka_produced_records_total",
            "Records produced and acknowledged by the brokers.",
            &l,
            get(&self.records),
        );
        m.set_total("weir_kafka_produced_bytes_total", "Value bytes produced and acknowledged.", &l, get(&self.bytes));
        m.set_total(
            "weir_kafka_produce_latency_seconds_count",
            "Batches produced; with _sum, the mean time from a batch's first send to its last acknowledgement.",
            &l,
            get(&self.batches),
        );
        m.set_total(
            "weir_kafka_produce_latency_seconds_sum",
            "Total time from each batch's first send to its last acknowledgement.",
            &l,
            get(&self.latency_us) / 1e6,
        );
        m.set(
            "weir_kafka_produce_latency_max_seconds",
            "The slowest batch's produce latency in the last report interval.",
            &l,
            self.latency_max_us.swap(0, Ordering::Relaxed) as f64 / 1e6,
        );
        let txns = "Kafka transactions (one per checkpoint) committed or aborted.";
        m.set_total(
            "weir_kafka_transactions_total",
            txns,
            &[("topic", topic), ("result", "committed")],
            get(&self.commits),
        );
        m.set_total(
            "weir_kafka_transactions_total",
            txns,
            &[("topic", topic), ("result", "aborted")],
            get(&self.aborts),
        );
        m.set_total(
            "weir_kafka_transaction_offset_commits_total",
            "Transactions that committed the Kafka source's positions to its consumer group.",
            &l,
            get(&self.offset_commits),
        );
        m.set_total(
            "weir_kafka_transaction_commit_seconds_total",
            "Time spent committing transactions; over the committed count, the mean commit time.",
            &l,
            get(&self.commit_us) / 1e6,
        );
    }
}

/// The Kafka source's positions at each checkpoint, handed to the exactly-once sink of the same
/// cluster, which commits them to the consumer group inside the checkpoint's transaction
/// (`send_offsets_to_transaction`). The group's committed offsets then say exactly how far the
/// committed output got, instead of being a progress hint committed afterwards.
#[derive(Default)]
pub struct TransactionalOffsets {
    by_epoch: std::sync::Mutex<std::collections::BTreeMap<u64, (TopicPartitionList, ConsumerGroupMetadata)>>,
}

impl std::fmt::Debug for TransactionalOffsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalOffsets").finish_non_exhaustive()
    }
}

impl TransactionalOffsets {
    /// A source worker's positions for checkpoint `epoch`, with the group membership now:
    /// each worker records those of its own partitions, and the checkpoint's are all of them.
    pub(crate) fn record(&self, epoch: Epoch, positions: TopicPartitionList, group: ConsumerGroupMetadata) {
        let mut m = self.by_epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.entry(epoch.0) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((positions, group));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let (all, membership) = o.get_mut();
                for e in positions.elements() {
                    let _ = all.add_partition_offset(e.topic(), e.partition(), e.offset());
                }
                *membership = group;
            }
        }
    }

    /// The positions of `epoch`, forgetting those of older checkpoints (never committed now).
    fn take(&self, epoch: Epoch) -> Option<(TopicPartitionList, ConsumerGroupMetadata)> {
        let mut m = self.by_epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = m.remove(&epoch.0);
        m.retain(|&e, _| e > epoch.0);
        mine
    }
}

/// One transactional producer and the checkpoint its open transaction belongs to.
#[derive(Default)]
struct SlotState {
    producer: Option<FutureProducer<Logging>>,
    open: Option<Epoch>,
}

struct Slot {
    id: String,
    state: tokio::sync::Mutex<SlotState>,
    /// Signalled when the slot's transaction commits or aborts.
    freed: tokio::sync::Notify,
}

/// The shared transactional producers of one exactly-once Kafka sink, and its committer.
pub(crate) struct Transactions {
    client: KafkaClientConfig,
    topic: String,
    settings: KafkaTransactionSettings,
    slots: [Slot; 2],
    stats: std::sync::Arc<ProduceStats>,
    /// Tells this run's transactions from an earlier one's of the same checkpoint number (a
    /// checkpoint whose commit was lost is taken again after recovery); new at each
    /// recovery, as a job starts again in the same process after partitions move.
    run: std::sync::Mutex<String>,
    /// The Kafka source's positions, committed inside each transaction (same cluster only).
    offsets: Option<std::sync::Arc<TransactionalOffsets>>,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions")
            .field("topic", &self.topic)
            .field("transactional_id", &self.settings.transactional_id)
            .field("commit_topic", &self.settings.commit_topic)
            .finish_non_exhaustive()
    }
}

fn txn_err(what: impl std::fmt::Display, e: &KafkaError) -> CoreError {
    // A transaction that failed cannot be picked up again by anyone: whatever went wrong,
    // the job restarts from its last checkpoint, whose recovery aborts it.
    match kafka_err(what, e) {
        CoreError::Other { message, blame, .. } => CoreError::Other { message, blame, retry: Retry::Never },
        other => other,
    }
}

/// Whether the producer was fenced (another producer with its transactional id started), or
/// its offsets commit came from an older generation of the consumer group: partitions moved.
fn fenced(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::Transaction(t) => {
            if t.is_fatal() && t.code() == RDKafkaErrorCode::Fatal {
                return true;
            }
            Some(t.code())
        }
        other => other.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
        )
    )
}

fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:04x}{n:x}", now.as_millis(), std::process::id() & 0xffff)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CoreError::Task(e.to_string()))
}

impl Transactions {
    pub(crate) fn new(
        client: &KafkaClientConfig,
        topic: &str,
        settings: KafkaTransactionSettings,
        stats: std::sync::Arc<ProduceStats>,
        offsets: Option<std::sync::Arc<TransactionalOffsets>>,
    ) -> Result<Self> {
        weir_core::ensure_config!(!settings.transactional_id.is_empty(), "kafka sink: `transactional_id` is empty");
        weir_core::ensure_config!(!settings.commit_topic.is_empty(), "kafka sink: `commit_topic` is empty");
        weir_core::ensure_config!(
            settings.timeout >= Duration::from_secs(1),
            "kafka sink: `transaction_timeout` must be at least 1s"
        );
        let slot = |i: usize| Slot {
            id: format!("{}-{i}", settings.transactional_id),
            state: tokio::sync::Mutex::new(SlotState::default()),
            freed: tokio::sync::Notify::new(),
        };
        Ok(Self {
            client: client.clone(),
            topic: topic.to_string(),
            slots: [slot(0), slot(1)],
            settings,
            stats,
            run: std::sync::Mutex::new(run_id()),
            offsets,
        })
    }

    /// A producer error inside a transaction. Fenced while several members share the input,
    /// it means another member took partitions over: the run starts again.
    pub(crate) fn error(&self, what: impl std::fmt::Display, e: &KafkaError) -> CoreError {
        if self.settings.handoff && fenced(e) {
            return CoreError::Rebalanced(format!(
                "{what}: {e}; another member fenced transactional id `{}` (it took partitions over)",
                self.settings.transactional_id
            ));
        }
        txn_err(what, e)
    }

    /// This process's run id, as the commit records and the checkpoint header name it.
    pub(crate) fn run(&self) -> String {
        self.run.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The header naming each record's transaction, if configured.
    pub(crate) fn checkpoint_header(&self) -> Option<&str> {
        self.settings.checkpoint_header.as_deref()
    }

    fn slot(&self, epoch: Epoch) -> &Slot {
        &self.slots[(epoch.0 % 2) as usize]
    }

    /// Creates the slot's producer and fences its id: `init_transactions` aborts whatever an
    /// earlier producer with the same id left open, and makes that producer unusable.
    async fn ensure_producer(&self, slot: &Slot, st: &mut SlotState) -> Result<FutureProducer<Logging>> {
        if let Some(p) = &st.producer {
            return Ok(p.clone());
        }
        let ours = [
            ("transactional.id", slot.id.clone()),
            ("enable.idempotence", "true".to_string()),
            ("acks", "all".to_string()),
            ("partitioner", "murmur2_random".to_string()),
            ("transaction.timeout.ms", self.settings.timeout.as_millis().to_string()),
        ];
        let log = Logging::new(format!("kafka sink {} (transactional id {})", self.topic, slot.id));
        let fatal = log.watch();
        let p: FutureProducer<Logging> = self
            .client
            .producer_config(&ours)
            .create_with_context(log)
            .map_err(|e| kafka_err("kafka sink: cannot create the transactional producer", &e))?;
        // The first call to reach the brokers. Made in short steps (librdkafka resumes a call
        // that timed out when it is made again), so that a client error no retry will cure
        // (an untrusted certificate) ends it within a step, and no abandoned call holds a
        // thread for the rest of `CALL_TIMEOUT`.
        let deadline = Instant::now() + CALL_TIMEOUT;
        let inited = loop {
            let q = p.clone();
            match blocking(move || q.init_transactions(INIT_STEP)).await? {
                Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                    if let Some(e) = fatal.error() {
                        return Err(e);
                    }
                }
                r => break r,
            }
        };
        inited.map_err(|e| {
            self.error(
                format!(
                    "kafka sink: initialising transactions for `{}` (is `transaction_timeout` above the broker's `transaction.max.timeout.ms`?)",
                    slot.id
                ),
                &e,
            )
        })?;
        tracing::info!(transactional_id = %slot.id, "Kafka transactional producer ready (earlier transactions of this id fenced).");
        st.producer = Some(p.clone());
        Ok(p)
    }

    /// The producer for rows of checkpoint `epoch`, its transaction begun. Waits while the
    /// slot still holds the transaction of `epoch - 2` (its checkpoint not yet committed).
    pub(crate) async fn producer_for(&self, epoch: Epoch) -> Result<FutureProducer<Logging>> {
        let slot = self.slot(epoch);
        let mut waited = Instant::now();
        loop {
            let freed = slot.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut st = slot.state.lock().await;
                match st.open {
                    Some(e) if e == epoch => {
                        if let Some(p) = &st.producer {
                            return Ok(p.clone());
                        }
                    }
                    None => {
                        let p = self.ensure_producer(slot, &mut st).await?;
                        p.begin_transaction().map_err(|e| self.error("kafka sink: beginning a transaction", &e))?;
                        st.open = Some(epoch);
                        return Ok(p);
                    }
                    Some(_) => {}
                }
            }
            tokio::select! {
                () = &mut freed => {}
                () = tokio::time::sleep(Duration::from_secs(10)) => {
                    if waited.elapsed() >= Duration::from_secs(10) {
                        tracing::warn!(checkpoint = epoch.0, transactional_id = %slot.id,
                            "Kafka sink waits for the transaction of an earlier checkpoint to commit.");
                        waited = Instant::now();
                    }
                }
            }
        }
    }

    /// Makes sure the commit topic exists (one partition, compacted).
    async fn create_commit_topic(&self) -> Result<()> {
        super::client::ensure_topic(
            &self.client,
            &self.settings.commit_topic,
            Some(1),
            &[("cleanup.policy", "compact")],
        )
        .await
        .map(|_| ())
    }

    /// The newest checkpoint recorded in the commit topic by this transactional id.
    async fn read_commits(&self) -> Result<Option<Epoch>> {
        let topic = self.settings.commit_topic.clone();
        let me = self.settings.transactional_id.clone();
        let consumer: BaseConsumer<Logging> = self
            .client
            .client_config(&[
                ("isolation.level", "read_committed".to_string()),
                ("enable.auto.commit", "false".to_string()),
                ("group.id", format!("{me}-commits-reader")),
            ])
            .create_with_context(Logging::new(format!("kafka sink commit reader ({topic})")))
            .map_err(|e| kafka_err("kafka sink: cannot create the commit topic reader", &e))?;
        blocking(move || -> Result<Option<Epoch>> {
            let (_, high) = consumer
                .fetch_watermarks(&topic, 0, Duration::from_secs(30))
                .map_err(|e| kafka_err(format!("kafka sink: reading the end of commit topic `{topic}`"), &e))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Beginning)
                .map_err(|e| kafka_err("kafka sink: commit topic position", &e))?;
            consumer.assign(&tpl).map_err(|e| kafka_err("kafka sink: assigning the commit topic", &e))?;
            let mut newest: Option<Epoch> = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut next = 0;
            // Control records (transaction markers) take offsets too and are never handed
            // out, so the reader is done when its position, not its last record, reaches
            // the end seen at the start; the fenced ids leave nothing open before it.
            while next < high {
                if Instant::now() > deadline {
                    return Err(CoreError::Other {
                        message: format!(
                            "kafka sink: reading commit topic `{topic}` took over 60 s (at offset {next} of {high})"
                        ),
                        blame: weir_core::Blame::External,
                        retry: Retry::Backoff,
                    });
                }
                if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                    let m = m.map_err(|e| kafka_err(format!("kafka sink: reading commit topic `{topic}`"), &e))?;
                    next = m.offset() + 1;
                    if m.key() == Some(me.as_bytes()) {
                        let v: serde_json::Value =
                            serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
                        if let Some(e) = v["checkpoint"].as_u64() {
                            newest = newest.max(Some(Epoch(e)));
                        }
                    }
                }
                if let Ok(pos) = consumer.position() {
                    if let Some(o) = pos.elements().first().and_then(|e| e.offset().to_raw()) {
                        next = next.max(o);
                    }
                }
            }
            Ok(newest)
        })
        .await?
    }
}

#[async_trait::async_trait]
impl Committer for Transactions {
    async fn commit(&self, epoch: Epoch) -> Result<()> {
        let slot = self.slot(epoch);
        let mut st = slot.state.lock().await;
        // Not open here: a commit repeated by recovery after a restart, whose transaction
        // died with the old process; `visible` already made recovery replay it.
        if st.open != Some(epoch) {
            return Ok(());
        }
        let Some(p) = st.producer.clone() else {
            weir_core::bail_internal!("kafka sink: open transaction without producer")
        };
        let started = Instant::now();
        let taken = self.offsets.as_ref().and_then(|o| o.take(epoch));
        let sent_offsets = taken.is_some();
        if let Some((positions, group)) = taken {
            let q = p.clone();
            blocking(move || q.send_offsets_to_transaction(&positions, &group, CALL_TIMEOUT)).await?.map_err(|e| {
                self.error(format!("kafka sink: committing the source's positions with checkpoint {epoch}"), &e)
            })?;
        }
        let value = serde_json::json!({ "checkpoint": epoch.0, "run": self.run(), "topic": self.topic }).to_string();
        let rec = FutureRecord::<str, str>::to(&self.settings.commit_topic)
            .key(&self.settings.transactional_id)
            .payload(&value);
        let f = p.send_result(rec).map_err(|(e, _)| {
            self.error(format!("kafka sink: recording checkpoint {epoch} in the commit topic"), &e)
        })?;
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                return Err(self.error(format!("kafka sink: recording checkpoint {epoch} in the commit topic"), &e))
            }
            Err(_) => return Err(CoreError::Task("kafka sink: the producer dropped a delivery".into())),
        }
        let q = p.clone();
        blocking(move || q.commit_transaction(CALL_TIMEOUT)).await?.map_err(|e| {
            self.error(
                format!(
                    "kafka sink: committing the transaction of checkpoint {epoch} (if it timed out on the broker, raise `transaction_timeout`)"
                ),
                &e,
            )
        })?;
        st.open = None;
        drop(st);
        slot.freed.notify_waiters();
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        if sent_offsets {
            self.stats.offset_commits.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.commit_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        tracing::debug!(checkpoint = epoch.0, transactional_id = %slot.id, "Kafka transaction committed.");
        Ok(())
    }

    async fn abort_after(&self, epoch: Epoch) -> Result<()> {
        for slot in &self.slots {
            let mut st = slot.state.lock().await;
            let (Some(open), Some(p)) = (st.open, st.producer.clone()) else { continue };
            if open <= epoch {
                continue;
            }
            blocking(move || p.abort_transaction(CALL_TIMEOUT))
                .await?
                .map_err(|e| self.error(format!("kafka sink: aborting the transaction of checkpoint {open}"), &e))?;
            st.open = None;
            drop(st);
            slot.freed.notify_waiters();
            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn records_progress(&self) -> bool {
        true
    }

    async fn visible(&self) -> Result<Visible> {
        *self.run.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = run_id();
        let mut any = None;
        for slot in &self.slots {
            let mut st = slot.state.lock().await;
            // A fresh producer per recovery: fencing is what aborts the old transactions.
            if st.open.take().is_some() {
                self.stats.aborts.fetch_add(1, Ordering::Relaxed);
            }
            st.producer = None;
            any = Some(self.ensure_producer(slot, &mut st).await?);
        }
        if any.is_some() {
            self.create_commit_topic().await?;
        }
        let newest = self.read_commits().await?;
        tracing::info!(
            transactional_id = %self.settings.transactional_id,
            commit_topic = %self.settings.commit_topic,
            committed_through = newest.map(|e| e.0),
            "Kafka sink recovered: open transactions of earlier runs aborted."
        );
        Ok(newest.map_or(Visible::Nothing, Visible::Through))
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::*;

    fn settings() -> KafkaTransactionSettings {
        KafkaTransactionSettings {
            transactional_id: "t".into(),
            commit_topic: "t.commits".into(),
            timeout: Duration::from_secs(60),
            checkpoint_header: None,
            handoff: false,
        }
    }

    fn txns(brokers: &str) -> Transactions {
        let client = KafkaClientConfig { brokers: brokers.into(), properties: Default::default() };
        Transactions::new(&client, "out", settings(), Default::default(), None).unwrap()
    }

    async fn send(p: &FutureProducer<Logging>, v: &str) {
        p.send(FutureRecord::<str, str>::to("out").payload(v), Duration::from_secs(10)).await.unwrap();
    }

    fn read_committed(brokers: &str) -> Vec<String> {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "test-reader")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let (_, high) = c.fetch_watermarks("out", 0, Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("out", 0, Offset::Beginning).unwrap();
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pos = c.position().unwrap().elements()[0].offset().to_raw().unwrap_or(0);
            if pos >= high || Instant::now() > deadline {
                break;
            }
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                out.push(String::from_utf8_lossy(m.unwrap().payload().unwrap()).into_owned());
            }
        }
        out
    }

    /// The crash the commit topic guards against: checkpoint 2 completed, but its
    /// transaction never committed. The next run aborts it (fencing the old producer), learns
    /// that output is visible through checkpoint 1 only, and commits checkpoint 2 anew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_fences_the_old_producer_and_reports_the_last_commit() {
        let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        mock.create_topic("out", 1, 1).unwrap();
        // The mock cluster does not serve CreateTopics.
        mock.create_topic("t.commits", 1, 1).unwrap();
        let brokers = mock.bootstrap_servers();

        let first = txns(&brokers);
        assert_eq!(first.visible().await.unwrap(), Visible::Nothing);
        let p = first.producer_for(Epoch(1)).await.unwrap();
        send(&p, "e1").await;
        first.commit(Epoch(1)).await.unwrap();
        let p = first.producer_for(Epoch(2)).await.unwrap();
        send(&p, "e2-lost").await;
        // The process dies here, its checkpoint 2 complete but not committed.

        let second = txns(&brokers);
        assert_eq!(second.visible().await.unwrap(), Visible::Through(Epoch(1)));
        let p = second.producer_for(Epoch(2)).await.unwrap();
        send(&p, "e2").await;
        second.commit(Epoch(2)).await.unwrap();
        assert_eq!(second.visible().await.unwrap(), Visible::Through(Epoch(2)));
        // The mock cluster keeps aborted records readable (it writes no transaction markers
        // and reports no aborted transactions), so `e2-lost` cannot be checked gone here.
        assert_eq!(read_committed(&brokers), vec!["e1".to_string(), "e2-lost".to_string(), "e2".to_string()]);

        // On a real broker the old producer is fenced now and its late commit fails; the mock
        // cluster does not check producer epochs on EndTxn, so that is not asserted here.
        assert_eq!(second.stats.commits.load(Ordering::Relaxed), 1);
    }

    /// Checkpoint `n + 1` flows through the other producer while `n` waits for its commit;
    /// `n + 2` waits until `n` has committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_is_reused_only_after_its_commit() {
        let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        mock.create_topic("out", 1, 1).unwrap();
        // The mock cluster does not serve CreateTopics.
        mock.create_topic("t.commits", 1, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let t = std::sync::Arc::new(txns(&brokers));
        t.visible().await.unwrap();
        let p1 = t.producer_for(Epoch(1)).await.unwrap();
        send(&p1, "a").await;
        let p2 = t.producer_for(Epoch(2)).await.unwrap();
        send(&p2, "b").await;
        let waiting = {
            let t = t.clone();
            weir_core::task::SpawnedTask::spawn(async move { t.producer_for(Epoch(3)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "checkpoint 3 must wait for checkpoint 1's commit");
        t.commit(Epoch(1)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap().unwrap();
        t.commit(Epoch(2)).await.unwrap();
        // A commit of an epoch not open here (repeated by recovery) does nothing.
        t.commit(Epoch(2)).await.unwrap();
        t.abort_after(Epoch(2)).await.unwrap();
        assert_eq!(t.stats.aborts.load(Ordering::Relaxed), 1, "the transaction of checkpoint 3 was aborted");
        assert_eq!(read_committed(&brokers), vec!["a".to_string(), "b".to_string()]);
    }
}
