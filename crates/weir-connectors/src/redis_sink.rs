//! The Redis sink: each row as a hash of its latest values (`HSET`, a live state table for
//! dashboards; a table's `delete` change removes the hash), a stream entry (`XADD`, trimmed with `MAXLEN ~`), or a message (`PUBLISH`).
//! Each batch is one pipeline of commands, one round trip.
//!
//! Redis has no transactions that outlive a connection, so the sink is at least once: after a
//! crash, the rows since the last checkpoint are written again. `HSET` makes that harmless
//! (the same values again); a stream gets those entries twice; a message published while
//! nobody listened is gone, as Redis pub/sub always is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use weir_core::error::RefusedRow;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};
use weir_formats::JsonValues;

use crate::template::RowTemplate;

/// What the sink does with each row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisSinkCommand {
    /// `HSET <key> <column> <value> ...`: the latest row per key; null values are left out
    /// (the field keeps its earlier value). With a TTL, `EXPIRE` follows.
    Hset {
        /// How long a key lives after its last write.
        ttl: Option<Duration>,
    },
    /// `XADD <key> [MAXLEN ~ n] * ...`: each column a field, or the row as JSON in one field.
    Xadd {
        /// Trim to about this many entries.
        maxlen: Option<u64>,
        /// Put the whole row, as JSON, in this one field.
        json_field: Option<String>,
    },
    /// `PUBLISH <key> <row as JSON>`.
    Publish,
}

/// Settings of a Redis sink.
#[derive(Clone)]
pub struct RedisSinkConfig {
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS).
    pub url: String,
    /// The key, stream or channel: a template of the row's columns, `device:{device_id}`.
    pub key: String,
    /// What to do with each row.
    pub command: RedisSinkCommand,
    /// Schema of the rows.
    pub schema: SchemaRef,
}

impl std::fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("url", &crate::redis_streams::redact_url(&self.url))
            .field("key", &self.key)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// Builds one connection per worker.
#[derive(Debug)]
pub struct RedisSinkFactory {
    cfg: RedisSinkConfig,
    key: RowTemplate,
    client: redis::Client,
    /// Rows written, by all workers.
    rows: Arc<AtomicU64>,
}

impl RedisSinkFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// A URL that does not parse, or a key template naming a column the rows lack.
    pub fn new(cfg: RedisSinkConfig) -> Result<Self> {
        // A hash is written from the rows without a table's `_op` (see `commands`).
        let schema = match cfg.command {
            RedisSinkCommand::Hset { .. } => weir_core::changes::without_change_column(&cfg.schema),
            _ => cfg.schema.clone(),
        };
        let key = RowTemplate::parse(&cfg.key, &schema, "redis sink `key`")?;
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            CoreError::Config(format!("redis sink: `url` ({}): {e}", crate::redis_streams::redact_url(&cfg.url)))
        })?;
        if let RedisSinkCommand::Xadd { maxlen: Some(0), .. } = cfg.command {
            return Err(CoreError::Config("redis sink: `maxlen` must be above 0".into()));
        }
        Ok(Self { cfg, key, client, rows: Arc::default() })
    }
}

impl SinkFactory for RedisSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(RedisSink {
            command: self.cfg.command.clone(),
            key: self.key.clone(),
            client: self.client.clone(),
            server: crate::redis_streams::redact_url(&self.cfg.url),
            conn: None,
            rows: self.rows.clone(),
        }))
    }
}

#[derive(Debug)]
struct RedisSink {
    command: RedisSinkCommand,
    key: RowTemplate,
    client: redis::Client,
    server: String,
    conn: Option<redis::aio::MultiplexedConnection>,
    rows: Arc<AtomicU64>,
}

fn transient(server: &str, e: &redis::RedisError) -> CoreError {
    CoreError::Other { message: format!("redis sink ({server}): {e}"), blame: Blame::External, retry: Retry::Backoff }
}

/// A column's value as Redis stores it: strings as they are, other values as JSON text.
struct Values<'a> {
    cols: Vec<(String, &'a dyn Array, Option<JsonValues<'a>>)>,
}

impl<'a> Values<'a> {
    fn new(rows: &'a RecordBatch) -> Result<Self> {
        let schema = rows.schema_ref();
        let cols = schema
            .fields()
            .iter()
            .zip(rows.columns())
            .map(|(f, c)| {
                let json = match c.data_type() {
                    DataType::Utf8 => None,
                    _ => Some(JsonValues::new(f.name(), c.as_ref()).map_err(crate::fmt_err)?),
                };
                Ok((f.name().clone(), c.as_ref(), json))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cols })
    }

    /// `(column, value)` of row `row`, nulls left out.
    fn fields(&self, row: usize, out: &mut Vec<(String, Vec<u8>)>) {
        out.clear();
        for (name, a, json) in &self.cols {
            if a.is_null(row) {
                continue;
            }
            let v = match json {
                None => a.as_string::<i32>().value(row).as_bytes().to_vec(),
                Some(j) => {
                    let mut v = Vec::new();
                    j.write(row, &mut v);
                    // A JSON string is stored without its quotes.
                    if v.first() == Some(&b'"') {
                        serde_json::from_slice::<String>(&v).map(String::into_bytes).unwrap_or(v)
                    } else {
                        v
                    }
                }
            };
            out.push((name.clone(), v));
        }
    }
}

impl RedisSink {
    /// The batch's commands (built before anything is awaited: the formatters are not `Send`),
    /// the row of each command, and the rows refused already (no key).
    fn commands(&self, rows: &RecordBatch) -> Result<(redis::Pipeline, Vec<usize>, Vec<RefusedRow>)> {
        let mut refused = Vec::new();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // The row of each command, to name a refused one.
        let mut of_command = Vec::new();
        // Changes of a table: a hash keeps the rest without `_op`; a delete removes the hash.
        let (rows, deletes) = match self.command {
            RedisSinkCommand::Hset { .. } => weir_core::changes::split(rows)?,
            _ => (rows.clone(), vec![false; rows.num_rows()]),
        };
        let rows = &rows;
        let keys = self.key.renderer(rows)?;
        let values = Values::new(rows)?;
        let mut key = String::new();
        let mut fields = Vec::new();
        for (row, &delete) in deletes.iter().enumerate() {
            if let Err(reason) = keys.render(row, &mut key) {
                refused.push(RefusedRow { row, reason: format!("redis sink: {reason}") });
                continue;
            }
            match &self.command {
                RedisSinkCommand::Hset { .. } if delete => {
                    pipe.cmd("DEL").arg(&key);
                    of_command.push(row);
                }
                RedisSinkCommand::Hset { ttl } => {
                    values.fields(row, &mut fields);
                    if fields.is_empty() {
                        continue;
                    }
                    let c = pipe.cmd("HSET").arg(&key);
                    for (f, v) in &fields {
                        c.arg(f).arg(v);
                    }
                    of_command.push(row);
                    if let Some(ttl) = ttl {
                        pipe.cmd("PEXPIRE").arg(&key).arg(ttl.as_millis() as u64);
                        of_command.push(row);
                    }
                }
                RedisSinkCommand::Xadd { maxlen, json_field } => {
                    let c = pipe.cmd("XADD").arg(&key);
                    if let Some(m) = maxlen {
                        c.arg("MAXLEN").arg("~").arg(*m);
                    }
                    c.arg("*");
                    match json_field {
                        Some(f) => {
                            c.arg(f).arg(weir_formats::row_to_json(rows, row));
                        }
                        None => {
                            values.fields(row, &mut fields);
                            if fields.is_empty() {
                                // A stream entry needs a field.
                                c.arg("_").arg("");
                            }
                            for (f, v) in &fields {
                                c.arg(f).arg(v);
                            }
                        }
                    }
                    of_command.push(row);
                }
                RedisSinkCommand::Publish => {
                    pipe.cmd("PUBLISH").arg(&key).arg(weir_formats::row_to_json(rows, row));
                    of_command.push(row);
                }
            }
        }
        Ok((pipe, of_command, refused))
    }
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (pipe, of_command, mut refused) = self.commands(rows)?;
        if !of_command.is_empty() {
            let conn = match &mut self.conn {
                Some(c) => c,
                None => {
                    let c = self
                        .client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| transient(&self.server, &e))?;
                    self.conn.insert(c)
                }
            };
            let results: Vec<redis::RedisResult<redis::Value>> = match pipe.query_async(conn).await {
                Ok(r) => r,
                Err(e) => {
                    // The connection is in doubt: the next try opens a new one.
                    self.conn = None;
                    return Err(transient(&self.server, &e));
                }
            };
            for (i, r) in results.iter().enumerate() {
                if let Err(e) = r {
                    let row = of_command[i];
                    if refused.last().is_none_or(|r: &RefusedRow| r.row != row) {
                        refused.push(RefusedRow { row, reason: format!("redis refused the row: {e}") });
                    }
                }
            }
        }
        refused.sort_by_key(|r| r.row);
        refused.dedup_by_key(|r| r.row);
        self.rows.fetch_add((rows.num_rows() - refused.len()) as u64, Ordering::Relaxed);
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
        m.set_total(
            "weir_redis_sink_rows_total",
            "Rows written to Redis.",
            &[("key", self.key.as_str())],
            self.rows.load(Ordering::Relaxed) as f64,
        );
    }
}
