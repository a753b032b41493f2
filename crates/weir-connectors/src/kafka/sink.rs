//! The Kafka sink: one record per row, keyed and partitioned from columns, with headers from
//! columns, produced by an idempotent producer (no duplicates from the producer's own
//! retries; at least once across a crash).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use weir_core::time::column_by_path;
use weir_core::{CoreError, Result, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

use super::client::{kafka_err, KafkaClientConfig, Logging};

/// Delivery guarantee of the Kafka sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaSinkMode {
    /// Idempotent producer: every row is delivered; after a crash, rows since the last
    /// checkpoint (or since the start, without checkpoints) are delivered again.
    #[default]
    AtLeastOnce,
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
}

/// Builds one producer per worker.
#[derive(Debug)]
pub struct KafkaSinkFactory {
    cfg: Arc<KafkaSinkConfig>,
}

impl KafkaSinkFactory {
    /// Checks the settings against the schema (no I/O).
    ///
    /// # Errors
    /// CSV, or a key, partition or header column the rows do not have.
    pub fn new(cfg: KafkaSinkConfig) -> Result<Self> {
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
        cfg.format.encoder(cfg.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Self { cfg: Arc::new(cfg) })
    }
}

impl SinkFactory for KafkaSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        let ours = [
            ("enable.idempotence", "true".to_string()),
            ("acks", "all".to_string()),
            ("partitioner", "murmur2_random".to_string()),
        ];
        let producer: FutureProducer<Logging> = self
            .cfg
            .client
            .client_config(&ours)
            .create_with_context(Logging { what: format!("kafka sink {} (worker {worker})", self.cfg.topic) })
            .map_err(|e| kafka_err("kafka sink: cannot create the producer", &e))?;
        let encoder = self.cfg.format.encoder(self.cfg.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Box::new(KafkaSink { cfg: self.cfg.clone(), producer, encoder, buf: Vec::new() }))
    }
}

struct KafkaSink {
    cfg: Arc<KafkaSinkConfig>,
    producer: FutureProducer<Logging>,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
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

/// The encoded rows of a batch: `(start, end)` of each row's bytes in `buf`.
fn encode_rows(
    enc: &mut dyn Encoder,
    format: &FormatSpec,
    rows: &RecordBatch,
    buf: &mut Vec<u8>,
) -> Result<Vec<(usize, usize)>> {
    buf.clear();
    let mut spans = Vec::with_capacity(rows.num_rows());
    if matches!(format, FormatSpec::Json) {
        // JSON Lines escapes newlines inside strings, so each '\n' ends one row.
        enc.encode(rows, buf).map_err(crate::fmt_err)?;
        let mut start = 0;
        for end in memchr_newlines(buf) {
            spans.push((start, end));
            start = end + 1;
        }
    } else {
        for i in 0..rows.num_rows() {
            let start = buf.len();
            enc.encode(&rows.slice(i, 1), buf).map_err(crate::fmt_err)?;
            spans.push((start, buf.len()));
        }
    }
    if spans.len() != rows.num_rows() {
        weir_core::bail_internal!("kafka sink encoded {} records for {} rows", spans.len(), rows.num_rows());
    }
    Ok(spans)
}

fn memchr_newlines(buf: &[u8]) -> impl Iterator<Item = usize> + '_ {
    buf.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i)
}

/// Waits for one record's delivery report.
async fn delivered(f: rdkafka::producer::DeliveryFuture, topic: &str) -> Result<()> {
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(kafka_err(format!("kafka sink: delivery to `{topic}`"), &e)),
        Err(_) => Err(CoreError::Task("kafka sink: the producer dropped a delivery".into())),
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        let spans = encode_rows(self.encoder.as_mut(), &self.cfg.format, rows, &mut self.buf)?;
        let keys = self.cfg.key.as_deref().map(|k| texts(rows, k)).transpose()?;
        let parts = self.cfg.partition.as_deref().map(|p| texts(rows, p)).transpose()?;
        let headers: Vec<(&str, Vec<Option<String>>)> =
            self.cfg.headers.iter().map(|(h, c)| Ok((h.as_str(), texts(rows, c)?))).collect::<Result<_>>()?;
        let mut pending = Vec::with_capacity(spans.len());
        for (i, (s, e)) in spans.iter().enumerate() {
            let mut rec = FutureRecord::<str, [u8]>::to(&self.cfg.topic).payload(&self.buf[*s..*e]);
            if let Some(k) = keys.as_ref().and_then(|k| k[i].as_deref()) {
                rec = rec.key(k);
            }
            if let Some(p) = parts.as_ref().and_then(|p| p[i].as_deref()) {
                let p: i32 = p.parse().map_err(|_| {
                    CoreError::user(format!("kafka sink: partition column value `{p}` is not a partition number"))
                })?;
                rec = rec.partition(p);
            }
            if !headers.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(headers.len());
                for (name, vals) in &headers {
                    h = h.insert(Header { key: name, value: vals[i].as_deref() });
                }
                rec = rec.headers(h);
            }
            // A full local queue is backpressure: wait for deliveries, then try again.
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        if pending.is_empty() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        } else {
                            delivered(pending.remove(0), &self.cfg.topic).await?;
                        }
                    }
                    Err((e, _)) => return Err(kafka_err(format!("kafka sink: producing to `{}`", self.cfg.topic), &e)),
                }
            }
        }
        for f in pending {
            delivered(f, &self.cfg.topic).await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30)))
            .await
            .map_err(|e| CoreError::Task(e.to_string()))?
            .map_err(|e| kafka_err("kafka sink: flushing at the end", &e))
    }
}
