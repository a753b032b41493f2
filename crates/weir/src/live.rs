//! Live reconfiguration: a running pipeline takes a changed pipeline file without a restart
//! for the settings that can change in place, and refuses the rest.
//!
//! What changes live: the rules of `detect` steps (thresholds, clear levels, EWMA and MAD
//! settings, rates, silence timeouts, model thresholds, severities, labels; a rule keeps its
//! name, kind and column, so every key's state still fits), the routes of `alert` steps (a
//! route whose settings did not change keeps its queue and connection), the quarantine's limits
//! (`max_dead_letters`, `within`, `cool_down`), and the log level (`log.level`, under
//! `weir run`). Anything else that differs (a new source, a changed key, a window's
//! size, an alert route) needs a restart: the reload is refused, naming the first such
//! setting, and the running pipeline goes on with what it had. A reload comes from the file
//! changing on disk or `SIGHUP` (`weir run`), or `POST /config` on the API port.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use weir_core::{CoreError, Result};
use weir_ops::rules::LiveRules;

use crate::config::{PipelineConfig, StepConfig};

/// The running `alert` steps' routers, by step id.
pub(crate) type Routers = Arc<Mutex<BTreeMap<String, Arc<weir_connectors::alerting::AlertRouter>>>>;

/// Sets the process's log filter (`info`, `weir_core=debug`, ...).
pub type LogLevelSetter = Arc<dyn Fn(&str) -> std::result::Result<(), String> + Send + Sync>;

/// Applies changed pipeline files to a running pipeline (see the module documentation).
pub struct Reloader {
    file: String,
    base: PathBuf,
    current: Mutex<PipelineConfig>,
    rules: Arc<Mutex<BTreeMap<String, LiveRules>>>,
    routers: Routers,
    log: Option<LogLevelSetter>,
    registry: Option<Arc<weir_core::metrics::Registry>>,
    quarantine: Option<Arc<weir_core::quarantine::Quarantine>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").field("file", &self.file).finish_non_exhaustive()
    }
}

impl Reloader {
    pub(crate) fn new(
        file: String,
        base: PathBuf,
        current: PipelineConfig,
        rules: Arc<Mutex<BTreeMap<String, LiveRules>>>,
        routers: Routers,
    ) -> Self {
        Self { file, base, current: Mutex::new(current), rules, routers, log: None, registry: None, quarantine: None }
    }

    /// Lets reloads change the log level.
    #[must_use]
    pub fn with_log_level(mut self, set: LogLevelSetter) -> Self {
        self.log = Some(set);
        self
    }

    /// Counts reloads in the job's metrics (`weir_config_reloads_total{outcome}`).
    #[must_use]
    pub fn with_registry(mut self, registry: Arc<weir_core::metrics::Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Lets reloads change the running job's quarantine limits.
    #[must_use]
    pub fn with_quarantine(mut self, q: Option<Arc<weir_core::quarantine::Quarantine>>) -> Self {
        self.quarantine = q;
        self
    }

    /// The pipeline file this reloader was made for.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Reads the pipeline file again and applies it (see [`Reloader::apply_text`]).
    ///
    /// # Errors
    /// The file cannot be read, or as [`Reloader::apply_text`].
    pub fn reload_file(&self) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| CoreError::Config(format!("cannot read pipeline file `{}`: {e}", self.file)))?;
        self.apply_text(&text)
    }

    /// Applies a pipeline (YAML, `${VAR}`s expanded): the settings that can change live
    /// change now, and the list of what changed is returned (empty: nothing to do).
    ///
    /// # Errors
    /// A file that does not parse or check, or one that changes a setting that needs a
    /// restart (named); nothing is applied then.
    pub fn apply_text(&self, text: &str) -> Result<Vec<String>> {
        let outcome = self.apply_inner(text);
        if let Some(r) = &self.registry {
            let label = if outcome.is_ok() { "applied" } else { "refused" };
            r.connectors.add(
                "weir_config_reloads_total",
                "Pipeline files applied to the running pipeline, or refused.",
                &[("outcome", label)],
                1.0,
            );
        }
        match &outcome {
            Ok(changes) if changes.is_empty() => {
                tracing::info!(file = %self.file, "The pipeline file changed nothing that runs.")
            }
            Ok(changes) => {
                tracing::info!(file = %self.file, ?changes, "Applied the changed pipeline file to the running pipeline.")
            }
            Err(e) => {
                tracing::error!(file = %self.file, error = %e, "Refused the changed pipeline file; the pipeline goes on as it was.")
            }
        }
        outcome
    }

    fn apply_inner(&self, text: &str) -> Result<Vec<String>> {
        let mut new = crate::yaml::parse(&self.file, text).map_err(|e| CoreError::Config(e.to_string()))?;
        crate::yaml::resolve_paths(&mut new, text, &self.base, |k| std::env::var(k).ok());
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut a, mut b) = (to_json(&current)?, to_json(&new)?);
        for v in [&mut a, &mut b] {
            blank_live_settings(v);
        }
        if let Some(path) = first_difference(&a, &b, "") {
            return Err(CoreError::Config(format!(
                "`{path}` changed, which needs a restart; the running pipeline keeps its settings (detect rules, alert routes, quarantine limits and log.level change live)"
            )));
        }
        // Every changed detect step's rules, checked on copies before any is applied.
        let mut planned: Vec<(String, LiveRules, Vec<weir_ops::RuleSpec>)> = Vec::new();
        {
            let rules = self.rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (old, step) in current.steps.iter().zip(&new.steps) {
                let (StepConfig::Detect(o), StepConfig::Detect(d)) = (old, step) else { continue };
                if o.rules == d.rules {
                    continue;
                }
                let live = rules.get(&d.id).ok_or_else(|| {
                    CoreError::Config(format!(
                        "detect step `{}` is not running; its rules change at its next start",
                        d.id
                    ))
                })?;
                let specs = d.rules.iter().map(crate::pipeline::rule_spec).collect::<Result<Vec<_>>>()?;
                LiveRules::new(live.rules(), live.input())
                    .update(specs.clone())
                    .map_err(|e| CoreError::Config(format!("detect step `{}`: {e}", d.id)))?;
                planned.push((d.id.clone(), live.clone(), specs));
            }
        }
        // Every changed alert step's routes, checked before any is applied.
        type RouteChange = (
            String,
            Arc<weir_connectors::alerting::AlertRouter>,
            Vec<weir_connectors::alerting::RouteSpec>,
            std::collections::HashSet<String>,
        );
        let mut routes: Vec<RouteChange> = Vec::new();
        {
            let routers = self.routers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (old, step) in current.steps.iter().zip(&new.steps) {
                let (StepConfig::Alert(o), StepConfig::Alert(a)) = (old, step) else { continue };
                if o.routes == a.routes {
                    continue;
                }
                let router = routers.get(&a.id).ok_or_else(|| {
                    CoreError::Config(format!(
                        "alert step `{}` is not running; its routes change at its next start",
                        a.id
                    ))
                })?;
                let specs = a.routes.iter().map(crate::pipeline::route_spec).collect::<Result<Vec<_>>>()?;
                weir_connectors::alerting::check_routes(&specs)
                    .map_err(|e| CoreError::Config(format!("alert step `{}`: {e}", a.id)))?;
                let keep = a.routes.iter().filter(|r| o.routes.contains(r)).map(|r| r.name.clone()).collect();
                routes.push((a.id.clone(), router.clone(), specs, keep));
            }
        }
        let old_level = current.log.as_ref().and_then(|l| l.level.clone());
        let new_level = new.log.as_ref().and_then(|l| l.level.clone());
        if old_level != new_level {
            weir_core::ensure_config!(self.log.is_some(), "log.level changes live only under `weir run`");
        }
        let (oq, nq) = (&current.quarantine, &new.quarantine);
        let quarantine =
            (oq.max_dead_letters, oq.within, oq.cool_down) != (nq.max_dead_letters, nq.within, nq.cool_down);
        if quarantine {
            weir_core::ensure_config!(
                self.quarantine.is_some(),
                "quarantine settings change live only when the pipeline runs with a quarantine"
            );
        }
        let mut changes = Vec::new();
        if let (true, Some(q)) = (quarantine, &self.quarantine) {
            let limits = weir_core::quarantine::Limits {
                max_failures: nq.max_dead_letters,
                window: nq.within,
                cool_down: nq.cool_down,
            };
            q.set_limits(limits);
            changes.push(format!(
                "quarantine: {} dead letters within {:?}, cool-down {:?}",
                nq.max_dead_letters, nq.within, nq.cool_down
            ));
        }
        for (id, live, specs) in planned {
            changes.extend(live.update(specs)?.into_iter().map(|c| format!("step `{id}`: {c}")));
        }
        for (id, router, specs, keep) in routes {
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            router.update(specs, &keep)?;
            changes.push(format!("step `{id}`: routes now {}", names.join(", ")));
        }
        if old_level != new_level {
            let level = new_level.clone().unwrap_or_else(|| "warn".into());
            if let Some(set) = &self.log {
                set(&level).map_err(|e| CoreError::Config(format!("log.level `{level}`: {e}")))?;
            }
            changes.push(format!("log level: {} -> {level}", old_level.unwrap_or_else(|| "(default)".into())));
        }
        *current = new;
        Ok(changes)
    }
}

fn to_json(cfg: &PipelineConfig) -> Result<Value> {
    serde_json::to_value(cfg).map_err(|e| CoreError::Internal(format!("pipeline settings as JSON: {e}")))
}

/// Takes out of the comparison what may change live: detect rules (checked by the step's
/// [`LiveRules`] instead) and the log level.
fn blank_live_settings(v: &mut Value) {
    if let Some(steps) = v.get_mut("steps").and_then(Value::as_array_mut) {
        for s in steps {
            if let Some(rules) = s.get_mut("detect").and_then(|d| d.get_mut("rules")) {
                *rules = Value::Null;
            }
            if let Some(routes) = s.get_mut("alert").and_then(|a| a.get_mut("routes")) {
                *routes = Value::Null;
            }
        }
    }
    if let Some(log) = v.get_mut("log").and_then(Value::as_object_mut) {
        log.remove("level");
    }
    if let Some(q) = v.get_mut("quarantine").and_then(Value::as_object_mut) {
        for k in ["max_dead_letters", "within", "cool_down"] {
            q.remove(k);
        }
    }
}

/// The path of the first setting that differs (`steps[1].window.tumbling`), if any.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                first_difference(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), &path)
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (p, q))| first_difference(p, q, &format!("{at}[{i}]")))
        }
        _ if a == b => None,
        _ => Some(if at.is_empty() { "the pipeline".into() } else { at.to_string() }),
    }
}
