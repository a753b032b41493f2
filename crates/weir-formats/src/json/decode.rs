//! The JSON decoder: a single pass over each record, directed by the schema, writing values
//! straight into column buffers.
//!
//! For speed it guesses each key from the key at the same position in the previous record and
//! compares the raw bytes; unknown keys are skipped with a validating skipper. A record that
//! fails half-way is rolled back by truncating every column to the row count. A record with a
//! schema error is checked again with the skipper so that a later syntax error wins (the record
//! is then a decode error).

use std::ops::Range;

use arrow_schema::SchemaRef;

use crate::columns::{
    end_struct, null_subtree, parse_timestamp_ms, truncate_subtree, Builders, Column, Data, Kind, Outcomes, Plan, ROOT,
};
use crate::{record_bytes, truncate_for_message, Decoded, Decoder, RecordError, RecordErrorKind, Result};

/// Deeper nesting than this is refused (it would only come from garbage or an attack).
const MAX_DEPTH: u32 = 128;
/// Learned key orders are kept for this many keys per object.
const MAX_ORDER: usize = 64;
/// "No schema field" in a learned key order.
const UNKNOWN: u32 = u32::MAX;

/// The key seen at one position of an object in the previous record.
#[derive(Debug, Clone)]
struct Learned {
    /// Its raw bytes (between the quotes; keys with escapes are not learned).
    key: Box<[u8]>,
    /// The child node it names, or [`UNKNOWN`].
    child: u32,
}
/// Longest value text quoted in an error message.
const QUOTE_MAX: usize = 40;

/// Decodes JSON objects, one per record, into batches of a fixed schema.
///
/// Fields not in the schema are skipped (after checking that they are valid JSON); a duplicate
/// key's last value wins.
#[derive(Debug)]
pub struct JsonDecoder {
    schema: SchemaRef,
    plan: Plan,
    builders: Builders,
    /// Per struct node, the child seen at each key position of the previous object.
    order: Vec<Vec<Learned>>,
    scratch: Vec<u8>,
}

impl JsonDecoder {
    /// A decoder for `schema` (types: `Boolean`, `Int64`, `Float64`, `Utf8`,
    /// `Timestamp(Millisecond, _)`, `Struct` of those).
    pub fn new(schema: SchemaRef) -> Result<Self> {
        let plan = Plan::new(&schema, "json")?;
        let builders = Builders::new(&plan);
        let order = vec![Vec::new(); plan.nodes.len()];
        Ok(Self { schema, plan, builders, order, scratch: Vec::new() })
    }
}

impl Decoder for JsonDecoder {
    fn decode(&mut self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        self.builders.reserve(records.len());
        let mut outcomes = Outcomes::default();
        for (index, range) in records.iter().enumerate() {
            let rec = record_bytes(buf, index, range)?;
            let n = self.builders.rows;
            let mut parser = Parser {
                buf: rec,
                pos: 0,
                plan: &self.plan,
                cols: &mut self.builders.cols,
                order: &mut self.order,
                scratch: &mut self.scratch,
            };
            match parser.record(n) {
                Ok(()) => {
                    self.builders.rows += 1;
                    outcomes.ok(index);
                }
                Err(e) => {
                    self.builders.rollback(n);
                    outcomes.failed(n, e.into_record_error(index, rec));
                }
            }
        }
        let batch = self.builders.finish(&self.plan, &self.schema)?;
        Ok(outcomes.into_decoded(batch))
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// Why a record failed, before it is rendered.
#[derive(Debug)]
pub(super) enum PErr {
    /// Not JSON: the byte offset in the record and a short reason.
    Decode { pos: usize, reason: &'static str },
    /// JSON that does not fit the schema.
    Schema(String),
}

const INVALID_UTF8: &str = "invalid UTF-8";

impl PErr {
    fn into_record_error(self, index: usize, rec: &[u8]) -> RecordError {
        match self {
            PErr::Decode { pos, reason } => {
                // Garbage bytes outside strings are reported as the UTF-8 error they usually are.
                let utf8 = if reason == INVALID_UTF8 || rec.get(pos).is_some_and(|&b| b >= 0x80) {
                    std::str::from_utf8(rec).err().map(|e| e.valid_up_to())
                } else {
                    None
                };
                let message = match utf8 {
                    Some(at) => format!("invalid UTF-8 at byte {at}"),
                    None => format!("invalid JSON at byte {pos}: {reason}"),
                };
                RecordError { index, kind: RecordErrorKind::Decode, message }
            }
            PErr::Schema(message) => RecordError { index, kind: RecordErrorKind::Schema, message },
        }
    }
}

#[inline]
fn decode_err(pos: usize, reason: &'static str) -> PErr {
    PErr::Decode { pos, reason }
}

#[inline]
fn eof(buf: &[u8]) -> PErr {
    decode_err(buf.len(), "unexpected end of input")
}

/// Where string contents go: a buffer, or nowhere when skipping.
pub(super) trait Sink {
    fn bytes(&mut self, b: &[u8]);
    fn char(&mut self, c: char);
}

impl Sink for Vec<u8> {
    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    #[inline]
    fn char(&mut self, c: char) {
        let mut tmp = [0u8; 4];
        self.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
    }
}

/// Discards string contents.
struct Discard;

impl Sink for Discard {
    #[inline]
    fn bytes(&mut self, _: &[u8]) {}
    #[inline]
    fn char(&mut self, _: char) {}
}

/// Byte classes inside a string: 0 plain ASCII, 1 quote, 2 backslash, 3 control, 4 non-ASCII.
static STR_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if i == b'"' as usize {
            1
        } else if i == b'\\' as usize {
            2
        } else if i < 0x20 {
            3
        } else if i >= 0x80 {
            4
        } else {
            0
        };
        i += 1;
    }
    t
};

/// Reads the rest of a string whose opening quote is before `*pos` into `out`, leaving `*pos`
/// after the closing quote.
#[inline]
pub(super) fn read_string<S: Sink>(buf: &[u8], pos: &mut usize, out: &mut S) -> Result<(), PErr> {
    let begin = *pos;
    let mut run = begin;
    let mut p = begin;
    let mut non_ascii = false;
    loop {
        while let Some(&b) = buf.get(p) {
            if STR_CLASS[b as usize] != 0 {
                break;
            }
            p += 1;
        }
        let Some(&b) = buf.get(p) else {
            return Err(eof(buf));
        };
        match STR_CLASS[b as usize] {
            1 => {
                out.bytes(&buf[run..p]);
                p += 1;
                break;
            }
            2 => {
                out.bytes(&buf[run..p]);
                p = escape(buf, p + 1, out)?;
                run = p;
            }
            3 => return Err(decode_err(p, "control character in string")),
            _ => {
                non_ascii = true;
                p += 1;
            }
        }
    }
    if non_ascii {
        // Escapes are ASCII, so the raw text is valid UTF-8 exactly when the content is.
        if let Err(e) = std::str::from_utf8(&buf[begin..p - 1]) {
            return Err(decode_err(begin + e.valid_up_to(), INVALID_UTF8));
        }
    }
    *pos = p;
    Ok(())
}

/// Decodes the escape whose backslash is before `p`; returns the position after it.
#[inline(never)]
fn escape<S: Sink>(buf: &[u8], p: usize, out: &mut S) -> Result<usize, PErr> {
    let Some(&c) = buf.get(p) else {
        return Err(eof(buf));
    };
    let simple = match c {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'u' => {
            let hi = hex4(buf, p + 1)?;
            let mut end = p + 5;
            let code = if (0xD800..0xDC00).contains(&hi) {
                if buf.get(end..end + 2) != Some(b"\\u") {
                    return Err(if end + 2 > buf.len() && buf[end..].iter().all(|&b| b == b'\\') {
                        eof(buf)
                    } else {
                        decode_err(end, "unpaired surrogate in \\u escape")
                    });
                }
                let lo = hex4(buf, end + 2)?;
                if !(0xDC00..0xE000).contains(&lo) {
                    return Err(decode_err(end, "unpaired surrogate in \\u escape"));
                }
                end += 6;
                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
            } else if (0xDC00..0xE000).contains(&hi) {
                return Err(decode_err(p - 1, "unpaired surrogate in \\u escape"));
            } else {
                hi
            };
            match char::from_u32(code) {
                Some(ch) => out.char(ch),
                None => return Err(decode_err(p - 1, "invalid \\u escape")),
            }
            return Ok(end);
        }
        _ => return Err(decode_err(p - 1, "invalid escape")),
    };
    out.bytes(&[simple]);
    Ok(p + 1)
}

fn hex4(buf: &[u8], p: usize) -> Result<u32, PErr> {
    let mut v = 0u32;
    for i in 0..4 {
        let Some(&b) = buf.get(p + i) else {
            return Err(eof(buf));
        };
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(decode_err(p + i, "invalid \\u escape")),
        };
        v = (v << 4) | u32::from(d);
    }
    Ok(v)
}

/// A number literal, scanned and checked against the JSON grammar.
#[derive(Debug, Clone, Copy)]
pub(super) struct Num {
    neg: bool,
    /// The significant digits, when they fit (`overflow` false).
    mant: u64,
    /// The decimal exponent to apply to `mant`.
    exp10: i32,
    /// Has a fraction or an exponent.
    float: bool,
    /// More than 19 significant digits.
    overflow: bool,
    start: usize,
    end: usize,
}

const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

const MANT_LIMIT: u64 = 1_000_000_000_000_000_000;

impl Num {
    /// The value as an `i64`, or `None` if out of range. Only for integers.
    #[inline]
    pub(super) fn to_i64(self) -> Option<i64> {
        if self.overflow {
            None
        } else if self.neg {
            (self.mant <= 1 << 63).then(|| (self.mant as i64).wrapping_neg())
        } else {
            i64::try_from(self.mant).ok()
        }
    }

    /// The value as the nearest `f64`.
    #[inline]
    pub(super) fn to_f64(self, buf: &[u8]) -> f64 {
        if !self.overflow && self.mant <= 1 << 53 && (-22..=22).contains(&self.exp10) {
            // Clinger's fast path: both operands are exact, so one rounding gives the nearest.
            let m = self.mant as f64;
            let v = if self.exp10 < 0 { m / POW10[(-self.exp10) as usize] } else { m * POW10[self.exp10 as usize] };
            return if self.neg { -v } else { v };
        }
        slow_f64(&buf[self.start..self.end])
    }
}

#[inline(never)]
fn slow_f64(text: &[u8]) -> f64 {
    std::str::from_utf8(text).ok().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// Scans a number starting at `*pos` (a '-' or a digit).
#[inline]
pub(super) fn scan_number(buf: &[u8], pos: &mut usize) -> Result<Num, PErr> {
    let start = *pos;
    let mut p = start;
    let neg = buf.get(p) == Some(&b'-');
    if neg {
        p += 1;
    }
    let mut mant: u64 = 0;
    let mut overflow = false;
    match buf.get(p) {
        Some(b'0') => p += 1,
        Some(b'1'..=b'9') => {
            while let Some(&d) = buf.get(p) {
                if !d.is_ascii_digit() {
                    break;
                }
                if mant < MANT_LIMIT {
                    mant = mant * 10 + u64::from(d - b'0');
                } else {
                    overflow = true;
                }
                p += 1;
            }
        }
        None => return Err(eof(buf)),
        Some(_) => return Err(decode_err(p, "invalid number")),
    }
    let mut frac = 0i32;
    let mut float = false;
    if buf.get(p) == Some(&b'.') {
        p += 1;
        float = true;
        let digits = p;
        while let Some(&d) = buf.get(p) {
            if !d.is_ascii_digit() {
                break;
            }
            if mant < MANT_LIMIT {
                mant = mant * 10 + u64::from(d - b'0');
                frac += 1;
            } else {
                overflow = true;
            }
            p += 1;
        }
        if p == digits {
            return Err(if p >= buf.len() { eof(buf) } else { decode_err(p, "invalid number") });
        }
    }
    let mut exp = 0i32;
    if let Some(b'e' | b'E') = buf.get(p) {
        p += 1;
        float = true;
        let eneg = match buf.get(p) {
            Some(b'-') => {
                p += 1;
                true
            }
            Some(b'+') => {
                p += 1;
                false
            }
            _ => false,
        };
        let digits = p;
        while let Some(&d) = buf.get(p) {
            if !d.is_ascii_digit() {
                break;
            }
            if exp < 100_000 {
                exp = exp * 10 + i32::from(d - b'0');
            }
            p += 1;
        }
        if p == digits {
            return Err(if p >= buf.len() { eof(buf) } else { decode_err(p, "invalid number") });
        }
        if eneg {
            exp = -exp;
        }
    }
    *pos = p;
    Ok(Num { neg, mant, exp10: exp - frac, float, overflow, start, end: p })
}

/// Byte equality of short slices without a call to `memcmp`.
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n >= 8 {
        let mut i = 0;
        while i + 8 < n {
            if word(a, i) != word(b, i) {
                return false;
            }
            i += 8;
        }
        word(a, n - 8) == word(b, n - 8)
    } else if n >= 4 {
        half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4)
    } else {
        a.iter().zip(b).all(|(x, y)| x == y)
    }
}

#[inline(always)]
fn word(s: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn half(s: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&s[i..i + 4]);
    u32::from_le_bytes(w)
}

/// Reads the literal `lit` (`true`, `false`, `null`) at `*pos`.
#[inline]
fn literal(buf: &[u8], pos: &mut usize, lit: &'static [u8]) -> Result<(), PErr> {
    let end = *pos + lit.len();
    if buf.get(*pos..end) == Some(lit) {
        *pos = end;
        Ok(())
    } else if end > buf.len() && lit.starts_with(&buf[*pos..]) {
        Err(eof(buf))
    } else {
        Err(decode_err(*pos, "invalid literal"))
    }
}

/// A short description of a JSON value's text for messages: `string "abc"`, `number 1.5`.
fn describe(raw: &[u8]) -> String {
    let text = truncate_for_message(&String::from_utf8_lossy(raw), QUOTE_MAX);
    let what = match raw.first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "bool",
        Some(b'n') => return "null".to_owned(),
        _ => "number",
    };
    format!("{what} {text}")
}

/// The state of parsing one record.
struct Parser<'a, 'b> {
    buf: &'a [u8],
    pos: usize,
    plan: &'b Plan,
    cols: &'b mut [Column],
    order: &'b mut [Vec<Learned>],
    scratch: &'b mut Vec<u8>,
}

impl Parser<'_, '_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => self.pos += 1,
                _ => break,
            }
        }
    }

    /// A decode error at the current position, or end of input if there is nothing left.
    #[inline(never)]
    fn fail(&self, reason: &'static str) -> PErr {
        if self.pos >= self.buf.len() {
            eof(self.buf)
        } else {
            decode_err(self.pos, reason)
        }
    }

    fn record(&mut self, n: usize) -> Result<(), PErr> {
        if self.buf.starts_with(b"\xEF\xBB\xBF") {
            // A UTF-8 byte-order mark, as some editors write at the start of a file.
            self.pos = 3;
        }
        self.skip_ws();
        if self.peek() == Some(b'{') {
            self.pos += 1;
            match self.object(ROOT, n, 1) {
                Ok(()) => {}
                Err(PErr::Schema(m)) => return Err(self.revalidate(m)),
                Err(e) => return Err(e),
            }
            self.skip_ws();
            if self.pos < self.buf.len() {
                return Err(decode_err(self.pos, "trailing characters after the object"));
            }
            Ok(())
        } else {
            let start = self.pos;
            self.skip_value(0)?;
            let end = self.pos;
            self.skip_ws();
            if self.pos < self.buf.len() {
                return Err(decode_err(self.pos, "trailing characters after the value"));
            }
            Err(PErr::Schema(format!("expected a JSON object, found {}", describe(&self.buf[start..end]))))
        }
    }

    /// After a schema error: a syntax error anywhere in the record takes precedence.
    #[cold]
    fn revalidate(&mut self, message: String) -> PErr {
        self.pos = if self.buf.starts_with(b"\xEF\xBB\xBF") { 3 } else { 0 };
        self.skip_ws();
        if let Err(e) = self.skip_value(0) {
            return e;
        }
        self.skip_ws();
        if self.pos < self.buf.len() {
            return decode_err(self.pos, "trailing characters after the object");
        }
        PErr::Schema(message)
    }

    /// Reads the members of an object (after its '{') into struct node `s`, row `n`.
    fn object(&mut self, s: usize, n: usize, depth: u32) -> Result<(), PErr> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            let mut k = 0;
            loop {
                if self.peek() != Some(b'"') {
                    return Err(self.fail("expected a string key"));
                }
                self.pos += 1;
                let child = self.key(s, k)?;
                k += 1;
                self.skip_ws();
                if self.peek() != Some(b':') {
                    return Err(self.fail("expected ':'"));
                }
                self.pos += 1;
                self.skip_ws();
                match child {
                    Some(c) => self.value(c, n, depth)?,
                    None => self.skip_value(depth)?,
                }
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.skip_ws();
                    }
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.fail("expected ',' or '}'")),
                }
            }
        }
        end_struct(self.plan, self.cols, s, n).map_err(PErr::Schema)
    }

    /// Reads a key (after its opening quote): the child of `s` it names, if any. `k` is the key's
    /// position in the object.
    #[inline]
    fn key(&mut self, s: usize, k: usize) -> Result<Option<usize>, PErr> {
        let start = self.pos;
        if let Some(guess) = self.order[s].get(k) {
            let end = start + guess.key.len();
            if self.buf.get(end) == Some(&b'"') && self.buf.get(start..end).is_some_and(|b| same(b, &guess.key)) {
                self.pos = end + 1;
                return Ok((guess.child != UNKNOWN).then_some(guess.child as usize));
            }
        }
        self.key_slow(s, k)
    }

    #[inline(never)]
    fn key_slow(&mut self, s: usize, k: usize) -> Result<Option<usize>, PErr> {
        let plan = self.plan;
        let start = self.pos;
        let mut p = start;
        let mut non_ascii = false;
        loop {
            let Some(&b) = self.buf.get(p) else {
                return Err(eof(self.buf));
            };
            match STR_CLASS[b as usize] {
                0 => p += 1,
                1 => {
                    if non_ascii {
                        if let Err(e) = std::str::from_utf8(&self.buf[start..p]) {
                            return Err(decode_err(start + e.valid_up_to(), INVALID_UTF8));
                        }
                    }
                    self.pos = p + 1;
                    let key = &self.buf[start..p];
                    let found = plan.find_child(s, key);
                    let learned = Learned { key: key.into(), child: found.map_or(UNKNOWN, |c| c as u32) };
                    let order = &mut self.order[s];
                    if k < order.len() {
                        order[k] = learned;
                    } else if k == order.len() && k < MAX_ORDER {
                        order.push(learned);
                    }
                    return Ok(found);
                }
                2 => {
                    self.scratch.clear();
                    read_string(self.buf, &mut self.pos, self.scratch)?;
                    // Keys with escapes are not learned: their raw bytes are not the key.
                    return Ok(plan.find_child(s, self.scratch));
                }
                3 => return Err(decode_err(p, "control character in string")),
                _ => {
                    non_ascii = true;
                    p += 1;
                }
            }
        }
    }

    /// Reads the value at the current position into node `c`, row `n`.
    #[inline]
    fn value(&mut self, c: usize, n: usize, depth: u32) -> Result<(), PErr> {
        let plan = self.plan;
        let node = &plan.nodes[c];
        if self.cols[c].len() > n {
            // A duplicate key: the last value wins.
            truncate_subtree(plan, self.cols, c, n);
        }
        let Some(b) = self.peek() else {
            return Err(eof(self.buf));
        };
        if b == b'n' {
            self.literal(b"null")?;
            if node.required {
                return Err(PErr::Schema(format!("required field `{}` is null", node.path)));
            }
            null_subtree(plan, self.cols, c);
            return Ok(());
        }
        let col = &mut self.cols[c];
        match &mut col.data {
            Data::F64(values) => {
                if b == b'-' || b.is_ascii_digit() {
                    let num = scan_number(self.buf, &mut self.pos)?;
                    let x = num.to_f64(self.buf);
                    if !x.is_finite() {
                        return Err(self.out_of_range(c, num, "float64"));
                    }
                    values.push(x);
                    col.valid.push(true);
                    Ok(())
                } else {
                    Err(self.mismatch(c, depth))
                }
            }
            Data::Str { offsets, bytes } => {
                if b == b'"' {
                    self.pos += 1;
                    read_string(self.buf, &mut self.pos, bytes)?;
                    offsets.push(bytes.len() as i32);
                    col.valid.push(true);
                    Ok(())
                } else {
                    Err(self.mismatch(c, depth))
                }
            }
            Data::I64(values) => {
                if b == b'-' || b.is_ascii_digit() {
                    let num = scan_number(self.buf, &mut self.pos)?;
                    if num.float {
                        return Err(self.mismatch_at(c, num.start));
                    }
                    let Some(v) = num.to_i64() else {
                        return Err(self.out_of_range(c, num, "int64"));
                    };
                    values.push(v);
                    col.valid.push(true);
                    Ok(())
                } else if b == b'"' && matches!(node.kind, Kind::Timestamp(_)) {
                    let start = self.pos;
                    self.pos += 1;
                    self.scratch.clear();
                    read_string(self.buf, &mut self.pos, self.scratch)?;
                    let parsed = std::str::from_utf8(self.scratch).ok().and_then(parse_timestamp_ms);
                    match parsed {
                        Some(ms) => {
                            values.push(ms);
                            col.valid.push(true);
                            Ok(())
                        }
                        None => Err(PErr::Schema(format!(
                            "field `{}`: invalid timestamp {} (expected RFC 3339 or integer milliseconds)",
                            node.path,
                            truncate_for_message(&String::from_utf8_lossy(&self.buf[start..self.pos]), QUOTE_MAX)
                        ))),
                    }
                } else {
                    Err(self.mismatch(c, depth))
                }
            }
            Data::Bool(values) => {
                let v = match b {
                    b't' => {
                        literal(self.buf, &mut self.pos, b"true")?;
                        true
                    }
                    b'f' => {
                        literal(self.buf, &mut self.pos, b"false")?;
                        false
                    }
                    _ => return Err(self.mismatch(c, depth)),
                };
                values.push(v);
                col.valid.push(true);
                Ok(())
            }
            Data::Struct => {
                if b == b'{' {
                    self.pos += 1;
                    self.object(c, n, depth + 1)
                } else {
                    Err(self.mismatch(c, depth))
                }
            }
        }
    }

    #[inline]
    fn literal(&mut self, lit: &'static [u8]) -> Result<(), PErr> {
        literal(self.buf, &mut self.pos, lit)
    }

    /// The value at the current position does not fit node `c`.
    #[cold]
    #[inline(never)]
    fn mismatch(&mut self, c: usize, depth: u32) -> PErr {
        let start = self.pos;
        if let Err(e) = self.skip_value(depth) {
            return e;
        }
        self.mismatch_at(c, start)
    }

    /// The value from `start` to the current position does not fit node `c`.
    #[cold]
    #[inline(never)]
    fn mismatch_at(&self, c: usize, start: usize) -> PErr {
        let node = &self.plan.nodes[c];
        PErr::Schema(format!(
            "field `{}`: expected {}, found {}",
            node.path,
            node.kind.name(),
            describe(&self.buf[start..self.pos])
        ))
    }

    #[cold]
    #[inline(never)]
    fn out_of_range(&self, c: usize, num: Num, ty: &str) -> PErr {
        let text = truncate_for_message(&String::from_utf8_lossy(&self.buf[num.start..num.end]), QUOTE_MAX);
        let what = if num.float { "number" } else { "integer" };
        PErr::Schema(format!("field `{}`: {what} {text} is out of range for {ty}", self.plan.nodes[c].path))
    }

    /// Skips any JSON value, checking its syntax.
    fn skip_value(&mut self, depth: u32) -> Result<(), PErr> {
        let Some(b) = self.peek() else {
            return Err(eof(self.buf));
        };
        match b {
            b'"' => {
                self.pos += 1;
                read_string(self.buf, &mut self.pos, &mut Discard)
            }
            b'{' | b'[' => {
                if depth >= MAX_DEPTH {
                    return Err(decode_err(self.pos, "nesting too deep"));
                }
                self.pos += 1;
                self.skip_ws();
                let close = if b == b'{' { b'}' } else { b']' };
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    if b == b'{' {
                        if self.peek() != Some(b'"') {
                            return Err(self.fail("expected a string key"));
                        }
                        self.pos += 1;
                        read_string(self.buf, &mut self.pos, &mut Discard)?;
                        self.skip_ws();
                        if self.peek() != Some(b':') {
                            return Err(self.fail("expected ':'"));
                        }
                        self.pos += 1;
                        self.skip_ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => {
                            self.pos += 1;
                            self.skip_ws();
                        }
                        Some(x) if x == close => {
                            self.pos += 1;
                            return Ok(());
                        }
                        _ => {
                            return Err(self.fail(if b == b'{' {
                                "expected ',' or '}'"
                            } else {
                                "expected ',' or ']'"
                            }))
                        }
                    }
                }
            }
            b'-' | b'0'..=b'9' => scan_number(self.buf, &mut self.pos).map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => Err(self.fail("expected a JSON value")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::sync::Arc;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
    use arrow_array::Array;
    use arrow_schema::{DataType, Field, Fields, Schema};

    use super::*;
    use crate::{FieldSpec, FieldType, SchemaSpec};

    const LINE: &str = r#"{"device_id":"dev-00042","ts":1700000000123,"readings":{"temp":22.51,"humidity":45.2,"pressure":1013.1,"vibration":0.021}}"#;

    fn schema() -> SchemaRef {
        SchemaSpec::from_yaml(crate::SENSOR_SCHEMA_YAML).unwrap().to_arrow()
    }

    fn decode_with(schema: SchemaRef, lines: &[&str]) -> Decoded {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for l in lines {
            let start = buf.len();
            buf.extend_from_slice(l.as_bytes());
            ranges.push(start..buf.len());
            buf.push(b'\n');
        }
        JsonDecoder::new(schema).unwrap().decode(&buf, &ranges).unwrap()
    }

    fn decode(lines: &[&str]) -> Decoded {
        decode_with(schema(), lines)
    }

    /// The single error of decoding one line: (kind, message).
    fn error_of(line: &str) -> (&'static str, String) {
        error_with(schema(), line)
    }

    fn error_with(schema: SchemaRef, line: &str) -> (&'static str, String) {
        let d = decode_with(schema, &[line]);
        assert_eq!(d.batch.num_rows(), 0, "{line} decoded");
        assert_eq!(d.errors.len(), 1);
        assert_eq!(d.errors[0].index, 0);
        (d.errors[0].kind.as_str(), d.errors[0].message.clone())
    }

    fn one_field(ty: FieldType, required: bool) -> SchemaRef {
        SchemaSpec::new(vec![FieldSpec::new("v", ty).with_required(required)]).to_arrow()
    }

    #[test]
    fn decodes_the_benchmark_line() {
        let d = decode(&[LINE]);
        assert!(d.errors.is_empty());
        assert!(d.row_records.is_none());
        let b = &d.batch;
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(0).as_string::<i32>().value(0), "dev-00042");
        assert_eq!(b.column(1).as_primitive::<Int64Type>().value(0), 1700000000123);
        let r = b.column(2).as_struct();
        assert_eq!(r.column(0).as_primitive::<Float64Type>().value(0), 22.51);
        assert_eq!(r.column(1).as_primitive::<Float64Type>().value(0), 0.021);
        assert_eq!(b.schema(), schema());
    }

    #[test]
    fn key_order_whitespace_and_unknown_fields() {
        let lines = [
            LINE,
            r#" { "readings" : { "vibration" : null , "temp" : -1.5e2 } , "x":[1,{"a":[true,false,null]},"s\"\\"], "ts" : -7 , "device_id" : "b" } "#,
            r#"{"ts":0,"device_id":"c","readings":{"temp":3}}"#,
            r#"{"device_id":"d","ts":5,"readings":{"temp":1E2,"extra":{"deep":{"deeper":"x"}}},"unknown":"\u00e9"}"#,
        ];
        let d = decode(&lines);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let b = &d.batch;
        assert_eq!(b.num_rows(), 4);
        let ids: Vec<_> = b.column(0).as_string::<i32>().iter().map(|s| s.unwrap()).collect();
        assert_eq!(ids, ["dev-00042", "b", "c", "d"]);
        let ts = b.column(1).as_primitive::<Int64Type>();
        assert_eq!(ts.values().to_vec(), vec![1700000000123, -7, 0, 5]);
        let r = b.column(2).as_struct();
        let temp = r.column(0).as_primitive::<Float64Type>();
        assert_eq!(temp.values().to_vec(), vec![22.51, -150.0, 3.0, 100.0]);
        let vib = r.column(1).as_primitive::<Float64Type>();
        assert!(vib.is_valid(0) && vib.is_null(1) && vib.is_null(2) && vib.is_null(3));
    }

    #[test]
    fn string_escapes() {
        let schema = one_field(FieldType::String, true);
        let d = decode_with(
            schema,
            &[
                r#"{"v":"a\"b\\c\/d\be\ff\ng\rh\ti"}"#,
                r#"{"v":"\u0041\u00e9\u20ac\ud83d\ude00 \uD834\uDD1E"}"#,
                r#"{"v":"h\u00e9llo w\u00f6rld — ✓ 😀"}"#,
                r#"{"v":""}"#,
                r#"{"\u0076":"escaped key"}"#,
            ],
        );
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let v = d.batch.column(0).as_string::<i32>();
        assert_eq!(v.value(0), "a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti");
        assert_eq!(v.value(1), "AÃ©€😀 𝄞".replace("Ã©", "é"));
        assert_eq!(v.value(2), "héllo wörld — ✓ 😀");
        assert_eq!(v.value(3), "");
        assert_eq!(v.value(4), "escaped key");
    }

    #[test]
    fn schema_errors_have_exact_messages() {
        let cases = [
            (r#"{"device_id":"a","readings":{"temp":1}}"#, "missing required field `ts`"),
            (r#"{"device_id":"a","ts":1,"readings":{"vibration":1}}"#, "missing required field `readings.temp`"),
            (r#"{"device_id":"a","ts":1}"#, "missing required field `readings`"),
            (r#"{"device_id":"a","ts":null,"readings":{"temp":1}}"#, "required field `ts` is null"),
            (r#"{"device_id":"a","ts":1,"readings":null}"#, "required field `readings` is null"),
            (
                r#"{"device_id":"a","ts":"yesterday","readings":{"temp":1}}"#,
                "field `ts`: expected int64, found string \"yesterday\"",
            ),
            (r#"{"device_id":"a","ts":1.5,"readings":{"temp":1}}"#, "field `ts`: expected int64, found number 1.5"),
            (r#"{"device_id":"a","ts":1e3,"readings":{"temp":1}}"#, "field `ts`: expected int64, found number 1e3"),
            (
                r#"{"device_id":"a","ts":99999999999999999999,"readings":{"temp":1}}"#,
                "field `ts`: integer 99999999999999999999 is out of range for int64",
            ),
            (
                r#"{"device_id":"a","ts":9223372036854775808,"readings":{"temp":1}}"#,
                "field `ts`: integer 9223372036854775808 is out of range for int64",
            ),
            (
                r#"{"device_id":"a","ts":1,"readings":{"temp":1e999}}"#,
                "field `readings.temp`: number 1e999 is out of range for float64",
            ),
            (r#"{"device_id":42,"ts":1,"readings":{"temp":1}}"#, "field `device_id`: expected string, found number 42"),
            (r#"{"device_id":"a","ts":1,"readings":[1,2]}"#, "field `readings`: expected struct, found array [1,2]"),
            (
                r#"{"device_id":"a","ts":1,"readings":{"temp":"warm"}}"#,
                "field `readings.temp`: expected float64, found string \"warm\"",
            ),
            (
                r#"{"device_id":{"nested":"object that is quite long indeed, really"},"ts":1,"readings":{"temp":1}}"#,
                "field `device_id`: expected string, found object {\"nested\":\"object that is quite long ind...",
            ),
            (r#"[1,2,3]"#, "expected a JSON object, found array [1,2,3]"),
            (r#""text""#, "expected a JSON object, found string \"text\""),
            (r#"42"#, "expected a JSON object, found number 42"),
        ];
        for (line, msg) in cases {
            assert_eq!(error_of(line), ("schema", msg.to_owned()), "{line}");
        }
        assert_eq!(
            error_with(one_field(FieldType::Bool, true), r#"{"v":"true"}"#),
            ("schema", "field `v`: expected bool, found string \"true\"".to_owned())
        );
        assert_eq!(
            error_with(one_field(FieldType::Timestamp, true), r#"{"v":"yesterday"}"#),
            (
                "schema",
                "field `v`: invalid timestamp \"yesterday\" (expected RFC 3339 or integer milliseconds)".to_owned()
            )
        );
        assert_eq!(
            error_with(one_field(FieldType::Timestamp, true), r#"{"v":true}"#),
            ("schema", "field `v`: expected timestamp, found bool true".to_owned())
        );
    }

    #[test]
    fn decode_errors_have_exact_messages() {
        let cases: [(&[u8], &str); 22] = [
            (br#"{"device_id":"a","ts":1,"readings":{"temp":1"#, "invalid JSON at byte 44: unexpected end of input"),
            (br#"{"device_id":"a"#, "invalid JSON at byte 15: unexpected end of input"),
            (br#"{"device_id""#, "invalid JSON at byte 12: unexpected end of input"),
            (b"", "invalid JSON at byte 0: unexpected end of input"),
            (br#"{"device_id":"a" "ts":1}"#, "invalid JSON at byte 17: expected ',' or '}'"),
            (br#"{"device_id" "a"}"#, "invalid JSON at byte 13: expected ':'"),
            (br#"{device_id:"a"}"#, "invalid JSON at byte 1: expected a string key"),
            (br#"{"a":1,}"#, "invalid JSON at byte 7: expected a string key"),
            (br#"{"a":tru}"#, "invalid JSON at byte 5: invalid literal"),
            (br#"{"a":-}"#, "invalid JSON at byte 6: invalid number"),
            (br#"{"ts":1.}"#, "invalid JSON at byte 8: invalid number"),
            (br#"{"a":"x\qy"}"#, "invalid JSON at byte 7: invalid escape"),
            (br#"{"a":"\u12g4"}"#, "invalid JSON at byte 10: invalid \\u escape"),
            (br#"{"a":"\ud800x"}"#, "invalid JSON at byte 12: unpaired surrogate in \\u escape"),
            (br#"{"a":"\udc00"}"#, "invalid JSON at byte 6: unpaired surrogate in \\u escape"),
            (b"{\"a\":\"x\ty\"}", "invalid JSON at byte 7: control character in string"),
            (
                br#"{"device_id":"a","ts":1,"readings":{"temp":1}} x"#,
                "invalid JSON at byte 47: trailing characters after the object",
            ),
            (b"{\"device_id\":\"a\xff\xfe\",\"ts\":1}", "invalid UTF-8 at byte 15"),
            (b"{\"\xc3\x28\":1}", "invalid UTF-8 at byte 2"),
            (b"\x00\x01\x02garbage", "invalid JSON at byte 0: expected a JSON value"),
            (b"\xff\xfe\x00binary", "invalid UTF-8 at byte 0"),
            (br#"{"a":[1,2}"#, "invalid JSON at byte 9: expected ',' or ']'"),
        ];
        for (line, msg) in cases {
            let d = JsonDecoder::new(schema()).unwrap().decode(line, &[0..line.len()]).unwrap();
            assert_eq!(d.errors.len(), 1, "{}", String::from_utf8_lossy(line));
            assert_eq!(
                (d.errors[0].kind, d.errors[0].message.as_str()),
                (RecordErrorKind::Decode, msg),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn syntax_error_after_schema_error_is_a_decode_error() {
        let (kind, msg) = error_of(r#"{"device_id":1,"ts":1,"readings":{"temp":1}"#);
        assert_eq!((kind, msg.as_str()), ("decode", "invalid JSON at byte 43: unexpected end of input"));
        let (kind, msg) = error_of(r#"{"readings":{"vibration":1},"x":[}"#);
        assert_eq!((kind, msg.as_str()), ("decode", "invalid JSON at byte 33: expected a JSON value"));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let line = format!("{{\"x\":{}}}", "[".repeat(100_000));
        let (kind, msg) = error_of(&line);
        assert_eq!((kind, msg.as_str()), ("decode", "invalid JSON at byte 132: nesting too deep"));
    }

    #[test]
    fn bad_records_in_the_middle_keep_rows_aligned() {
        let lines = [
            r#"{"device_id":"a","ts":1,"readings":{"temp":1.0,"vibration":0.5}}"#,
            r#"{"device_id":"BAD","ts":2,"readings":{"temp":"x","vibration":0.5}}"#,
            r#"{"device_id":"b","ts":3,"readings":{"temp":3.0}}"#,
            r#"{"device_id":"BAD2","ts":4,"readings":{"vibration":9.0,"temp":4.0"#,
            r#"{"device_id":"BAD3","readings":{"vibration":9.0,"temp":4.0},"ts":null}"#,
            r#"{"device_id":"c","ts":5,"readings":{"temp":5.0,"vibration":null}}"#,
            r#"{"ts":6,"readings":{"temp":6.0,"vibration":6.5},"device_id":"d"}"#,
        ];
        let d = decode(&lines);
        let errs: Vec<_> = d.errors.iter().map(|e| (e.index, e.kind.as_str())).collect();
        assert_eq!(errs, vec![(1, "schema"), (3, "decode"), (4, "schema")]);
        assert_eq!(d.row_records, Some(vec![0, 2, 5, 6]));
        assert_eq!(d.record_of_row(2), 5);
        let b = &d.batch;
        let ids: Vec<_> = b.column(0).as_string::<i32>().iter().map(|s| s.unwrap()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(b.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![1, 3, 5, 6]);
        let r = b.column(2).as_struct();
        assert_eq!(r.column(0).as_primitive::<Float64Type>().values().to_vec(), vec![1.0, 3.0, 5.0, 6.0]);
        let vib: Vec<_> = r.column(1).as_primitive::<Float64Type>().iter().collect();
        assert_eq!(vib, vec![Some(0.5), None, None, Some(6.5)]);
        b.column(2).to_data().validate_full().unwrap();
        // The decoder is reusable and starts from a clean state.
    }

    #[test]
    fn empty_structs_and_empty_schemas() {
        let schema = Arc::new(Schema::new(vec![Field::new("e", DataType::Struct(Fields::empty()), true)]));
        let d = decode_with(schema, &[r#"{"e":{"x":1}}"#, r#"{}"#]);
        assert!(d.errors.is_empty());
        assert_eq!(d.batch.num_rows(), 2);
        assert!(d.batch.column(0).is_valid(0) && d.batch.column(0).is_null(1));
        let d = decode_with(Arc::new(Schema::empty()), &[r#"{"a":1}"#, "{}", "[]"]);
        assert_eq!(d.batch.num_rows(), 2);
        assert_eq!(d.errors.len(), 1);
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let line = format!("\u{feff}{LINE}");
        let d = decode(&[&line]);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let (kind, msg) = error_of("\u{feff}{\"ts\":1}");
        assert_eq!((kind, msg.as_str()), ("schema", "missing required field `device_id`"));
    }

    #[test]
    fn decoder_is_reusable_after_errors() {
        let mut dec = JsonDecoder::new(schema()).unwrap();
        let bad = br#"{"device_id":"x","ts":1,"readings":{"temp":"#;
        let d = dec.decode(bad, &[0..bad.len()]).unwrap();
        assert_eq!(d.batch.num_rows(), 0);
        assert_eq!(d.row_records, Some(vec![]));
        let d = dec.decode(LINE.as_bytes(), &[0..LINE.len(), 0..LINE.len()]).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        assert!(d.row_records.is_none());
        let err = dec.decode(b"{}", &[0..3]).unwrap_err().to_string();
        assert_eq!(err, "record 0: range 0..3 is outside the buffer of 2 bytes");
    }

    #[test]
    fn optional_struct_missing_or_null_is_null() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "loc",
                DataType::Struct(Fields::from(vec![
                    Field::new("lat", DataType::Float64, false),
                    Field::new("name", DataType::Utf8, true),
                    Field::new(
                        "inner",
                        DataType::Struct(Fields::from(vec![Field::new("deep", DataType::Boolean, false)])),
                        true,
                    ),
                ])),
                true,
            ),
        ]));
        let d = decode_with(
            schema.clone(),
            &[
                r#"{"id":1}"#,
                r#"{"id":2,"loc":null}"#,
                r#"{"id":3,"loc":{"lat":1.5,"inner":{"deep":true}}}"#,
                r#"{"id":4,"loc":{"lat":2.5,"name":"x","inner":null}}"#,
                r#"{"id":5,"loc":{"name":"no lat"}}"#,
                r#"{"id":6,"loc":{"lat":1,"inner":{}}}"#,
            ],
        );
        let errs: Vec<_> = d.errors.iter().map(|e| (e.index, e.message.as_str())).collect();
        assert_eq!(errs, vec![(4, "missing required field `loc.lat`"), (5, "missing required field `loc.inner.deep`")]);
        let b = &d.batch;
        assert_eq!(b.num_rows(), 4);
        let loc = b.column(1).as_struct();
        assert_eq!(loc.nulls().map(|n| n.iter().collect::<Vec<_>>()), Some(vec![false, false, true, true]));
        let inner = loc.column(2).as_struct();
        assert!(inner.is_null(0) && inner.is_null(1) && inner.is_valid(2) && inner.is_null(3));
        assert!(inner.column(0).as_boolean().value(2));
        b.column(1).to_data().validate_full().unwrap();
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let d = decode(&[
            r#"{"device_id":"a","device_id":"second","ts":1,"ts":2,"readings":{"temp":1},"readings":{"temp":2,"vibration":3}}"#,
        ]);
        assert!(d.errors.is_empty());
        let b = &d.batch;
        assert_eq!(b.column(0).as_string::<i32>().value(0), "second");
        assert_eq!(b.column(1).as_primitive::<Int64Type>().value(0), 2);
        let r = b.column(2).as_struct();
        assert_eq!(r.column(0).as_primitive::<Float64Type>().value(0), 2.0);
        assert_eq!(r.column(1).as_primitive::<Float64Type>().value(0), 3.0);
    }

    #[test]
    fn numbers() {
        let schema = one_field(FieldType::Float64, false);
        let texts = [
            "0",
            "-0",
            "1",
            "-1",
            "0.1",
            "22.51",
            "1013.1",
            "0.021",
            "1e10",
            "1E-10",
            "-2.5e+3",
            "123456789012345678901234567890",
            "0.30000000000000004",
            "2.2250738585072014e-308",
            "4.9e-324",
            "1.7976931348623157e308",
            "9007199254740993",
            "3.141592653589793238462643383279",
            "1e-400",
        ];
        let lines: Vec<String> = texts.iter().map(|t| format!("{{\"v\":{t}}}")).collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let d = decode_with(schema, &refs);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let v = d.batch.column(0).as_primitive::<Float64Type>();
        for (i, t) in texts.iter().enumerate() {
            let want: f64 = t.parse().unwrap();
            assert_eq!(v.value(i).to_bits(), want.to_bits(), "{t}");
        }
        let schema = one_field(FieldType::Int64, true);
        let d = decode_with(schema, &[r#"{"v":-9223372036854775808}"#, r#"{"v":9223372036854775807}"#, r#"{"v":-0}"#]);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let v = d.batch.column(0).as_primitive::<Int64Type>();
        assert_eq!(v.values().to_vec(), vec![i64::MIN, i64::MAX, 0]);
        let (kind, msg) = error_with(one_field(FieldType::Int64, true), r#"{"v":-9223372036854775809}"#);
        assert_eq!(
            (kind, msg.as_str()),
            ("schema", "field `v`: integer -9223372036854775809 is out of range for int64")
        );
        let (kind, msg) = error_with(one_field(FieldType::Int64, true), r#"{"v":01}"#);
        assert_eq!((kind, msg.as_str()), ("decode", "invalid JSON at byte 6: expected ',' or '}'"));
    }

    #[test]
    fn timestamps_and_bools() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("t", DataType::Timestamp(arrow_schema::TimeUnit::Millisecond, Some("UTC".into())), false),
            Field::new("b", DataType::Boolean, true),
        ]));
        let d = decode_with(
            schema.clone(),
            &[
                r#"{"t":1700000000123,"b":true}"#,
                r#"{"t":"2023-11-14T22:13:20.123Z","b":false}"#,
                r#"{"t":"2023-11-14T23:13:20.123+01:00"}"#,
            ],
        );
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.batch.schema(), schema);
        let t = d.batch.column(0).as_primitive::<TimestampMillisecondType>();
        assert_eq!(t.values().to_vec(), vec![1700000000123; 3]);
        let b: Vec<_> = d.batch.column(1).as_boolean().iter().collect();
        assert_eq!(b, vec![Some(true), Some(false), None]);
    }

    #[test]
    fn unsupported_schema_types_are_refused() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let err = JsonDecoder::new(schema).unwrap_err().to_string();
        assert_eq!(err, "field `x`: type Int32 is not supported by the json format");
    }

    #[test]
    fn wide_structs_use_the_hash_lookup() {
        let fields: Vec<FieldSpec> =
            (0..40).map(|i| FieldSpec::new(format!("f{i}"), FieldType::Int64).with_required(false)).collect();
        let schema = SchemaSpec::new(fields).to_arrow();
        let line: String =
            format!("{{{}}}", (0..40).rev().map(|i| format!("\"f{i}\":{i}")).collect::<Vec<_>>().join(","));
        let d = decode_with(schema, &[&line, r#"{"f7":7,"zzz":1}"#]);
        assert!(d.errors.is_empty());
        for i in 0..40 {
            assert_eq!(d.batch.column(i).as_primitive::<Int64Type>().value(0), i as i64);
        }
        assert_eq!(d.batch.column(7).as_primitive::<Int64Type>().value(1), 7);
        assert!(d.batch.column(8).is_null(1));
    }
}
