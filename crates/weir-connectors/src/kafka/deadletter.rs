//! Dead letters (and quarantined rows) to a Kafka topic: each entry is the same JSON object the
//! dead-letter file holds, one record per entry, keyed by the step that failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use weir_core::deadletter::{DeadLetter, DeadLetterSink};
use weir_core::{CoreError, Result};

use super::client::{kafka_err, KafkaClientConfig, Logging};

/// Counts failed deliveries, so that a flush (which a checkpoint waits for) reports them.
#[derive(Debug, Default)]
struct Deliveries {
    log: Logging,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        }
    }
}

/// Writes dead-letter entries to a Kafka topic.
pub struct KafkaDeadLetters {
    topic: String,
    producer: ThreadedProducer<Deliveries>,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaDeadLetters {
    /// A producer for `topic` (idempotent, `acks=all`); `what` names it in logs.
    ///
    /// # Errors
    /// A producer that cannot be created (bad properties).
    pub fn new(client: &KafkaClientConfig, topic: &str, what: &str) -> Result<Self> {
        let ours = [("enable.idempotence", "true".to_string()), ("acks", "all".to_string())];
        let ctx = Deliveries { log: Logging::new(format!("{what} to kafka {topic}")), ..Deliveries::default() };
        let producer = client
            .client_config(&ours)
            .create_with_context(ctx)
            .map_err(|e| kafka_err(format!("{what}: cannot create the Kafka producer"), &e))?;
        Ok(Self { topic: topic.to_string(), producer })
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        for l in &letters {
            let entry = crate::deadletter::render(l);
            let value = entry.trim_end_matches('\n');
            let key = l.step.as_str();
            let mut rec = BaseRecord::<str, str>::to(&self.topic).key(key).payload(value);
            // A full local queue waits for deliveries: dead letters are never dropped.
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(kafka_err(format!("dead letters to kafka `{}`", self.topic), &e)),
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(|e| kafka_err(format!("flushing dead letters to kafka `{}`", self.topic), &e))?;
        let ctx = self.producer.context();
        let failed = ctx.failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let last = ctx.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone().unwrap_or_default();
            return Err(CoreError::Other {
                message: format!("{failed} dead letters could not be delivered to kafka `{}`: {last}", self.topic),
                blame: weir_core::Blame::External,
                retry: weir_core::Retry::Backoff,
            });
        }
        Ok(())
    }
}

/// Every record of `topic` from its start to its end as of now, in partition then offset
/// order (what `weir dlq replay` reads from a dead-letter topic). Reads with a consumer of its
/// own that joins no group and commits nothing.
///
/// # Errors
/// A topic that does not exist, or brokers that do not answer within `timeout`.
pub fn read_topic(client: &KafkaClientConfig, topic: &str, timeout: Duration) -> Result<Vec<Vec<u8>>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::{Message as _, Offset, TopicPartitionList};
    let c: BaseConsumer<Logging> = client
        .client_config(&[
            ("group.id", format!("weir-dlq-replay-{}", std::process::id())),
            ("enable.auto.commit", "false".into()),
            ("enable.partition.eof", "false".into()),
        ])
        .create_with_context(Logging::new("dlq replay"))
        .map_err(|e| kafka_err("kafka: cannot create the dead-letter reader", &e))?;
    let meta = c.fetch_metadata(Some(topic), timeout).map_err(|e| kafka_err(format!("kafka: topic `{topic}`"), &e))?;
    let parts: Vec<i32> = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if parts.is_empty() {
        return Err(CoreError::Config(format!("kafka: topic `{topic}` does not exist or has no partitions")));
    }
    let mut ends = std::collections::BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        let (low, high) = c
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| kafka_err(format!("kafka: the ends of `{topic}`/{p}"), &e))?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| kafka_err("kafka: assigning the dead-letter topic", &e))?;
        }
    }
    let mut by_part: std::collections::BTreeMap<i32, Vec<Vec<u8>>> = std::collections::BTreeMap::new();
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    c.assign(&tpl).map_err(|e| kafka_err("kafka: assigning the dead-letter topic", &e))?;
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(CoreError::Other {
                message: format!("kafka: reading `{topic}` to its end took over {timeout:?}"),
                blame: weir_core::Blame::External,
                retry: weir_core::Retry::Backoff,
            });
        }
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.map_err(|e| kafka_err(format!("kafka: reading `{topic}`"), &e))?;
        let p = m.partition();
        by_part.entry(p).or_default().push(m.payload().unwrap_or_default().to_vec());
        if ends.get(&p).is_some_and(|end| m.offset() + 1 >= *end) {
            ends.remove(&p);
        }
    }
    Ok(by_part.into_values().flatten().collect())
}
