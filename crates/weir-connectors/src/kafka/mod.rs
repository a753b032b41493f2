//! Kafka: a source that reads topics through a consumer group, and a sink that produces to a
//! topic, at least once (idempotent producer) or exactly once (a transaction per checkpoint).
//!
//! Both sit on librdkafka (the `rdkafka` crate, built from source, so no system library is
//! needed). Settings Weir does not name can be passed through as librdkafka properties; Weir's
//! own settings win on a clash, because the engine's guarantees depend on them (offsets are
//! never auto-committed, the producer is idempotent). Property values are never logged: they
//! may hold passwords.

mod client;
mod deadletter;
mod queue;
mod sink;
mod source;
mod txn;

pub use crate::redacted;
pub use client::KafkaClientConfig;
pub use deadletter::{read_topic, KafkaDeadLetters};
pub use sink::{
    KafkaSinkConfig, KafkaSinkFactory, KafkaSinkMode, KafkaTopicSpec, KafkaTransactionSettings, RegistrySinkConfig,
};
pub use source::{
    KafkaMetadataColumns, KafkaSourceConfig, KafkaSourceFactory, KafkaStart, MissingPosition, RegistryFormat,
    RegistryPayload,
};
pub use txn::TransactionalOffsets;
