//! Weir: a real-time stream-processing engine that moves Arrow micro-batches through a
//! dataflow of operators.
//!
//! This crate is the front door: the [`Pipeline`] builder (whose settings are the YAML form,
//! one to one), planning and running, the metrics endpoint, and a [`prelude`].
//!
//! ```no_run
//! use weir::prelude::*;
//!
//! # async fn demo() -> weir::Result<()> {
//! let mut p = Pipeline::new("w2");
//! p.source(SourceConfig::new("events", SourceConnector::File(FileSourceSettings::new("events.jsonl", FormatSpec::Json))))
//!     .filter("hot", "readings.temp > 25.0")
//!     .select("cols", ["device_id", "ts", "readings.temp AS temp"])
//!     .sink(SinkConfig::new("out", SinkConnector::File(FileSinkSettings { path: "hot.jsonl".into(), format: FormatSpec::Json })));
//! let summary = p.build()?.run(&RunOptions::default()).await?;
//! println!("{} rows out", summary.sink_rows);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
// Without some connectors, parts of the planning that only they use are unused.
#![cfg_attr(not(all(feature = "kafka", feature = "mqtt")), allow(dead_code, unused_imports))]

pub mod config;
pub mod connector;
pub mod console;
pub mod http;
pub mod live;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod yaml;

pub use pipeline::{BuiltPipeline, CustomStep, Functions, Pipeline, RunOptions};
/// The connectors, for tools built on the engine (`weir dlq replay` reads dead-letter topics).
pub use weir_connectors as connectors;
pub use weir_core::{CoreError, Result};

/// The names most pipelines need.
pub mod prelude {
    pub use crate::config::*;
    pub use crate::pipeline::{BuiltPipeline, CustomStep, Pipeline, RunOptions};
    pub use weir_core::runtime::RunSummary;
    pub use weir_core::time::TimeFormat;
    pub use weir_formats::{CsvOptions, FieldSpec, FieldType, FormatSpec, SchemaSpec};
}
