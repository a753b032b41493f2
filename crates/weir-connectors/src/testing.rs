//! Servers the tests of the connectors start for themselves: each on a free loopback port with
//! its own data folder, so a test can stop, restart or kill its server without disturbing
//! another test or the machine's own. Not part of the stable API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback (the OS picks it; a race with another process taking it in the
/// meantime is possible but rare).
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    #[allow(clippy::unwrap_used)]
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `port` on loopback takes connections.
///
/// # Panics
/// After `within` without it, naming `what` and its log.
pub fn wait_for_port(port: u16, within: Duration, what: &str, log: &Path) {
    let until = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < until,
            "{what} did not listen on 127.0.0.1:{port} within {within:?}; its log {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Mosquitto broker of the test's own (Debian package `mosquitto`; `scripts/services.sh`
/// installs it), persisting to its folder, queueing without limit for offline sessions.
#[derive(Debug)]
pub struct Mosquitto {
    child: Process,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    /// A password file: only its users may connect.
    passwords: Option<PathBuf>,
}

impl Mosquitto {
    /// Starts a broker keeping its data in `dir`.
    ///
    /// # Panics
    /// When `mosquitto` is not installed or does not start.
    pub fn start(dir: &Path) -> Self {
        let mut m = Self { child: Process(None), port: free_port(), dir: dir.to_path_buf(), passwords: None };
        m.launch();
        m
    }

    /// Starts a broker that lets in only `user` with `password`.
    ///
    /// # Panics
    /// As [`Mosquitto::start`], or when `mosquitto_passwd` fails.
    pub fn start_with_user(dir: &Path, user: &str, password: &str) -> Self {
        let file = dir.join("passwords");
        let out = Command::new(binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd"))
            .arg("-c")
            .arg("-b")
            .arg(&file)
            .args([user, password])
            .output()
            .unwrap_or_else(|e| panic!("cannot run mosquitto_passwd: {e}"));
        assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
        let mut m = Self { child: Process(None), port: free_port(), dir: dir.to_path_buf(), passwords: Some(file) };
        m.launch();
        m
    }

    fn launch(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        let access = match &self.passwords {
            None => "allow_anonymous true\n".to_string(),
            Some(f) => format!("allow_anonymous false\npassword_file {}\n", f.display()),
        };
        let text = format!(
            "listener {port} 127.0.0.1\n{access}persistence true\npersistence_location {dir}/\nmax_queued_messages 0\nuser root\nlog_dest file {dir}/mosquitto.log\n",
            port = self.port,
            dir = self.dir.display()
        );
        #[allow(clippy::unwrap_used)]
        std::fs::write(&conf, text).unwrap();
        let child = Command::new(binary("mosquitto", "/usr/sbin/mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start mosquitto ({e}); `apt-get install mosquitto` or run scripts/services.sh")
            });
        self.child = Process(Some(child));
        wait_for_port(self.port, Duration::from_secs(10), "mosquitto", &self.dir.join("mosquitto.log"));
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker as an administrator would (SIGTERM: it saves its sessions and queues).
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts the broker again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Makes a persistent MQTT 5 session for `client_id` subscribed to `topic` with QoS 1, so
    /// the broker keeps what is published from now on for that client.
    ///
    /// # Panics
    /// When `mosquitto_sub` fails.
    pub fn open_session(&self, client_id: &str, topic: &str) {
        let out = Command::new(binary("mosquitto_sub", "/usr/bin/mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic, "-q", "1", "-c", "-i", client_id])
            .args(["-V", "mqttv5", "-x", "604800", "-E"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run mosquitto_sub: {e}"));
        assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Publishes each line of `file` as one message on `topic` with QoS 1, waiting for the
    /// broker to take them all (with Weir's own publisher: `mosquitto_pub -l` at full speed
    /// gets itself disconnected by Mosquitto 2.0 after some 30,000 messages).
    ///
    /// # Panics
    /// When the broker does not take them.
    #[cfg(feature = "mqtt")]
    pub fn publish_lines(&self, topic: &str, file: &Path) {
        #[allow(clippy::unwrap_used)]
        let text = std::fs::read_to_string(file).unwrap();
        let messages =
            text.lines().filter(|l| !l.is_empty()).map(|l| (topic.to_string(), l.as_bytes().to_vec())).collect();
        #[allow(clippy::unwrap_used)]
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let url = self.url();
        rt.block_on(crate::mqtt::publish(&url, messages, None)).unwrap_or_else(|e| panic!("publishing to {url}: {e}"));
    }
}

/// A server process a test owns: stopped as an administrator would (SIGTERM, so it keeps its
/// data), killed when dropped.
#[derive(Debug)]
struct Process(Option<Child>);

impl Process {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A server binary: on the PATH, or where Debian puts it (`/usr/sbin` is not on every PATH).
fn binary(name: &str, debian: &str) -> String {
    if Path::new(debian).exists() {
        debian.to_string()
    } else {
        name.to_string()
    }
}

/// A Redis server of the test's own, keeping its data in an append-only file in its folder so
/// a restart keeps the streams and their groups.
#[derive(Debug)]
pub struct RedisServer {
    child: Process,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server keeping its data in `dir`.
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not start.
    pub fn start(dir: &Path) -> Self {
        let mut r = Self { child: Process(None), port: free_port(), dir: dir.to_path_buf() };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new(binary("redis-server", "/usr/bin/redis-server"))
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); `apt-get install redis-server` or run scripts/services.sh")
            });
        self.child = Process(Some(child));
        let log = self.dir.join("redis.log");
        wait_for_port(self.port, Duration::from_secs(10), "redis-server", &log);
        // Listening is not serving: it answers `-LOADING` while it reads its data back.
        let until = Instant::now() + Duration::from_secs(30);
        while !ping(self.port) {
            assert!(Instant::now() < until, "redis-server did not load its data within 30 s; see {}", log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server as an administrator would (SIGTERM; the append-only file is kept).
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// A NATS server with JetStream of the test's own, keeping its streams in its folder so a
/// restart keeps them.
#[derive(Debug)]
pub struct NatsServer {
    child: Process,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    monitor: u16,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts a server keeping its JetStream data in `dir`.
    ///
    /// # Panics
    /// When `nats-server` is not installed or JetStream does not come up.
    pub fn start(dir: &Path) -> Self {
        let mut n = Self { child: Process(None), port: free_port(), monitor: free_port(), dir: dir.to_path_buf() };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let log = self.dir.join("nats.log");
        let child = Command::new(binary("nats-server", "/usr/sbin/nats-server"))
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor.to_string()])
            .arg("-sd")
            .arg(self.dir.join("js"))
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); `apt-get install nats-server` or run scripts/services.sh")
            });
        self.child = Process(Some(child));
        wait_for_port(self.port, Duration::from_secs(10), "nats-server", &log);
        // JetStream recovers its streams after the port opens; `/healthz` says when it serves.
        let until = Instant::now() + Duration::from_secs(30);
        while !http_ok(self.monitor, "/healthz") {
            assert!(
                Instant::now() < until,
                "nats-server's JetStream did not come up within 30 s; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server as an administrator would (SIGTERM; its streams are kept).
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts the server again on the same port with the same streams.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Client subscriptions to exactly `subject` (core NATS tests wait for the source's
    /// before publishing).
    pub fn subscriptions(&self, subject: &str) -> usize {
        let body = http_get(self.monitor, "/connz?subs=1").unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let conns = v["connections"].as_array().cloned().unwrap_or_default();
        conns
            .iter()
            .flat_map(|c| c["subscriptions_list"].as_array().cloned().unwrap_or_default())
            .filter(|s| s.as_str() == Some(subject))
            .count()
    }

    /// Makes JetStream stream `name` over `subjects` (file storage).
    #[cfg(feature = "nats")]
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        use async_nats::jetstream::stream;
        let url = self.url();
        block_on(async move {
            let js = async_nats::jetstream::new(
                async_nats::connect(url).await.expect("connecting to the test's nats-server"),
            );
            js.get_or_create_stream(stream::Config {
                name: name.into(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("a JetStream request to the test's nats-server");
        });
    }

    /// Publishes each line of `file` on `subject`, confirmed by JetStream (`jetstream`) or not.
    #[cfg(feature = "nats")]
    pub fn publish_lines(&self, subject: &str, file: &Path, jetstream: bool) {
        let text = std::fs::read_to_string(file).expect("reading the lines to publish");
        let msgs = text.lines().map(|l| (subject.to_string(), l.as_bytes().to_vec())).collect();
        block_on(crate::nats::publish(&self.url(), msgs, jetstream, None))
            .expect("a JetStream request to the test's nats-server");
    }

    /// Makes durable consumer `consumer` on `stream` as Weir does (`AckAll`, 10 min
    /// `ack_wait`) and takes `n` messages through it without acknowledging them: what a
    /// reader killed before its checkpoint leaves behind.
    #[cfg(feature = "nats")]
    pub fn pull_without_acks(&self, stream: &str, consumer: &str, n: usize) {
        use async_nats::jetstream::consumer::{pull, AckPolicy};
        use futures::StreamExt;
        let url = self.url();
        block_on(async move {
            let js = async_nats::jetstream::new(
                async_nats::connect(url).await.expect("connecting to the test's nats-server"),
            );
            let s = js.get_stream(stream).await.expect("a JetStream request to the test's nats-server");
            let c = s
                .create_consumer(pull::Config {
                    durable_name: Some(consumer.into()),
                    ack_policy: AckPolicy::All,
                    ack_wait: Duration::from_secs(600),
                    max_ack_pending: 1_000_000,
                    ..Default::default()
                })
                .await
                .expect("a JetStream request to the test's nats-server");
            let mut got = 0;
            while got < n {
                let mut batch = c
                    .fetch()
                    .max_messages(n - got)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .expect("a JetStream request to the test's nats-server");
                while let Some(m) = batch.next().await {
                    m.expect("a JetStream request to the test's nats-server");
                    got += 1;
                }
            }
        });
    }

    /// The durable consumer's (delivered and unacknowledged, not yet delivered) counts.
    #[cfg(feature = "nats")]
    pub fn consumer_pending(&self, stream: &str, consumer: &str) -> (usize, u64) {
        let url = self.url();
        block_on(async move {
            let js = async_nats::jetstream::new(
                async_nats::connect(url).await.expect("connecting to the test's nats-server"),
            );
            let s = js.get_stream(stream).await.expect("a JetStream request to the test's nats-server");
            let i = s.consumer_info(consumer).await.expect("a JetStream request to the test's nats-server");
            (i.num_ack_pending, i.num_pending)
        })
    }
}

/// A RabbitMQ broker of the test's own (its own node, port and data in its folder, no
/// plugins), so a test can restart it. The Debian script runs the broker as user `rabbitmq`,
/// so the folder is handed to that user; the broker's own pid file says which process to stop.
#[derive(Debug)]
pub struct RabbitMqServer {
    wrapper: Process,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist: u16,
    dir: PathBuf,
}

impl RabbitMqServer {
    /// Starts a broker keeping its data in `dir/rabbitmq`.
    ///
    /// # Panics
    /// When `rabbitmq-server` is not installed or does not start within a minute.
    pub fn start(dir: &Path) -> Self {
        let home = dir.join("rabbitmq");
        std::fs::create_dir_all(&home).expect("a folder for the test's RabbitMQ");
        let mut r = Self { wrapper: Process(None), port: free_port(), dist: free_port(), dir: home };
        std::fs::write(r.dir.join("enabled_plugins"), "[].\n").expect("writing enabled_plugins");
        std::fs::write(r.dir.join("rabbitmq.conf"), format!("listeners.tcp.local = 127.0.0.1:{}\n", r.port))
            .expect("writing rabbitmq.conf");
        // The broker runs as `rabbitmq`: it must reach and own its folder.
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let _ = Command::new("chown").arg("-R").arg("rabbitmq:").arg(&r.dir).status();
        r.launch();
        r
    }

    fn launch(&mut self) {
        let d = |name: &str| self.dir.join(name);
        let _ = std::fs::remove_file(d("pid"));
        let child = Command::new(binary("rabbitmq-server", "/usr/sbin/rabbitmq-server"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_NODENAME", format!("weir-test-{}@localhost", self.port))
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("db"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("feature_flags"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d("plugins"))
            .env("RABBITMQ_QUORUM_DIR", d("quorum"))
            .env("RABBITMQ_GENERATED_CONFIG_DIR", d("generated"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .stdout(std::fs::File::create(d("out.log")).map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start rabbitmq-server ({e}); `apt-get install rabbitmq-server` or run scripts/services.sh"
                )
            });
        self.wrapper = Process(Some(child));
        wait_for_port(self.port, Duration::from_secs(60), "rabbitmq-server", &d("out.log"));
        // The port opens before the node serves AMQP, and a connection made then is aborted
        // ("connection aborted" while declaring a queue, seen in CI): ready means a handshake.
        #[cfg(feature = "amqp")]
        {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let url = self.url();
                let opened = block_on(async move {
                    let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
                    let _ = c.close(200, "ready".into()).await;
                    Ok::<(), lapin::Error>(())
                });
                match opened {
                    Ok(()) => break,
                    Err(e) => {
                        assert!(
                            Instant::now() < until,
                            "rabbitmq-server on port {} serves no AMQP within 60 s: {e}",
                            self.port
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The broker's process, from its pid file.
    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("pid")).ok().map(|p| p.trim().to_string()).filter(|p| !p.is_empty())
    }

    /// Stops the broker as an administrator would (SIGTERM; durable queues and persistent
    /// messages are kept).
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
            let until = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.wrapper.stop();
    }

    /// Starts the broker again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Declares durable queue `queue` (bound to the default exchange by its name).
    #[cfg(feature = "amqp")]
    pub fn declare_queue(&self, queue: &str) {
        declare_queue(&self.url(), queue);
    }

    /// Publishes each line of `file` to `queue`, persistent, confirmed by the broker.
    #[cfg(feature = "amqp")]
    pub fn publish_lines(&self, queue: &str, file: &Path) {
        publish_lines(&self.url(), queue, file);
    }

    /// Messages ready in `queue` (after a consumer closed, its unacknowledged ones too).
    #[cfg(feature = "amqp")]
    pub fn ready(&self, queue: &str) -> u32 {
        queue_ready(&self.url(), queue)
    }
}

impl Drop for RabbitMqServer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-KILL").arg(&pid).status();
        }
    }
}

/// Declares durable queue `queue` on the broker at `url`.
#[cfg(feature = "amqp")]
pub fn declare_queue(url: &str, queue: &str) {
    block_on(crate::rabbitmq::declare_queue(url, queue)).expect("declaring a queue");
}

/// Declares durable queue `queue` on the broker at `url` and binds it to `exchange` with `key`.
#[cfg(feature = "amqp")]
pub fn bind_queue(url: &str, queue: &str, exchange: &str, key: &str) {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    block_on(async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connecting to RabbitMQ");
        let ch = c.create_channel().await.expect("a RabbitMQ channel");
        let none = lapin::types::FieldTable::default;
        ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), none()).await.expect("declaring a queue");
        ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), none())
            .await
            .expect("binding a queue");
        let _ = c.close(200, "done".into()).await;
    });
}

/// Publishes `messages` (routing key, body) to `exchange` on the broker at `url`.
#[cfg(feature = "amqp")]
pub fn publish_to(url: &str, exchange: &str, messages: Vec<(String, Vec<u8>)>) {
    block_on(crate::rabbitmq::publish(url, exchange, messages, None)).expect("publishing to RabbitMQ");
}

/// Publishes each line of `file` to `queue` on the broker at `url` (default exchange).
#[cfg(feature = "amqp")]
pub fn publish_lines(url: &str, queue: &str, file: &Path) {
    let text = std::fs::read_to_string(file).expect("reading the lines to publish");
    let msgs = text.lines().map(|l| (queue.to_string(), l.as_bytes().to_vec())).collect();
    block_on(crate::rabbitmq::publish(url, "", msgs, None)).expect("publishing to RabbitMQ");
}

/// Messages ready in `queue` on the broker at `url`.
#[cfg(feature = "amqp")]
pub fn queue_ready(url: &str, queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    block_on(async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connecting to RabbitMQ");
        let ch = c.create_channel().await.expect("a RabbitMQ channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        let _ = c.close(200, "done".into()).await;
        q.message_count()
    })
}

/// Runs `f` on a runtime of its own (the helpers are called from plain test threads).
#[cfg(any(feature = "nats", feature = "amqp"))]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for a test helper").block_on(f)
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    http_get(port, path).is_some()
}

/// The body of `GET path` on 127.0.0.1:`port` when it answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.split(' ').nth(1).filter(|code| *code == "200").map(|_| body.to_string())
}

/// Whether the Redis server on `port` answers `PING` with `PONG`.
fn ping(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    c.write_all(b"PING\r\n").is_ok() && c.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// A PostgreSQL server of the test's own (its own data folder and port), for tests that stop
/// it under a running pipeline. It runs as the `postgres` user, which must reach `dir`.
#[derive(Debug)]
pub struct PostgresServer {
    child: Process,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// Extra server settings (`-c name=value`).
    args: Vec<String>,
}

impl PostgresServer {
    /// Makes a database cluster in `dir/pg` (trust authentication, user `postgres`) and starts it.
    ///
    /// # Panics
    /// When PostgreSQL's server is not installed or does not start.
    pub fn start(dir: &Path) -> Self {
        Self::start_with_password(dir, None)
    }

    /// [`PostgresServer::start`], and with a password: TCP connections must give it
    /// (SCRAM), for tests of credentials.
    ///
    /// # Panics
    /// As [`PostgresServer::start`].
    pub fn start_with_password(dir: &Path, password: Option<&str>) -> Self {
        Self::start_with(dir, password, None)
    }

    /// [`PostgresServer::start`] serving TLS with `cert` and `key` (PEM files), and refusing
    /// TCP connections without it (`hostssl` only), for tests of TLS.
    ///
    /// # Panics
    /// As [`PostgresServer::start`].
    pub fn start_with_tls(dir: &Path, cert: &Path, key: &Path) -> Self {
        Self::start_with(dir, None, Some((cert, key)))
    }

    fn start_with(dir: &Path, password: Option<&str>, tls: Option<(&Path, &Path)>) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("postgres").exists()).max())
            .unwrap_or_else(|| panic!("no PostgreSQL server under /usr/lib/postgresql; `apt-get install postgresql` or run scripts/services.sh"));
        let data = dir.join("pg");
        std::fs::create_dir_all(&data).expect("a folder for the test's PostgreSQL");
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
        let _ = Command::new("chown").arg("-R").arg("postgres:").arg(&data).status();
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb.args(["-U", "postgres", "--no-sync", "-E", "UTF8", "--auth-local=trust"]);
        match password {
            Some(pw) => {
                let file = dir.join("pg-password");
                std::fs::write(&file, pw).expect("writing the password file");
                let _ = Command::new("chown").arg("postgres:").arg(&file).status();
                initdb.arg("--auth-host=scram-sha-256").arg(format!("--pwfile={}", file.display()));
            }
            None => {
                initdb.arg("--auth-host=trust");
            }
        }
        let out = initdb.arg("-D").arg(&data).output().expect("running initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut args = Vec::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt as _;
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(name)).expect("copying the TLS files");
                let _ = Command::new("chown").arg("postgres:").arg(data.join(name)).status();
                let _ = std::fs::set_permissions(data.join(name), std::fs::Permissions::from_mode(0o600));
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("writing pg_hba.conf");
            args = ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key"]
                .map(String::from)
                .to_vec();
        }
        let mut p = Self { child: Process(None), port: free_port(), dir: data, bin, args };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let log = self.dir.join("server.log");
        let child = as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(&self.args)
            .arg("-k")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres ({e})"));
        self.child = Process(Some(child));
        wait_for_port(self.port, Duration::from_secs(30), "postgres", &log);
        // The port opens before the server takes connections (it may be recovering).
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(Instant::now() < until, "postgres did not accept connections within 30 s; see {}", log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as an administrator would in a hurry (fast shutdown: sessions are
    /// ended, open transactions rolled back, committed data kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.0.take() {
            let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// A command run as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]).arg(program);
    c
}

/// Runs SQL on a PostgreSQL server through `psql` (no client library needed in the tests).
///
/// # Panics
/// When `psql` fails; its error is in the message.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql `{sql}`: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}
