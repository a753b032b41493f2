//! Standard input and output, line-delimited.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::{StdinSourceFactory, StdoutSinkFactory};
use weir_core::{Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::default_format;

/// Stdin settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StdinSettings {
    /// Record format (line-delimited).
    #[serde(default = "default_format")]
    pub format: FormatSpec,
}

impl SourceSettings for StdinSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let schema = cx.src.schema.as_ref().map(weir_formats::SchemaSpec::to_arrow).ok_or_else(|| {
            cx.error(format!(
                "source `{}`: stdin needs a declared `schema` (it cannot be read twice to infer one)",
                cx.src.id
            ))
        })?;
        let fac = StdinSourceFactory::new(
            self.format,
            schema.clone(),
            cx.event_time.clone(),
            cx.src.batch_size,
            cx.src.max_linger,
        )?;
        Ok((Arc::new(fac), schema))
    }
}

/// Stdout settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSettings {
    /// Format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
}

impl SinkSettings for StdoutSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        Ok(Arc::new(StdoutSinkFactory::new(self.format, cx.schema.clone())))
    }
}
