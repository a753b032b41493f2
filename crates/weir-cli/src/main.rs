//! The `weir` command.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod checkpoints;
mod dlq;
mod publish;
use weir::prelude::*;
use weir::yaml::{self, ConfigError};
use weir_core::runtime::Job;
use weir_core::task::SpawnedTask;
use weir_core::Blame;

/// Weir: real-time stream processing on Arrow micro-batches.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    /// Log format on stderr: `text`, or `json` (one object per line, with the job, stage,
    /// worker and source of the task that logged it). The level comes from WEIR_LOG, else
    /// RUST_LOG (e.g. `info`, `weir_core=debug`); warnings by default.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlanFormatArg {
    Text,
    Dot,
    Mermaid,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a pipeline described in YAML.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Worker count (default: the pipeline's `workers`, else the number of cores).
        #[arg(long, short)]
        workers: Option<usize>,
        /// Serve /metrics, /healthz and the alert API here (a bare port means loopback, e.g.
        /// 9464); wins over the pipeline's `api.addr`.
        #[arg(long)]
        metrics_addr: Option<String>,
        /// No live progress line, even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// No end-of-run summary.
        #[arg(long)]
        quiet: bool,
        /// Start over: ignore and delete the pipeline's checkpoints instead of resuming.
        #[arg(long)]
        fresh: bool,
        /// Do not serve the web console at `/` of the API port (the JSON API stays).
        #[arg(long)]
        no_console: bool,
    },
    /// Check a pipeline file: keys, types, references, columns and expressions.
    Validate {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Print a pipeline's graph (sources, steps, sinks, how rows move between workers) and the
    /// tasks it runs as, after checking it as `validate` does.
    Plan {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Worker count to plan for (default: the pipeline's `workers`, else the number of cores).
        #[arg(long, short)]
        workers: Option<usize>,
        /// `text`, `dot` (Graphviz) or `mermaid`.
        #[arg(long, value_enum, default_value_t = PlanFormatArg::Text)]
        format: PlanFormatArg,
    },
    /// Write synthetic sensor events (JSON Lines by default).
    Gen {
        /// Number of events.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        count: u64,
        /// Events per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Number of devices.
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        /// Random seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Fraction of events with an anomaly.
        #[arg(long, default_value_t = 0.0005)]
        anomaly_rate: f64,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<String>,
        /// Output format: json, csv or msgpack.
        #[arg(long, default_value = "json")]
        format: String,
        /// Publish the events (JSON) to this MQTT broker, `mqtt://host:port`, with QoS 1,
        /// instead of writing them; `--rate` paces the publishing.
        #[arg(long, conflicts_with = "nats")]
        mqtt: Option<String>,
        /// Publish the events (JSON) to this NATS server, `nats://host:port`, through
        /// JetStream (a stream must take the subjects), instead of writing them.
        #[arg(long, conflicts_with = "amqp")]
        nats: Option<String>,
        /// Publish the events (JSON) to this RabbitMQ broker, `amqp://user:pw@host:5672/%2f`,
        /// persistent and confirmed, into the durable queue `--topic` (default `sensors`,
        /// declared when missing), instead of writing them.
        #[arg(long, conflicts_with = "mqtt")]
        amqp: Option<String>,
        /// With `--mqtt` or `--nats`: the topic (subject) of each event; `{device_id}` and
        /// `{site}` (one of four sites, by device) are filled in. Default
        /// `sensors/{site}/{device_id}/telemetry`, or `sensors.{site}.{device_id}` for NATS.
        /// With `--amqp`: the queue.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Look into a dead-letter file.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Look into a checkpoint directory.
    Checkpoints {
        #[command(subcommand)]
        cmd: CheckpointsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CheckpointsCmd {
    /// Every checkpoint, newest first: status, time, workers, files and state size.
    List {
        /// The `checkpoints.dir` of a pipeline (a directory or an s3:// URL), or one pipeline's folder inside it.
        dir: String,
    },
    /// One checkpoint in detail: state per step, watermarks, source positions.
    Inspect {
        /// The `checkpoints.dir` of a pipeline (a directory or an s3:// URL), or one pipeline's folder inside it.
        dir: String,
        /// The epoch (default: the newest complete one).
        #[arg(long)]
        epoch: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// Count dead letters by kind, step and (with --key) key.
    Stats {
        /// The dead-letter file.
        file: PathBuf,
        /// A column path to group by, read from each JSON payload, e.g. device_id.
        #[arg(long)]
        key: Option<String>,
        /// How many rows per group to show.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// Feed the records of a dead-letter file back into a (fixed) pipeline. The pipeline's
    /// source is replaced by the dead letters, read in the source's format.
    Replay {
        /// The dead-letter file, or a dead-letter topic: kafka://host:port[,host:port]/topic.
        file: String,
        /// The pipeline to run them through.
        #[arg(long)]
        pipeline: PathBuf,
        /// Only these kinds (decode, schema, event_time, clock: records, through the whole
        /// pipeline; expression, function, sink, quarantined: rows, back in at the step that
        /// failed them); default: all.
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        /// Where results go when the sink is a file (required then: the sink would replace it;
        /// with several groups of dead letters, one file each: OUTPUT.0, OUTPUT.1, ...).
        #[arg(long)]
        output: Option<String>,
        /// Where the replay's own dead letters go (default: FILE with `.replay.jsonl`).
        #[arg(long)]
        dead_letters: Option<String>,
        /// Worker count.
        #[arg(long, short)]
        workers: Option<usize>,
    },
}

/// Whether the environment set the log filter, and how to change it (for `log.level`).
static LOG_LEVEL: std::sync::OnceLock<(bool, weir::live::LogLevelSetter)> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    let cli = Cli::parse();
    // WEIR_LOG first, then RUST_LOG as Rust users expect, else warnings and errors only.
    let from_env = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .ok();
    let env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // The pipeline's `log.level` applies when the environment sets none, at the start and
    // when a reload changes it.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let sub = tracing_subscriber::registry().with(filter);
    let _ = LOG_LEVEL.set((
        env_set,
        Arc::new(move |level: &str| {
            let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())
        }),
    ));
    match cli.log_format {
        LogFormat::Text => sub.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
        LogFormat::Json => sub.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(String),
    Run(anyhow::Error),
}

impl From<weir_core::CoreError> for Failure {
    fn from(e: weir_core::CoreError) -> Self {
        match e.blame() {
            Blame::User => Failure::Config(e.to_string()),
            // A core error's text already holds its causes (`step `x`: cause`); the alternate
            // form would print each cause a second time.
            _ => Failure::Run(anyhow::anyhow!(e.to_string())),
        }
    }
}

/// Loads and builds a pipeline file; errors name the file and line.
fn load(path: &PathBuf) -> Result<(BuiltPipeline, String), Failure> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("cannot read pipeline file `{file}`: {e}")))?;
    let mut cfg = yaml::parse(&file, &text).map_err(|e| Failure::Config(e.to_string()))?;
    let base = path.parent().unwrap_or_else(|| Path::new(""));
    yaml::resolve_paths(&mut cfg, &text, base, |k| std::env::var(k).ok());
    let built = Pipeline::from_config(cfg).build().map_err(|e| located(&file, &text, e))?;
    Ok((built, text))
}

/// Points an error about a step at that step's line in the file.
fn located(file: &str, text: &str, e: weir_core::CoreError) -> Failure {
    let line = match &e {
        weir_core::CoreError::Step { step, .. } => yaml::step_line(text, step.as_str()),
        _ => None,
    };
    if e.blame() != Blame::User && !matches!(e, weir_core::CoreError::Step { .. }) {
        return Failure::from(e);
    }
    Failure::Config(ConfigError { file: file.into(), line, message: e.to_string() }.to_string())
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| Failure::Run(anyhow::anyhow!("cannot start the runtime: {e}")))
}

fn run(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Validate { pipeline } => {
            let (built, text) = load(&pipeline)?;
            // Checks columns, expressions and settings; reads the input only to infer a schema.
            built
                .check(&RunOptions { workers: Some(1), ..Default::default() })
                .map_err(|e| located(&pipeline.display().to_string(), &text, e))?;
            eprintln!("{}: ok ({} steps)", pipeline.display(), built.config().steps.len());
            Ok(())
        }
        Cmd::Plan { pipeline, workers, format } => {
            let (built, text) = load(&pipeline)?;
            let view = built
                .plan_view(&RunOptions { workers, ..Default::default() })
                .map_err(|e| located(&pipeline.display().to_string(), &text, e))?;
            let format = match format {
                PlanFormatArg::Text => weir::plan::PlanFormat::Text,
                PlanFormatArg::Dot => weir::plan::PlanFormat::Dot,
                PlanFormatArg::Mermaid => weir::plan::PlanFormat::Mermaid,
            };
            let out = view.render(format)?;
            std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes()).map_err(|e| Failure::Run(e.into()))?;
            Ok(())
        }
        Cmd::Checkpoints { cmd } => {
            let rt = runtime(1)?;
            let out = rt.block_on(async {
                match cmd {
                    CheckpointsCmd::List { dir } => checkpoints::list(&dir).await,
                    CheckpointsCmd::Inspect { dir, epoch } => checkpoints::inspect(&dir, epoch).await,
                }
            })?;
            print!("{out}");
            Ok(())
        }
        Cmd::Run { pipeline, workers, metrics_addr, no_progress, quiet, fresh, no_console } => {
            let (built, text) = load(&pipeline)?;
            let opts = RunOptions { workers, fresh };
            let spec = built.plan(&opts).map_err(|e| located(&pipeline.display().to_string(), &text, e))?;
            let workers = spec.workers;
            let rt = runtime(workers)?;
            let level = built.config().log.as_ref().and_then(|l| l.level.clone());
            let summary = rt.block_on(async move {
                let traces = built.start_traces()?;
                let job = Job::new(spec)?;
                let registry = job.registry();
                let mut reloader =
                    built.reloader(&pipeline).with_registry(registry.clone()).with_quarantine(job.quarantine());
                if let Some((env_set, set)) = LOG_LEVEL.get() {
                    if !env_set {
                        if let Some(level) = &level {
                            set(level)
                                .map_err(|e| weir_core::CoreError::Config(format!("log.level `{level}`: {e}")))?;
                        }
                        reloader = reloader.with_log_level(set.clone());
                    }
                }
                let reloader = Arc::new(reloader);
                let mut state = built.http_state(&job);
                state.reloader = Some(reloader.clone());
                if no_console {
                    state.console = None;
                }
                let _server = match built.http_addr(metrics_addr.as_deref()) {
                    Some(a) => Some(weir::http::MetricsServer::start(&a, state).await?),
                    None => None,
                };
                // A changed pipeline file (or SIGHUP) is applied where it can be, live.
                let _watch = SpawnedTask::spawn(watch_pipeline(reloader));
                let stop = job.shutdown_handle();
                // The helpers below live as long as the run: dropping them stops them.
                #[cfg(unix)]
                let _usr1 = {
                    // SIGUSR1 asks for a checkpoint now (ignored without checkpoints).
                    let on_demand = job.checkpoint_handle();
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok().map(
                        |mut usr1| {
                            SpawnedTask::spawn(async move {
                                while usr1.recv().await.is_some() {
                                    on_demand.trigger();
                                }
                            })
                        },
                    )
                };
                let _signals = SpawnedTask::spawn(async move {
                    // First signal: stop reading and flush. Second: leave at once.
                    wait_signal().await;
                    eprintln!("\nStopping: finishing the current batches (signal again to abort).");
                    stop.stop();
                    wait_signal().await;
                    std::process::exit(130);
                });
                let progress = (!no_progress && std::io::stderr().is_terminal()).then(|| {
                    let reg = registry.clone();
                    SpawnedTask::spawn(async move {
                        let every = Duration::from_secs(1);
                        let mut last = 0;
                        let mut tick = tokio::time::interval(every);
                        tick.tick().await;
                        loop {
                            tick.tick().await;
                            eprint!("\r\x1b[2K{}", weir::report::progress_line(&reg, &mut last, every));
                        }
                    })
                });
                let res = job.run().await;
                if let Some(p) = progress {
                    p.abort();
                    eprint!("\r\x1b[2K");
                }
                if let Some(t) = traces {
                    t.finish().await;
                }
                res
            })?;
            if !quiet {
                eprint!("{}", weir::report::summary(&summary, workers));
            }
            Ok(())
        }
        Cmd::Dlq { cmd: DlqCmd::Stats { file, key, top } } => {
            let s = dlq::stats(&file, key.as_deref())
                .map_err(|e| Failure::Config(format!("cannot read dead-letter file `{}`: {e}", file.display())))?;
            print!("{}", dlq::render(&s, top));
            Ok(())
        }
        Cmd::Dlq { cmd: DlqCmd::Replay { file, pipeline, kind, output, dead_letters, workers } } => {
            replay(&file, &pipeline, &kind, output, dead_letters, workers)
        }
        Cmd::Gen { count, rate, devices, seed, anomaly_rate, output, format, mqtt, nats, amqp, topic } => {
            let format = FormatSpec::from_name(&format)
                .ok_or_else(|| Failure::Config(format!("unknown format `{format}`; use json, csv or msgpack")))?;
            let target = match (mqtt, nats) {
                (Some(url), _) => Some((url, "sensors/{site}/{device_id}/telemetry", publish::mqtt as Publish)),
                (_, Some(url)) => Some((url, "sensors.{site}.{device_id}", publish::nats as Publish)),
                _ => amqp.map(|url| (url, "sensors", publish::amqp as Publish)),
            };
            if let Some((url, default_topic, publish)) = target {
                let dir = tempfile_dir()?;
                let events = dir.join("events.jsonl");
                generate(
                    count,
                    None,
                    devices,
                    seed,
                    anomaly_rate,
                    Some(events.display().to_string()),
                    FormatSpec::Json,
                )?;
                let published = publish(&url, topic.as_deref().unwrap_or(default_topic), &events, rate)?;
                let _ = std::fs::remove_dir_all(&dir);
                eprintln!("published {published} events to {url}");
                return Ok(());
            }
            generate(count, rate, devices, seed, anomaly_rate, output, format)
        }
    }
}

/// Applies the pipeline file when it changes on disk (checked every second) or on SIGHUP,
/// saying on stderr what changed or why nothing did.
async fn watch_pipeline(reloader: Arc<weir::live::Reloader>) {
    let modified = |r: &weir::live::Reloader| std::fs::metadata(r.file()).and_then(|m| m.modified()).ok();
    let mut seen = modified(&reloader);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = every.tick() => {
                let now = modified(&reloader);
                if now == seen {
                    continue;
                }
                seen = now;
            }
            _ = hangup => {}
        }
        let r = reloader.clone();
        let outcome = tokio::task::spawn_blocking(move || r.reload_file()).await;
        match outcome {
            Ok(Ok(changes)) if changes.is_empty() => {}
            Ok(Ok(changes)) => eprintln!("\nApplied {} live: {}", reloader.file(), changes.join("; ")),
            Ok(Err(e)) => eprintln!("\nDid not apply {}: {e}", reloader.file()),
            Err(e) => eprintln!("\nDid not apply {}: {e}", reloader.file()),
        }
    }
}

/// Publishes a file of events to a server: `(url, topic template, events, rate)`.
type Publish = fn(&str, &str, &Path, Option<f64>) -> Result<u64, Failure>;

/// A fresh folder for the command's own temporary files.
fn tempfile_dir() -> Result<PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("weir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::Run(e.into()))?;
    Ok(dir)
}

/// `weir gen` into a file or stdout.
fn generate(
    count: u64,
    rate: Option<f64>,
    devices: u32,
    seed: u64,
    anomaly_rate: f64,
    output: Option<String>,
    format: FormatSpec,
) -> Result<(), Failure> {
    let mut p = Pipeline::new("gen");
    p.source(SourceConfig::new(
        "generator",
        SourceConnector::Generator(GeneratorSettings {
            count: Some(count),
            rate,
            devices,
            seed,
            anomaly_rate,
            ..Default::default()
        }),
    ));
    p.sink(match output {
        Some(path) => SinkConfig::new("out", SinkConnector::File(FileSinkSettings { path, format })),
        None => SinkConfig::new("out", SinkConnector::Stdout(StdoutSettings { format })),
    });
    // One worker keeps the output in generation order.
    let built = p.build()?;
    let rt = runtime(1)?;
    rt.block_on(built.run(&RunOptions { workers: Some(1), ..Default::default() }))?;
    Ok(())
}

fn replay(
    from: &str,
    pipeline: &PathBuf,
    kinds: &[String],
    output: Option<String>,
    dead_letters: Option<String>,
    workers: Option<usize>,
) -> Result<(), Failure> {
    let (built, _) = load(pipeline)?;
    let base = built.config().clone();
    let entries = dlq::read_entries(from).map_err(Failure::Config)?;
    let picked = dlq::replay_records(&entries, kinds);
    eprintln!("replaying {} dead letters ({} skipped) through {}", picked.taken, picked.skipped, pipeline.display());
    let dir = std::env::temp_dir().join(format!("weir-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::Run(e.into()))?;
    let result = replay_groups(&base, &picked, &dir, from, output, dead_letters, workers);
    let _ = std::fs::remove_dir_all(&dir);
    let (summaries, workers) = result?;
    for (label, s) in summaries {
        eprintln!("-- {label}");
        eprint!("{}", weir::report::summary(&s, workers));
    }
    Ok(())
}

/// Runs each group of picked dead letters: records through the whole pipeline, and the rows of
/// each step from that step on (after the `key_by` before it), with the rows' schema taken from
/// planning the steps before. Replays take no checkpoints (they would resume the pipeline's).
fn replay_groups(
    base: &PipelineConfig,
    picked: &dlq::Replay,
    dir: &Path,
    from: &str,
    output: Option<String>,
    dead_letters: Option<String>,
    workers: Option<usize>,
) -> Result<(Vec<(String, RunSummary)>, usize), Failure> {
    let mut groups: Vec<(String, PipelineConfig)> = Vec::new();
    if base.sources.len() > 1 || base.steps.iter().any(|s| !s.inputs().is_empty()) {
        return Err(Failure::Config(
            "replay feeds dead letters back into a straight pipeline (one source, steps one after the other); this one is a graph".into(),
        ));
    }
    if !picked.records.is_empty() {
        let format = match &base.source().connector {
            SourceConnector::File(f) => f.format,
            SourceConnector::Stdin(s) => s.format,
            _ => {
                return Err(Failure::Config(
                    "replaying records needs a pipeline whose source reads records (file or stdin); rows that failed after decoding replay through any source".into(),
                ))
            }
        };
        if matches!(format, FormatSpec::MsgPack) {
            return Err(Failure::Config(
                "replay feeds records back one per line; a msgpack source cannot read them".into(),
            ));
        }
        let records = dir.join("records");
        std::fs::write(&records, &picked.records).map_err(|e| Failure::Run(e.into()))?;
        let mut cfg = base.clone();
        let mut src = FileSourceSettings::new(records.display().to_string(), format);
        if let SourceConnector::File(f) = &base.source().connector {
            src.chunk_size = f.chunk_size;
        }
        cfg.source_mut().connector = SourceConnector::File(src);
        groups.push(("records, through the whole pipeline".into(), cfg));
    }
    for (i, (step, rows)) in picked.rows.iter().enumerate() {
        let path = dir.join(format!("rows-{i}.jsonl"));
        std::fs::write(&path, rows.join("\n") + "\n").map_err(|e| Failure::Run(e.into()))?;
        groups.push((format!("rows, back in at step `{step}`"), rows_config(base, step, &path)?));
    }
    let n = groups.len();
    let sink_file = match &base.sink.connector {
        SinkConnector::File(f) => Some(f.path.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    let mut used_workers = 1;
    for (g, (label, mut cfg)) in groups.into_iter().enumerate() {
        cfg.checkpoints = None;
        match (&mut cfg.sink.connector, &output) {
            // Several groups: one output file each (a file sink replaces its file).
            (SinkConnector::File(f), Some(o)) => f.path = if n > 1 { format!("{o}.{g}") } else { o.clone() },
            (SinkConnector::File(_), None) => {
                return Err(Failure::Config(format!(
                    "the pipeline writes `{}`, which the replay would replace; give --output",
                    sink_file.clone().unwrap_or_default()
                )))
            }
            _ => {}
        }
        cfg.dead_letters.path = match (&dead_letters, n) {
            (Some(d), 1) => d.clone(),
            (Some(d), _) => format!("{d}.{g}"),
            (None, _) => {
                let stem = match from.strip_prefix("kafka://").and_then(|r| r.rsplit_once('/')) {
                    Some((_, topic)) => format!("{topic}-dead-letters"),
                    None => from.to_string(),
                };
                format!("{stem}.replay{}.jsonl", if n > 1 { format!(".{g}") } else { String::new() })
            }
        };
        if let SinkConnector::File(f) = &cfg.sink.connector {
            eprintln!("{label}: results to {}", f.path);
        }
        let built = Pipeline::from_config(cfg).build()?;
        let spec = built.plan(&RunOptions { workers, ..Default::default() })?;
        used_workers = spec.workers;
        let rt = runtime(spec.workers)?;
        out.push((label, rt.block_on(async move { Job::new(spec)?.run().await })?));
    }
    Ok((out, used_workers))
}

/// A pipeline that takes rows that failed at `step` back in there: its source reads them
/// (JSON, with the schema the steps before `step` produce), followed by the `key_by` before
/// `step` (so keyed steps stay keyed) and the steps from `step` on.
fn rows_config(base: &PipelineConfig, step: &str, rows: &Path) -> Result<PipelineConfig, Failure> {
    let at = if step == base.sink.id {
        base.steps.len()
    } else if step == base.source().id {
        0
    } else {
        base.steps.iter().position(|s| s.id() == step).ok_or_else(|| {
            Failure::Config(format!("the dead letters name step `{step}`, which the pipeline does not have"))
        })?
    };
    let mut probe = base.clone();
    probe.steps.truncate(at);
    probe.sink = SinkConfig::new("replay-probe", SinkConnector::Stdout(StdoutSettings { format: FormatSpec::Json }));
    probe.checkpoints = None;
    let schema = Pipeline::from_config(probe)
        .build()
        .and_then(|b| b.check(&RunOptions { workers: Some(1), ..Default::default() }))
        .map_err(|e| {
            Failure::Config(format!(
                "cannot tell the schema of the rows that failed at `{step}` ({e}); declare the source's schema"
            ))
        })?;
    let spec = SchemaSpec::from_arrow(&schema)
        .map_err(|e| Failure::Config(format!("the rows that failed at `{step}` cannot be read back: {e}")))?;
    let mut cfg = base.clone();
    let key_by = base.steps[..at].iter().rev().find(|s| matches!(s, StepConfig::KeyBy(_))).cloned().map(|mut k| {
        if let StepConfig::KeyBy(k) = &mut k {
            k.repartition = None;
        }
        k
    });
    cfg.steps = key_by.into_iter().chain(base.steps[at..].iter().cloned()).collect();
    let mut source = SourceConfig::new(
        base.source().id.clone(),
        SourceConnector::File(FileSourceSettings::new(rows.display().to_string(), FormatSpec::Json)),
    );
    source.schema = Some(spec);
    source.event_time = base
        .source()
        .event_time
        .clone()
        .filter(|et| schema.field_with_name(et.column.split('.').next().unwrap_or_default()).is_ok());
    source.watermark = base.source().watermark.clone();
    cfg.sources = vec![source];
    Ok(cfg)
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
