//! A client of a schema registry with Confluent's REST API (Confluent Schema Registry,
//! Karapace, Redpanda, Apicurio's compatible API): writer schemas by id, fetched once and kept.
//!
//! A source asks for the ids of a batch's records before it decodes them
//! ([`SchemaRegistry::prefetch`]), so decoding never waits on the network. An id the registry
//! does not have (404), or whose schema is not Avro or does not parse, is remembered with the
//! reason, which the records of that id carry to the dead-letter output; such an id is asked
//! again after a minute (a schema registered late). An unreachable registry, or one answering
//! 5xx, is retried with backoff for as long as it takes, logged when it goes away and when it
//! is back: the batch waits, nothing is dead-lettered for the registry's outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use weir_core::{CoreError, Result};
use weir_formats::avro::{AvroSchemas, Schema};
use weir_formats::protobuf::{ProtoSchema, ProtoSchemas};

/// Where the registry is.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Its base URL (`http://127.0.0.1:8081`).
    pub url: String,
    /// Basic authentication.
    pub username: Option<String>,
    /// Basic authentication (never logged).
    pub password: Option<String>,
    /// How long one request may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("username", &self.username)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How long an id the registry did not have is believed missing.
const RECHECK_MISSING: Duration = Duration::from_secs(60);

/// The client, shared by every worker's decoder.
#[derive(Debug)]
pub struct SchemaRegistry {
    cfg: RegistryConfig,
    http: reqwest::Client,
    known: RwLock<HashMap<u32, Writer>>,
    /// Ids that cannot be used, with why and since when.
    refused: Mutex<HashMap<u32, (String, Instant)>>,
    /// Requests the registry failed (unreachable or 5xx).
    failures: std::sync::atomic::AtomicU64,
}

/// A writer schema the registry holds.
#[derive(Debug, Clone)]
enum Writer {
    Avro(Arc<Schema>),
    Protobuf(Arc<ProtoSchema>),
}

/// What one request said of an id.
enum Answer {
    Schema(Writer),
    /// The id cannot be used: why.
    Refused(String),
}

impl SchemaRegistry {
    /// A client of the registry at `cfg.url` (no request yet).
    ///
    /// # Errors
    /// A URL that is not http(s).
    pub fn new(cfg: RegistryConfig) -> Result<Arc<Self>> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| {
            CoreError::Config(format!(
                "schema_registry: `url: {}` is not a URL: {e}",
                crate::redis_streams::redact_url(&cfg.url)
            ))
        })?;
        weir_core::ensure_config!(
            matches!(url.scheme(), "http" | "https"),
            "schema_registry: `url`: scheme `{}` is not http or https",
            url.scheme()
        );
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| CoreError::Config(format!("schema_registry: cannot build the HTTP client: {e}")))?;
        Ok(Arc::new(Self {
            cfg,
            http,
            known: RwLock::default(),
            refused: Mutex::default(),
            failures: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Requests to the registry that failed so far (it was unreachable or answered 5xx).
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn base(&self) -> &str {
        self.cfg.url.trim_end_matches('/')
    }

    /// Whether `id` needs asking: not known, and not refused recently.
    fn wanted(&self, id: u32, now: Instant) -> bool {
        if self.known.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(&id) {
            return false;
        }
        let refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.get(&id).is_none_or(|(_, at)| now.duration_since(*at) >= RECHECK_MISSING)
    }

    /// Makes sure every id in `ids` is known or refused, asking the registry for the others.
    /// Waits (retrying with backoff) while the registry cannot answer. Cancel safe: what it
    /// learned is kept.
    ///
    /// # Errors
    /// None yet: an outage is waited out. (The `Result` is for the callers' `?`.)
    pub async fn prefetch(&self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        let now = Instant::now();
        let mut want: Vec<u32> = ids.into_iter().filter(|id| self.wanted(*id, now)).collect();
        want.sort_unstable();
        want.dedup();
        for id in want {
            let answer = self.retrying(&format!("schema id {id}"), || self.fetch(id)).await;
            match answer {
                Answer::Schema(s) => {
                    self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
                    self.known.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, s);
                }
                Answer::Refused(why) => {
                    tracing::warn!(schema_id = id, reason = %why, "Schema registry: records of this schema id go to the dead-letter output.");
                    self.refused
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(id, (why, Instant::now()));
                }
            }
        }
        Ok(())
    }

    /// Runs `attempt` until the registry answers, with backoff while it cannot (logged when
    /// it goes away and when it is back).
    async fn retrying<T, F: std::future::Future<Output = std::result::Result<T, String>>>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> F,
    ) -> T {
        let mut delay = Duration::from_millis(100);
        let mut down_since: Option<Instant> = None;
        loop {
            match attempt().await {
                Ok(a) => {
                    if let Some(t) = down_since {
                        tracing::warn!(url = %self.base(), outage_ms = t.elapsed().as_millis() as u64, "Schema registry answers again.");
                    }
                    return a;
                }
                Err(why) => {
                    self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(url = %self.base(), asking = what, error = %why, "Schema registry unreachable; retrying with backoff.");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One request for `id`: an answer, or why there was none (to retry).
    async fn fetch(&self, id: u32) -> std::result::Result<Answer, String> {
        let url = format!("{}/schemas/ids/{id}", self.base());
        let mut req = self.http.get(&url).header(reqwest::header::ACCEPT, "application/vnd.schemaregistry.v1+json");
        if let Some(u) = &self.cfg.username {
            req = req.basic_auth(u, self.cfg.password.as_ref());
        }
        let res = req.send().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
        let status = res.status();
        let body = res.text().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
        if status.as_u16() == 404 {
            return Ok(Answer::Refused(format!("schema id {id} is not in the schema registry")));
        }
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(format!("answered {status}: {}", body.chars().take(200).collect::<String>()));
        }
        if !status.is_success() {
            // 401/403 and the like will not pass by retrying the same id every second; they
            // are refusals that name the answer, rechecked after a minute.
            return Ok(Answer::Refused(format!(
                "the schema registry answered {status} for schema id {id}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let found: serde_json::Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Answer::Refused(format!("the schema registry's answer for schema id {id} is not JSON: {e}")))
            }
        };
        let Some(text) = found["schema"].as_str() else {
            return Ok(Answer::Refused(format!("the schema registry's answer for schema id {id} has no `schema`")));
        };
        Ok(match found["schemaType"].as_str().unwrap_or("AVRO") {
            "AVRO" => match Schema::parse_str(text) {
                Ok(s) => Answer::Schema(Writer::Avro(Arc::new(s))),
                Err(e) => Answer::Refused(format!("schema id {id} does not parse as Avro: {e}")),
            },
            "PROTOBUF" => match self.imports(id, &found).await? {
                Err(why) => Answer::Refused(why),
                Ok(imports) => match ProtoSchema::parse(text, &imports) {
                    Ok(s) => Answer::Schema(Writer::Protobuf(Arc::new(s))),
                    Err(e) => Answer::Refused(format!("schema id {id} does not compile as Protobuf: {e}")),
                },
            },
            other => Answer::Refused(format!("schema id {id} is a {other} schema; Weir reads Avro and Protobuf")),
        })
    }

    /// The files a Protobuf schema imports, from its `references` (each a subject's version):
    /// `Ok(Err(why))` when one cannot be had, `Err` to retry.
    async fn imports(
        &self,
        id: u32,
        found: &serde_json::Value,
    ) -> std::result::Result<std::result::Result<Vec<(String, String)>, String>, String> {
        let mut out = Vec::new();
        for r in found["references"].as_array().into_iter().flatten() {
            let (Some(name), Some(subject), Some(version)) =
                (r["name"].as_str(), r["subject"].as_str(), r["version"].as_i64())
            else {
                return Ok(Err(format!("schema id {id} has a reference without name, subject and version: {r}")));
            };
            let url = format!("{}/subjects/{}/versions/{version}", self.base(), escape(subject));
            let mut req = self.http.get(&url);
            if let Some(u) = &self.cfg.username {
                req = req.basic_auth(u, self.cfg.password.as_ref());
            }
            let res = req.send().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
            let status = res.status();
            let body = res.text().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
            if status.is_server_error() {
                return Err(format!("answered {status}"));
            }
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            match v["schema"].as_str() {
                Some(text) if status.is_success() => out.push((name.to_string(), text.to_string())),
                _ => {
                    return Ok(Err(format!(
                        "schema id {id} imports `{name}` (subject `{subject}` version {version}), which the registry does not give: {status}"
                    )))
                }
            }
        }
        Ok(Ok(out))
    }
}

/// A subject as a URL path segment.
fn escape(subject: &str) -> String {
    subject
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How a sink names the subject its schema goes under (Confluent's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubjectStrategy {
    /// `<topic>-value` (`TopicNameStrategy`, the default).
    #[default]
    Topic,
    /// The record's full name (`RecordNameStrategy`).
    Record,
    /// `<topic>-<record full name>` (`TopicRecordNameStrategy`).
    TopicRecord,
}

impl SubjectStrategy {
    /// The subject of values written to `topic` whose record (message) is called `record`
    /// (its full name).
    pub fn subject(self, topic: &str, record: &str) -> String {
        match self {
            Self::Topic => format!("{topic}-value"),
            Self::Record => record.to_string(),
            Self::TopicRecord => format!("{topic}-{record}"),
        }
    }
}

impl SchemaRegistry {
    /// The id of the schema `text` (of `kind`: `AVRO` or `PROTOBUF`) under `subject`:
    /// registered as a new version if `register` (the registry answers the existing id for a
    /// schema it has), else looked up. Waits out an unreachable registry like
    /// [`SchemaRegistry::prefetch`].
    ///
    /// # Errors
    /// The registry refuses the schema (incompatible with the subject's versions: 409; not
    /// valid: 422), or without `register` the subject does not have it.
    pub async fn id_of(&self, subject: &str, text: &str, kind: &str, register: bool) -> Result<u32> {
        self.retrying(&format!("subject {subject}"), || self.post_schema(subject, text, kind, register)).await
    }

    /// One request: `Ok(answer)` when the registry answered, `Err` to retry.
    async fn post_schema(
        &self,
        subject: &str,
        text: &str,
        kind: &str,
        register: bool,
    ) -> std::result::Result<Result<u32>, String> {
        let path = escape(subject);
        let url = match register {
            true => format!("{}/subjects/{path}/versions", self.base()),
            false => format!("{}/subjects/{path}", self.base()),
        };
        let mut body = serde_json::json!({ "schema": text });
        if kind != "AVRO" {
            body["schemaType"] = kind.into();
        }
        let body = body.to_string();
        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")
            .body(body);
        if let Some(u) = &self.cfg.username {
            req = req.basic_auth(u, self.cfg.password.as_ref());
        }
        let res = req.send().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
        let status = res.status();
        let text = res.text().await.map_err(|e| crate::alerting::describe_http_error(&e))?;
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(format!("answered {status}: {}", text.chars().take(200).collect::<String>()));
        }
        let said = text.chars().take(300).collect::<String>();
        if !status.is_success() {
            let what = match (status.as_u16(), register) {
                (404, false) => {
                    format!("subject `{subject}` has no version with the sink's schema (`register: false`)")
                }
                (409, _) => format!("the sink's schema is incompatible with subject `{subject}`"),
                _ => format!("the schema registry refused the sink's schema for subject `{subject}`"),
            };
            return Ok(Err(CoreError::Config(format!("{what}: {status} {said}"))));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("an answer that is not JSON: {e}"))?;
        Ok(v["id"].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
            CoreError::Config(format!("the schema registry's answer for subject `{subject}` has no id: {said}"))
        }))
    }
}

impl SchemaRegistry {
    /// The writer schema of `id`, or why there is none.
    fn writer(&self, id: u32) -> std::result::Result<Writer, String> {
        if let Some(w) = self.known.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id) {
            return Ok(w.clone());
        }
        let refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Err(refused
            .get(&id)
            .map_or_else(|| format!("schema id {id} was not fetched from the schema registry"), |(why, _)| why.clone()))
    }
}

impl AvroSchemas for SchemaRegistry {
    fn get(&self, id: u32) -> std::result::Result<Arc<Schema>, String> {
        match self.writer(id)? {
            Writer::Avro(s) => Ok(s),
            Writer::Protobuf(_) => Err(format!("schema id {id} is a PROTOBUF schema; this source reads Avro")),
        }
    }
}

impl ProtoSchemas for SchemaRegistry {
    fn get(&self, id: u32) -> std::result::Result<Arc<ProtoSchema>, String> {
        match self.writer(id)? {
            Writer::Protobuf(s) => Ok(s),
            Writer::Avro(_) => Err(format!("schema id {id} is an AVRO schema; this source reads Protobuf")),
        }
    }
}
