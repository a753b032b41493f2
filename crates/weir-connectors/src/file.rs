//! The file source: one file or a glob, JSON Lines, CSV or MessagePack, optionally following a
//! growing file.
//!
//! Splitting: a line-delimited file is cut into chunks of `chunk_size` bytes, and worker `w` of
//! `W` reads chunks `w, w + W, w + 2W, ...` of every file, so parsing spreads over all cores
//! even for one file. A line belongs to the chunk in which it starts. Each worker's share of
//! the files is one partition, whose watermark follows the rows in file order; a subsequence of
//! a stream keeps the stream's bound on disorder, so the bound holds per worker.
//! MessagePack files cannot be cut at arbitrary bytes; they are assigned whole, round-robin.
//! In follow mode, worker 0 reads every file and keeps polling for appended data. Pipelines
//! whose result depends on arrival order per key (`ewma_zscore`) turn splitting off, so each
//! file is read in order by one worker and the exchange keeps each key's rows in that order.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::metrics::StepMetrics;
use weir_core::time::EventTimeSpec;
use weir_core::{Batch, CoreError, Result, Source, SourceContext, SourceFactory, SourcePoll};
use weir_formats::{csv_header, split_records, Decoder, FormatSpec};

use crate::decode::{decode_records, Position};

/// Settings of the file source.
#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    /// A path or a glob pattern (`data/*.jsonl`); files are read in sorted path order.
    pub path: String,
    /// Record format.
    pub format: FormatSpec,
    /// Schema of the decoded rows.
    pub schema: SchemaRef,
    /// Event-time column; `None` for processing time (the time a row is read).
    pub event_time: Option<EventTimeSpec>,
    /// Rows per batch at most.
    pub batch_size: usize,
    /// Bytes per chunk when splitting a file between workers.
    pub chunk_size: usize,
    /// Keep reading as the file grows, until the job is stopped.
    pub follow: bool,
    /// How often to look for new data in follow mode.
    pub poll_interval: Duration,
    /// Split line-delimited files between workers. Off, each file is read whole by one
    /// worker, which keeps rows of a key in file order for order-sensitive steps.
    pub split: bool,
}

/// Expands a path or glob into a sorted list of files.
///
/// # Errors
/// A bad pattern, or no file matching: both name the pattern.
pub fn expand_paths(pattern: &str) -> Result<Vec<PathBuf>> {
    let is_glob = pattern.contains(['*', '?', '[']);
    if !is_glob {
        let p = PathBuf::from(pattern);
        return match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(vec![p]),
            Ok(_) => Err(CoreError::Config(format!("input `{pattern}` is not a file"))),
            Err(e) => Err(CoreError::io(format!("cannot open input file `{pattern}`"), e)),
        };
    }
    let mut files: Vec<PathBuf> = glob::glob(pattern)
        .map_err(|e| CoreError::Config(format!("bad glob pattern `{pattern}`: {e}")))?
        .filter_map(std::result::Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CoreError::Config(format!("no file matches `{pattern}`")));
    }
    Ok(files)
}

/// Builds file source instances. Resolves the file list at planning time, so a missing file is
/// reported before anything runs.
#[derive(Debug)]
pub struct FileSourceFactory {
    cfg: Arc<FileSourceConfig>,
    files: Arc<Vec<PathBuf>>,
}

impl FileSourceFactory {
    /// Checks the path and format.
    ///
    /// # Errors
    /// Missing files, bad glob.
    pub fn new(cfg: FileSourceConfig) -> Result<Self> {
        let files = expand_paths(&cfg.path)?;
        Ok(Self { cfg: Arc::new(cfg), files: Arc::new(files) })
    }

    /// A factory that has not looked for its files, for checking a pipeline where its input
    /// is not; its sources read nothing.
    #[must_use]
    pub fn unresolved(cfg: FileSourceConfig) -> Self {
        Self { cfg: Arc::new(cfg), files: Arc::new(Vec::new()) }
    }
}

impl FileSourceFactory {
    fn splittable(&self) -> bool {
        self.cfg.split && !self.cfg.follow && !matches!(self.cfg.format, FormatSpec::MsgPack)
    }
}

impl SourceFactory for FileSourceFactory {
    fn schema(&self) -> SchemaRef {
        self.cfg.schema.clone()
    }

    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Source>> {
        let splittable = self.splittable();
        let mut plan = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            if self.cfg.follow {
                if worker == 0 {
                    plan.push(FilePlan { path: f.clone(), stride: 1, first: 0, chunked: false });
                }
            } else if splittable {
                // One worker reads in order (which knows line numbers) unless a checkpoint
                // says the file was being read in chunks.
                plan.push(FilePlan { path: f.clone(), stride: workers, first: worker, chunked: workers > 1 });
            } else if i % workers == worker {
                plan.push(FilePlan { path: f.clone(), stride: 1, first: 0, chunked: false });
            }
        }
        Ok(Box::new(FileSource {
            splittable,
            cfg: self.cfg.clone(),
            plan,
            current: None,
            ready: std::collections::VecDeque::new(),
            partitions: usize::from(worker == 0 || !self.cfg.follow),
            positions: HashMap::new(),
        }))
    }

    fn resumable(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
struct FilePlan {
    path: PathBuf,
    /// Read chunks `first, first + stride, ...`.
    stride: usize,
    first: usize,
    /// Read in chunks at fixed offsets; otherwise the whole file in order.
    chunked: bool,
}

#[derive(Debug)]
struct OpenFile {
    plan: FilePlan,
    file: File,
    origin: String,
    decoder: Box<dyn Decoder>,
    next_chunk: usize,
    /// For sequential reading: byte offset of the next unread byte and the current line.
    offset: u64,
    line: u64,
    done: bool,
    /// CSV: the header line is skipped.
    skip_header: bool,
    /// Keep polling at the end (follow mode, last file).
    follow: bool,
}

#[derive(Debug)]
struct FileSource {
    splittable: bool,
    cfg: Arc<FileSourceConfig>,
    plan: Vec<FilePlan>,
    current: Option<OpenFile>,
    /// Decoded batches not yet handed out, each with the position reached once it is.
    ready: std::collections::VecDeque<(Option<Batch>, Progress)>,
    partitions: usize,
    /// Position of every chunk (or whole file) handed out so far, plus every position
    /// restored from a checkpoint: the snapshot. Positions only grow, so merging the
    /// snapshots of several instances takes the largest.
    positions: HashMap<(Arc<str>, i64), Progress>,
}

/// How far a chunk (or a file read in order) has been handed out.
#[derive(Debug, Clone)]
struct Progress {
    file: Arc<str>,
    /// Offset where the chunk starts; -1 for a whole file read in order.
    chunk_start: i64,
    /// Offset where the chunk's lines must start before; -1 for a whole file.
    chunk_end: i64,
    /// Offset of the first record not yet handed out.
    resume: u64,
    /// Line number at `resume` (0 when unknown, in split chunks).
    line: u64,
}

impl Progress {
    fn done(&self) -> bool {
        self.chunk_end >= 0 && self.resume >= self.chunk_end as u64
    }
}

impl FileSource {
    fn open(&self, plan: FilePlan) -> Result<OpenFile> {
        let origin = plan.path.display().to_string();
        let file =
            File::open(&plan.path).map_err(|e| CoreError::io(format!("cannot open input file `{origin}`"), e))?;
        let (header, skip_header) = match &self.cfg.format {
            FormatSpec::Csv(o) if o.header => {
                let mut buf = vec![0u8; 64 * 1024];
                let n = file.read_at(&mut buf, 0).map_err(|e| CoreError::io(format!("reading `{origin}`"), e))?;
                let end = buf[..n].iter().position(|b| *b == b'\n').unwrap_or(n);
                (Some(csv_header(&buf[..end], o.delimiter)), true)
            }
            _ => (None, false),
        };
        let decoder =
            self.cfg.format.decoder_with_header(self.cfg.schema.clone(), header.as_deref()).map_err(crate::fmt_err)?;
        // Following applies to the last file: earlier ones are complete by the time it starts.
        let follow = self.cfg.follow && self.plan.is_empty();
        let (offset, line) = match self.positions.get(&(Arc::from(origin.as_str()), -1)) {
            Some(p) => (p.resume, p.line.max(1)),
            None => (0, 1),
        };
        Ok(OpenFile {
            next_chunk: plan.first,
            plan,
            file,
            origin,
            decoder,
            offset,
            line,
            done: false,
            skip_header,
            follow,
        })
    }

    /// Reads the next chunk of the current file into `ready`. Returns false at the end of the
    /// file's share (or, following, when no new data is there yet).
    fn read_chunk(&mut self, cx: &SourceContext) -> Result<bool> {
        let cfg = self.cfg.clone();
        let Some(f) = self.current.as_mut() else {
            return Ok(false);
        };
        if f.done {
            return Ok(false);
        }
        let len = f.file.metadata().map_err(|e| CoreError::io(format!("reading `{}`", f.origin), e))?.len();
        let chunk = cfg.chunk_size as u64;
        let sequential = !f.plan.chunked;
        // Where this chunk's lines may start, and the end of the range lines must start before.
        let file_key: Arc<str> = Arc::from(f.origin.as_str());
        // A split chunk resumed from a checkpoint starts at a record, not at a chunk boundary.
        let mut resumed = false;
        let (start, limit) = if sequential {
            (f.offset, f.offset + chunk)
        } else {
            let k = f.next_chunk as u64;
            let (from, to) = (k * chunk, (k + 1) * chunk);
            match self.positions.get(&(file_key.clone(), from as i64)) {
                Some(p) if p.done() && from < len => {
                    f.next_chunk += f.plan.stride;
                    return Ok(true);
                }
                Some(p) => {
                    resumed = true;
                    (p.resume.max(from), to)
                }
                None => (from, to),
            }
        };
        if start >= len {
            if !f.follow {
                f.done = true;
            }
            return Ok(false);
        }
        // Read from one byte before the chunk so a line starting exactly at `start` is seen.
        let read_from = if sequential || resumed || start == 0 { start } else { start - 1 };
        let mut buf = Vec::new();
        let mut want = (limit - read_from + 64 * 1024).min(len - read_from);
        loop {
            buf.resize(want as usize, 0);
            let n = read_full(&f.file, &mut buf, read_from)
                .map_err(|e| CoreError::io(format!("reading `{}`", f.origin), e))?;
            buf.truncate(n);
            // Done when the last line starting before `limit` is complete, or at end of file.
            let eof = read_from + n as u64 >= len;
            let tail_start = (limit - read_from).min(n as u64) as usize;
            if eof || buf[tail_start..].contains(&b'\n') || matches!(cfg.format, FormatSpec::MsgPack) {
                break;
            }
            want = (want * 2).min(len - read_from);
        }
        let eof = read_from + buf.len() as u64 >= len;
        // First record start.
        let mut first = 0usize;
        if !sequential && !resumed && start > 0 {
            match buf.iter().position(|b| *b == b'\n') {
                Some(p) => first = p + 1,
                None => first = buf.len(),
            }
        }
        if f.skip_header && read_from == 0 {
            first = buf.iter().position(|b| *b == b'\n').map_or(buf.len(), |p| p + 1);
            f.line = 2;
        }
        // Records starting before `limit` (in sequential mode: all complete ones).
        let mut ranges = Vec::new();
        let body = &buf[first..];
        let at_end = eof && !f.follow;
        let consumed = split_records(&cfg.format, body, at_end, &mut ranges).map_err(crate::fmt_err)?;
        let mut keep = ranges.len();
        if !sequential {
            let lim = (limit - read_from) as usize;
            keep = ranges.iter().position(|r| first + r.start >= lim).unwrap_or(ranges.len());
        }
        ranges.truncate(keep);
        for r in &mut ranges {
            r.start += first;
            r.end += first;
        }
        StepMetrics::add(&cx.registry.source_bytes, buf.len() as u64);
        // Line numbers are known when reading in order. Records of line formats hold no
        // newline, so only the gaps between records (the line ends, and any empty lines) need
        // counting: a few bytes per record, not the whole chunk.
        let line_based = !matches!(cfg.format, FormatSpec::MsgPack);
        let mut lines: Vec<u64> = Vec::new();
        if sequential && line_based {
            let (mut line, mut at) = (f.line, first);
            lines.reserve(ranges.len());
            for r in &ranges {
                line += count_newlines(&buf[at..r.start]);
                lines.push(line);
                at = r.end;
            }
            f.line = line + count_newlines(&buf[at..first + consumed]);
        }
        if sequential {
            f.offset = read_from + (first + consumed) as u64;
            if consumed == 0 && !f.follow && eof {
                f.done = true;
            }
        } else {
            f.next_chunk += f.plan.stride;
        }
        // Where the chunk stands once all of it read so far is handed out.
        let (chunk_start, chunk_end) = if sequential { (-1, -1) } else { ((limit - chunk) as i64, limit as i64) };
        let progress =
            |resume: u64, line: u64| Progress { file: file_key.clone(), chunk_start, chunk_end, resume, line };
        let end_progress = if sequential { progress(f.offset, f.line) } else { progress(limit, 0) };
        let bs = cfg.batch_size.max(1);
        for (gi, group) in ranges.chunks(bs).enumerate() {
            let base = gi * bs;
            let pos =
                |i: usize| Position { offset: read_from + group[i].start as u64, line: lines.get(base + i).copied() };
            let b = decode_records(f.decoder.as_mut(), cfg.event_time.as_ref(), &buf, group, &f.origin, pos, cx)?;
            let next = base + group.len();
            let at = match ranges.get(next) {
                Some(r) => progress(read_from + r.start as u64, lines.get(next).copied().unwrap_or(0)),
                None => end_progress.clone(),
            };
            self.ready.push_back((b, at));
        }
        if ranges.is_empty() {
            self.ready.push_back((None, end_progress));
        }
        Ok(!ranges.is_empty() || (sequential && consumed > 0))
    }
}

fn count_newlines(b: &[u8]) -> u64 {
    b.iter().filter(|c| **c == b'\n').count() as u64
}

fn read_full(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[async_trait::async_trait]
impl Source for FileSource {
    fn partitions(&self) -> usize {
        self.partitions
    }

    async fn poll(&mut self, cx: &mut SourceContext) -> Result<SourcePoll> {
        loop {
            if let Some((b, at)) = self.ready.pop_front() {
                self.positions.insert((at.file.clone(), at.chunk_start), at);
                match b {
                    Some(batch) => return Ok(SourcePoll::Rows { partition: 0, batch }),
                    None => continue,
                }
            }
            if cx.stopping() {
                return Ok(SourcePoll::End);
            }
            if self.current.is_none() {
                if self.plan.is_empty() {
                    return Ok(SourcePoll::End);
                }
                let next = self.plan.remove(0);
                self.current = Some(self.open(next)?);
            }
            if self.read_chunk(cx)? {
                continue;
            }
            let done = self.current.as_ref().is_none_or(|f| f.done);
            if done {
                self.current = None;
                continue;
            }
            // Following and nothing new: wait, but wake for shutdown.
            let mut stop = cx.shutdown.clone();
            tokio::select! {
                () = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = stop.changed() => {}
            }
            return Ok(SourcePoll::Waiting);
        }
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let mut rows: Vec<&Progress> = self.positions.values().collect();
        rows.sort_by(|a, b| (&a.file, a.chunk_start).cmp(&(&b.file, b.chunk_start)));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|p| &*p.file))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|p| p.chunk_start))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|p| p.chunk_end))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|p| p.resume))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|p| p.line))),
        ];
        Ok(Some(RecordBatch::try_new(position_schema(), cols)?))
    }

    fn restore(&mut self, tables: &[RecordBatch]) -> Result<()> {
        let chunk = self.cfg.chunk_size as i64;
        for t in tables {
            if t.schema().fields() != position_schema().fields() {
                return Err(CoreError::Config(format!(
                    "the checkpoint's file positions have columns {:?}; expected file, chunk_start, chunk_end, resume, line",
                    t.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>()
                )));
            }
            let col = |i: usize| t.column(i).clone();
            let (files, starts, ends, resumes, lines) = (col(0), col(1), col(2), col(3), col(4));
            let files = files.as_any().downcast_ref::<StringArray>();
            let starts = starts.as_any().downcast_ref::<Int64Array>();
            let ends = ends.as_any().downcast_ref::<Int64Array>();
            let resumes = resumes.as_any().downcast_ref::<UInt64Array>();
            let lines = lines.as_any().downcast_ref::<UInt64Array>();
            let (Some(files), Some(starts), Some(ends), Some(resumes), Some(lines)) =
                (files, starts, ends, resumes, lines)
            else {
                return Err(CoreError::Config("the checkpoint's file positions have the wrong column types".into()));
            };
            for i in 0..t.num_rows() {
                let p = Progress {
                    file: Arc::from(files.value(i)),
                    chunk_start: starts.value(i),
                    chunk_end: ends.value(i),
                    resume: resumes.value(i),
                    line: lines.value(i),
                };
                if p.chunk_start >= 0 && p.chunk_end - p.chunk_start != chunk {
                    return Err(CoreError::Config(format!(
                        "the checkpoint read `{}` in chunks of {} bytes, but chunk_size is now {chunk}; set it back to resume, or start with --fresh",
                        p.file,
                        p.chunk_end - p.chunk_start
                    )));
                }
                self.merge(p);
            }
        }
        // Positions recorded one way are honoured when reading the other way.
        let mut synthesized = Vec::new();
        for plan in &mut self.plan {
            let file: Arc<str> = Arc::from(plan.path.display().to_string().as_str());
            let has_chunks = self.positions.keys().any(|(f, start)| *f == file && *start >= 0);
            if self.splittable && has_chunks {
                plan.chunked = true;
            }
            // Read in order up to `resume`: every chunk before it is done, and the chunk
            // holding it resumes there (a record start).
            let in_order = self.positions.get(&(file.clone(), -1)).map(|p| p.resume);
            if let (true, Some(upto)) = (plan.chunked, in_order) {
                let chunk = self.cfg.chunk_size as u64;
                let mut start = 0;
                while start < upto {
                    let end = start + chunk;
                    synthesized.push(Progress {
                        file: file.clone(),
                        chunk_start: start as i64,
                        chunk_end: end as i64,
                        resume: upto.min(end),
                        line: 0,
                    });
                    start = end;
                }
            }
        }
        for p in synthesized {
            self.merge(p);
        }
        Ok(())
    }
}

impl FileSource {
    /// Records a position, keeping the furthest of two for one chunk.
    fn merge(&mut self, p: Progress) {
        let key = (p.file.clone(), p.chunk_start);
        match self.positions.get(&key) {
            Some(have) if have.resume >= p.resume => {}
            _ => {
                self.positions.insert(key, p);
            }
        }
    }
}

fn position_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("file", DataType::Utf8, false),
        Field::new("chunk_start", DataType::Int64, false),
        Field::new("chunk_end", DataType::Int64, false),
        Field::new("resume", DataType::UInt64, false),
        Field::new("line", DataType::UInt64, false),
    ]))
}
