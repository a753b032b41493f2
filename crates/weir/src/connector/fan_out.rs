//! Several sinks for one result: `sinks: [...]` (or `sink: {id, fan_out: [...]}`) writes every
//! row to each (see [`weir_core::fanout`] for retries, refused rows and checkpoints).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_core::fanout::{FanOutPart, FanOutSinkFactory};
use weir_core::{Result, SinkFactory, StepId};

use super::{SinkConnector, SinkCx, SinkSettings};
use crate::config::{RetryConfig, SinkConfig};

/// The sinks of a fan-out, each as a `sink:` is written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct FanOutSettings(pub Vec<SinkConfig>);

impl SinkSettings for FanOutSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        if self.0.is_empty() {
            return Err(cx.error("the list of sinks is empty"));
        }
        let mut parts = Vec::with_capacity(self.0.len());
        for (i, s) in self.0.iter().enumerate() {
            if self.0[..i].iter().any(|o| o.id == s.id) {
                return Err(cx.error(format!("two sinks in the list are called `{}`", s.id)));
            }
            let not_here = |what: &str| cx.error(format!("sink `{}`: {what}", s.id));
            match &s.connector {
                SinkConnector::FanOut(_) => return Err(not_here("a list of sinks cannot hold another list")),
                SinkConnector::Code(_) => return Err(not_here("a sink written in code cannot be in a list")),
                _ => {}
            }
            if s.retry != RetryConfig::default() {
                return Err(not_here(
                    "`retry` applies to every sink of a list: write `sink: {id: out, retry: {...}, fan_out: [...]}` instead of `sinks:`",
                ));
            }
            if s.latency_column.is_some() {
                return Err(not_here("`latency_column` applies to every sink of a list: set it beside `fan_out`"));
            }
            let part = SinkCx {
                sink: s,
                step: StepId::new(&s.id),
                pipeline: cx.pipeline,
                schema: cx.schema.clone(),
                checkpoints: cx.checkpoints,
                code: None,
                feeds: cx.feeds,
                #[cfg(feature = "kafka")]
                source_offsets: cx.source_offsets.clone(),
                #[cfg(feature = "kafka")]
                create_topic: None,
            };
            parts.push(FanOutPart { id: s.id.clone(), factory: s.connector.build(&part)? });
        }
        Ok(Arc::new(FanOutSinkFactory::new(parts).map_err(|e| e.in_step(&cx.step))?))
    }
}
