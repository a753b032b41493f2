//! `weir gen --mqtt` and `--nats`: generated sensor telemetry published to an MQTT broker or a
//! NATS server, one topic (subject) per device, as a fleet would publish it (the input of
//! `examples/iot-mqtt.yaml`).

use std::path::Path;

use crate::Failure;

/// The topic of an event: `{device_id}` and `{site}` (one of four, by the device's number)
/// filled in.
#[cfg_attr(not(any(feature = "mqtt", feature = "nats")), allow(dead_code))]
fn topic(template: &str, device_id: &str) -> String {
    let n: u64 = device_id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
    template.replace("{device_id}", device_id).replace("{site}", &format!("site-{}", n % 4))
}

/// Publishes each line of `events` (a JSON event with a `device_id`) with QoS 1, paced to
/// `rate` per second when given, and waits until the broker has taken every one. Returns how
/// many were published.
#[cfg(feature = "mqtt")]
pub(crate) fn mqtt(url: &str, template: &str, events: &Path, rate: Option<f64>) -> Result<u64, Failure> {
    let messages = messages(template, events)?;
    let rt = crate::runtime(1)?;
    Ok(rt.block_on(weir::connectors::mqtt::publish(url, messages, rate))?)
}

/// Publishes each line of `events` to JetStream, paced to `rate` per second when given, and
/// waits until a stream has stored every one. Returns how many were published.
#[cfg(feature = "nats")]
pub(crate) fn nats(url: &str, template: &str, events: &Path, rate: Option<f64>) -> Result<u64, Failure> {
    let messages = messages(template, events)?;
    let rt = crate::runtime(1)?;
    Ok(rt.block_on(weir::connectors::nats::publish(url, messages, true, rate))?)
}

/// Declares durable queue `queue` and publishes each line of `events` to it (persistent,
/// with publisher confirms), paced to `rate` per second when given. Returns how many were
/// published.
#[cfg(feature = "amqp")]
pub(crate) fn amqp(url: &str, queue: &str, events: &Path, rate: Option<f64>) -> Result<u64, Failure> {
    let text = std::fs::read_to_string(events).map_err(|e| Failure::Run(e.into()))?;
    let messages = text.lines().filter(|l| !l.is_empty()).map(|l| (queue.to_string(), l.as_bytes().to_vec())).collect();
    let rt = crate::runtime(1)?;
    Ok(rt.block_on(async {
        weir::connectors::rabbitmq::declare_queue(url, queue).await?;
        weir::connectors::rabbitmq::publish(url, "", messages, rate).await
    })?)
}

/// Without the `amqp` feature there is no client to publish with.
#[cfg(not(feature = "amqp"))]
pub(crate) fn amqp(url: &str, _: &str, _: &Path, _: Option<f64>) -> Result<u64, Failure> {
    Err(Failure::Config(format!("--amqp {url}: this build of weir leaves RabbitMQ out (cargo feature `amqp`)")))
}

/// Without the `nats` feature there is no client to publish with.
#[cfg(not(feature = "nats"))]
pub(crate) fn nats(url: &str, _: &str, _: &Path, _: Option<f64>) -> Result<u64, Failure> {
    Err(Failure::Config(format!("--nats {url}: this build of weir leaves NATS out (cargo feature `nats`)")))
}

/// Each line of `events` with its topic.
#[cfg(any(feature = "mqtt", feature = "nats"))]
fn messages(template: &str, events: &Path) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let text = std::fs::read_to_string(events).map_err(|e| Failure::Run(e.into()))?;
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Failure::Run(e.into()))?;
        messages.push((topic(template, v["device_id"].as_str().unwrap_or("unknown")), line.as_bytes().to_vec()));
    }
    Ok(messages)
}

/// Without the `mqtt` feature there is no client to publish with.
#[cfg(not(feature = "mqtt"))]
pub(crate) fn mqtt(url: &str, _: &str, _: &Path, _: Option<f64>) -> Result<u64, Failure> {
    Err(Failure::Config(format!("--mqtt {url}: this build of weir leaves MQTT out (cargo feature `mqtt`)")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn topics_name_the_device_and_its_site() {
        assert_eq!(
            super::topic("sensors/{site}/{device_id}/telemetry", "dev-00042"),
            "sensors/site-2/dev-00042/telemetry"
        );
        assert_eq!(super::topic("t/{device_id}", "x"), "t/x");
    }
}
