//! The HTTP sink: rows POSTed as JSON to a URL, up to `max_rows` per request. A request the
//! endpoint may take later (a refused connection, a timeout, 408, 429, 5xx) fails the write,
//! which the runtime retries with backoff while the sink's input waits; one it refuses (any
//! other 4xx) sends its rows to the dead-letter output with the status and the start of the
//! answer. At least once: a retried batch sends again the requests that had already gone
//! through, each with the same `Idempotency-Key` (a hash of its body), for endpoints that drop
//! repeats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use weir_core::error::RefusedRow;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};
use weir_formats::{Encoder, JsonEncoder};

/// How each request's body holds its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpBody {
    /// A JSON array of row objects (`application/json`).
    #[default]
    JsonArray,
    /// One JSON object per line (`application/x-ndjson`).
    JsonLines,
}

/// Settings of an HTTP sink.
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra headers (an `Authorization` one is never logged).
    pub headers: Vec<(String, String)>,
    /// Rows per request at most.
    pub max_rows: usize,
    /// How long a request may take.
    pub timeout: Duration,
    /// Body layout.
    pub body: HttpBody,
    /// Schema of the rows.
    pub schema: arrow_schema::SchemaRef,
}

impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("headers", &redact_headers(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
            .field("max_rows", &self.max_rows)
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

/// Headers for logs and `Debug`: the values of `Authorization` and of any header whose name
/// holds `key` replaced by `***`.
pub fn redact_headers<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
    headers
        .map(|(k, v)| {
            let secret = k.eq_ignore_ascii_case("authorization") || k.to_ascii_lowercase().contains("key");
            (k, if secret { "***" } else { v })
        })
        .collect()
}

/// Builds the sink; every worker shares one HTTP client (its connection pool).
#[derive(Debug)]
pub struct HttpSinkFactory {
    cfg: HttpSinkConfig,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    stats: Arc<[AtomicU64; 2]>,
}

impl HttpSinkFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// A URL that is not http(s), a header that is not valid, `max_rows` of 0.
    pub fn new(cfg: HttpSinkConfig) -> Result<Self> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| {
            CoreError::Config(format!("http sink: `url: {}`: {e}", crate::redis_streams::redact_url(&cfg.url)))
        })?;
        weir_core::ensure_config!(
            matches!(url.scheme(), "http" | "https"),
            "http sink: `url`: scheme `{}` is not http or https",
            url.scheme()
        );
        weir_core::ensure_config!(cfg.max_rows > 0, "http sink: `max_rows` must be above 0");
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| CoreError::Config(format!("http sink: header `{k}`: {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| CoreError::Config(format!("http sink: the value of header `{k}`: {e}")))?;
            headers.insert(name, value);
        }
        JsonEncoder::new(cfg.schema.clone()).map_err(crate::fmt_err)?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| CoreError::Internal(format!("http sink: cannot make a client: {e}")))?;
        Ok(Self { cfg, client, headers, stats: Arc::default() })
    }
}

impl SinkFactory for HttpSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(HttpSink {
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            headers: self.headers.clone(),
            encoder: JsonEncoder::new(self.cfg.schema.clone()).map_err(crate::fmt_err)?,
            stats: self.stats.clone(),
            traceparent: None,
        }))
    }
}

#[derive(Debug)]
struct HttpSink {
    cfg: HttpSinkConfig,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    encoder: JsonEncoder,
    /// Rows delivered, requests sent.
    stats: Arc<[AtomicU64; 2]>,
    /// The `traceparent` of the write in progress, when it is traced: the receiving service
    /// continues the trace (W3C Trace Context).
    traceparent: Option<String>,
}

impl HttpSink {
    fn body(&mut self, rows: &RecordBatch) -> Result<Vec<u8>> {
        let mut lines = Vec::new();
        self.encoder.encode(rows, &mut lines).map_err(crate::fmt_err)?;
        Ok(match self.cfg.body {
            HttpBody::JsonLines => lines,
            HttpBody::JsonArray => {
                let mut out = Vec::with_capacity(lines.len() + 2);
                out.push(b'[');
                for (i, l) in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(l);
                }
                out.push(b']');
                out
            }
        })
    }
}

fn transient(url: &str, what: String) -> CoreError {
    CoreError::Other {
        message: format!("http sink ({}): {what}", crate::redis_streams::redact_url(url)),
        blame: Blame::External,
        retry: Retry::Backoff,
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    fn trace(&mut self, cx: Option<&weir_core::trace::SpanContext>) {
        self.traceparent = cx.map(weir_core::trace::traceparent);
    }

    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        let mut refused = Vec::new();
        let mut start = 0;
        while start < rows.num_rows() {
            let len = self.cfg.max_rows.min(rows.num_rows() - start);
            let body = self.body(&rows.slice(start, len))?;
            let key = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
            let kind = match self.cfg.body {
                HttpBody::JsonArray => "application/json",
                HttpBody::JsonLines => "application/x-ndjson",
            };
            let mut req = self
                .client
                .post(&self.cfg.url)
                .headers(self.headers.clone())
                .header(reqwest::header::CONTENT_TYPE, kind)
                .header("Idempotency-Key", key);
            if let Some(tp) = &self.traceparent {
                req = req.header(weir_core::trace::TRACEPARENT, tp);
            }
            let res = req.body(body).send().await;
            self.stats[1].fetch_add(1, Ordering::Relaxed);
            let res = res.map_err(|e| transient(&self.cfg.url, crate::alerting::describe_http_error(&e)))?;
            let status = res.status();
            if !status.is_success() {
                let text = res.text().await.unwrap_or_default();
                let text: String = text.chars().take(300).collect();
                let code = status.as_u16();
                if code == 408 || code == 429 || status.is_server_error() {
                    return Err(transient(&self.cfg.url, format!("answered {status}: {text}")));
                }
                let reason = format!("http sink: the endpoint refused the request ({status}): {text}");
                refused.extend((start..start + len).map(|row| RefusedRow { row, reason: reason.clone() }));
            } else {
                self.stats[0].fetch_add(len as u64, Ordering::Relaxed);
            }
            start += len;
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(CoreError::Refused(refused))
        }
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }

    fn report(&self, m: &weir_core::metrics::ConnectorMetrics) {
        let url = crate::redis_streams::redact_url(&self.cfg.url);
        let l = [("url", url.as_str())];
        m.set_total(
            "weir_http_sink_rows_total",
            "Rows the HTTP endpoint took.",
            &l,
            self.stats[0].load(Ordering::Relaxed) as f64,
        );
        m.set_total(
            "weir_http_sink_requests_total",
            "Requests sent, retries included.",
            &l,
            self.stats[1].load(Ordering::Relaxed) as f64,
        );
    }
}
