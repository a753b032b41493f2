//! Sources and sinks written in code and registered with the pipeline
//! ([`crate::Pipeline::source_code`], [`crate::Pipeline::sink_code`]): the Python package's
//! test source and collecting sink.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_core::{Result, SinkFactory, SourceFactory};

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};

/// The settings of a source or sink written in code: none, the code has them. In YAML, `code: {}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSettings {}

impl SourceSettings for CodeSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let fac =
            cx.code.clone().ok_or_else(|| cx.error("the source is `code`, but no source was registered from code"))?;
        cx.no_schema("a source written in code brings its schema")?;
        let schema = fac.schema();
        Ok((fac, schema))
    }
}

impl SinkSettings for CodeSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        cx.code.clone().ok_or_else(|| cx.error("the sink is `code`, but no sink was registered from code"))
    }
}
