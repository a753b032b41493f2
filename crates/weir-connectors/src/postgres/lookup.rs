//! A lookup table in PostgreSQL: rows found by key with one query per batch for all the keys
//! the cache lacks (`WHERE key = ANY($1)`), never one per row, through a cache of a bounded
//! number of keys kept for a while (`cache.size`, `cache.ttl`), found rows and missing keys
//! alike.
//!
//! The join's operator is synchronous; the queries run on a thread of the table's own with a
//! runtime of its own, and the operator waits for the answer (its worker's other tasks move to
//! another thread meanwhile). A query that fails on a lost connection is retried with backoff
//! on a new one, so a database restart holds the join up rather than failing the run.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use tokio_postgres::types::Type;
use weir_core::lookup::LookupTable;
use weir_core::{CoreError, Result};

use crate::lookup_cache::{CacheLimits, CachedTable, Fetch, Value};

use super::copy::{parse_table, quote_ident};

/// What the PostgreSQL table was told.
#[derive(Debug, Clone)]
pub struct PgTableSpec {
    /// Connection URL (as the sink's; `PGPASSWORD` when it has no password).
    pub url: String,
    /// `name` or `schema.name`.
    pub table: String,
    /// The key column(s), matched in order with the rows' key.
    pub key: Vec<String>,
    /// The columns a found row brings; `None` for every column but the key.
    pub columns: Option<Vec<String>>,
    /// Keys held in the cache at most.
    pub cache_size: usize,
    /// How long a key's answer (its row, or that there is none) is kept.
    pub cache_ttl: Duration,
    /// A CA certificate (PEM) to verify the server against, with `sslmode=require`.
    pub ca_file: Option<std::path::PathBuf>,
}

/// A question for the table's thread: these keys, answer here.
type Ask = (Vec<String>, mpsc::Sender<Result<Vec<(String, Vec<Value>)>>>);

/// Asks the table's thread.
#[derive(Debug)]
struct PgRows {
    ask: Mutex<mpsc::Sender<Ask>>,
    _thread: std::thread::JoinHandle<()>,
}

/// Opens a table in PostgreSQL ([module docs](self)), behind its cache: connects, reads the
/// table's columns and starts the table's thread.
///
/// # Errors
/// The server cannot be reached, the table or a column does not exist, or a column's type is
/// not one the join reads (integers, floating point, boolean, text).
pub fn open(spec: PgTableSpec) -> Result<Arc<dyn LookupTable>> {
    let (pg, tls) = super::connect_config(&spec.url, "postgres table")?;
    let parts = parse_table(&spec.table).map_err(|e| CoreError::Config(format!("postgres table: {e}")))?;
    let table = parts.iter().map(|p| quote_ident(p)).collect::<Vec<_>>().join(".");
    // Everything that awaits runs on the table's thread, with a runtime of its own: the
    // join may be planned and run inside another runtime, which cannot block on one.
    let (ready_tx, ready_rx) = mpsc::channel::<Result<SchemaRef>>();
    let (tx, rx) = mpsc::channel::<Ask>();
    let described = spec.clone();
    let thread = std::thread::Builder::new()
        .name("weir-pg-lookup".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(CoreError::io("postgres table: starting its runtime", e)));
                    return;
                }
            };
            let ca = described.ca_file.clone();
            match rt.block_on(describe(&pg, tls, &described, &table)) {
                Ok((out, sql)) => {
                    let _ = ready_tx.send(Ok(out));
                    serve(rt, pg, tls, ca, sql, rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| CoreError::io("postgres table: starting its thread", e))?;
    let out = weir_core::runtime::blocking(|| ready_rx.recv())
        .map_err(|_| CoreError::Internal("postgres table: its thread stopped".into()))??;
    let limits = CacheLimits { size: spec.cache_size, ttl: spec.cache_ttl };
    Ok(CachedTable::new(PgRows { ask: Mutex::new(tx), _thread: thread }, out, limits))
}

/// Reads the table's columns and types: the schema of what a found row brings, and the query.
async fn describe(
    pg: &tokio_postgres::Config,
    tls: bool,
    spec: &PgTableSpec,
    table: &str,
) -> Result<(SchemaRef, String)> {
    let what = format!("postgres table `{}`", spec.table);
    let conn = super::open_client(pg, tls, spec.ca_file.as_deref()).await?;
    let stmt = conn
        .client
        .prepare(&format!("SELECT * FROM {table} LIMIT 0"))
        .await
        .map_err(|e| CoreError::Config(format!("{what}: {}", super::describe(&e))))?;
    let columns: Vec<(String, Type)> =
        stmt.columns().iter().map(|c| (c.name().to_string(), c.type_().clone())).collect();
    let have = || columns.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    let find = |n: &str| {
        columns
            .iter()
            .find(|(c, _)| c == n)
            .cloned()
            .ok_or_else(|| CoreError::Config(format!("{what} has no column `{n}`; it has {}", have())))
    };
    let keys = spec.key.iter().map(|k| find(k)).collect::<Result<Vec<_>>>()?;
    let wanted: Vec<String> = match &spec.columns {
        Some(c) => c.clone(),
        None => columns.iter().map(|(n, _)| n.clone()).filter(|n| !spec.key.contains(n)).collect(),
    };
    let mut fields = Vec::new();
    let mut types = Vec::new();
    for n in &wanted {
        let (_, t) = find(n)?;
        let dt = arrow_type(&t).ok_or_else(|| {
                CoreError::Config(format!(
                    "{what}: column `{n}` is {t}, which a lookup does not read (integers, real, double precision, numeric, boolean, text, varchar)"
                ))
            })?;
        fields.push(Field::new(n, dt, true));
        types.push(t);
    }
    // Keys are compared as text on this side; the server compares them in the key's own
    // type, so its index serves.
    let key_text = keys.iter().map(|(k, _)| format!("{}::text", quote_ident(k))).collect::<Vec<_>>();
    let key_expr =
        if key_text.len() == 1 { key_text[0].clone() } else { format!("concat_ws(E'\\x1f', {})", key_text.join(", ")) };
    let select = wanted
        .iter()
        .zip(&types)
        .map(|(n, t)| match arrow_type(t) {
            Some(DataType::Float64) if *t == Type::NUMERIC => format!("{}::float8", quote_ident(n)),
            _ => quote_ident(n),
        })
        .collect::<Vec<_>>();
    let filter = if keys.len() == 1 {
        let (k, t) = &keys[0];
        format!("{} = ANY($1::text[]::{}[])", quote_ident(k), t.name())
    } else {
        format!("{key_expr} = ANY($1::text[])")
    };
    let sql = format!(
        "SELECT {key_expr}{}{} FROM {table} WHERE {filter}",
        if select.is_empty() { "" } else { ", " },
        select.join(", ")
    );
    Ok((Arc::new(Schema::new(fields)), sql))
}

/// The Arrow type a PostgreSQL column is read as.
fn arrow_type(t: &Type) -> Option<DataType> {
    Some(match *t {
        Type::INT2 | Type::INT4 | Type::INT8 => DataType::Int64,
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => DataType::Float64,
        Type::BOOL => DataType::Boolean,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => DataType::Utf8,
        _ => return None,
    })
}

/// The table's thread: answers questions until the table is dropped, reconnecting with backoff
/// when the connection is lost.
fn serve(
    rt: tokio::runtime::Runtime,
    pg: tokio_postgres::Config,
    tls: bool,
    ca: Option<std::path::PathBuf>,
    sql: String,
    rx: mpsc::Receiver<Ask>,
) {
    let mut conn: Option<super::Conn> = None;
    while let Ok((keys, reply)) = rx.recv() {
        let answer = rt.block_on(async {
            let mut failures = 0u32;
            loop {
                if conn.is_none() {
                    match super::open_client(&pg, tls, ca.as_deref()).await {
                        Ok(c) => conn = Some(c),
                        Err(e) if e.retry() == weir_core::Retry::Backoff => {
                            failures += 1;
                            backoff(failures, &e).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let Some(c) = conn.as_ref() else { continue };
                match c.client.query(&sql, &[&keys]).await {
                    Ok(rows) => return rows.iter().map(row_values).collect::<Result<Vec<_>>>(),
                    Err(e) => {
                        let e = super::classify(&e).into_error("postgres table: looking up keys");
                        if e.retry() != weir_core::Retry::Backoff {
                            return Err(e);
                        }
                        // Lost (a restart, a network fault): again on a new connection.
                        conn = None;
                        failures += 1;
                        backoff(failures, &e).await;
                    }
                }
            }
        });
        let _ = reply.send(answer);
    }
}

async fn backoff(failures: u32, e: &CoreError) {
    if failures == 1 || failures.is_power_of_two() {
        tracing::warn!(error = %e, failures, "PostgreSQL lookup table unreachable; retrying.");
    }
    tokio::time::sleep(Duration::from_millis(100).saturating_mul(1 << failures.min(7)).min(Duration::from_secs(10)))
        .await;
}

/// A row of the answer: its key (as text) and its values.
fn row_values(row: &tokio_postgres::Row) -> Result<(String, Vec<Value>)> {
    let err = |e: tokio_postgres::Error| CoreError::Config(format!("postgres table: reading a row: {e}"));
    let key: String = row.try_get(0).map_err(err)?;
    let mut values = Vec::with_capacity(row.len() - 1);
    for (i, c) in row.columns().iter().enumerate().skip(1) {
        let v = match *c.type_() {
            Type::INT2 => row.try_get::<_, Option<i16>>(i).map_err(err)?.map(|v| Value::Int(v.into())),
            Type::INT4 => row.try_get::<_, Option<i32>>(i).map_err(err)?.map(|v| Value::Int(v.into())),
            Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(err)?.map(Value::Int),
            Type::FLOAT4 => row.try_get::<_, Option<f32>>(i).map_err(err)?.map(|v| Value::Float(v.into())),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map_err(err)?.map(Value::Float),
            Type::BOOL => row.try_get::<_, Option<bool>>(i).map_err(err)?.map(Value::Bool),
            _ => row.try_get::<_, Option<String>>(i).map_err(err)?.map(Value::Text),
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok((key, values))
}

impl Fetch for PgRows {
    fn fetch(&self, keys: &[String]) -> Result<Vec<(String, Vec<Value>)>> {
        let (tx, rx) = mpsc::channel();
        self.ask
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send((keys.to_vec(), tx))
            .map_err(|_| CoreError::Internal("postgres table: its thread stopped".into()))?;
        weir_core::runtime::blocking(|| rx.recv())
            .map_err(|_| CoreError::Internal("postgres table: its thread stopped".into()))?
    }
}
