//! Weir's built-in operators.
//!
//! Each operator comes as a `…Spec` (settings, checked against the input schema by `plan`)
//! that yields an [`weir_core::OperatorFactory`] plus the output schema; the factory makes one
//! operator per worker. Keyed operators (windows, detectors) run after an exchange on their
//! key, so each instance owns its keys outright and needs no locks.
#![warn(missing_docs)]

pub mod aggregate;
pub mod alerts;
pub mod detect;
pub mod join;
pub mod lookup;
pub mod model;
pub mod relational;
pub mod rules;
mod snapshot;
pub mod table;
pub mod window;

pub use aggregate::{AggFunc, AggSpec};
pub use alerts::{AlertBoard, AlertPolicy, AlertSpec};
pub use detect::EwmaZscoreSpec;
pub use join::{IntervalJoinSpec, JoinKind, TemporalJoinSpec, UnionSpec, WindowJoinSpec};
pub use relational::{FilterSpec, SelectSpec};
pub use rules::{DetectSpec, RuleKind, RuleSpec, DETECTION_COLUMNS};
pub use table::{TableAnswer, TableSpec, TableValues, Tables, CHANGE_COLUMN};
pub use window::{LatePolicy, SideWriter, TimeDomain, WindowKind, WindowSpec};

/// The last segment of a dotted column path: the name a key or value column gets in output.
pub fn leaf_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Finds the field at a dotted path in a schema, descending into structs.
///
/// # Errors
/// If a segment is missing; the message lists every available path.
pub fn field_by_path(schema: &arrow_schema::Schema, path: &str) -> weir_core::Result<arrow_schema::FieldRef> {
    let mut fields = schema.fields().clone();
    let mut found: Option<arrow_schema::FieldRef> = None;
    for part in path.split('.') {
        let f = fields.iter().find(|f| f.name() == part).cloned().ok_or_else(|| {
            weir_core::CoreError::Config(format!(
                "unknown column `{path}`; available: {}",
                all_paths(schema).join(", ")
            ))
        })?;
        if let arrow_schema::DataType::Struct(children) = f.data_type() {
            fields = children.clone();
        } else {
            fields = arrow_schema::Fields::empty();
        }
        found = Some(f);
    }
    found.ok_or_else(|| weir_core::CoreError::Config("empty column path".into()))
}

/// Every column path of a schema, structs expanded (`readings`, `readings.temp`, ...).
pub fn all_paths(schema: &arrow_schema::Schema) -> Vec<String> {
    fn walk(prefix: &str, fields: &arrow_schema::Fields, out: &mut Vec<String>) {
        for f in fields {
            let p = if prefix.is_empty() { f.name().clone() } else { format!("{prefix}.{}", f.name()) };
            out.push(p.clone());
            if let arrow_schema::DataType::Struct(c) = f.data_type() {
                walk(&p, c, out);
            }
        }
    }
    let mut out = Vec::new();
    walk("", schema.fields(), &mut out);
    out
}

/// Counts keys a step forgot (`state_ttl`) and how many it holds now.
pub(crate) fn note_expired(cx: &mut weir_core::OpContext<'_>, gone: usize, live: usize) {
    weir_core::metrics::StepMetrics::add(&cx.metrics.state_evicted, gone as u64);
    cx.metrics.state_keys.store(live as u64, std::sync::atomic::Ordering::Relaxed);
}
