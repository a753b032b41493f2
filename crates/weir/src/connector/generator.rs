//! The synthetic sensor generator: the embedded default input of the examples and benchmarks.

use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_connectors::{GeneratorConfig, GeneratorFactory};
use weir_core::{Result, SourceFactory};

use super::{SourceCx, SourceSettings};

/// Generator settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSettings {
    /// Number of devices.
    #[serde(default = "default_devices")]
    pub devices: u32,
    /// Events per second; absent for unlimited.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Total events; absent for no limit.
    #[serde(default)]
    pub count: Option<u64>,
    /// Run time; absent for no limit.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Fraction of events that arrive out of order.
    #[serde(default = "default_disorder")]
    pub disorder: f64,
    /// How late an out-of-order event is at most.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
    /// Fraction of events with an injected anomaly.
    #[serde(default = "default_anomaly_rate")]
    pub anomaly_rate: f64,
    /// Random seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Add a `created_us` column (wall clock at creation) for latency measurement.
    #[serde(default)]
    pub stamp_created: bool,
}

fn default_devices() -> u32 {
    1000
}
fn default_disorder() -> f64 {
    0.05
}
fn default_max_delay() -> Duration {
    Duration::from_millis(2000)
}
fn default_anomaly_rate() -> f64 {
    0.0005
}
fn default_seed() -> u64 {
    7
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        Self {
            devices: default_devices(),
            rate: None,
            count: None,
            duration: None,
            disorder: default_disorder(),
            max_delay: default_max_delay(),
            anomaly_rate: default_anomaly_rate(),
            seed: default_seed(),
            stamp_created: false,
        }
    }
}

impl SourceSettings for GeneratorSettings {
    fn build(&self, cx: &SourceCx<'_>) -> Result<(Arc<dyn SourceFactory>, SchemaRef)> {
        cx.no_schema("the generator's schema is fixed")?;
        let fac = GeneratorFactory::new(GeneratorConfig {
            devices: self.devices,
            rate: self.rate,
            count: self.count,
            duration: self.duration,
            disorder: self.disorder,
            max_delay_ms: u32::try_from(self.max_delay.as_millis()).unwrap_or(u32::MAX),
            anomaly_rate: self.anomaly_rate,
            seed: self.seed,
            batch_size: cx.src.batch_size,
            max_linger: cx.src.max_linger,
            stamp_created: self.stamp_created,
        })
        .map_err(|e| e.in_step(&cx.step))?;
        let schema = fac.schema();
        Ok((Arc::new(fac), schema))
    }
}
