//! Integration tests of the engine through its public API: one binary, a module per area.
#![allow(clippy::unwrap_used)]
// The tests use every connector.
#![cfg(all(feature = "kafka", feature = "mqtt", feature = "nats", feature = "amqp", feature = "postgres"))]

mod alerting;
mod bus_sinks;
mod checkpoints;
mod common;
mod connectors;
mod detect;
mod errors;
mod fan_out;
mod functions;
mod golden;
mod graphs;
mod http_ingest;
mod http_sink;
mod kafka;
mod kafka_tls;
mod live_feed;
mod lookups;
mod metrics;
mod mqtt;
mod nats;
mod postgres;
mod rabbitmq;
mod redis_sink;
mod redis_streams;
mod runtime;
mod schema_registry;
mod sink_restarts;
mod tables;
mod traces;
