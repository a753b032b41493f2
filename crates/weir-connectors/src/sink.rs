//! File and stdout sinks.
//!
//! All workers' instances of one sink share one writer, a thread of its own: rows are encoded in
//! the worker and handed over as one block per batch, so lines from different workers never
//! interleave, and a destination that stalls (a full pipe, a slow disk) makes the sink wait
//! without blocking a runtime thread.
//! At-least-once: a crash may leave a partial last batch (exactly-once files come with
//! checkpoints).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use weir_core::{CoreError, Result, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

/// What the writer thread is asked to do.
enum Cmd {
    /// Write these bytes (one batch, so lines of different workers never interleave).
    Write(Vec<u8>),
    /// Hand buffered bytes to the OS (readers such as `tail -f` see them).
    Flush,
    /// Flush and say how it went, or what failed earlier.
    Sync(tokio::sync::oneshot::Sender<Option<(std::io::ErrorKind, String)>>),
}

/// Batches in flight to a writer thread at most: a destination that stops taking bytes (a
/// full disk, a stdout nobody reads) makes the sink's `write` wait (backpressure, not a
/// blocked runtime thread), after this many.
const WRITER_QUEUE: usize = 8;

/// A destination written from a thread of its own, so a slow or stuck destination never
/// blocks a runtime worker: the sink hands encoded batches over a bounded channel and awaits
/// only when it is full. The first write error is kept and reported by the next call.
#[derive(Clone)]
struct Out {
    tx: tokio::sync::mpsc::Sender<Cmd>,
    failed: Arc<Mutex<Option<(std::io::ErrorKind, String)>>>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Out")
    }
}

impl Out {
    fn spawn(mut w: Box<dyn Write + Send>, name: &str) -> Result<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Cmd>(WRITER_QUEUE);
        let failed: Arc<Mutex<Option<(std::io::ErrorKind, String)>>> = Arc::default();
        let slot = failed.clone();
        // The thread ends when every sink instance (every sender) is gone.
        std::thread::Builder::new()
            .name(format!("weir-out-{name}"))
            .spawn(move || {
                let note = |e: std::io::Error| {
                    let mut f = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    f.get_or_insert((e.kind(), e.to_string()));
                };
                while let Some(cmd) = rx.blocking_recv() {
                    let failed_before = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                    match cmd {
                        // After a failure nothing more is written: the job is failing.
                        Cmd::Write(_) | Cmd::Flush if failed_before.is_some() => {}
                        Cmd::Write(b) => w.write_all(&b).unwrap_or_else(note),
                        Cmd::Flush => w.flush().unwrap_or_else(note),
                        Cmd::Sync(ack) => {
                            if failed_before.is_none() {
                                w.flush().unwrap_or_else(note);
                            }
                            let _ = ack.send(slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
                        }
                    }
                }
                let _ = w.flush();
            })
            .map_err(|e| CoreError::io(format!("starting the writer thread of {name}"), e))?;
        Ok(Self { tx, failed })
    }

    fn error(what: &str, (kind, msg): (std::io::ErrorKind, String)) -> CoreError {
        CoreError::io(what.to_string(), std::io::Error::new(kind, msg))
    }

    /// The error the thread met, if any.
    fn check(&self, what: &str) -> Result<()> {
        match self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            Some(e) => Err(Self::error(what, e)),
            None => Ok(()),
        }
    }

    async fn send(&self, cmd: Cmd, what: &str) -> Result<()> {
        self.tx.send(cmd).await.map_err(|_| CoreError::Task(format!("the writer thread of {what} stopped")))
    }

    /// Waits until everything sent so far is flushed.
    async fn sync(&self, what: &str) -> Result<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.send(Cmd::Sync(ack), what).await?;
        match done.await.map_err(|_| CoreError::Task(format!("the writer thread of {what} stopped")))? {
            Some(e) => Err(Self::error(&format!("writing {what}"), e)),
            None => Ok(()),
        }
    }
}

type SharedWriter = Out;

/// Writes rows to one file, replacing it at start.
#[derive(Debug)]
pub struct FileSinkFactory {
    path: PathBuf,
    format: FormatSpec,
    schema: SchemaRef,
    writer: Mutex<Option<SharedWriter>>,
}

impl FileSinkFactory {
    /// A sink to `path` (parent folders are created when the job starts).
    pub fn new(path: impl Into<PathBuf>, format: FormatSpec, schema: SchemaRef) -> Self {
        Self { path: path.into(), format, schema, writer: Mutex::new(None) }
    }

    fn shared(&self) -> Result<SharedWriter> {
        let mut slot = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = slot.as_ref() {
            return Ok(w.clone());
        }
        let f = crate::create_output(&self.path, "output file")?;
        let w = Out::spawn(Box::new(BufWriter::with_capacity(1 << 20, f)), "file")?;
        *slot = Some(w.clone());
        Ok(w)
    }
}

impl SinkFactory for FileSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(WriterSink::new(
            self.shared()?,
            &self.format,
            &self.schema,
            worker,
            self.path.display().to_string(),
        )?))
    }
}

/// Writes rows to standard output.
#[derive(Debug)]
pub struct StdoutSinkFactory {
    format: FormatSpec,
    schema: SchemaRef,
    writer: Mutex<Option<SharedWriter>>,
}

impl StdoutSinkFactory {
    /// A sink to stdout.
    pub fn new(format: FormatSpec, schema: SchemaRef) -> Self {
        Self { format, schema, writer: Mutex::new(None) }
    }
}

impl SinkFactory for StdoutSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        let w = {
            let mut slot = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match slot.as_ref() {
                Some(w) => w.clone(),
                None => slot.insert(Out::spawn(Box::new(std::io::stdout()), "stdout")?).clone(),
            }
        };
        Ok(Box::new(WriterSink::new(w, &self.format, &self.schema, worker, "stdout".into())?))
    }
}

struct WriterSink {
    writer: SharedWriter,
    /// Buffered bytes reach the file at least this often, so a slow stream is visible to
    /// readers (`tail -f`) without a write per batch.
    last_flush: std::time::Instant,
    encoder: Box<dyn Encoder>,
    /// Size of the last encoded batch: the next buffer starts that large.
    last_len: usize,
    what: String,
}

impl std::fmt::Debug for WriterSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterSink").field("what", &self.what).finish_non_exhaustive()
    }
}

impl WriterSink {
    fn new(writer: SharedWriter, format: &FormatSpec, schema: &SchemaRef, worker: usize, what: String) -> Result<Self> {
        // CSV writes its header once per encoder: only worker 0's encoder may write it.
        let format = match format {
            FormatSpec::Csv(o) if worker > 0 => FormatSpec::Csv(weir_formats::CsvOptions { header: false, ..*o }),
            f => *f,
        };
        Ok(Self {
            writer,
            last_flush: std::time::Instant::now(),
            encoder: format.encoder(schema.clone()).map_err(crate::fmt_err)?,
            last_len: 1 << 16,
            what,
        })
    }
}

#[async_trait::async_trait]
impl Sink for WriterSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        self.writer.check(&format!("writing {}", self.what))?;
        // A buffer per batch: it travels to the writer thread.
        let mut buf = Vec::with_capacity(self.last_len + self.last_len / 8);
        self.encoder.encode(rows, &mut buf).map_err(crate::fmt_err)?;
        self.last_len = buf.len();
        self.writer.send(Cmd::Write(buf), &self.what).await?;
        if self.last_flush.elapsed() >= std::time::Duration::from_millis(100) {
            self.last_flush = std::time::Instant::now();
            self.writer.send(Cmd::Flush, &self.what).await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.writer.sync(&self.what).await
    }
}

/// The encoded rows of a batch: `(start, end)` of each row's bytes in `buf`. `lines`: the
/// encoder ends each row with a newline and has none inside (JSON Lines), so the whole batch is
/// encoded at once and cut; otherwise rows are encoded one by one.
pub(crate) fn encode_rows(
    enc: &mut dyn Encoder,
    lines: bool,
    rows: &RecordBatch,
    buf: &mut Vec<u8>,
) -> Result<Vec<(usize, usize)>> {
    buf.clear();
    let mut spans = Vec::with_capacity(rows.num_rows());
    if lines {
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
        weir_core::bail_internal!("sink encoded {} records for {} rows", spans.len(), rows.num_rows());
    }
    Ok(spans)
}

fn memchr_newlines(buf: &[u8]) -> impl Iterator<Item = usize> + '_ {
    buf.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i)
}

/// One row's message, for the sinks that publish a message per row (NATS, RabbitMQ, MQTT).
#[cfg(any(feature = "nats", feature = "amqp", feature = "mqtt"))]
#[derive(Debug)]
pub(crate) struct RowMessage {
    /// The row in the batch.
    pub(crate) row: usize,
    /// Where it goes: the subject, routing key or topic.
    pub(crate) to: String,
    /// Its message id, when the sink has a template for one (MQTT has none).
    #[cfg_attr(not(any(feature = "nats", feature = "amqp")), allow(dead_code))]
    pub(crate) id: Option<String>,
    /// Its payload's bytes in the encoded batch.
    pub(crate) span: (usize, usize),
}

/// Encodes `rows` into `buf` and addresses each row from the templates `to` (and `id`). A row
/// whose address has a null column is refused, the reason led by `sink` (`nats sink`). Made
/// before anything is awaited: the templates' formatters are not `Send`.
#[cfg(any(feature = "nats", feature = "amqp", feature = "mqtt"))]
pub(crate) fn row_messages(
    enc: &mut dyn Encoder,
    format: &FormatSpec,
    rows: &RecordBatch,
    buf: &mut Vec<u8>,
    to: &crate::template::RowTemplate,
    id: Option<&crate::template::RowTemplate>,
    sink: &str,
) -> Result<(Vec<RowMessage>, Vec<weir_core::RefusedRow>)> {
    let spans = encode_rows(enc, matches!(format, FormatSpec::Json), rows, buf)?;
    let tos = to.renderer(rows)?;
    let ids = id.map(|t| t.renderer(rows)).transpose()?;
    let (mut out, mut refused) = (Vec::with_capacity(rows.num_rows()), Vec::new());
    let (mut address, mut text) = (String::new(), String::new());
    for (row, span) in spans.into_iter().enumerate() {
        let rendered = tos.render(row, &mut address).and_then(|()| match &ids {
            Some(t) => t.render(row, &mut text).map(|()| Some(text.clone())),
            None => Ok(None),
        });
        match rendered {
            Ok(id) => out.push(RowMessage { row, to: address.clone(), id, span }),
            Err(reason) => refused.push(weir_core::RefusedRow { row, reason: format!("{sink}: {reason}") }),
        }
    }
    Ok((out, refused))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use arrow_array::Int64Array;
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    /// A destination that takes nothing until released, like a stdout nobody reads.
    struct Stuck {
        open: std::sync::mpsc::Receiver<()>,
        released: bool,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if !self.released {
                let _ = self.open.recv();
                self.released = true;
            }
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A destination that stops taking bytes makes the sink wait once its queue is full, but
    /// never blocks the runtime's thread: other tasks on it go on. Nothing is lost.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stuck_destination_blocks_the_sink_not_the_runtime() {
        let (release, open) = std::sync::mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let out = Out::spawn(Box::new(Stuck { open, released: false, got: got.clone() }), "test").unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let mut sink = WriterSink::new(out, &FormatSpec::Json, &schema, 0, "stuck".into()).unwrap();
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let ticker = weir_core::task::SpawnedTask::spawn(async move {
            loop {
                t.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        // The writer thread holds one batch, the queue eight more: then `write` waits.
        let mut written = 0;
        while let Ok(r) = tokio::time::timeout(std::time::Duration::from_millis(200), sink.write(&batch)).await {
            r.unwrap();
            written += 1;
            assert!(written <= 20, "the queue is bounded");
        }
        // Other tasks run while the sink waits: the ticker moves on.
        let before = ticks.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ticks.load(Ordering::Relaxed) < before + 5 {
            assert!(std::time::Instant::now() < deadline, "the runtime's thread is blocked");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Released, the destination takes everything, in order.
        release.send(()).unwrap();
        sink.write(&batch).await.unwrap();
        sink.close().await.unwrap();
        ticker.abort();
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2 * (written + 1), "{text}");
    }
}
