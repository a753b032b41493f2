//! The MQTT sink (3.1.1): a message per row on a topic made from the row's columns. With QoS 1
//! a batch counts as written once the broker acknowledged every message of it (`PUBACK`), so a
//! checkpoint never covers an unacknowledged row; the client's persistent session sends
//! unacknowledged messages again after a reconnect. QoS 0 is fire and forget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use weir_core::error::RefusedRow;
use weir_core::task::SpawnedTask;
use weir_core::{Blame, CoreError, Result, Retry, Sink, SinkFactory};
use weir_formats::{Encoder, FormatSpec};

use crate::mqtt::Endpoint;
use crate::template::RowTemplate;

/// How long a batch waits for its acknowledgements before the write fails (and is retried).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of an MQTT sink.
#[derive(Clone)]
pub struct MqttSinkConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// Each row's topic: a template of its columns, `alerts/{site}/{device_id}`.
    pub topic: String,
    /// 0 or 1.
    pub qos: u8,
    /// Publish with the retain flag: a new subscriber gets each topic's last message.
    pub retain: bool,
    /// Client id prefix; worker `w` connects as `<client_id>-<w>`.
    pub client_id: String,
    /// User name and password, when the broker asks for them.
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// Payload format: `json` or `msgpack`.
    pub format: FormatSpec,
    /// Schema of the rows.
    pub schema: SchemaRef,
}

impl std::fmt::Debug for MqttSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSinkConfig")
            .field("url", &self.url)
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Builds one client per worker.
#[derive(Debug)]
pub struct MqttSinkFactory {
    cfg: MqttSinkConfig,
    endpoint: Endpoint,
    topic: RowTemplate,
    published: Arc<AtomicU64>,
}

impl MqttSinkFactory {
    /// Checks the settings (no I/O).
    ///
    /// # Errors
    /// A bad URL, QoS above 1, CSV, or a topic naming columns the rows lack.
    pub fn new(cfg: MqttSinkConfig) -> Result<Self> {
        weir_core::ensure_config!(cfg.qos <= 1, "mqtt sink: `qos: {}`: 0 or 1", cfg.qos);
        weir_core::ensure_config!(
            !matches!(cfg.format, FormatSpec::Csv(_)),
            "mqtt sink: one message per row needs `json` or `msgpack`, not csv"
        );
        let endpoint = Endpoint::parse(&cfg.url)?;
        let topic = RowTemplate::parse(&cfg.topic, &cfg.schema, "mqtt sink `topic`")?;
        weir_core::ensure_config!(
            !cfg.topic.contains('+') && !cfg.topic.contains('#'),
            "mqtt sink `topic: {}`: `+` and `#` are for subscribing, not publishing",
            cfg.topic
        );
        cfg.format.encoder(cfg.schema.clone()).map_err(crate::fmt_err)?;
        Ok(Self { cfg, endpoint, topic, published: Arc::default() })
    }
}

impl SinkFactory for MqttSinkFactory {
    fn create(&self, worker: usize, _workers: usize) -> Result<Box<dyn Sink>> {
        Ok(Box::new(MqttSink {
            cfg: self.cfg.clone(),
            endpoint: self.endpoint.clone(),
            client_id: format!("{}-{worker}", self.cfg.client_id),
            topic: self.topic.clone(),
            encoder: self.cfg.format.encoder(self.cfg.schema.clone()).map_err(crate::fmt_err)?,
            buf: Vec::new(),
            conn: None,
            sent: 0,
            published: self.published.clone(),
        }))
    }
}

/// A client and the task that drives its event loop, counting acknowledgements.
struct Conn {
    client: rumqttc::AsyncClient,
    acked: Arc<AtomicU64>,
    notify: Arc<tokio::sync::Notify>,
    _driver: SpawnedTask<()>,
}

struct MqttSink {
    cfg: MqttSinkConfig,
    endpoint: Endpoint,
    client_id: String,
    topic: RowTemplate,
    encoder: Box<dyn Encoder>,
    buf: Vec<u8>,
    conn: Option<Conn>,
    /// QoS 1 messages handed to the client on this connection.
    sent: u64,
    published: Arc<AtomicU64>,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink").field("topic", &self.topic.as_str()).finish_non_exhaustive()
    }
}

fn transient(url: &str, what: &str, e: &dyn std::fmt::Display) -> CoreError {
    CoreError::Other {
        message: format!("mqtt sink ({url}): {what}: {e}"),
        blame: Blame::External,
        retry: Retry::Backoff,
    }
}

/// Polls the event loop: counts `PUBACK`s, and on a failure waits a moment before the next
/// poll, which reconnects (the session keeps unacknowledged messages and sends them again).
async fn drive(mut el: rumqttc::EventLoop, acked: Arc<AtomicU64>, notify: Arc<tokio::sync::Notify>, url: String) {
    let mut failures = 0u32;
    loop {
        match el.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked.fetch_add(1, Ordering::Relaxed);
                notify.notify_waiters();
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                if failures > 0 {
                    tracing::info!(server = %url, failures, "MQTT sink connection back.");
                }
                failures = 0;
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(server = %url, error = %e, failures, "MQTT sink connection failed; retrying.");
                }
                let wait = Duration::from_millis(100).saturating_mul(1 << failures.min(7)).min(Duration::from_secs(10));
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl MqttSink {
    fn conn(&mut self) -> &Conn {
        self.conn.get_or_insert_with(|| {
            let mut o =
                rumqttc::MqttOptions::new(self.client_id.clone(), self.endpoint.host.clone(), self.endpoint.port);
            // A persistent session: what the broker did not acknowledge is sent again after a
            // reconnect, and the broker keeps its half of QoS 1 exchanges in progress.
            o.set_keep_alive(Duration::from_secs(30)).set_clean_session(false);
            if let Some(u) = &self.cfg.username {
                o.set_credentials(u.clone(), self.cfg.password.clone().unwrap_or_default());
            }
            if self.endpoint.tls {
                o.set_transport(rumqttc::Transport::tls_with_default_config());
            }
            let (client, el) = rumqttc::AsyncClient::new(o, 1024);
            let acked = Arc::new(AtomicU64::new(0));
            let notify = Arc::new(tokio::sync::Notify::new());
            let driver = SpawnedTask::spawn(drive(el, acked.clone(), notify.clone(), self.cfg.url.clone()));
            self.sent = 0;
            Conn { client, acked, notify, _driver: driver }
        })
    }
}

#[async_trait::async_trait]
impl Sink for MqttSink {
    async fn write(&mut self, rows: &RecordBatch) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let (mut messages, mut refused) = crate::sink::row_messages(
            self.encoder.as_mut(),
            &self.cfg.format,
            rows,
            &mut self.buf,
            &self.topic,
            None,
            "mqtt sink",
        )?;
        messages.retain(|m| {
            let ok = !m.to.is_empty() && !m.to.contains(['+', '#']);
            if !ok {
                refused.push(RefusedRow {
                    row: m.row,
                    reason: format!("mqtt sink: topic `{}` is not one a message can be published to", m.to),
                });
            }
            ok
        });
        let qos = if self.cfg.qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
        let (retain, url) = (self.cfg.retain, self.cfg.url.clone());
        let n = messages.len() as u64;
        let conn = self.conn();
        let (client, acked, notify) = (conn.client.clone(), conn.acked.clone(), conn.notify.clone());
        for m in messages {
            let payload = self.buf[m.span.0..m.span.1].to_vec();
            client.publish(m.to, qos, retain, payload).await.map_err(|e| transient(&url, "publishing", &e))?;
        }
        if qos == rumqttc::QoS::AtLeastOnce {
            self.sent += n;
            let want = self.sent;
            let waited = tokio::time::timeout(ACK_TIMEOUT, async {
                loop {
                    let notified = notify.notified();
                    if acked.load(Ordering::Relaxed) >= want {
                        break;
                    }
                    notified.await;
                }
            })
            .await;
            if waited.is_err() {
                // The session sends them again; a retry of the batch may repeat some.
                return Err(transient(
                    &url,
                    "waiting for acknowledgements",
                    &format!("{} of {n} missing after {ACK_TIMEOUT:?}", want - acked.load(Ordering::Relaxed)),
                ));
            }
        }
        self.published.fetch_add(n, Ordering::Relaxed);
        if refused.is_empty() {
            Ok(())
        } else {
            refused.sort_by_key(|r| r.row);
            Err(CoreError::Refused(std::mem::take(&mut refused)))
        }
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(c) = self.conn.take() {
            let _ = c.client.disconnect().await;
        }
        Ok(())
    }

    fn report(&self, m: &weir_core::metrics::ConnectorMetrics) {
        m.set_total(
            "weir_mqtt_sink_messages_total",
            "Rows published to MQTT (acknowledged by the broker at QoS 1).",
            &[("topic", self.topic.as_str())],
            self.published.load(Ordering::Relaxed) as f64,
        );
    }
}
