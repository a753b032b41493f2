//! Dead-letter and side outputs written as JSON Lines files.
//!
//! A dead-letter entry:
//! `{"time":"2026-11-22T10:00:00.123Z","step":"in","kind":"schema","reason":"missing required
//! field `readings.temp`","origin":"events.jsonl","position":"line 42, offset 5120",
//! "payload":"{...}","payload_encoding":"utf8"}`. The payload is the record as read: UTF-8 text
//! when it is valid UTF-8, else base64 (`"payload_encoding":"base64"`); rows that failed after
//! decoding are rendered as a JSON object (`"payload_encoding":"json"`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use arrow_array::RecordBatch;
use base64::Engine as _;
use weir_core::deadletter::{DeadLetter, DeadLetterSink, Payload};
use weir_core::notify::SideWriter;
use weir_core::{CoreError, Result};
use weir_formats::{Encoder, FormatSpec};

/// Appends dead letters to a JSON Lines file, created on the first entry (a clean run leaves
/// no empty file behind).
#[derive(Debug)]
pub struct FileDeadLetters {
    path: PathBuf,
    append: bool,
    out: Mutex<Option<BufWriter<File>>>,
}

impl FileDeadLetters {
    /// A dead-letter file at `path`. An existing file is replaced when the first entry comes.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), append: false, out: Mutex::new(None) }
    }

    /// Appends to an existing file instead of replacing it (a run resuming from a checkpoint).
    #[must_use]
    pub fn appending(mut self, append: bool) -> Self {
        self.append = append;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Renders one entry as a JSON line (with the trailing newline).
pub fn render(l: &DeadLetter) -> String {
    let (payload, enc) = match &l.payload {
        Payload::Raw(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => (s.to_string(), "utf8"),
            Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes), "base64"),
        },
        Payload::Row(b) => (weir_formats::row_to_json(b, 0), "json"),
    };
    let time = chrono::DateTime::from_timestamp_millis(l.time_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let v = serde_json::json!({
        "time": time,
        "step": l.step.as_str(),
        "kind": l.kind.as_str(),
        "reason": l.reason,
        "origin": l.origin,
        "position": l.position,
        "attempts": l.attempts,
        "first_failure": l.first_failure_ms.and_then(chrono::DateTime::from_timestamp_millis).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).or_else(|| time.clone()),
        "payload": payload,
        "payload_encoding": enc,
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

impl DeadLetterSink for FileDeadLetters {
    fn write(&self, letters: Vec<DeadLetter>) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        // Called from a worker's hooks: a file that stalls (a full disk, a pipe nobody
        // reads) must not stall the other tasks of that runtime thread.
        weir_core::runtime::blocking(|| self.write_now(&letters))
    }

    fn flush(&self) -> Result<()> {
        weir_core::runtime::blocking(|| {
            let mut slot = self.out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(w) = slot.as_mut() {
                w.flush().map_err(|e| CoreError::io(format!("flushing `{}`", self.path.display()), e))?;
            }
            Ok(())
        })
    }
}

impl FileDeadLetters {
    fn write_now(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut slot = self.out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let f = crate::open_output(&self.path, "dead-letter file", self.append)?;
            tracing::warn!(path = %self.path.display(), "Writing dead letters.");
            *slot = Some(BufWriter::new(f));
        }
        if let Some(w) = slot.as_mut() {
            for l in letters {
                w.write_all(render(l).as_bytes())
                    .map_err(|e| CoreError::io(format!("writing dead letters to `{}`", self.path.display()), e))?;
            }
        }
        Ok(())
    }
}

/// An open side-output file and its encoder.
type OpenSide = (BufWriter<File>, Box<dyn Encoder>);

/// Writes side-output rows (late rows) to a JSON Lines file.
pub struct FileSideWriter {
    path: PathBuf,
    append: bool,
    state: Mutex<Option<OpenSide>>,
}

impl std::fmt::Debug for FileSideWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSideWriter").field("path", &self.path).finish_non_exhaustive()
    }
}

impl FileSideWriter {
    /// A side output at `path`, created on the first row.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), append: false, state: Mutex::new(None) }
    }

    /// Appends to an existing file instead of replacing it (a run resuming from a checkpoint).
    #[must_use]
    pub fn appending(mut self, append: bool) -> Self {
        self.append = append;
        self
    }
}

impl SideWriter for FileSideWriter {
    fn write(&self, rows: &RecordBatch) -> Result<()> {
        weir_core::runtime::blocking(|| self.write_now(rows))
    }
}

impl FileSideWriter {
    fn write_now(&self, rows: &RecordBatch) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.is_none() {
            let f = crate::open_output(&self.path, "side output", self.append)?;
            *st = Some((BufWriter::new(f), FormatSpec::Json.encoder(rows.schema()).map_err(crate::fmt_err)?));
        }
        if let Some((w, enc)) = st.as_mut() {
            let mut buf = Vec::new();
            enc.encode(rows, &mut buf).map_err(crate::fmt_err)?;
            // Late rows are rare and must survive a crash as well as the results do.
            w.write_all(&buf)
                .and_then(|()| w.flush())
                .map_err(|e| CoreError::io(format!("writing `{}`", self.path.display()), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use weir_core::deadletter::ErrorKind;
    use weir_core::StepId;

    use super::*;

    #[test]
    fn invalid_utf8_payloads_are_base64() {
        let l = DeadLetter {
            payload: Payload::Raw(vec![0xff, 0x00, b'x']),
            kind: ErrorKind::Decode,
            reason: "bad".into(),
            step: StepId::new("in"),
            origin: "f".into(),
            position: Some("offset 3".into()),
            time_ms: 0,
            attempts: 1,
            first_failure_ms: None,
        };
        let v: serde_json::Value = serde_json::from_str(&render(&l)).unwrap();
        assert_eq!(v["payload"], "/wB4");
        assert_eq!(v["payload_encoding"], "base64");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["kind"], "decode");
        assert_eq!((v["attempts"].as_u64(), v["first_failure"].as_str()), (Some(1), Some("1970-01-01T00:00:00.000Z")));
    }

    /// A dead-letter file that stalls (here a FIFO nobody reads yet) holds up the task that
    /// writes to it, not the other tasks of the runtime: on a runtime with a single worker
    /// thread, a ticker goes on while the write waits, and the entry arrives once read.
    #[test]
    fn a_stalled_dead_letter_file_does_not_block_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("dead.fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = ticks.clone();
        let _ticker = rt.spawn(async move {
            loop {
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        let dead = std::sync::Arc::new(FileDeadLetters::new(&fifo).appending(true));
        let d = dead.clone();
        let writing = rt.spawn(async move {
            let l = DeadLetter {
                payload: Payload::Raw(b"x".to_vec()),
                kind: ErrorKind::Decode,
                reason: "bad".into(),
                step: StepId::new("in"),
                origin: "f".into(),
                position: None,
                time_ms: 0,
                attempts: 1,
                first_failure_ms: None,
            };
            d.write(vec![l]).unwrap();
            d.flush().unwrap();
        });
        // The write is stuck opening the FIFO; the ticker still runs.
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ticks.load(std::sync::atomic::Ordering::Relaxed) < before + 20 {
            assert!(std::time::Instant::now() < deadline, "the runtime's only worker is blocked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!writing.is_finished());
        // Reading lets the write through: one line, the entry (the file stays open).
        let mut read = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(File::open(&fifo).unwrap()), &mut read).unwrap();
        rt.block_on(writing).unwrap();
        assert!(read.contains("\"reason\":\"bad\""), "{read}");
    }
}
