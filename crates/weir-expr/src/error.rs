//! The crate's error type.

use arrow_schema::DataType;

/// Result type of this crate.
pub type Result<T, E = ExprError> = std::result::Result<T, E>;

/// Why an expression could not be compiled or evaluated.
///
/// Every variant carries the expression text (`expr`) so that messages can be
/// shown to a user as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExprError {
    /// The text is not a valid SQL expression.
    #[error("cannot parse expression `{expr}`: {message}")]
    Parse {
        /// The expression text.
        expr: String,
        /// What the SQL parser reported.
        message: String,
    },
    /// The expression is valid SQL but cannot be planned against the input
    /// schema: unknown column (the message then lists the available column
    /// paths), unknown function, type mismatch, ...
    #[error("invalid expression `{expr}`: {message}")]
    Plan {
        /// The expression text.
        expr: String,
        /// What went wrong.
        message: String,
    },
    /// A filter predicate does not evaluate to a boolean.
    #[error("filter `{expr}` must be a boolean expression, but it has type {actual}")]
    NotBoolean {
        /// The expression text.
        expr: String,
        /// The type it has.
        actual: DataType,
    },
    /// Two projection items produce an output column of the same name.
    #[error("duplicate output column `{name}`: produced by both `{first}` and `{second}`")]
    DuplicateName {
        /// The clashing output name.
        name: String,
        /// The first item producing it.
        first: String,
        /// The second item producing it.
        second: String,
    },
    /// Evaluation on a batch failed (e.g. a cast that fails at run time, or a
    /// batch whose schema does not match the compiled one).
    #[error("cannot evaluate `{expr}`: {message}")]
    Eval {
        /// The expression text.
        expr: String,
        /// What went wrong.
        message: String,
    },
}

impl ExprError {
    /// The expression text the error is about (for [`ExprError::DuplicateName`],
    /// the second item).
    pub fn expr(&self) -> &str {
        match self {
            Self::Parse { expr, .. }
            | Self::Plan { expr, .. }
            | Self::NotBoolean { expr, .. }
            | Self::Eval { expr, .. } => expr,
            Self::DuplicateName { second, .. } => second,
        }
    }

    pub(crate) fn plan(expr: &str, message: impl Into<String>) -> Self {
        Self::Plan { expr: expr.to_string(), message: message.into() }
    }

    pub(crate) fn eval(expr: &str, message: impl Into<String>) -> Self {
        Self::Eval { expr: expr.to_string(), message: message.into() }
    }
}
