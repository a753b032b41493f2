//! Spans of the engine's work, for OpenTelemetry.
//!
//! The engine only speaks the OpenTelemetry API: a tracer is installed at run time (the `weir`
//! crate builds one that exports over OTLP) and until then every function here is a check of
//! one atomic flag. A batch carries the [`SpanContext`] of the span that last worked on it
//! ([`crate::Batch::trace`]), so the spans of its trip through the steps, across the channels
//! between tasks, and into a sink form one trace; a Kafka source takes that context from a
//! record's W3C `traceparent` header and a Kafka sink writes it into the records it produces,
//! so a trace goes on in the next process.
//!
//! Sampling is the tracer's: spans of an unsampled batch are not recorded, and the context
//! it carries says so, so nothing downstream records them either.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use opentelemetry::global::BoxedSpan;
/// A tracer to [`install`].
pub use opentelemetry::global::BoxedTracer;
/// The context of a span, as batches carry it and headers propagate it.
pub use opentelemetry::trace::SpanContext;
use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::Context;
/// An attribute of a span.
pub use opentelemetry::KeyValue;

static ON: AtomicBool = AtomicBool::new(false);
static TRACER: RwLock<Option<Arc<BoxedTracer>>> = RwLock::new(None);

/// The header (and W3C Trace Context field) a trace context travels in between processes.
pub const TRACEPARENT: &str = "traceparent";

/// Makes the engine record spans with `tracer` (replacing any before), or stops it (`None`).
pub fn install(tracer: Option<BoxedTracer>) {
    let mut t = TRACER.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    ON.store(tracer.is_some(), Ordering::Release);
    *t = tracer.map(Arc::new);
}

/// Whether a tracer is installed: when not, no span is started and no header is read.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn tracer() -> Option<Arc<BoxedTracer>> {
    if !enabled() {
        return None;
    }
    TRACER.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// A span the engine started (or none, when tracing is off or its trace is not sampled). It
/// ends when dropped.
#[derive(Default)]
pub struct Span(Option<BoxedSpan>);

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Span").field(&self.context()).finish()
    }
}

impl Span {
    /// No span.
    pub fn none() -> Self {
        Self(None)
    }

    /// A span that begins a trace of its own, or goes on from `parent` (a context from another
    /// task or process). The tracer's sampler decides whether it is recorded.
    pub fn start(name: impl Into<Cow<'static, str>>, parent: Option<&SpanContext>, attrs: Vec<KeyValue>) -> Self {
        let Some(t) = tracer() else { return Self(None) };
        let cx = match parent {
            Some(p) if p.is_valid() => Context::new().with_remote_span_context(p.clone()),
            _ => Context::new(),
        };
        let span =
            t.span_builder(name).with_kind(SpanKind::Internal).with_attributes(attrs).start_with_context(&*t, &cx);
        Self(Some(span).filter(|s| s.is_recording()))
    }

    /// A span under `parent`, recorded only if `parent` was: the spans of a batch's steps and
    /// writes, which cost nothing for a batch whose trace is not sampled.
    pub fn child(name: impl Into<Cow<'static, str>>, parent: Option<&SpanContext>, attrs: Vec<KeyValue>) -> Self {
        match parent {
            Some(p) if p.is_sampled() && enabled() => Self::start(name, Some(p), attrs),
            _ => Self(None),
        }
    }

    /// Whether it is recorded.
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// Its context, for children and for the batches it passes on; `None` if not recorded.
    pub fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|s| s.span_context().clone())
    }

    /// Sets an attribute.
    pub fn set(&mut self, attr: KeyValue) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(attr);
        }
    }

    /// Records an event (a retry, a failure) with attributes.
    pub fn event(&mut self, name: &'static str, attrs: Vec<KeyValue>) {
        if let Some(s) = &mut self.0 {
            s.add_event(name, attrs);
        }
    }

    /// Links another trace (a batch made of records from several traces links them all).
    pub fn link(&mut self, other: SpanContext) {
        if let Some(s) = &mut self.0 {
            s.add_link(other, Vec::new());
        }
    }

    /// Marks it failed.
    pub fn fail(&mut self, why: impl std::fmt::Display) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::error(why.to_string()));
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
            s.end();
        }
    }
}

/// Reads a W3C `traceparent` value (`00-<trace id>-<span id>-<flags>`); `None` if it is not
/// one (a malformed header never fails a record: its batch just starts a trace of its own).
pub fn parse_traceparent(v: &[u8]) -> Option<SpanContext> {
    let v = std::str::from_utf8(v).ok()?.trim();
    let mut parts = v.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may add some, after these.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(hex(version) && hex(trace) && hex(span) && hex(flags)) {
        return None;
    }
    let trace_id = TraceId::from_bytes(u128::from_str_radix(trace, 16).ok()?.to_be_bytes());
    let span_id = SpanId::from_bytes(u64::from_str_radix(span, 16).ok()?.to_be_bytes());
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let cx = SpanContext::new(trace_id, span_id, flags, true, TraceState::NONE);
    cx.is_valid().then_some(cx)
}

/// The `traceparent` value of a context.
pub fn traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        u128::from_be_bytes(cx.trace_id().to_bytes()),
        u64::from_be_bytes(cx.span_id().to_bytes()),
        cx.trace_flags().to_u8()
    )
}

/// An attribute.
pub fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// Hex of a trace id, as OTLP backends show it.
pub fn trace_id_hex(cx: &SpanContext) -> String {
    format!("{:032x}", u128::from_be_bytes(cx.trace_id().to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_is_not_one() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(v.as_bytes()).expect("a valid traceparent");
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(traceparent(&cx), v);
        assert_eq!(trace_id_hex(&cx), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
        assert!(!unsampled.is_sampled());
        // A later version may carry more fields after these four.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?} was taken");
        }
    }

    #[test]
    fn without_a_tracer_nothing_is_recorded() {
        install(None);
        assert!(!enabled());
        let s = Span::start("batch", None, vec![kv("rows", 3i64)]);
        assert!(!s.is_recording() && s.context().is_none());
        let parent = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(!Span::child("step", parent.as_ref(), Vec::new()).is_recording());
    }
}
