//! Integration tests of the engine through its public API: one binary, a module per area.

mod common;
mod errors;
mod golden;
mod runtime;
