//! The exactly-once file sink: a directory of part files that appear only when the checkpoint
//! covering their rows completes.
//!
//! Each worker writes the rows of checkpoint `n` to a hidden in-progress file,
//! `.part-<n>-w<worker>-<run>.<ext>.inprogress`. At the barrier of `n` the file is flushed,
//! synced and closed (pre-commit). Once the manifest of `n` is written, the committer renames
//! every in-progress file of an epoch up to `n` to `part-<n>-w<worker>-<run>.<ext>`: a rename
//! is atomic, so a reader listing `part-*` sees whole files of completed checkpoints only.
//! After a crash, recovery renames what the newest complete checkpoint covers (the crash may
//! have come between its manifest and the renames) and deletes in-progress files of later
//! epochs, whose rows will be produced again from the restored positions.
//!
//! Names sort by epoch, so `cat dir/part-*` gives the output in checkpoint order. `<run>`
//! tells apart runs that restarted epochs from scratch (a deleted checkpoint folder).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use weir_core::checkpoint::Epoch;
use weir_core::{Committer, CoreError, Result, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

/// Builds the exactly-once sink's instances and its committer.
#[derive(Debug)]
pub struct TxFileSinkFactory {
    dir: PathBuf,
    format: FormatSpec,
    schema: SchemaRef,
    run: String,
    committer: Arc<TxFileCommitter>,
}

impl TxFileSinkFactory {
    /// A sink writing part files into the directory `dir` (created if missing).
    ///
    /// # Errors
    /// `dir` exists and is not a directory, or cannot be created.
    pub fn new(dir: impl Into<PathBuf>, format: FormatSpec, schema: SchemaRef) -> Result<Self> {
        let dir = dir.into();
        if dir.is_file() {
            return Err(CoreError::Config(format!(
                "with checkpoints, the file sink writes a directory of part files, but `{}` is a file",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| CoreError::io(format!("cannot create output directory `{}`", dir.display()), e))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let run = format!("{:x}{:04x}", now.as_secs(), std::process::id() & 0xffff);
        let committer = Arc::new(TxFileCommitter { dir: dir.clone() });
        Ok(Self { dir, format, schema, run, committer })
    }
}

impl SinkFactory for TxFileSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(TxFileSink {
            dir: self.dir.clone(),
            format: self.format,
            schema: self.schema.clone(),
            run: self.run.clone(),
            worker,
            epoch: Epoch(0),
            open: None,
            buf: Vec::with_capacity(1 << 16),
        }))
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        Some(self.committer.clone())
    }
}

fn extension(format: &FormatSpec) -> &'static str {
    match format {
        FormatSpec::Json => "jsonl",
        FormatSpec::Csv(_) => "csv",
        FormatSpec::MsgPack => "msgpack",
    }
}

struct OpenPart {
    path: PathBuf,
    out: BufWriter<File>,
    encoder: Box<dyn Encoder>,
}

struct TxFileSink {
    dir: PathBuf,
    format: FormatSpec,
    schema: SchemaRef,
    run: String,
    worker: usize,
    epoch: Epoch,
    open: Option<OpenPart>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for TxFileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxFileSink").field("dir", &self.dir).field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl TxFileSink {
    fn part(&mut self) -> Result<&mut OpenPart> {
        if self.open.is_none() {
            let name = format!(
                ".part-{:010}-w{:03}-{}.{}.inprogress",
                self.epoch.0,
                self.worker,
                self.run,
                extension(&self.format)
            );
            let path = self.dir.join(name);
            let f = crate::create_output(&path, "part file")?;
            // Every part is a file of its own: CSV parts each get the header.
            let encoder = self.format.encoder(self.schema.clone()).map_err(crate::fmt_err)?;
            self.open = Some(OpenPart { path, out: BufWriter::with_capacity(1 << 20, f), encoder });
        }
        self.open.as_mut().ok_or_else(|| CoreError::Internal("part file vanished".into()))
    }

    fn finish_part(&mut self) -> Result<()> {
        if let Some(mut p) = self.open.take() {
            let what = || format!("writing `{}`", p.path.display());
            p.out.flush().map_err(|e| CoreError::io(what(), e))?;
            p.out.get_ref().sync_data().map_err(|e| CoreError::io(what(), e))?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for TxFileSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let part = self.part()?;
        part.encoder.encode(rows, &mut buf).map_err(crate::fmt_err)?;
        part.out.write_all(&buf).map_err(|e| CoreError::io(format!("writing `{}`", part.path.display()), e))?;
        self.buf = buf;
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.finish_part()
    }

    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }

    async fn pre_commit(&mut self, epoch: Epoch) -> Result<()> {
        if epoch != self.epoch {
            return Err(CoreError::Internal(format!("pre-commit of {epoch} while writing {}", self.epoch)));
        }
        self.finish_part()
    }
}

/// Renames or deletes in-progress part files.
#[derive(Debug)]
pub struct TxFileCommitter {
    dir: PathBuf,
}

/// The epoch of an in-progress part file, from its name.
fn pending_epoch(name: &str) -> Option<u64> {
    name.strip_prefix(".part-")?.strip_suffix(".inprogress")?.get(..10)?.parse().ok()
}

impl TxFileCommitter {
    fn pending(&self) -> Result<Vec<(u64, PathBuf, String)>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| CoreError::io(format!("listing output directory `{}`", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| CoreError::io(format!("listing `{}`", self.dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(e) = pending_epoch(&name) {
                out.push((e, entry.path(), name));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CoreError::io(format!("syncing output directory `{}`", dir.display()), e))
}

#[async_trait::async_trait]
impl Committer for TxFileCommitter {
    async fn commit(&self, epoch: Epoch) -> Result<()> {
        let mut renamed = 0;
        for (e, path, name) in self.pending()? {
            if e > epoch.0 {
                continue;
            }
            let visible = name.trim_start_matches('.').trim_end_matches(".inprogress").to_string();
            std::fs::rename(&path, self.dir.join(&visible))
                .map_err(|err| CoreError::io(format!("committing `{}`", path.display()), err))?;
            renamed += 1;
        }
        if renamed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    async fn abort_after(&self, epoch: Epoch) -> Result<()> {
        for (e, path, _) in self.pending()? {
            if e > epoch.0 {
                tracing::info!(file = %path.display(), "Discarding output of a checkpoint that never completed.");
                std::fs::remove_file(&path)
                    .map_err(|err| CoreError::io(format!("discarding `{}`", path.display()), err))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::Int64Array;
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    fn rows(v: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(v.to_vec()))]).unwrap()
    }

    fn visible(dir: &Path) -> String {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("part-"))
            .collect();
        names.sort();
        names.iter().map(|n| std::fs::read_to_string(dir.join(n)).unwrap()).collect()
    }

    #[tokio::test]
    async fn rows_appear_only_when_their_checkpoint_commits() {
        let dir = tempfile::tempdir().unwrap();
        let f = TxFileSinkFactory::new(dir.path().join("out"), FormatSpec::Json, rows(&[]).schema()).unwrap();
        let c = f.committer().unwrap();
        let mut s = f.create(0, 1).unwrap();
        s.begin(Epoch(1)).await.unwrap();
        s.write(&rows(&[1, 2])).await.unwrap();
        s.pre_commit(Epoch(1)).await.unwrap();
        s.begin(Epoch(2)).await.unwrap();
        s.write(&rows(&[3])).await.unwrap();
        let out = dir.path().join("out");
        assert_eq!(visible(&out), "", "nothing is visible before a commit");
        c.commit(Epoch(1)).await.unwrap();
        c.commit(Epoch(1)).await.unwrap();
        assert_eq!(visible(&out), "{\"x\":1}\n{\"x\":2}\n", "commits are idempotent");
        s.pre_commit(Epoch(2)).await.unwrap();
        // A crash before checkpoint 2 completed: recovery discards it.
        c.abort_after(Epoch(1)).await.unwrap();
        c.commit(Epoch(2)).await.unwrap();
        assert_eq!(visible(&out), "{\"x\":1}\n{\"x\":2}\n");
        assert_eq!(pending_epoch(".part-0000000002-w000-x.jsonl.inprogress"), Some(2));
        let plain = dir.path().join("plain.jsonl");
        std::fs::write(&plain, "").unwrap();
        let err = TxFileSinkFactory::new(&plain, FormatSpec::Json, rows(&[]).schema()).unwrap_err();
        assert!(err.to_string().contains("is a file"), "{err}");
    }
}
