//! Weir's sources and sinks that need no external server: files (one, a glob, or a growing
//! file), stdin and stdout, the synthetic sensor generator, and the dead-letter and side
//! outputs.
//!
//! Guarantees: the file sink is at-least-once until checkpoints land (a crash may leave a
//! partial file); sources read each record once per run.
#![warn(missing_docs)]

pub mod alerting;
pub mod deadletter;
mod decode;
pub mod file;
pub mod generator;
pub mod http_ingest;
pub mod http_sink;
#[cfg(any(feature = "nats", feature = "amqp"))]
mod inbox;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod live_feed;
mod lookup_cache;
pub mod lookup_file;
pub mod lookup_redis;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "mqtt")]
pub mod mqtt_sink;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "nats")]
pub mod nats_sink;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "postgres")]
pub mod postgres;
mod quiet;
#[cfg(feature = "amqp")]
pub mod rabbitmq;
#[cfg(feature = "amqp")]
pub mod rabbitmq_sink;
mod reconnect;
pub mod redis_sink;
pub mod redis_streams;
#[cfg(feature = "kafka")]
pub mod schema_registry;
pub mod sink;
pub mod stdin;
pub mod template;
#[doc(hidden)]
pub mod testing;
pub mod topic;
pub mod txfile;

pub use deadletter::{FileDeadLetters, FileSideWriter};
pub use file::{FileSourceConfig, FileSourceFactory};
pub use generator::{GeneratorConfig, GeneratorFactory};
pub use sink::{FileSinkFactory, StdoutSinkFactory};
pub use stdin::StdinSourceFactory;
pub use txfile::TxFileSinkFactory;

/// Properties with the values of anything that may be a secret replaced by `***`, for logs
/// and `Debug`.
pub fn redacted(props: &std::collections::BTreeMap<String, String>) -> std::collections::BTreeMap<&str, &str> {
    props
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", "key", "token", "jaas"].iter().any(|s| k.contains(s));
            (k.as_str(), if secret { "***" } else { v.as_str() })
        })
        .collect()
}

/// Turns a formats error into a core error (it is the user's input or config at fault).
pub(crate) fn fmt_err(e: weir_formats::FormatError) -> weir_core::CoreError {
    weir_core::CoreError::user(e)
}

/// Creates (or truncates) an output file, making its folder first. `what` names the file in
/// errors, e.g. "dead-letter file".
pub(crate) fn create_output(path: &std::path::Path, what: &str) -> weir_core::Result<std::fs::File> {
    open_output(path, what, false)
}

/// Opens an output file, creating its folders; `append` keeps what an earlier run wrote
/// (resuming from a checkpoint), otherwise the file is replaced.
pub(crate) fn open_output(path: &std::path::Path, what: &str, append: bool) -> weir_core::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            weir_core::CoreError::io(format!("cannot create folder `{}` for the {what}", dir.display()), e)
        })?;
    }
    let mut opts = std::fs::OpenOptions::new();
    if append {
        opts.append(true).create(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    opts.open(path).map_err(|e| weir_core::CoreError::io(format!("cannot create {what} `{}`", path.display()), e))
}
