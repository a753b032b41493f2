//! What the Kafka source and sink share: connection settings, librdkafka properties, and a
//! client context that sends librdkafka's logs and errors to `tracing`.

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use weir_core::{CoreError, Retry};

/// How to reach the brokers. Security settings (TLS, SASL PLAIN or SCRAM) are librdkafka
/// properties: `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
/// `ssl.ca.location`, ...
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaClientConfig {
    /// `host:port,host:port`.
    pub brokers: String,
    /// librdkafka properties passed through (Weir's own settings win on a clash).
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaClientConfig")
            .field("brokers", &self.brokers)
            .field("properties", &crate::redacted(&self.properties))
            .finish()
    }
}

/// The producers' `linger.ms` unless the pipeline sets it (librdkafka's default is 5 ms).
/// Weir hands its producers whole batches, so waiting for more records before sending only
/// delays what is already there; under load, records still gather into larger requests while
/// earlier ones are in flight. See docs/benchmarks.md (Kafka latency).
pub(crate) const PRODUCER_LINGER_MS: &str = "0";

/// The producers' `queue.buffering.max.messages` unless the pipeline sets it (librdkafka's
/// default is 100,000). A job produces faster than a broker acknowledges in bursts; with the
/// smaller queue, sends were refused as full and the job waited, which made Kafka -> W2 ->
/// Kafka on Tansu take 1.7 to 2.6 s instead of 1.4 to 1.6 (docs/benchmarks.md). The memory
/// the queue may hold is still capped by `queue.buffering.max.kbytes`.
pub(crate) const PRODUCER_QUEUE_MESSAGES: &str = "1000000";

impl KafkaClientConfig {
    /// A producer's librdkafka configuration: as [`Self::client_config`], with Weir's
    /// defaults ([`PRODUCER_LINGER_MS`], [`PRODUCER_QUEUE_MESSAGES`]) where the pipeline sets
    /// nothing.
    pub(crate) fn producer_config(&self, ours: &[(&str, String)]) -> ClientConfig {
        let mut c = self.client_config(ours);
        if !["linger.ms", "queue.buffering.max.ms"].iter().any(|k| self.properties.contains_key(*k)) {
            c.set("linger.ms", PRODUCER_LINGER_MS);
        }
        if !self.properties.contains_key("queue.buffering.max.messages") {
            c.set("queue.buffering.max.messages", PRODUCER_QUEUE_MESSAGES);
        }
        c
    }

    /// The librdkafka configuration: passed-through properties, then Weir's own `ours`.
    pub(crate) fn client_config(&self, ours: &[(&str, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in ours {
            if self.properties.get(*k).is_some_and(|theirs| theirs != v) {
                tracing::warn!(property = *k, "A Kafka property set in the pipeline is overridden by Weir.");
            }
            c.set(*k, v);
        }
        c
    }
}

/// Logs librdkafka's own messages and errors through `tracing`, so a broker that is down is
/// reported (librdkafka reconnects by itself, with backoff).
///
/// It also keeps the first client error no retry will cure ([`permanent`]), for the source or
/// sink using the client to stop with.
#[derive(Debug, Default)]
pub(crate) struct Logging {
    pub(crate) what: String,
    fatal: Fatal,
}

impl Logging {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        let what = what.into();
        Self { fatal: Fatal { what: what.clone(), why: Default::default() }, what }
    }

    /// The permanent failure seen, if any, as the error to stop with.
    pub(crate) fn fatal(&self) -> Option<CoreError> {
        self.fatal.error()
    }

    /// A handle on the permanent failure, for a user of the client that cannot reach its
    /// context (a producer's is wrapped).
    pub(crate) fn watch(&self) -> Fatal {
        self.fatal.clone()
    }
}

/// The first client error no retry will cure, once seen.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fatal {
    what: String,
    why: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Fatal {
    /// Waits for `fut`, unless a client error no retry will cure comes first (the delivery
    /// of records to a broker that refuses the handshake would wait for `message.timeout.ms`).
    pub(crate) async fn or_fatal<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T, CoreError> {
        tokio::pin!(fut);
        loop {
            // The future first: one already done (a settled batch) costs no timer.
            tokio::select! {
                biased;
                r = &mut fut => return Ok(r),
                () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    if let Some(e) = self.error() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The failure as the error to stop with.
    pub(crate) fn error(&self) -> Option<CoreError> {
        let why = self.why.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()?;
        Some(CoreError::Other {
            message: format!("{}: {why}", self.what),
            blame: weir_core::Blame::User,
            retry: Retry::Never,
        })
    }
}

impl ClientContext for Logging {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let what = self.what.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(client = what, facility = fac, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(client = what, facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(client = what, facility = fac, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(client = what, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(why) = permanent(&error, reason) {
            self.fatal.why.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(why);
        }
        tracing::warn!(client = %self.what, error = %error, "Kafka client error (it keeps retrying): {reason}");
    }
}

/// A client error no retry will cure, as the reason to stop: the broker's TLS certificate is
/// not trusted, or SASL authentication failed. librdkafka itself retries these for ever.
pub(crate) fn permanent(error: &KafkaError, reason: &str) -> Option<String> {
    use rdkafka::types::RDKafkaErrorCode as C;
    let text = format!("{error} {reason}");
    match error.rdkafka_error_code()? {
        C::SSL if text.contains("certificate verify failed") => Some(format!(
            "TLS: the broker's certificate is not trusted ({reason}); check `ssl.ca.location` in `properties`"
        )),
        C::Authentication => Some(format!("SASL authentication failed ({reason}); check the `sasl.*` properties")),
        _ => None,
    }
}

/// Plain consumers (the exactly-once sink's commit topic reader) log the same way.
impl rdkafka::consumer::ConsumerContext for Logging {}

/// A Kafka error as a core error: configuration mistakes are the user's and final; anything
/// else may pass (a broker down, a leader moving) and is retried with backoff.
pub(crate) fn kafka_err(what: impl fmt::Display, e: &KafkaError) -> CoreError {
    let config = matches!(e, KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_));
    let fatal = e.rdkafka_error_code().is_some_and(|c| {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            c,
            C::Fatal
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::InvalidProducerEpoch
                | C::ProducerFenced
                | C::MessageSizeTooLarge
                | C::UnknownTopicOrPartition
        )
    });
    CoreError::Other {
        message: format!("{what}: {e}"),
        blame: if config { weir_core::Blame::User } else { weir_core::Blame::External },
        retry: if config || fatal { Retry::Never } else { Retry::Backoff },
    }
}

/// The partition count of `topic`, or `None` when it does not exist.
///
/// # Errors
/// The admin client cannot be made.
pub(crate) async fn partition_count(client: &KafkaClientConfig, topic: &str) -> weir_core::Result<Option<usize>> {
    use rdkafka::admin::AdminClient;
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        client.client_config(&[]).create().map_err(|e| kafka_err("kafka: cannot create the admin client", &e))?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        admin.inner().fetch_metadata(Some(&topic), std::time::Duration::from_secs(10)).ok().and_then(|m| {
            m.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().len())
        })
    })
    .await
    .map_err(|e| CoreError::Task(e.to_string()))
}

/// Makes sure `topic` exists: creates it with `partitions` (the brokers' default when
/// `None`) and topic `config` when it does not. Returns its partition count.
///
/// # Errors
/// The brokers cannot be reached, or refuse to create it.
pub(crate) async fn ensure_topic(
    client: &KafkaClientConfig,
    topic: &str,
    partitions: Option<i32>,
    config: &[(&str, &str)],
) -> weir_core::Result<usize> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    use std::time::Duration;
    if let Some(n) = partition_count(client, topic).await? {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> =
        client.client_config(&[]).create().map_err(|e| kafka_err("kafka: cannot create the admin client", &e))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // -1 asks for the broker's defaults; brokers before 2.4 need numbers.
    for (np, rf) in [(partitions.unwrap_or(-1), -1), (partitions.unwrap_or(1), 1)] {
        let mut new = NewTopic::new(topic, np, TopicReplication::Fixed(rf));
        for (k, v) in config {
            new = new.set(k, v);
        }
        let res = admin
            .create_topics(&[new], &opts)
            .await
            .map_err(|e| kafka_err(format!("kafka: creating topic `{topic}`"), &e))?;
        match res.into_iter().next() {
            Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => break,
            Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor | RDKafkaErrorCode::InvalidPartitions)))
                if rf == -1 =>
            {
                continue
            }
            Some(Err((_, code))) => {
                return Err(CoreError::Other {
                    message: format!("kafka: creating topic `{topic}`: {code}"),
                    blame: weir_core::Blame::External,
                    retry: Retry::Backoff,
                })
            }
        }
    }
    tracing::info!(topic, partitions = ?partitions, "Kafka topic created.");
    Ok(partition_count(client, topic).await?.unwrap_or(partitions.unwrap_or(1).max(1) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_our_settings_win() {
        let cfg = KafkaClientConfig {
            brokers: "b:9092".into(),
            properties: [
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("ssl.key.location".to_string(), "/k".to_string()),
                ("enable.auto.commit".to_string(), "true".to_string()),
                ("client.id".to_string(), "me".to_string()),
            ]
            .into_iter()
            .collect(),
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2") && shown.contains("***") && shown.contains("client.id"), "{shown}");
        let c = cfg.client_config(&[("enable.auto.commit", "false".into())]);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("client.id"), Some("me"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn producers_get_weirs_defaults_unless_the_pipeline_sets_them() {
        let cfg = |props: &[(&str, &str)]| KafkaClientConfig {
            brokers: "b:9092".into(),
            properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let c = cfg(&[]).producer_config(&[]);
        assert_eq!(c.get("linger.ms"), Some(PRODUCER_LINGER_MS));
        assert_eq!(c.get("queue.buffering.max.messages"), Some(PRODUCER_QUEUE_MESSAGES));
        let c = cfg(&[("queue.buffering.max.ms", "7"), ("queue.buffering.max.messages", "500")]).producer_config(&[]);
        assert_eq!(c.get("linger.ms"), None);
        assert_eq!(c.get("queue.buffering.max.ms"), Some("7"));
        assert_eq!(c.get("queue.buffering.max.messages"), Some("500"));
    }
}
