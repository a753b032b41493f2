//! File and stdout sinks.
//!
//! All workers' instances of one sink share one writer: rows are encoded outside the lock and
//! written as one block per batch under it, so lines from different workers never interleave.
//! At-least-once: a crash may leave a partial last batch (exactly-once files come with
//! checkpoints).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use weir_core::{CoreError, Result, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

/// The destination bytes go to, shared by a sink's instances.
struct Out(Box<dyn Write + Send>);

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Out")
    }
}

type SharedWriter = Arc<Mutex<Out>>;

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
        let w: SharedWriter = Arc::new(Mutex::new(Out(Box::new(BufWriter::with_capacity(1 << 20, f)))));
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
    writer: SharedWriter,
}

impl StdoutSinkFactory {
    /// A sink to stdout.
    pub fn new(format: FormatSpec, schema: SchemaRef) -> Self {
        Self { format, schema, writer: Arc::new(Mutex::new(Out(Box::new(std::io::stdout())))) }
    }
}

impl SinkFactory for StdoutSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(WriterSink::new(self.writer.clone(), &self.format, &self.schema, worker, "stdout".into())?))
    }
}

struct WriterSink {
    writer: SharedWriter,
    /// Buffered bytes reach the file at least this often, so a slow stream is visible to
    /// readers (`tail -f`) without a write per batch.
    last_flush: std::time::Instant,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
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
            buf: Vec::with_capacity(1 << 16),
            what,
        })
    }
}

#[async_trait::async_trait]
impl Sink for WriterSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        self.buf.clear();
        self.encoder.encode(rows, &mut self.buf).map_err(crate::fmt_err)?;
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.0.write_all(&self.buf).map_err(|e| CoreError::io(format!("writing {}", self.what), e))?;
        if self.last_flush.elapsed() >= std::time::Duration::from_millis(100) {
            self.last_flush = std::time::Instant::now();
            w.0.flush().map_err(|e| CoreError::io(format!("flushing {}", self.what), e))?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.0.flush().map_err(|e| CoreError::io(format!("flushing {}", self.what), e))
    }
}
