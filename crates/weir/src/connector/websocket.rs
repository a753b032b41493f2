//! The live feed: a sink whose rows stream to WebSocket clients of the API port
//! (`GET /ws/<sink id>`; see [`weir_connectors::live_feed`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_connectors::live_feed::{FeedHub, FeedSinkFactory};
use weir_core::{Result, SinkFactory};

use super::{SinkCx, SinkSettings};

/// Live feed settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Batches a client may fall behind before it is dropped (default 64).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_queue() -> usize {
    64
}

impl SinkSettings for WebSocketSettings {
    fn build(&self, cx: &SinkCx<'_>) -> Result<Arc<dyn SinkFactory>> {
        if self.queue == 0 {
            return Err(cx.error("websocket sink: `queue` must be above 0"));
        }
        let hub = Arc::new(FeedHub::new(cx.schema.clone(), self.queue));
        let factory = FeedSinkFactory::new(hub.clone()).map_err(|e| e.in_step(&cx.step))?;
        cx.feeds.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(cx.sink.id.clone(), hub);
        Ok(Arc::new(factory))
    }
}
