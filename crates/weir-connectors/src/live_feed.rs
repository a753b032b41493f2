//! The live feed: a sink whose rows go to every WebSocket client of the API port's
//! `GET /ws/<sink id>`, as one JSON object per message, filtered per client by column values.
//!
//! The sink never waits for a client: each batch is encoded once and put on a broadcast
//! channel of `queue` batches. A client that falls that far behind is dropped (its connection
//! closed with the reason) and counted; the pipeline and the other clients go on. With no
//! client connected, the rows are only counted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::{DataType, SchemaRef};
use tokio::sync::broadcast;
use weir_core::{Result, Sink, SinkFactory};
use weir_formats::JsonEncoder;

/// One batch as the clients get it: the rows (for filters) and each row's JSON text.
#[derive(Debug)]
pub struct FeedBatch {
    rows: RecordBatch,
    json: bytes::Bytes,
    spans: Vec<(usize, usize)>,
}

/// Where a feed sink's batches meet the API port's clients.
#[derive(Debug)]
pub struct FeedHub {
    tx: broadcast::Sender<Arc<FeedBatch>>,
    /// Becomes true when every worker's sink has closed: the pipeline ended. (The clients hold
    /// the hub, so the sender never drops while one is connected.)
    ended: tokio::sync::watch::Sender<bool>,
    /// Sink instances open now.
    open: AtomicUsize,
    schema: SchemaRef,
    clients: AtomicUsize,
    dropped: AtomicU64,
    rows: AtomicU64,
}

/// Why a client's feed ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEnd {
    /// The client fell this many batches behind and is dropped.
    TooSlow(u64),
    /// The pipeline ended.
    Closed,
}

impl FeedHub {
    /// A hub keeping up to `queue` batches for each client.
    pub fn new(schema: SchemaRef, queue: usize) -> Self {
        let (tx, _) = broadcast::channel(queue.max(1));
        Self {
            tx,
            ended: tokio::sync::watch::Sender::new(false),
            open: AtomicUsize::new(0),
            schema,
            clients: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        }
    }

    /// A new client, receiving the rows whose columns equal the given values (`device_id=d-1`;
    /// a column named twice takes any of its values).
    ///
    /// # Errors
    /// A filter naming a column the rows do not have, or one that is not a plain value; the
    /// message lists the columns.
    pub fn subscribe(self: &Arc<Self>, filters: &[(String, String)]) -> std::result::Result<FeedClient, String> {
        let mut by_column: Vec<(usize, Vec<String>)> = Vec::new();
        for (name, value) in filters {
            let Some((i, f)) = self.schema.column_with_name(name) else {
                let names: Vec<&str> = self.schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(format!("no column `{name}` to filter on; the rows have: {}", names.join(", ")));
            };
            if matches!(f.data_type(), DataType::Struct(_) | DataType::List(_) | DataType::Map(_, _)) {
                return Err(format!("column `{name}` is a {}, not a plain value to filter on", f.data_type()));
            }
            match by_column.iter_mut().find(|(c, _)| *c == i) {
                Some((_, vs)) => vs.push(value.clone()),
                None => by_column.push((i, vec![value.clone()])),
            }
        }
        self.clients.fetch_add(1, Ordering::Relaxed);
        Ok(FeedClient { rx: self.tx.subscribe(), ended: self.ended.subscribe(), filters: by_column, hub: self.clone() })
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Clients dropped for falling behind, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One WebSocket client's view of a feed.
#[derive(Debug)]
pub struct FeedClient {
    rx: broadcast::Receiver<Arc<FeedBatch>>,
    ended: tokio::sync::watch::Receiver<bool>,
    filters: Vec<(usize, Vec<String>)>,
    hub: Arc<FeedHub>,
}

impl Drop for FeedClient {
    fn drop(&mut self) {
        self.hub.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FeedClient {
    /// The JSON texts of the next batch's rows that pass the client's filters (possibly none).
    ///
    /// # Errors
    /// The client fell behind by more than the queue (it is counted as dropped), or the
    /// pipeline ended.
    pub async fn next(&mut self) -> std::result::Result<Vec<bytes::Bytes>, FeedEnd> {
        // What is queued goes out before the end is told.
        let got = tokio::select! {
            biased;
            got = self.rx.recv() => got,
            _ = self.ended.wait_for(|ended| *ended) => return Err(FeedEnd::Closed),
        };
        let batch = match got {
            Ok(b) => b,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.hub.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(FeedEnd::TooSlow(n));
            }
            Err(broadcast::error::RecvError::Closed) => return Err(FeedEnd::Closed),
        };
        Ok(self.pick(&batch))
    }

    /// The client's connection stopped taking messages: it is dropped, and counted so.
    pub fn note_dropped(&self) {
        self.hub.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn pick(&self, b: &FeedBatch) -> Vec<bytes::Bytes> {
        let text = |i: usize| {
            let (s, e) = b.spans[i];
            b.json.slice(s..e)
        };
        if self.filters.is_empty() {
            return (0..b.spans.len()).map(text).collect();
        }
        let options = FormatOptions::default();
        let columns: Vec<(&dyn Array, Option<ArrayFormatter<'_>>, &Vec<String>)> = self
            .filters
            .iter()
            .map(|(i, vs)| {
                let a = b.rows.column(*i).as_ref();
                (a, ArrayFormatter::try_new(a, &options).ok(), vs)
            })
            .collect();
        let mut value = String::new();
        (0..b.rows.num_rows())
            .filter(|&r| {
                columns.iter().all(|(a, fmt, vs)| {
                    if a.is_null(r) {
                        return false;
                    }
                    value.clear();
                    match (a.data_type(), fmt) {
                        (DataType::Utf8, _) => value.push_str(a.as_string::<i32>().value(r)),
                        (_, Some(f)) => {
                            use std::fmt::Write as _;
                            let _ = write!(value, "{}", f.value(r));
                        }
                        (_, None) => return false,
                    }
                    vs.contains(&value)
                })
            })
            .map(text)
            .collect()
    }
}

/// Builds the sink's instances, all feeding one hub.
#[derive(Debug)]
pub struct FeedSinkFactory {
    hub: Arc<FeedHub>,
}

impl FeedSinkFactory {
    /// A sink feeding `hub` (which the API port serves).
    ///
    /// # Errors
    /// A schema the JSON encoder cannot write.
    pub fn new(hub: Arc<FeedHub>) -> Result<Self> {
        JsonEncoder::new(hub.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Self { hub })
    }
}

impl SinkFactory for FeedSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        let encoder = JsonEncoder::new(self.hub.schema.clone()).map_err(crate::fmt_err)?;
        self.hub.open.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FeedSink { hub: self.hub.clone(), encoder, closed: false }))
    }
}

#[derive(Debug)]
struct FeedSink {
    hub: Arc<FeedHub>,
    encoder: JsonEncoder,
    closed: bool,
}

impl FeedSink {
    /// The last open instance to close ends the feed: its clients are told, after their
    /// queued rows.
    fn finish(&mut self) {
        if !std::mem::replace(&mut self.closed, true) && self.hub.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.hub.ended.send_replace(true);
        }
    }
}

impl Drop for FeedSink {
    fn drop(&mut self) {
        self.finish();
    }
}

#[async_trait::async_trait]
impl Sink for FeedSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        self.hub.rows.fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
        if self.hub.tx.receiver_count() == 0 || rows.num_rows() == 0 {
            return Ok(());
        }
        let mut json = Vec::new();
        let spans = crate::sink::encode_rows(&mut self.encoder, true, rows, &mut json)?;
        // No receiver left between the check and the send is not an error: nobody watches.
        let _ = self.hub.tx.send(Arc::new(FeedBatch { rows: rows.clone(), json: json.into(), spans }));
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.finish();
        Ok(())
    }

    fn report(&self, m: &weir_core::metrics::ConnectorMetrics) {
        m.set("weir_feed_clients", "WebSocket clients of the live feed now.", &[], self.hub.clients() as f64);
        m.set_total(
            "weir_feed_clients_dropped_total",
            "Live feed clients dropped because they fell behind.",
            &[],
            self.hub.dropped() as f64,
        );
        m.set_total(
            "weir_feed_rows_total",
            "Rows that reached the live feed sink.",
            &[],
            self.hub.rows.load(Ordering::Relaxed) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    fn batch(schema: &SchemaRef, from: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "a"])) as ArrayRef,
                Arc::new(Int64Array::from(vec![from, from + 1, from + 2])),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn clients_get_their_rows_and_a_slow_one_is_dropped_without_stopping_the_sink() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let hub = Arc::new(FeedHub::new(schema.clone(), 2));
        let mut sink = FeedSinkFactory::new(hub.clone()).unwrap().create(0, 1).unwrap();
        // Nobody listens: rows are counted, not kept.
        sink.write(&batch(&schema, 0)).await.unwrap();
        let mut all = hub.subscribe(&[]).unwrap();
        let mut only_a = hub.subscribe(&[("k".into(), "a".into()), ("n".into(), "12".into())]).unwrap();
        let mut slow = hub.subscribe(&[]).unwrap();
        assert_eq!(hub.clients(), 3);
        sink.write(&batch(&schema, 10)).await.unwrap();
        assert_eq!(all.next().await.unwrap(), [r#"{"k":"a","n":10}"#, r#"{"k":"b","n":11}"#, r#"{"k":"a","n":12}"#]);
        assert_eq!(only_a.next().await.unwrap(), [r#"{"k":"a","n":12}"#]);
        sink.write(&batch(&schema, 20)).await.unwrap();
        sink.write(&batch(&schema, 30)).await.unwrap();
        assert_eq!(all.next().await.unwrap().len(), 3);
        assert_eq!(slow.next().await, Err(FeedEnd::TooSlow(1)), "three batches behind a queue of two");
        assert_eq!(hub.dropped(), 1);
        drop(slow);
        assert_eq!(hub.clients(), 2);
        let e = hub.subscribe(&[("nope".into(), "1".into())]).unwrap_err();
        assert_eq!(e, "no column `nope` to filter on; the rows have: k, n");
        // The end of the pipeline: queued rows still come, then the end is told, to a client
        // that comes later too. Regression: the clients held the sender, so it never closed.
        let mut second = FeedSinkFactory::new(hub.clone()).unwrap().create(1, 2).unwrap();
        sink.write(&batch(&schema, 40)).await.unwrap();
        sink.close().await.unwrap();
        assert_eq!(all.next().await.unwrap()[0], r#"{"k":"a","n":30}"#);
        second.write(&batch(&schema, 50)).await.unwrap();
        assert_eq!(all.next().await.unwrap()[0], r#"{"k":"a","n":40}"#, "one sink of two closed: not the end");
        drop(second);
        assert_eq!(all.next().await.unwrap()[0], r#"{"k":"a","n":50}"#);
        assert_eq!(all.next().await, Err(FeedEnd::Closed));
        assert_eq!(hub.subscribe(&[]).unwrap().next().await, Err(FeedEnd::Closed));
    }
}
