//! HTTP ingest: `POST /ingest/<source id>` on the API port (see
//! [`weir_connectors::http_ingest`]).

use std::sync::Arc;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::http_ingest::{HttpIngestFactory, IngestHub, Respond};
use weir_core::{Result, SinkFactory, SourceFactory};

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};

/// HTTP ingest settings. The token may be a `${VAR}` reference and is never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpIngestSettings {
    /// The bearer token requests must carry; default the API's (`api.token`, `WEIR_API_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Requests waiting for the pipeline at most; beyond, the answer is 503 with `Retry-After`.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// The largest body taken, in bytes (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// `accepted` (default): answer once the rows are in the pipeline; `checkpointed`: once the
    /// checkpoint covering them has completed (needs `checkpoints`).
    #[serde(default = "default_respond")]
    pub respond: String,
}

impl std::fmt::Debug for HttpIngestSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpIngestSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("queue", &self.queue)
            .field("max_body", &self.max_body)
            .field("respond", &self.respond)
            .finish()
    }
}

fn default_queue() -> usize {
    16
}
fn default_max_body() -> usize {
    16 << 20
}
fn default_respond() -> String {
    "accepted".into()
}

impl Default for HttpIngestSettings {
    fn default() -> Self {
        Self { token: None, queue: default_queue(), max_body: default_max_body(), respond: default_respond() }
    }
}

impl SourceSettings for HttpIngestSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let schema = cx.src.schema.as_ref().map(weir_formats::SchemaSpec::to_arrow).ok_or_else(|| {
            cx.error(format!("source `{}`: http ingest needs a declared `schema` for its records", cx.src.id))
        })?;
        let respond = match self.respond.as_str() {
            "accepted" => Respond::Accepted,
            "checkpointed" if cx.checkpoints.is_some() => Respond::Checkpointed,
            "checkpointed" => {
                return Err(
                    cx.error("http `respond: checkpointed` answers when a checkpoint completes: add `checkpoints`")
                )
            }
            other => return Err(cx.error(format!("http `respond: {other}`: expected accepted or checkpointed"))),
        };
        let token = self.token.clone().or_else(|| cx.api_token.clone()).filter(|t| !t.is_empty()).ok_or_else(|| {
            cx.error(format!(
                "source `{}`: http ingest needs a bearer token: set `token`, `api.token` or WEIR_API_TOKEN",
                cx.src.id
            ))
        })?;
        let hub = IngestHub::new(self.queue, token, self.max_body);
        cx.ingest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(cx.src.id.clone(), hub.clone());
        let fac = HttpIngestFactory::new(
            hub,
            schema.clone(),
            cx.event_time.clone(),
            cx.src.batch_size,
            cx.src.max_linger,
            respond,
        );
        Ok((Arc::new(fac), schema))
    }
}

/// HTTP sink settings: rows POSTed as JSON. Header values may be `${VAR}` references;
/// `Authorization` and `*key*` headers are never logged.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkSettings {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Rows per request at most (default 1000).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// How long a request may take (default 10s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: std::time::Duration,
    /// `json` (default: a JSON array of rows) or `jsonl` (one object per line).
    #[serde(default = "default_body")]
    pub body: String,
}

fn default_max_rows() -> usize {
    1000
}
fn default_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_body() -> String {
    "json".into()
}

impl std::fmt::Debug for HttpSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers =
            weir_connectors::http_sink::redact_headers(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        f.debug_struct("HttpSinkSettings")
            .field("url", &weir_connectors::redis_streams::redact_url(&self.url))
            .field("headers", &headers)
            .field("max_rows", &self.max_rows)
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .finish()
    }
}

impl SinkSettings for HttpSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        use weir_connectors::http_sink::{HttpBody, HttpSinkConfig, HttpSinkFactory};
        let body = match self.body.as_str() {
            "json" => HttpBody::JsonArray,
            "jsonl" => HttpBody::JsonLines,
            other => return Err(cx.error(format!("http sink: `body: {other}`: json or jsonl"))),
        };
        let cfg = HttpSinkConfig {
            url: self.url.clone(),
            headers: self.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            max_rows: self.max_rows,
            timeout: self.timeout,
            body,
            schema: cx.schema.clone(),
        };
        Ok(Arc::new(HttpSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
