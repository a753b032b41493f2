//! Shared by the byte-reading sources: records -> decoded, time-stamped batches, with bad
//! records dead-lettered.

use std::ops::Range;

use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::metrics::StepMetrics;
use weir_core::time::EventTimeSpec;
use weir_core::{Batch, Result, SourceContext};
use weir_formats::{Decoder, RecordErrorKind};

/// Where a record sits in its origin, for dead-letter entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    /// Byte offset of the record's first byte in the origin.
    pub(crate) offset: u64,
    /// 1-based line number, when the reader knows it.
    pub(crate) line: Option<u64>,
}

impl Position {
    /// How a dead-letter entry names the position.
    pub(crate) fn render(self) -> String {
        match self.line {
            Some(l) => format!("line {l}, offset {}", self.offset),
            None => format!("offset {}", self.offset),
        }
    }
}

/// Decodes `records` of `buf`, dead-letters failures (decode, schema, event time) and returns
/// the good rows with their event times. `pos(i)` gives record `i`'s position.
pub(crate) fn decode_records(
    decoder: &mut dyn Decoder,
    time: Option<&EventTimeSpec>,
    buf: &[u8],
    records: &[Range<usize>],
    origin: &str,
    pos: impl Fn(usize) -> Position,
    cx: &SourceContext,
) -> Result<Option<Batch>> {
    decode_records_with(decoder, time, buf, records, origin, |i| pos(i).render(), cx, |d| Ok(d.batch.clone()))
}

/// [`decode_records`] for sources whose rows carry more than the payload: `rows` turns the
/// decoded payloads into the source's rows (adding, say, Kafka metadata columns by
/// [`weir_formats::Decoded::record_of_row`]) before event times are read, so an event time can
/// come from such a column. `pos(i)` names record `i`'s position in dead letters.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_records_with(
    decoder: &mut dyn Decoder,
    time: Option<&EventTimeSpec>,
    buf: &[u8],
    records: &[Range<usize>],
    origin: &str,
    pos: impl Fn(usize) -> String,
    cx: &SourceContext,
    rows: impl FnOnce(&weir_formats::Decoded) -> Result<arrow_array::RecordBatch>,
) -> Result<Option<Batch>> {
    decode_records_noting(decoder, time, buf, records, origin, pos, cx, rows, &mut Vec::new())
}

/// [`decode_records_with`] that also notes each dead-lettered record's index and reason in
/// `noted`, for a source that answers its sender record by record (HTTP ingest).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_records_noting(
    decoder: &mut dyn Decoder,
    time: Option<&EventTimeSpec>,
    buf: &[u8],
    records: &[Range<usize>],
    origin: &str,
    pos: impl Fn(usize) -> String,
    cx: &SourceContext,
    rows: impl FnOnce(&weir_formats::Decoded) -> Result<arrow_array::RecordBatch>,
    noted: &mut Vec<(usize, String)>,
) -> Result<Option<Batch>> {
    if records.is_empty() {
        return Ok(None);
    }
    cx.count_records(records.len() as u64);
    let decoded = decoder.decode(buf, records).map_err(crate::fmt_err)?;
    let mut letters = Vec::new();
    let letter = |idx: usize, kind: ErrorKind, reason: String| DeadLetter {
        payload: Payload::Raw(buf[records[idx].clone()].to_vec()),
        kind,
        reason,
        step: cx.step.clone(),
        origin: origin.to_string(),
        position: Some(pos(idx)),
        time_ms: now_ms(),
        attempts: 1,
        first_failure_ms: None,
    };
    for e in &decoded.errors {
        let kind = match e.kind {
            RecordErrorKind::Decode => ErrorKind::Decode,
            RecordErrorKind::Schema => ErrorKind::Schema,
        };
        noted.push((e.index, e.message.clone()));
        letters.push(letter(e.index, kind, e.message.clone()));
    }
    let rows = rows(&decoded)?;
    let (batch, bad) = weir_core::time::stamp(time, rows, now_ms())?;
    for (row, kind, reason) in bad {
        noted.push((decoded.record_of_row(row), reason.clone()));
        letters.push(letter(decoded.record_of_row(row), kind, reason));
    }
    if !letters.is_empty() {
        StepMetrics::add(&cx.metrics.dead_lettered, letters.len() as u64);
        cx.dead_letters.write(letters)?;
    }
    Ok((!batch.is_empty()).then_some(batch))
}
