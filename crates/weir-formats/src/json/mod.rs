//! JSON Lines: the schema-directed decoder and the encoder.

mod decode;
mod encode;

pub use decode::JsonDecoder;
pub use encode::{row_to_json, JsonEncoder, JsonValues};
