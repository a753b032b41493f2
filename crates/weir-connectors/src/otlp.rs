//! Exports the engine's spans ([`weir_core::trace`]) to an OpenTelemetry collector over
//! OTLP/HTTP with protobuf bodies.
//!
//! Spans are queued and sent in batches by the SDK's own thread, so a slow or dead collector
//! never holds up the pipeline: when the queue (2048 spans) is full, new spans are dropped.
//! A failed export is logged once when the collector goes away and once when it is back, and
//! counted ([`TraceExporter::failed_exports`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;
use weir_core::{CoreError, Result};

/// Where and how much to export.
#[derive(Debug, Clone)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP address: `http://host:4318` (then `/v1/traces` is added) or
    /// the full URL of its traces endpoint.
    pub endpoint: String,
    /// The share of batches traced, 0 to 1 (a batch that arrives with a sampled trace context
    /// is traced whatever this says, one with an unsampled one never is). Checkpoints are
    /// always traced.
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Resource attributes (the job's name, the group member).
    pub attributes: Vec<(String, String)>,
    /// Headers sent with every export (an API key of a hosted backend).
    pub headers: Vec<(String, String)>,
    /// How long one export may take.
    pub timeout: Duration,
    /// How long spans wait in the queue before they are sent.
    pub delay: Duration,
}

/// The running exporter: installed as the engine's tracer until [`TraceExporter::shutdown`].
#[derive(Debug)]
pub struct TraceExporter {
    provider: SdkTracerProvider,
    client: Arc<Client>,
}

impl TraceExporter {
    /// Starts exporting, with HTTP requests made on `rt` (the SDK's thread has no runtime of
    /// its own), and installs the tracer.
    ///
    /// # Errors
    /// An endpoint that is not an http(s) URL, a ratio outside 0..=1, a header that cannot be
    /// sent.
    pub fn start(cfg: &TracesConfig, rt: tokio::runtime::Handle) -> Result<Self> {
        let endpoint = traces_url(&cfg.endpoint)?;
        weir_core::ensure_config!(
            (0.0..=1.0).contains(&cfg.sample_ratio),
            "traces: `sample_ratio: {}` is not between 0 and 1",
            cfg.sample_ratio
        );
        for (k, v) in &cfg.headers {
            let bad = http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err();
            weir_core::ensure_config!(!bad, "traces: header `{k}` cannot be sent as an HTTP header");
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| CoreError::Config(format!("traces: cannot build the HTTP client: {e}")))?;
        let client = Arc::new(Client {
            http,
            rt,
            endpoint: endpoint.clone(),
            down: AtomicBool::new(false),
            failed: AtomicU64::new(0),
        });
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(cfg.timeout)
            .with_headers(cfg.headers.iter().cloned().collect::<HashMap<_, _>>())
            .with_shared_http_client(client.clone())
            .build()
            .map_err(|e| CoreError::Config(format!("traces: cannot build the OTLP exporter: {e}")))?;
        let batches = BatchConfigBuilder::default().with_scheduled_delay(cfg.delay).build();
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batches).build();
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes(cfg.attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampling::new(cfg.sample_ratio))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("weir");
        weir_core::trace::install(Some(weir_core::trace::BoxedTracer::new(Box::new(tracer))));
        Ok(Self { provider, client })
    }

    /// Exports that failed so far.
    pub fn failed_exports(&self) -> u64 {
        self.client.failed.load(Ordering::Relaxed)
    }

    /// Stops recording, sends what is queued (waiting at most the export timeout) and stops.
    /// Blocking: call it off the runtime's threads (`spawn_blocking`).
    pub fn shutdown(self) {
        weir_core::trace::install(None);
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(10)) {
            tracing::warn!(error = %e, "Traces: the last spans could not all be exported.");
        }
    }
}

/// `http://host:port` gets the OTLP traces path; a URL with a path is taken as it is.
fn traces_url(endpoint: &str) -> Result<String> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| CoreError::Config(format!("traces: `endpoint: {endpoint}` is not a URL: {e}")))?;
    weir_core::ensure_config!(
        matches!(url.scheme(), "http" | "https"),
        "traces: `endpoint: {endpoint}`: OTLP/HTTP needs an http or https URL"
    );
    Ok(match url.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    })
}

/// Checkpoints always; anything else as its parent was, or (a new trace) by trace id ratio.
#[derive(Debug, Clone)]
struct Sampling(Sampler);

impl Sampling {
    fn new(ratio: f64) -> Self {
        Self(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
    }
}

impl ShouldSample for Sampling {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name == "checkpoint" {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: Default::default(),
            };
        }
        self.0.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// The exporter's HTTP client: reqwest, run on the job's runtime.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    rt: tokio::runtime::Handle,
    endpoint: String,
    down: AtomicBool,
    failed: AtomicU64,
}

impl Client {
    fn outcome(&self, failure: Option<String>) {
        match failure {
            None => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "Traces: the collector takes spans again.");
                }
            }
            Some(why) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %self.endpoint, error = %why, "Traces: export failed; spans are dropped until the collector answers again.");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> std::result::Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let http = self.http.clone();
        let sent = self.rt.spawn(async move {
            let res =
                http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            let (status, headers) = (res.status(), res.headers().clone());
            Ok::<_, reqwest::Error>((status, headers, res.bytes().await?))
        });
        let (status, headers, body) = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.outcome(Some(crate::alerting::describe_http_error(&e)));
                return Err(Box::new(e));
            }
            Err(e) => {
                self.outcome(Some(e.to_string()));
                return Err(Box::new(e));
            }
        };
        self.outcome((!status.is_success()).then(|| format!("answered {status}")));
        let mut res = http::Response::new(body);
        *res.status_mut() = status;
        *res.headers_mut() = headers;
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_to_a_bare_address() {
        assert_eq!(traces_url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://127.0.0.1:4318/").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("https://otel.example/ingest/traces").unwrap(), "https://otel.example/ingest/traces");
        let e = traces_url("grpc://127.0.0.1:4317").unwrap_err().to_string();
        assert!(e.contains("http or https"), "{e}");
        assert!(traces_url("127.0.0.1:4318").is_err());
    }

    #[test]
    fn checkpoints_are_always_sampled_and_batches_by_ratio() {
        let never = Sampling::new(0.0);
        let id = TraceId::from_bytes([7; 16]);
        let d = |s: &Sampling, name| s.should_sample(None, id, name, &SpanKind::Internal, &[], &[]).decision;
        assert_eq!(d(&never, "checkpoint"), SamplingDecision::RecordAndSample);
        assert_eq!(d(&never, "batch in"), SamplingDecision::Drop);
        assert_eq!(d(&Sampling::new(1.0), "batch in"), SamplingDecision::RecordAndSample);
    }
}
