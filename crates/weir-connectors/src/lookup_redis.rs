//! A lookup table in Redis: one hash per key (`HSET <prefix><key> field value ...`, as the
//! Redis sink's `hset` writes them), read with one pipeline of `HGETALL`s per batch for the keys
//! the cache lacks. Hash fields are text; each column is read as the type the table's schema
//! gives it (text when none), and a value that does not parse is a null, logged once.
//!
//! The blocking client is used (the join's operator is synchronous; its worker's other tasks
//! move to another thread meanwhile); a lost connection is retried with backoff on a new one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_schema::{DataType, SchemaRef};
use weir_core::lookup::{LookupTable, KEY_SEPARATOR};
use weir_core::{CoreError, Result};

use crate::lookup_cache::{CacheLimits, CachedTable, Fetch, Value};

/// What the Redis table was told.
#[derive(Debug, Clone)]
pub struct RedisTableSpec {
    /// `redis://host:6379/0`.
    pub url: String,
    /// A key's hash is `<prefix><key>` (the parts of a key of several columns joined by `:`).
    pub prefix: String,
    /// The hash fields a found row brings, with their types (Int64, Float64, Boolean, Utf8).
    pub schema: SchemaRef,
    /// Keys held in the cache at most.
    pub cache_size: usize,
    /// How long a key's answer (its row, or that there is none) is kept.
    pub cache_ttl: Duration,
}

struct Hashes {
    spec: RedisTableSpec,
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    /// A value that did not parse was logged (once).
    warned: AtomicBool,
}

impl std::fmt::Debug for Hashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashes")
            .field("server", &crate::redis_streams::redact_url(&self.spec.url))
            .field("prefix", &self.spec.prefix)
            .finish_non_exhaustive()
    }
}

/// Opens a Redis lookup table (connects once to check the server).
///
/// # Errors
/// A URL that does not parse, a server that cannot be reached, or a column type the table
/// does not read.
pub fn open(spec: RedisTableSpec) -> Result<Arc<dyn LookupTable>> {
    let server = crate::redis_streams::redact_url(&spec.url);
    for f in spec.schema.fields() {
        if !matches!(f.data_type(), DataType::Int64 | DataType::Float64 | DataType::Boolean | DataType::Utf8) {
            return Err(CoreError::Config(format!(
                "redis table: column `{}` is {}; a hash field is read as int64, float64, bool or string",
                f.name(),
                f.data_type()
            )));
        }
    }
    let client = redis::Client::open(spec.url.as_str())
        .map_err(|e| CoreError::Config(format!("redis table: `url` ({server}): {e}")))?;
    let conn = weir_core::runtime::blocking(|| client.get_connection_with_timeout(Duration::from_secs(10)))
        .map_err(|e| CoreError::Config(format!("redis table ({server}): {e}")))?;
    let limits = CacheLimits { size: spec.cache_size, ttl: spec.cache_ttl };
    let out = spec.schema.clone();
    let hashes = Hashes { spec, client, conn: Mutex::new(Some(conn)), warned: AtomicBool::new(false) };
    Ok(CachedTable::new(hashes, out, limits))
}

impl Hashes {
    fn parse(&self, field: &str, t: &DataType, text: Option<String>) -> Value {
        let Some(text) = text else { return Value::Null };
        let v = match t {
            DataType::Int64 => text.trim().parse().ok().map(Value::Int),
            DataType::Float64 => text.trim().parse().ok().map(Value::Float),
            DataType::Boolean => match text.trim() {
                "true" | "1" => Some(Value::Bool(true)),
                "false" | "0" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => Some(Value::Text(text.clone())),
        };
        v.unwrap_or_else(|| {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(field, value = %text, expected = %t, "Redis lookup table: a value does not parse; it is a null.");
            }
            Value::Null
        })
    }
}

impl Fetch for Hashes {
    fn fetch(&self, keys: &[String]) -> Result<Vec<(String, Vec<Value>)>> {
        let fields: Vec<&str> = self.spec.schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut pipe = redis::pipe();
        for k in keys {
            let key = format!("{}{}", self.spec.prefix, k.replace(KEY_SEPARATOR, ":"));
            pipe.cmd("EXISTS").arg(&key).cmd("HMGET").arg(&key).arg(&fields);
        }
        let server = crate::redis_streams::redact_url(&self.spec.url);
        let mut failures = 0u32;
        let answers: Vec<redis::Value> = loop {
            let mut conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let got = weir_core::runtime::blocking(|| {
                if conn.is_none() {
                    *conn = Some(self.client.get_connection_with_timeout(Duration::from_secs(10))?);
                }
                match conn.as_mut() {
                    Some(c) => pipe.query::<Vec<redis::Value>>(c),
                    None => Err(redis::RedisError::from((redis::ErrorKind::Io, "no connection"))),
                }
            });
            match got {
                Ok(v) => break v,
                Err(e)
                    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() =>
                {
                    *conn = None;
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(server = %server, error = %e, failures, "Redis lookup table unreachable; retrying.");
                    }
                    let pause =
                        Duration::from_millis(100).saturating_mul(1 << failures.min(7)).min(Duration::from_secs(10));
                    weir_core::runtime::blocking(|| std::thread::sleep(pause));
                }
                Err(e) => return Err(CoreError::Config(format!("redis table ({server}): {e}"))),
            }
        };
        let mut rows = Vec::new();
        for (k, pair) in keys.iter().zip(answers.chunks(2)) {
            let exists: i64 = redis::from_redis_value_ref(&pair[0]).unwrap_or(0);
            if exists == 0 {
                continue;
            }
            let values: Vec<Option<String>> = redis::from_redis_value_ref(&pair[1]).unwrap_or_default();
            let row = self
                .spec
                .schema
                .fields()
                .iter()
                .zip(values)
                .map(|(f, v)| self.parse(f.name(), f.data_type(), v))
                .collect();
            rows.push((k.clone(), row));
        }
        Ok(rows)
    }
}
