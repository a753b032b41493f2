//! Files: the source reads one file, a glob, or a growing file; the sink writes one file, or
//! under checkpoints a folder of part files committed exactly once.

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::{FileSinkFactory, FileSourceConfig, FileSourceFactory, TxFileSinkFactory};
use weir_core::{Result, SinkFactory, SourceFactory};
use weir_formats::FormatSpec;

use super::{SinkCx, SinkSettings, SourceCx, SourceSettings};
use crate::config::default_format;

/// File source settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceSettings {
    /// Path or glob.
    pub path: String,
    /// Record format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
    /// Keep reading the last file as it grows.
    #[serde(default)]
    pub follow: bool,
    /// How often to look for new data when following.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bytes per chunk when splitting files between workers.
    #[serde(default = "default_chunk")]
    pub chunk_size: usize,
}

fn default_poll() -> Duration {
    Duration::from_millis(200)
}
fn default_chunk() -> usize {
    4 << 20
}

impl FileSourceSettings {
    /// Settings for a path with defaults otherwise.
    pub fn new(path: impl Into<String>, format: FormatSpec) -> Self {
        Self { path: path.into(), format, follow: false, poll_interval: default_poll(), chunk_size: default_chunk() }
    }
}

impl SourceSettings for FileSourceSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        let schema = match &cx.src.schema {
            Some(s) => s.to_arrow(),
            None => crate::pipeline::infer_from_file(&self.path, &self.format).map_err(|e| e.in_step(&cx.step))?,
        };
        let cfg = FileSourceConfig {
            path: self.path.clone(),
            format: self.format,
            schema: schema.clone(),
            event_time: cx.event_time.clone(),
            batch_size: cx.src.batch_size,
            chunk_size: self.chunk_size.max(4096),
            follow: self.follow,
            poll_interval: self.poll_interval,
            split: !cx.keep_order,
        };
        let fac = if cx.checking && cx.src.schema.is_some() {
            FileSourceFactory::unresolved(cfg)
        } else {
            FileSourceFactory::new(cfg).map_err(|e| e.in_step(&cx.step))?
        };
        Ok((Arc::new(fac), schema))
    }
}

/// File sink settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkSettings {
    /// Output path (replaced); under checkpoints, a folder of part files.
    pub path: String,
    /// Format.
    #[serde(default = "default_format")]
    pub format: FormatSpec,
}

impl SinkSettings for FileSinkSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        Ok(match cx.checkpoints {
            Some(_) => Arc::new(
                TxFileSinkFactory::new(&self.path, self.format, cx.schema.clone()).map_err(|e| e.in_step(&cx.step))?,
            ),
            None => Arc::new(FileSinkFactory::new(&self.path, self.format, cx.schema.clone())),
        })
    }
}
