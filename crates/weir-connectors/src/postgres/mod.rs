//! The PostgreSQL sink: rows appended to a table by binary `COPY`, or kept as the latest row
//! per key (`INSERT ... ON CONFLICT (key) DO UPDATE` from a staging table the rows are copied
//! into).
//!
//! **At least once** (no checkpoints): each batch is one transaction on the worker's own
//! connection. **Exactly once** (with checkpoints): the rows of checkpoint `n`, from every
//! worker of the process, go into one transaction held open on a connection of their own; it
//! commits when checkpoint `n` is complete, together with a row of a progress table that says
//! `n` is written. A crash before that commit loses the transaction with its connection, and
//! recovery restores the checkpoint the progress table names ([`Committer::visible`]), so the
//! input after it is processed again and its rows written once. A lost connection while a
//! checkpoint's transaction is open stops the run and starts it again from the last checkpoint
//! ([`CoreError::Restart`]) for the same reason.
//!
//! A row the database refuses (a constraint, a value out of range) is found by halving the
//! batch under savepoints and goes to the dead-letter output with the server's message; the
//! rest of the batch is written.

mod copy;
pub mod lookup;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use futures::SinkExt as _;
use tokio_postgres::Client;
use weir_core::checkpoint::Epoch;
use weir_core::error::RefusedRow;
use weir_core::metrics::ConnectorMetrics;
use weir_core::runtime::RetryPolicy;
use weir_core::task::SpawnedTask;
use weir_core::{Blame, Committer, CoreError, Result, Retry, Sink, SinkFactory, Visible};

pub(crate) use copy::PgType;
use copy::{parse_table, quote_ident};

/// How rows land in the table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PostgresWrite {
    /// Every row appended (binary `COPY`).
    #[default]
    Append,
    /// The latest row per key: a row whose key is in the table replaces it. The table needs a
    /// primary key or unique index on exactly these columns (a created table gets one).
    Upsert {
        /// The key columns.
        key: Vec<String>,
    },
}

/// Where an exactly-once sink records its committed checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresProgress {
    /// The table (made when missing) with one row per sink: its key and its last committed
    /// checkpoint.
    pub table: String,
    /// This sink's row: the same each time the pipeline starts again, and different for every
    /// pipeline writing to the database.
    pub key: String,
}

/// Settings of a PostgreSQL sink.
#[derive(Clone)]
pub struct PostgresSinkConfig {
    /// A connection URL (`postgres://user@host:5432/db?sslmode=require`) or libpq key-value
    /// string. Without a password in it, `PGPASSWORD` is used when set.
    pub url: String,
    /// The table: `name` or `schema.name`; unquoted parts fold to lower case, as in SQL.
    pub table: String,
    /// Append or upsert.
    pub write: PostgresWrite,
    /// Create the table from the rows' schema when it does not exist.
    pub create_table: bool,
    /// Schema of the rows.
    pub schema: SchemaRef,
    /// Exactly once, under checkpoints; `None` for at least once.
    pub exactly_once: Option<PostgresProgress>,
    /// PEM file of certificate authorities trusted besides the system's, for TLS.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSinkConfig")
            .field("url", &redact(&self.url))
            .field("table", &self.table)
            .field("write", &self.write)
            .field("create_table", &self.create_table)
            .field("exactly_once", &self.exactly_once)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced by `***` (URL or `password=` key-value form).
pub fn redact(url: &str) -> String {
    if url.contains("://") {
        return crate::redis_streams::redact_url(url);
    }
    url.split_whitespace()
        .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What every instance of a sink shares: settings, the table's column plan (read once), and
/// figures.
#[derive(Debug)]
struct Shared {
    cfg: PostgresSinkConfig,
    pg: tokio_postgres::Config,
    tls: bool,
    table: String,
    plan: tokio::sync::OnceCell<Arc<Plan>>,
    stats: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    rows: AtomicU64,
    refused: AtomicU64,
    commits: AtomicU64,
    commit_us: AtomicU64,
    restarts: AtomicU64,
}

/// How the rows' columns are written: the table's type for each, and the statements.
#[derive(Debug)]
struct Plan {
    types: Vec<PgType>,
    names: Vec<String>,
    /// `COPY <table or staging table> (...) FROM STDIN (FORMAT binary)`.
    copy: String,
    upsert: Option<Upsert>,
}

#[derive(Debug)]
struct Upsert {
    /// Makes the connection's staging table of keys to delete.
    delete_staging: String,
    /// `COPY` of keys into it.
    delete_copy: String,
    /// Deletes the staged keys from the table, then empties the staging table.
    delete: String,
    /// The key columns' types and names, for encoding the keys to delete.
    key_types: Vec<PgType>,
    key_names: Vec<String>,
    /// Makes the connection's staging table (temporary, so each connection has its own).
    staging: String,
    /// Moves the staging table's rows into the table, then empties it.
    merge: String,
    /// Indices of the key columns among the rows' columns.
    key: Vec<usize>,
}

/// The staging table of upserts, one per connection.
const STAGING: &str = "weir_upsert_staging";
/// The staging table of keys to delete (changes with `_op: delete`), one per connection.
const DELETE_STAGING: &str = "weir_delete_staging";

/// A connection: the client, and the task that drives its socket (ended with it).
struct Conn {
    client: Client,
    _driver: SpawnedTask<()>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("closed", &self.client.is_closed()).finish()
    }
}

/// Why a statement failed, as the sink acts on it.
enum Failure {
    /// The rows: a constraint or a value (SQLSTATE classes 22 and 23). Halve and find them.
    Rows(String),
    /// The connection or the server's state: retry after a while.
    Transient(String),
    /// The table, permissions or settings: retrying will not help.
    Fatal(String),
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            if let Some(h) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(h);
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

fn classify(e: &tokio_postgres::Error) -> Failure {
    let msg = describe(e);
    match e.as_db_error() {
        Some(db) => match &db.code().code()[..2] {
            "22" | "23" => Failure::Rows(msg),
            // Connection, resources, operator intervention, serialization and deadlocks.
            "08" | "53" | "57" | "40" => Failure::Transient(msg),
            _ => Failure::Fatal(msg),
        },
        // The client's own settings (a password the server asks for and nobody gave) will not
        // change by waiting.
        None if msg.starts_with("invalid configuration") => Failure::Fatal(msg),
        // A certificate that does not verify, or a server without TLS, stays so.
        None if msg.contains("TLS") || msg.contains("certificate") => Failure::Fatal(msg),
        None => Failure::Transient(msg),
    }
}

impl Failure {
    fn into_error(self, what: &str) -> CoreError {
        match self {
            Self::Rows(m) | Self::Fatal(m) => {
                CoreError::Other { message: format!("postgres: {what}: {m}"), blame: Blame::User, retry: Retry::Never }
            }
            Self::Transient(m) => CoreError::Other {
                message: format!("postgres: {what}: {m}"),
                blame: Blame::External,
                retry: Retry::Backoff,
            },
        }
    }
}

fn fail(what: &str) -> impl Fn(tokio_postgres::Error) -> CoreError + '_ {
    move |e| classify(&e).into_error(what)
}

/// The connection settings of `url` (`what` names the user in errors): the password from
/// `PGPASSWORD` when the URL has none, a 10 s connect timeout, and whether to use TLS.
fn connect_config(url: &str, what: &str) -> Result<(tokio_postgres::Config, bool)> {
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e| CoreError::Config(format!("{what}: `url` ({}): {e}", redact(url))))?;
    if pg.get_password().is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            pg.password(p);
        }
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    // TLS only when the URL asks for it (libpq's default, `prefer`, would try it against
    // any server and fail on one whose certificate cannot be verified).
    let tls = url.contains("sslmode=require") || url.contains("sslmode=prefer");
    if !tls {
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    Ok((pg, tls))
}

/// `host/database` of a connection's settings, for errors and logs.
fn server_of(pg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!("{}/{}", hosts.join(","), pg.get_dbname().unwrap_or(""))
}

/// A connection with its driver task (which ends with it).
async fn open_client(pg: &tokio_postgres::Config, tls: bool, ca_file: Option<&std::path::Path>) -> Result<Conn> {
    let what = format!("connecting to {}", server_of(pg));
    let driver = |r: std::result::Result<(), tokio_postgres::Error>| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "PostgreSQL connection ended.");
        }
    };
    Ok(if tls {
        let tls = tls_connector(ca_file)?;
        let (client, conn) = pg.connect(tls).await.map_err(fail(&what))?;
        Conn { client, _driver: SpawnedTask::spawn(async move { driver(conn.await) }) }
    } else {
        let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(fail(&what))?;
        Conn { client, _driver: SpawnedTask::spawn(async move { driver(conn.await) }) }
    })
}

impl Shared {
    fn new(mut cfg: PostgresSinkConfig) -> Result<Self> {
        let (pg, tls) = connect_config(&cfg.url, "postgres sink")?;
        if matches!(cfg.write, PostgresWrite::Upsert { .. }) {
            // Changes of a table: `_op` says what to do with the row, it is not written.
            cfg.schema = weir_core::changes::without_change_column(&cfg.schema);
        }
        let parts = parse_table(&cfg.table).map_err(|e| CoreError::Config(format!("postgres sink: {e}")))?;
        let table = parts.iter().map(|p| quote_ident(p)).collect::<Vec<_>>().join(".");
        let names: Vec<&str> = cfg.schema.fields().iter().map(|f| f.name().as_str()).collect();
        if let PostgresWrite::Upsert { key } = &cfg.write {
            weir_core::ensure_config!(!key.is_empty(), "postgres sink: `key` is empty");
            for k in key {
                weir_core::ensure_config!(
                    names.contains(&k.as_str()),
                    "postgres sink: key column `{k}` is not in the rows (they have: {})",
                    names.join(", ")
                );
            }
        }
        for f in cfg.schema.fields() {
            weir_core::ensure_config!(
                !cfg.create_table || PgType::for_arrow(f.data_type()).is_some(),
                "postgres sink: `create_table` cannot give column `{}` a type for {}",
                f.name(),
                f.data_type()
            );
        }
        Ok(Self { cfg, pg, tls, table, plan: tokio::sync::OnceCell::new(), stats: Stats::default() })
    }

    fn server(&self) -> String {
        server_of(&self.pg)
    }

    /// A new connection, with the table's plan read (the first time) and the connection's
    /// staging table made.
    async fn open(&self) -> Result<Conn> {
        let client = self.connect().await?;
        let plan = self.plan.get_or_try_init(|| self.read_plan(&client)).await?;
        if let Some(u) = &plan.upsert {
            client.batch_execute(&u.staging).await.map_err(fail("making the staging table"))?;
            client.batch_execute(&u.delete_staging).await.map_err(fail("making the staging table"))?;
        }
        Ok(client)
    }

    async fn connect(&self) -> Result<Conn> {
        open_client(&self.pg, self.tls, self.cfg.ca_file.as_deref()).await
    }

    /// Reads the table's columns (creating the table when asked) and maps the rows onto them.
    async fn read_plan(&self, client: &Client) -> Result<Arc<Plan>> {
        let mut columns = self.columns(client).await?;
        if columns.is_empty() {
            weir_core::ensure_config!(
                self.cfg.create_table,
                "postgres sink: table `{}` does not exist (create it, or set `create_table: true`)",
                self.cfg.table
            );
            client.batch_execute(&self.create_sql()).await.map_err(fail("creating the table"))?;
            tracing::info!(table = %self.table, "Created the PostgreSQL table.");
            columns = self.columns(client).await?;
        }
        let mut types = Vec::new();
        let mut names = Vec::new();
        for f in self.cfg.schema.fields() {
            let Some(typname) = columns.get(f.name()) else {
                let mut have: Vec<&String> = columns.keys().collect();
                have.sort();
                return Err(CoreError::Config(format!(
                    "postgres sink: table `{}` has no column `{}` (it has: {})",
                    self.cfg.table,
                    f.name(),
                    have.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )));
            };
            let t = PgType::from_typname(typname).ok_or_else(|| {
                CoreError::Config(format!(
                    "postgres sink: column `{}` of `{}` has type {typname}, which the sink does not write \
                     (it writes boolean, smallint, integer, bigint, real, double precision, text, varchar, \
                     bytea, timestamp[tz], date, json, jsonb)",
                    f.name(),
                    self.cfg.table
                ))
            })?;
            weir_core::ensure_config!(
                t.accepts(f.data_type()),
                "postgres sink: column `{}` of `{}` is {} but the rows' `{}` is {}",
                f.name(),
                self.cfg.table,
                t.sql(),
                f.name(),
                f.data_type()
            );
            types.push(t);
            names.push(f.name().clone());
        }
        let cols = names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
        let upsert = match &self.cfg.write {
            PostgresWrite::Append => None,
            PostgresWrite::Upsert { key } => {
                let keys = key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
                let set: Vec<String> = names
                    .iter()
                    .filter(|n| !key.contains(n))
                    .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
                    .collect();
                let action =
                    if set.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", set.join(", ")) };
                let key_cols: Vec<usize> = key.iter().filter_map(|k| names.iter().position(|n| n == k)).collect();
                let match_keys =
                    key.iter().map(|k| format!("t.{0} = d.{0}", quote_ident(k))).collect::<Vec<_>>().join(" AND ");
                let u = Upsert {
                    delete_staging: format!(
                        "CREATE TEMP TABLE IF NOT EXISTS {DELETE_STAGING} AS SELECT {keys} FROM {} WITH NO DATA",
                        self.table
                    ),
                    delete_copy: format!("COPY {DELETE_STAGING} ({keys}) FROM STDIN (FORMAT binary)"),
                    delete: format!(
                        "DELETE FROM {t} t USING {DELETE_STAGING} d WHERE {match_keys}; TRUNCATE {DELETE_STAGING}",
                        t = self.table
                    ),
                    key_types: key_cols.iter().map(|&i| types[i]).collect(),
                    key_names: key_cols.iter().map(|&i| names[i].clone()).collect(),
                    staging: format!(
                        "CREATE TEMP TABLE IF NOT EXISTS {STAGING} AS SELECT {cols} FROM {} WITH NO DATA",
                        self.table
                    ),
                    merge: format!(
                        "INSERT INTO {t} ({cols}) SELECT {cols} FROM {STAGING} ON CONFLICT ({keys}) DO {action}; TRUNCATE {STAGING}",
                        t = self.table
                    ),
                    key: key_cols,
                };
                // The server checks `ON CONFLICT` against the table's indexes when it plans
                // the statement: try it on the empty staging table, so a missing unique index
                // is a settings error now rather than at the first row.
                let check = format!("BEGIN; {}; {}; {}; {}; ROLLBACK", u.staging, u.merge, u.delete_staging, u.delete);
                if let Err(e) = client.batch_execute(&check).await {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(CoreError::Config(format!(
                        "postgres sink: upsert into `{}` on ({}): {}",
                        self.cfg.table,
                        key.join(", "),
                        describe(&e)
                    )));
                }
                Some(u)
            }
        };
        let into = if upsert.is_some() { STAGING.to_string() } else { self.table.clone() };
        Ok(Arc::new(Plan { types, names, copy: format!("COPY {into} ({cols}) FROM STDIN (FORMAT binary)"), upsert }))
    }

    async fn columns(&self, client: &Client) -> Result<HashMap<String, String>> {
        let rows = client
            .query(
                "SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.table],
            )
            .await
            .map_err(fail("reading the table's columns"))?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect())
    }

    fn create_sql(&self) -> String {
        let mut cols: Vec<String> = self
            .cfg
            .schema
            .fields()
            .iter()
            .map(|f| {
                let t = PgType::for_arrow(f.data_type()).map_or("text", PgType::sql);
                let null = if f.is_nullable() { "" } else { " NOT NULL" };
                format!("{} {t}{null}", quote_ident(f.name()))
            })
            .collect();
        if let PostgresWrite::Upsert { key } = &self.cfg.write {
            cols.push(format!("PRIMARY KEY ({})", key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")));
        }
        format!("CREATE TABLE IF NOT EXISTS {} ({})", self.table, cols.join(", "))
    }

    /// Writes `rows` inside the connection's open transaction. Rows the server (or the
    /// encoding) refuses come back; the others are written. `own` says the transaction holds
    /// nothing else: the whole batch is then tried without a savepoint (two round trips fewer),
    /// and a refusal rolls the transaction back and begins it again before the halving.
    async fn insert(&self, client: &Client, rows: &RecordBatch, own: bool) -> Result<Vec<RefusedRow>> {
        let plan = self.plan.get().ok_or_else(|| CoreError::Internal("postgres: no plan before a write".into()))?;
        // Changes of a table: the same rows without `_op`, and which of them delete their key.
        let (rows, deletes) = match &plan.upsert {
            Some(_) => weir_core::changes::split(rows)?,
            None => (rows.clone(), Vec::new()),
        };
        let rows = &rows;
        let mut refused = Vec::new();
        let mut keep = vec![true; rows.num_rows()];
        // The encoding that finds the values a column cannot hold is also the first COPY's.
        let (encoded, bad) = copy::encode(rows, &plan.types, &plan.names);
        for b in bad {
            keep[b.row] = false;
            refused.push(RefusedRow { row: b.row, reason: format!("postgres sink: {}", b.reason) });
        }
        if let Some(u) = &plan.upsert {
            // One statement cannot update a row twice: of several rows with one key, the last wins.
            last_per_key(rows, &u.key, &mut keep)?;
            // A key whose last change deletes it goes, and is not upserted.
            let gone: Vec<u32> = (0..rows.num_rows()).filter(|&r| keep[r] && deletes[r]).map(|r| r as u32).collect();
            if !gone.is_empty() {
                for &r in &gone {
                    keep[r as usize] = false;
                }
                let keys = arrow_select::take::take_record_batch(rows, &arrow_array::UInt32Array::from(gone))?
                    .project(&u.key)?;
                let (bytes, _) = copy::encode(&keys, &u.key_types, &u.key_names);
                let go = async {
                    let sink = client.copy_in::<_, Bytes>(&u.delete_copy).await?;
                    futures::pin_mut!(sink);
                    sink.send(Bytes::from(bytes)).await?;
                    sink.finish().await?;
                    client.batch_execute(&u.delete).await
                };
                go.await.map_err(fail("deleting rows"))?;
            }
        }
        let index: Vec<usize> = (0..rows.num_rows()).filter(|&r| keep[r]).collect();
        if index.is_empty() {
            return Ok(refused);
        }
        let (rows, mut whole) = if index.len() == rows.num_rows() {
            (rows.clone(), Some(encoded))
        } else {
            (arrow_select::filter::filter_record_batch(rows, &BooleanArray::from(keep))?, None)
        };
        // Rows `start..start + len` as COPY data: the first encoding when it is the whole batch.
        let mut bytes = |start: usize, len: usize| match whole.take().filter(|_| len == rows.num_rows()) {
            Some(b) => b,
            None => copy::encode(&rows.slice(start, len), &plan.types, &plan.names).0,
        };
        // Whole, or halves under savepoints until each refused row stands alone.
        let mut todo = vec![(0, rows.num_rows())];
        let mut failed = 0;
        if own {
            match self.copy(client, plan, bytes(0, rows.num_rows())).await {
                Ok(()) => todo.clear(),
                Err(Failure::Rows(_)) => {
                    client.batch_execute("ROLLBACK; BEGIN").await.map_err(fail("writing rows"))?;
                }
                Err(f) => return Err(f.into_error("writing rows")),
            }
        }
        while let Some((start, len)) = todo.pop() {
            client.batch_execute("SAVEPOINT weir_rows").await.map_err(fail("writing rows"))?;
            match self.copy(client, plan, bytes(start, len)).await {
                Ok(()) => client.batch_execute("RELEASE SAVEPOINT weir_rows").await.map_err(fail("writing rows"))?,
                Err(Failure::Rows(reason)) => {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT weir_rows; RELEASE SAVEPOINT weir_rows")
                        .await
                        .map_err(fail("writing rows"))?;
                    if len == 1 {
                        failed += 1;
                        refused.push(RefusedRow {
                            row: index[start],
                            reason: format!("postgres refused the row: {reason}"),
                        });
                    } else {
                        let half = len / 2;
                        todo.push((start + half, len - half));
                        todo.push((start, half));
                    }
                }
                Err(f) => return Err(f.into_error("writing rows")),
            }
        }
        self.stats.rows.fetch_add((rows.num_rows() - failed) as u64, Ordering::Relaxed);
        self.stats.refused.fetch_add(refused.len() as u64, Ordering::Relaxed);
        refused.sort_by_key(|r| r.row);
        Ok(refused)
    }

    /// Copies rows encoded by [`copy::encode`] (their values were checked there), and merges
    /// them into the table for an upsert.
    async fn copy(&self, client: &Client, plan: &Plan, bytes: Vec<u8>) -> std::result::Result<(), Failure> {
        let go = async {
            let sink = client.copy_in::<_, Bytes>(&plan.copy).await?;
            futures::pin_mut!(sink);
            sink.send(Bytes::from(bytes)).await?;
            sink.finish().await?;
            if let Some(u) = &plan.upsert {
                client.batch_execute(&u.merge).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        go.await.map_err(|e| classify(&e))
    }

    fn report(&self, m: &ConnectorMetrics) {
        let l = [("table", self.cfg.table.as_str())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        m.set_total(
            "weir_postgres_rows_total",
            "Rows written to PostgreSQL (committed or in an open transaction).",
            &l,
            get(&self.stats.rows),
        );
        m.set_total(
            "weir_postgres_rows_refused_total",
            "Rows PostgreSQL refused, sent to the dead-letter output.",
            &l,
            get(&self.stats.refused),
        );
        m.set_total(
            "weir_postgres_checkpoint_commits_total",
            "Checkpoint transactions committed (exactly once).",
            &l,
            get(&self.stats.commits),
        );
        m.set_total(
            "weir_postgres_commit_seconds_total",
            "Time spent committing checkpoint transactions.",
            &l,
            get(&self.stats.commit_us) / 1e6,
        );
        m.set_total(
            "weir_postgres_lost_transactions_total",
            "Checkpoint transactions lost with their connection (the run started again from its last checkpoint).",
            &l,
            get(&self.stats.restarts),
        );
    }
}

/// Of several kept rows with one key, keeps only the last (`keep` marks the rows kept).
fn last_per_key(rows: &RecordBatch, key: &[usize], keep: &mut [bool]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let fmt = arrow_cast::display::FormatOptions::default();
    let formatters = key
        .iter()
        .map(|&i| arrow_cast::display::ArrayFormatter::try_new(rows.column(i).as_ref(), &fmt))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for r in (0..rows.num_rows()).rev() {
        if !keep[r] {
            continue;
        }
        let key: Vec<String> = formatters.iter().map(|f| f.value(r).to_string()).collect();
        if !seen.insert(key) {
            keep[r] = false;
        }
    }
    Ok(())
}

/// Verifies the server's certificate against the system's authorities and `ca_file`.
fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| CoreError::io(format!("reading `ca_file` {}", path.display()), e))?;
        let mut n = 0;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| CoreError::Config(format!("postgres sink: `ca_file` {}: {e}", path.display())))?;
            roots.add(c).map_err(|e| CoreError::Config(format!("postgres sink: `ca_file` {}: {e}", path.display())))?;
            n += 1;
        }
        weir_core::ensure_config!(n > 0, "postgres sink: `ca_file` {} holds no certificate", path.display());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| CoreError::Internal(format!("postgres TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Builds the sink's instances: each worker with its own connection (at least once), or all
/// of them writing into the process's checkpoint transactions (exactly once).
#[derive(Debug)]
pub struct PostgresSinkFactory {
    shared: Arc<Shared>,
    txns: Option<Arc<Transactions>>,
}

impl PostgresSinkFactory {
    /// Checks the settings (no I/O: the table is read at the first write, or at recovery).
    ///
    /// # Errors
    /// A URL that does not parse, a bad table name, key columns the rows lack.
    pub fn new(cfg: PostgresSinkConfig) -> Result<Self> {
        let progress = cfg.exactly_once.clone();
        let shared = Arc::new(Shared::new(cfg)?);
        let txns = match progress {
            Some(p) => {
                let parts =
                    parse_table(&p.table).map_err(|e| CoreError::Config(format!("postgres sink: progress {e}")))?;
                let table = parts.iter().map(|p| quote_ident(p)).collect::<Vec<_>>().join(".");
                Some(Arc::new(Transactions {
                    shared: shared.clone(),
                    key: p.key,
                    progress: table,
                    state: tokio::sync::Mutex::new(TxState::default()),
                    ensured: AtomicBool::new(false),
                }))
            }
            None => None,
        };
        Ok(Self { shared, txns })
    }
}

impl SinkFactory for PostgresSinkFactory {
    fn create(&self, _worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(PostgresSink {
            shared: self.shared.clone(),
            txns: self.txns.clone(),
            client: None,
            epoch: Epoch(0),
        }))
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        self.txns.clone().map(|t| t as Arc<dyn Committer>)
    }
}

/// One worker's instance.
#[derive(Debug)]
struct PostgresSink {
    shared: Arc<Shared>,
    txns: Option<Arc<Transactions>>,
    /// At least once: this worker's connection.
    client: Option<Conn>,
    epoch: Epoch,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions")
            .field("table", &self.shared.table)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Sink for PostgresSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let refused = match self.txns.clone() {
            Some(t) => t.write(self.epoch, rows).await?,
            None => {
                let client = match self.client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => self.shared.open().await?,
                };
                let res = async {
                    client.batch_execute("BEGIN").await.map_err(fail("writing rows"))?;
                    let refused = self.shared.insert(&client, rows, true).await?;
                    client.batch_execute("COMMIT").await.map_err(fail("committing rows"))?;
                    Ok::<_, CoreError>(refused)
                }
                .await;
                match res {
                    Ok(r) => {
                        self.client = Some(client);
                        r
                    }
                    Err(e) => {
                        // A failed transaction is rolled back with the connection dropped.
                        if !client.is_closed() && e.retry() == Retry::Never {
                            let _ = client.batch_execute("ROLLBACK").await;
                            self.client = Some(client);
                        }
                        return Err(e);
                    }
                }
            }
        };
        if refused.is_empty() {
            Ok(())
        } else {
            Err(CoreError::Refused(refused))
        }
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }

    async fn begin(&mut self, epoch: Epoch) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }

    fn report(&self, metrics: &ConnectorMetrics) {
        self.shared.report(metrics);
    }
}

/// Exactly once: the open transaction of each checkpoint, on a connection of its own, and the
/// committer that ends them.
struct Transactions {
    shared: Arc<Shared>,
    /// This sink's row in the progress table.
    key: String,
    /// The progress table, quoted.
    progress: String,
    state: tokio::sync::Mutex<TxState>,
    /// The progress table is known to exist.
    ensured: AtomicBool,
}

#[derive(Default)]
struct TxState {
    open: BTreeMap<u64, Arc<tokio::sync::Mutex<Tx>>>,
    idle: Vec<Conn>,
}

struct Tx {
    client: Conn,
    /// Rows written into it: a transaction lost before any is no loss.
    rows: u64,
}

impl Transactions {
    /// The open transaction of checkpoint `epoch`, begun on an idle or new connection.
    async fn tx(&self, epoch: Epoch) -> Result<Arc<tokio::sync::Mutex<Tx>>> {
        let mut st = self.state.lock().await;
        if let Some(t) = st.open.get(&epoch.0) {
            return Ok(t.clone());
        }
        let client = loop {
            match st.idle.pop() {
                Some(c) if !c.is_closed() => break c,
                Some(_) => {}
                None => break self.shared.open().await?,
            }
        };
        client.batch_execute("BEGIN").await.map_err(fail("beginning a checkpoint's transaction"))?;
        let t = Arc::new(tokio::sync::Mutex::new(Tx { client, rows: 0 }));
        st.open.insert(epoch.0, t.clone());
        Ok(t)
    }

    async fn write(&self, epoch: Epoch, rows: &RecordBatch) -> Result<Vec<RefusedRow>> {
        let t = self.tx(epoch).await?;
        let mut tx = t.lock().await;
        match self.shared.insert(&tx.client, rows, false).await {
            Ok(refused) => {
                tx.rows += (rows.num_rows() - refused.len()) as u64;
                Ok(refused)
            }
            Err(e) if e.retry() == Retry::Backoff => {
                // The transaction is gone with the connection (or the server ended it).
                let had = tx.rows;
                drop(tx);
                self.state.lock().await.open.remove(&epoch.0);
                if had == 0 {
                    return Err(e);
                }
                self.shared.stats.restarts.fetch_add(1, Ordering::Relaxed);
                Err(CoreError::Restart(format!(
                    "the PostgreSQL transaction of checkpoint {} ({had} rows) was lost: {e}",
                    epoch.0
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn ensure_progress(&self, client: &Client) -> Result<()> {
        if self.ensured.load(Ordering::Relaxed) {
            return Ok(());
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (sink text PRIMARY KEY, checkpoint bigint NOT NULL, \
             committed_at timestamptz NOT NULL DEFAULT now())",
            self.progress
        );
        if let Err(e) = client.batch_execute(&sql).await {
            // Two processes creating it at once: one loses the race, and the table is there.
            let raced = e.as_db_error().is_some_and(|d| matches!(d.code().code(), "23505" | "42P07"));
            if !raced {
                return Err(fail("creating the progress table")(e));
            }
        }
        self.ensured.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn record_sql(&self) -> String {
        format!(
            "INSERT INTO {p} AS p (sink, checkpoint) VALUES ($1, $2) ON CONFLICT (sink) DO UPDATE \
             SET checkpoint = EXCLUDED.checkpoint, committed_at = now() WHERE p.checkpoint < EXCLUDED.checkpoint",
            p = self.progress
        )
    }

    /// A connection for the committer's own statements.
    async fn spare(&self) -> Result<Conn> {
        let mut st = self.state.lock().await;
        while let Some(c) = st.idle.pop() {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        drop(st);
        self.shared.open().await
    }

    /// Puts an ended transaction's connection back for a later checkpoint.
    async fn reuse(&self, t: Arc<tokio::sync::Mutex<Tx>>) {
        if let Ok(m) = Arc::try_unwrap(t) {
            let client = m.into_inner().client;
            if !client.is_closed() {
                self.state.lock().await.idle.push(client);
            }
        }
    }

    async fn read_progress(&self) -> Result<Option<u64>> {
        let client = self.spare().await?;
        self.ensure_progress(&client).await?;
        let row = client
            .query_opt(&format!("SELECT checkpoint FROM {} WHERE sink = $1", self.progress), &[&self.key])
            .await
            .map_err(fail("reading the progress table"))?;
        self.state.lock().await.idle.push(client);
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }
}

#[async_trait::async_trait]
impl Committer for Transactions {
    async fn commit(&self, epoch: Epoch) -> Result<()> {
        let started = Instant::now();
        let due: Vec<(u64, Arc<tokio::sync::Mutex<Tx>>)> = {
            let mut st = self.state.lock().await;
            let keys: Vec<u64> = st.open.range(..=epoch.0).map(|(k, _)| *k).collect();
            keys.into_iter().filter_map(|k| st.open.remove(&k).map(|t| (k, t))).collect()
        };
        let sql = self.record_sql();
        let mut recorded = false;
        for (k, t) in due {
            let res = {
                let tx = t.lock().await;
                async {
                    self.ensure_progress(&tx.client).await?;
                    tx.client
                        .execute(&sql, &[&self.key, &(k as i64)])
                        .await
                        .map_err(fail("recording the checkpoint"))?;
                    tx.client.batch_execute("COMMIT").await.map_err(fail("committing the checkpoint's transaction"))
                }
                .await
            };
            if let Err(e) = res {
                // Committed or not, the progress table tells recovery which.
                self.shared.stats.restarts.fetch_add(1, Ordering::Relaxed);
                return Err(CoreError::Restart(format!("committing checkpoint {k} to PostgreSQL failed: {e}")));
            }
            recorded = k == epoch.0;
            self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.reuse(t).await;
        }
        if !recorded {
            // No rows in this checkpoint: record it anyway, so recovery restores it.
            let client = self.spare().await?;
            self.ensure_progress(&client).await?;
            client.execute(&sql, &[&self.key, &(epoch.0 as i64)]).await.map_err(fail("recording the checkpoint"))?;
            self.state.lock().await.idle.push(client);
        }
        self.shared.stats.commit_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn abort_after(&self, epoch: Epoch) -> Result<()> {
        let gone: Vec<Arc<tokio::sync::Mutex<Tx>>> = {
            let mut st = self.state.lock().await;
            let keys: Vec<u64> = st.open.range(epoch.0 + 1..).map(|(k, _)| *k).collect();
            keys.into_iter().filter_map(|k| st.open.remove(&k)).collect()
        };
        for t in gone {
            let ok = t.lock().await.client.batch_execute("ROLLBACK").await.is_ok();
            if ok {
                self.reuse(t).await;
            }
        }
        Ok(())
    }

    fn records_progress(&self) -> bool {
        true
    }

    async fn visible(&self) -> Result<Visible> {
        // Recovery cannot choose a checkpoint without this answer: wait for the server.
        let policy = RetryPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        };
        let mut failures = 0u32;
        loop {
            match self.read_progress().await {
                Ok(Some(e)) => return Ok(Visible::Through(Epoch(e))),
                Ok(None) => return Ok(Visible::Nothing),
                Err(e) if e.retry() == Retry::Backoff => {
                    failures += 1;
                    let wait = policy.delay(failures);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(server = %self.shared.server(), error = %e, failures, retry_in_ms = wait.as_millis() as u64, "PostgreSQL unreachable while recovering; retrying.");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
