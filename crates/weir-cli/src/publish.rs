//! `weir gen --mqtt`: generated sensor telemetry published to an MQTT broker, one topic per
//! device, as a fleet would publish it (the input of `examples/iot-mqtt.yaml`).

use std::path::Path;

use crate::Failure;

/// The topic of an event: `{device_id}` and `{site}` (one of four, by the device's number)
/// filled in.
#[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
fn topic(template: &str, device_id: &str) -> String {
    let n: u64 = device_id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
    template.replace("{device_id}", device_id).replace("{site}", &format!("site-{}", n % 4))
}

/// Publishes each line of `events` (a JSON event with a `device_id`) with QoS 1, paced to
/// `rate` per second when given, and waits until the broker has taken every one. Returns how
/// many were published.
#[cfg(feature = "mqtt")]
pub(crate) fn mqtt(url: &str, template: &str, events: &Path, rate: Option<f64>) -> Result<u64, Failure> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use std::time::{Duration, Instant};

    let parsed = url::Url::parse(url).map_err(|e| Failure::Config(format!("--mqtt `{url}`: {e}")))?;
    if parsed.scheme() != "mqtt" {
        return Err(Failure::Config(format!("--mqtt `{url}`: write it like mqtt://127.0.0.1:1883")));
    }
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
    let port = parsed.port().unwrap_or(1883);
    let text = std::fs::read_to_string(events).map_err(|e| Failure::Run(e.into()))?;
    let rt = crate::runtime(1)?;
    rt.block_on(async move {
        let mut o = MqttOptions::new(format!("weir-gen-{}", std::process::id()), host, port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 10_000);
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        let total = lines.len() as u64;
        // The event loop runs beside the publishing; it counts the broker's acknowledgements.
        let acks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = acks.clone();
        let driver = weir_core::task::SpawnedTask::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) => {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => return Err::<(), String>(e.to_string()),
                }
            }
        });
        let started = Instant::now();
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Failure::Run(e.into()))?;
            let device = v["device_id"].as_str().unwrap_or("unknown");
            client
                .publish(topic(template, device), QoS::AtLeastOnce, false, line.as_bytes().to_vec())
                .await
                .map_err(|e| Failure::Run(anyhow::anyhow!("publishing to {url}: {e}")))?;
            if let Some(r) = rate.filter(|r| *r > 0.0) {
                let due = started + Duration::from_secs_f64((i + 1) as f64 / r);
                tokio::time::sleep_until(due.into()).await;
            }
            if driver.is_finished() {
                break;
            }
        }
        let until = Instant::now() + Duration::from_secs(60);
        while acks.load(std::sync::atomic::Ordering::Relaxed) < total {
            if driver.is_finished() || Instant::now() > until {
                let err = match driver.await {
                    Ok(Err(e)) => e,
                    _ => "no acknowledgement within 60 s".into(),
                };
                return Err(Failure::Run(anyhow::anyhow!("MQTT broker at {url}: {err}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = client.disconnect().await;
        Ok(total)
    })
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
