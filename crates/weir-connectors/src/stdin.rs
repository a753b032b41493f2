//! Records from standard input, cut into batches by size or adaptive linger. Worker 0 reads;
//! other workers get rows through exchanges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use tokio::io::{AsyncBufReadExt, BufReader, Stdin};
use weir_core::linger::Linger;
use weir_core::time::EventTimeSpec;
use weir_core::{CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{split_records, Decoder, FormatSpec};

use crate::decode::{decode_records, Position};

/// Builds the stdin source.
#[derive(Debug)]
pub struct StdinSourceFactory {
    format: FormatSpec,
    schema: SchemaRef,
    event_time: Option<EventTimeSpec>,
    batch_size: usize,
    max_linger: Duration,
}

impl StdinSourceFactory {
    /// A stdin source of line-delimited records.
    ///
    /// # Errors
    /// MessagePack, which is not line-delimited.
    pub fn new(
        format: FormatSpec,
        schema: SchemaRef,
        event_time: Option<EventTimeSpec>,
        batch_size: usize,
        max_linger: Duration,
    ) -> Result<Self> {
        weir_core::ensure_config!(
            !matches!(format, FormatSpec::MsgPack),
            "stdin reads line-delimited formats (json, csv), not msgpack"
        );
        Ok(Self { format, schema, event_time, batch_size, max_linger })
    }
}

impl SourceFactory for StdinSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Source>> {
        let decoder = self.format.decoder(self.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Box::new(StdinSource {
            reader: (worker == 0).then(|| BufReader::with_capacity(1 << 20, tokio::io::stdin())),
            decoder,
            format: self.format,
            event_time: self.event_time.clone().map(Arc::new),
            linger: Linger::new(self.batch_size, self.max_linger),
            buf: Vec::new(),
            starts: Vec::new(),
            first_at: None,
            line: 1,
            offset: 0,
            eof: false,
        }))
    }
}

#[derive(Debug)]
struct StdinSource {
    reader: Option<BufReader<Stdin>>,
    decoder: Box<dyn Decoder>,
    format: FormatSpec,
    event_time: Option<Arc<EventTimeSpec>>,
    linger: Linger,
    /// Complete lines waiting to be cut into a batch.
    buf: Vec<u8>,
    /// Line number and offset of each buffered line.
    starts: Vec<(u64, u64)>,
    first_at: Option<Instant>,
    line: u64,
    offset: u64,
    eof: bool,
}

impl StdinSource {
    fn cut(&mut self, cx: &SourceContext) -> Result<Option<weir_core::Batch>> {
        let mut ranges = Vec::new();
        split_records(&self.format, &self.buf, true, &mut ranges).map_err(crate::fmt_err)?;
        // Map each record back to the line it started on.
        let starts = std::mem::take(&mut self.starts);
        let base = starts.first().map_or(0, |s| s.1);
        let pos = |i: usize| {
            let abs = base + ranges[i].start as u64;
            let line = starts.iter().rev().find(|(_, o)| *o <= abs).map(|(l, _)| *l);
            Position { offset: abs, line }
        };
        let out =
            decode_records(self.decoder.as_mut(), self.event_time.as_deref(), &self.buf, &ranges, "stdin", pos, cx)?;
        self.buf.clear();
        self.first_at = None;
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Source for StdinSource {
    fn partitions(&self) -> usize {
        usize::from(self.reader.is_some())
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        let Some(mut reader) = self.reader.take() else {
            return Ok(SourcePoll::End);
        };
        let result = loop {
            let pending = self.starts.len();
            if self.eof
                || cx.stopping()
                || self.first_at.is_some_and(|f| self.linger.should_cut(pending, f, Instant::now()))
            {
                if pending > 0 {
                    let l = self.linger.linger(1).as_micros();
                    cx.registry
                        .linger_us
                        .store(u64::try_from(l).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
                    if let Some(b) = self.cut(cx)? {
                        break Ok(SourcePoll::Rows { partition: 0, batch: b });
                    }
                    continue;
                }
                if self.eof || cx.stopping() {
                    break Ok(SourcePoll::End);
                }
            }
            let deadline = self.first_at.map(|f| f + self.linger.linger(pending));
            let mut line = Vec::new();
            let mut stop = cx.shutdown.clone();
            // Cancel safety: if another branch wins, `read_until` may have put part of a line
            // into `line`; the same vector is passed again below to finish it, so nothing is
            // lost.
            let read = tokio::select! {
                r = reader.read_until(b'\n', &mut line) => Some(r),
                () = sleep_until_opt(deadline) => None,
                _ = stop.changed() => None,
            };
            match read {
                None => {
                    if !line.is_empty() {
                        // Finish the partial line before cutting.
                        reader.read_until(b'\n', &mut line).await.map_err(|e| CoreError::io("reading stdin", e))?;
                        self.push_line(line);
                    }
                    if pending == 0 && self.first_at.is_none() {
                        break Ok(SourcePoll::Waiting);
                    }
                }
                Some(Ok(0)) => self.eof = true,
                Some(Ok(_)) => self.push_line(line),
                Some(Err(e)) => break Err(CoreError::io("reading stdin", e)),
            }
        };
        self.reader = Some(reader);
        result
    }
}

impl StdinSource {
    fn push_line(&mut self, line: Vec<u8>) {
        let now = Instant::now();
        self.linger.arrived(1, now);
        if self.first_at.is_none() {
            self.first_at = Some(now);
        }
        self.starts.push((self.line, self.offset));
        self.line += 1;
        self.offset += line.len() as u64;
        self.buf.extend_from_slice(&line);
        if !line.ends_with(b"\n") {
            self.buf.push(b'\n');
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
