//! PostgreSQL: the sink appends rows to a table or keeps the latest row per key, exactly once
//! under checkpoints.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_connectors::postgres::{self as pg, PostgresProgress, PostgresSinkConfig, PostgresSinkFactory, PostgresWrite};
use weir_core::{Result, SinkFactory};

use super::{SinkCx, SinkSettings};

/// PostgreSQL sink settings.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkSettings {
    /// `postgres://user@host:5432/database` (add `?sslmode=require` for TLS) or a libpq
    /// key-value string. A password is best left to `PGPASSWORD`.
    pub url: String,
    /// The table, `name` or `schema.name`.
    pub table: String,
    /// `append` (default: binary COPY) or `upsert` (the latest row per `key`).
    #[serde(default)]
    pub mode: PostgresMode,
    /// `upsert`: the key columns (the table's primary key or a unique index on them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<String>,
    /// Create the table from the rows' schema when missing (with `key` as primary key).
    #[serde(default)]
    pub create_table: bool,
    /// `exactly_once` (the default with checkpoints: a transaction per checkpoint) or
    /// `at_least_once` (a transaction per batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Exactly once: the table recording each sink's last committed checkpoint.
    #[serde(default = "default_progress_table")]
    pub progress_table: String,
    /// Exactly once: this sink's row in it; default `<pipeline>/<sink id>`. Keep it across
    /// restarts; give every pipeline writing to the database its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_key: Option<String>,
    /// Certificate authorities (PEM) trusted for TLS besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_progress_table() -> String {
    "weir_sink_progress".into()
}

/// How the rows land.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresMode {
    /// Every row appended.
    #[default]
    Append,
    /// The latest row per key.
    Upsert,
}

/// A sink's delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Each row once in the committed output, under checkpoints.
    ExactlyOnce,
    /// Each row at least once; after a crash, rows since the last checkpoint again.
    AtLeastOnce,
}

impl std::fmt::Debug for PostgresSinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSinkSettings")
            .field("url", &pg::redact(&self.url))
            .field("table", &self.table)
            .field("mode", &self.mode)
            .field("key", &self.key)
            .field("create_table", &self.create_table)
            .field("delivery", &self.delivery)
            .field("progress_table", &self.progress_table)
            .field("progress_key", &self.progress_key)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl SinkSettings for PostgresSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        let write = match self.mode {
            PostgresMode::Append => {
                if !self.key.is_empty() {
                    return Err(cx.error("postgres sink: `key` is for `mode: upsert`"));
                }
                PostgresWrite::Append
            }
            PostgresMode::Upsert => {
                if self.key.is_empty() {
                    return Err(
                        cx.error("postgres sink: `mode: upsert` needs `key` (the columns of the table's primary key)")
                    );
                }
                PostgresWrite::Upsert { key: self.key.clone() }
            }
        };
        let exactly_once = match (self.delivery, cx.checkpoints) {
            (Some(Delivery::AtLeastOnce), _) | (None, None) => None,
            (Some(Delivery::ExactlyOnce), None) => {
                return Err(cx.error("postgres sink: `delivery: exactly_once` needs `checkpoints`"));
            }
            (_, Some(ck)) => {
                if ck.member.is_some() {
                    return Err(cx.error(
                        "postgres sink: exactly once with `checkpoints.member` (several processes sharing the input) is not supported yet; use `delivery: at_least_once` (with `mode: upsert` it stays idempotent)",
                    ));
                }
                Some(PostgresProgress {
                    table: self.progress_table.clone(),
                    key: self.progress_key.clone().unwrap_or_else(|| format!("{}/{}", cx.pipeline, cx.sink.id)),
                })
            }
        };
        let cfg = PostgresSinkConfig {
            url: self.url.clone(),
            table: self.table.clone(),
            write,
            create_table: self.create_table,
            schema: cx.schema.clone(),
            exactly_once,
            ca_file: self.ca_file.clone(),
        };
        Ok(Arc::new(PostgresSinkFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?))
    }
}
