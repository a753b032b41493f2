//! The error type of the core, with whose fault it is and whether a retry can help.

use crate::ids::StepId;

/// Result with [`CoreError`] as the default error.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Who caused an error: decides between reporting a mistake to the user and restarting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The pipeline, its config or its input is wrong; fixing it is the user's job.
    User,
    /// A system outside Weir (a file system, a server) failed.
    External,
    /// Weir itself is wrong: a bug.
    Internal,
}

/// Whether trying again may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same call will fail the same way.
    Never,
    /// The failure may pass; retry with exponential backoff.
    Backoff,
}

/// Errors raised by the runtime and by operators, sources and sinks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The pipeline or its configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// Reading or writing a file or stream failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An Arrow kernel failed.
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    /// An error in a step, with the step named.
    #[error("step `{step}`: {source}")]
    Step {
        /// The failing step.
        step: StepId,
        /// The cause.
        #[source]
        source: Box<CoreError>,
    },
    /// A failure reported by another crate's error type, already rendered.
    #[error("{message}")]
    Other {
        /// The rendered error chain.
        message: String,
        /// Whose fault.
        blame: Blame,
        /// Whether to retry.
        retry: Retry,
    },
    /// A runtime task was cancelled or panicked.
    #[error("task failed: {0}")]
    Task(String),
    /// An invariant did not hold.
    #[error("internal invariant violated: {0} (this is a bug, please report it)")]
    Internal(String),
    /// The source's partitions moved to or from another process (a consumer group
    /// rebalanced): the run stops where it is and the job starts again from its last
    /// checkpoint with the new assignment's state (see [`crate::handoff`]).
    #[error("partitions moved: {0}")]
    Rebalanced(String),
    /// A sink lost output it cannot write again in place (an open database transaction died
    /// with its connection): the run stops and the job starts again from its last checkpoint,
    /// which replays that output.
    #[error("starting again from the last checkpoint: {0}")]
    Restart(String),
    /// A sink wrote a batch but for these rows, which it refuses for reasons of their own (too
    /// large, a key or partition value that is not valid, a value it cannot encode). The
    /// runtime sends them to the dead-letter output (kind `sink`) and the job goes on; an
    /// error about the sink as a whole (bad settings, authentication) is another variant.
    #[error("{} row(s) refused by the sink, the first: {}", .0.len(), .0.first().map_or("", |r| r.reason.as_str()))]
    Refused(Vec<RefusedRow>),
}

/// A row a sink refused: its index in the batch given to `Sink::write`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// Index of the row in the batch being written.
    pub row: usize,
    /// The sink's reason, as the dead letter gives it.
    pub reason: String,
}

impl CoreError {
    /// Whose fault the error is.
    pub fn blame(&self) -> Blame {
        match self {
            Self::Config(_) => Blame::User,
            Self::Io { .. } | Self::Rebalanced(_) | Self::Restart(_) | Self::Refused(_) => Blame::External,
            Self::Arrow(_) | Self::Internal(_) | Self::Task(_) => Blame::Internal,
            Self::Step { source, .. } => source.blame(),
            Self::Other { blame, .. } => *blame,
        }
    }

    /// Whether a retry may help.
    pub fn retry(&self) -> Retry {
        match self {
            Self::Io { source, .. } => io_retry(source.kind()),
            Self::Step { source, .. } => source.retry(),
            Self::Other { retry, .. } => *retry,
            _ => Retry::Never,
        }
    }

    /// Wraps the error with the step it happened in (once: an error already naming a step is
    /// left alone so messages do not stutter).
    #[must_use]
    pub fn in_step(self, step: &StepId) -> Self {
        match self {
            Self::Step { .. } => self,
            other => Self::Step { step: step.clone(), source: Box::new(other) },
        }
    }

    /// The run stopped because the source's partitions moved ([`CoreError::Rebalanced`]),
    /// wherever in the chain of steps it was raised.
    pub fn is_rebalance(&self) -> bool {
        match self {
            Self::Rebalanced(_) => true,
            Self::Step { source, .. } => source.is_rebalance(),
            _ => false,
        }
    }

    /// The job should start again from its last checkpoint, in this process: its partitions
    /// moved ([`CoreError::Rebalanced`]) or a sink lost what it had written since
    /// ([`CoreError::Restart`]).
    pub fn starts_again(&self) -> bool {
        match self {
            Self::Rebalanced(_) | Self::Restart(_) => true,
            Self::Step { source, .. } => source.starts_again(),
            _ => false,
        }
    }

    /// An I/O error with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }

    /// A user error from another crate (config, schema, expression).
    pub fn user(err: impl std::fmt::Display) -> Self {
        Self::Other { message: err.to_string(), blame: Blame::User, retry: Retry::Never }
    }
}

/// Whether an I/O failure of this kind can pass by itself. A missing file, a refused
/// permission or a read-only file system stay until someone acts: retrying them forever would
/// hide the fault, so they fail at once (with the path, which [`CoreError::Io`] names). A
/// refused, reset or timed-out connection, an interruption or a full disk can pass. A kind not
/// known to be permanent is retried: giving up on a transient fault loses more than waiting on
/// a permanent one that is reported at every retry.
pub fn io_retry(kind: std::io::ErrorKind) -> Retry {
    use std::io::ErrorKind as K;
    match kind {
        K::NotFound
        | K::PermissionDenied
        | K::ReadOnlyFilesystem
        | K::IsADirectory
        | K::NotADirectory
        | K::InvalidInput
        | K::InvalidData
        | K::InvalidFilename
        | K::Unsupported
        | K::AlreadyExists
        | K::FileTooLarge
        | K::DirectoryNotEmpty
        | K::CrossesDevices
        | K::AddrNotAvailable => Retry::Never,
        _ => Retry::Backoff,
    }
}

/// Returns early with [`CoreError::Internal`].
#[macro_export]
macro_rules! bail_internal {
    ($($arg:tt)*) => { return Err($crate::CoreError::Internal(format!($($arg)*))) };
}

/// Returns early with [`CoreError::Config`] unless the condition holds.
#[macro_export]
macro_rules! ensure_config {
    ($cond:expr, $($arg:tt)*) => { if !$cond { return Err($crate::CoreError::Config(format!($($arg)*))); } };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn io_errors_are_retried_only_when_they_can_pass() {
        for k in [ErrorKind::PermissionDenied, ErrorKind::NotFound, ErrorKind::ReadOnlyFilesystem] {
            let e = CoreError::io("writing `/out/x.jsonl`", Error::from(k)).in_step(&StepId::new("out"));
            assert_eq!(e.retry(), Retry::Never, "{k:?}");
            assert!(e.to_string().contains("/out/x.jsonl"), "{e}");
        }
        for k in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::TimedOut,
            ErrorKind::Interrupted,
            ErrorKind::StorageFull,
        ] {
            assert_eq!(CoreError::io("x", Error::from(k)).retry(), Retry::Backoff, "{k:?}");
        }
    }
}
