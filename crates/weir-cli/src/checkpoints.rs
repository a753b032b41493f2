//! `weir checkpoints list|inspect`: what a checkpoint store holds.

use std::fmt::Write as _;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt64Type};
use arrow_array::RecordBatch;
use weir_core::checkpoint::{Epoch, StateRole};
use weir_core::store::{CheckpointStore, ManifestFile};
use weir_core::Result;

/// The stores at `dir` (a directory or an `s3://` URL; S3 settings from the `AWS_*`
/// environment): `dir` itself when it is one pipeline's folder, else one per pipeline in it.
async fn stores(dir: &str) -> Result<Vec<CheckpointStore>> {
    CheckpointStore::discover(dir, &std::collections::BTreeMap::new()).await
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// One line per checkpoint, newest first.
pub(crate) async fn list(dir: &str) -> Result<String> {
    let mut s = String::new();
    let stores = stores(dir).await?;
    if stores.is_empty() {
        let _ = writeln!(s, "no checkpoints under `{dir}`");
    }
    for store in stores {
        let listed = store.list().await?;
        let job = listed.iter().find_map(|l| l.manifest.as_ref().ok().map(|m| m.job.clone())).unwrap_or_default();
        let job = match store.member_name() {
            Some(m) => format!("{job}, member {m}"),
            None => job,
        };
        let _ = writeln!(s, "{job} ({} checkpoints)", listed.len());
        let _ = writeln!(
            s,
            "  {:>8}  {:<9}  {:<24}  {:>7}  {:>6}  {:>10}",
            "epoch", "status", "created", "workers", "files", "state"
        );
        for l in listed {
            match l.manifest {
                Ok(m) => {
                    let status = if m.drained { "drained" } else { "complete" };
                    let _ = writeln!(
                        s,
                        "  {:>8}  {:<9}  {:<24}  {:>7}  {:>6}  {:>10}",
                        m.epoch.0,
                        status,
                        time(m.created_ms),
                        m.workers,
                        m.files().count(),
                        bytes(m.state_bytes())
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  {:>8}  {:<9}  {e}", l.epoch.0, "unusable");
                }
            }
        }
    }
    Ok(s)
}

/// One checkpoint in detail: state per step, watermarks and source positions.
pub(crate) async fn inspect(dir: &str, epoch: Option<u64>) -> Result<String> {
    let mut s = String::new();
    for store in stores(dir).await? {
        let e = match epoch {
            Some(e) => Epoch(e),
            None => match store.list().await?.into_iter().find(|l| l.manifest.is_ok()) {
                Some(l) => l.epoch,
                None => {
                    let _ = writeln!(s, "no complete checkpoint");
                    continue;
                }
            },
        };
        let (m, tables) = store.load(e).await?;
        if let Some(member) = store.member_name() {
            let _ = writeln!(s, "member {member}:");
        }
        render(&mut s, &m, &tables);
    }
    Ok(s)
}

fn render(s: &mut String, m: &ManifestFile, tables: &[(weir_core::checkpoint::StateFile, RecordBatch)]) {
    let _ = writeln!(s, "{} checkpoint {}", m.job, m.epoch.0);
    let _ = writeln!(s, "  created   {}", time(m.created_ms));
    let _ = writeln!(s, "  workers   {} ({} tasks)", m.workers, m.tasks.len());
    let _ = writeln!(s, "  drained   {}", m.drained);
    let _ = writeln!(s, "  state     {} in {} files", bytes(m.state_bytes()), m.files().count());
    // Per step: role, rows, bytes over all tasks.
    let mut steps: std::collections::BTreeMap<(&str, &str), (u64, u64, usize)> = Default::default();
    for (_, f) in m.files() {
        let role = match f.role {
            StateRole::Source => "source positions",
            StateRole::Operator => "operator state",
        };
        let e = steps.entry((f.step.as_str(), role)).or_default();
        e.0 += f.rows;
        e.1 += f.bytes;
        e.2 += 1;
    }
    let _ = writeln!(s, "  {:<20}  {:<17}  {:>9}  {:>10}  {:>5}", "step", "kind", "rows", "size", "tasks");
    for ((step, role), (rows, b, n)) in steps {
        let _ = writeln!(s, "  {step:<20}  {role:<17}  {rows:>9}  {:>10}  {n:>5}", bytes(b));
    }
    let mut wms: std::collections::BTreeMap<&str, i64> = Default::default();
    for snap in m.tasks.values() {
        for (step, w) in &snap.watermarks {
            let e = wms.entry(step.as_str()).or_insert(*w);
            *e = (*e).min(*w);
        }
    }
    if !wms.is_empty() {
        let _ = writeln!(s, "  watermarks (lowest over tasks):");
        for (step, w) in wms {
            let _ = writeln!(s, "    {step:<20}  {}", time(w));
        }
    }
    for (f, t) in tables.iter().filter(|(f, _)| f.role == StateRole::Source) {
        let _ = writeln!(s, "  positions of `{}` ({}):", f.step, f.path);
        source_positions(s, t);
    }
}

/// File positions: one line per file, chunks done and the furthest offset handed out.
fn source_positions(s: &mut String, t: &RecordBatch) {
    let (Some(file), Some(start), Some(end), Some(resume)) = (
        t.column_by_name("file").and_then(|c| c.as_string_opt::<i32>()),
        t.column_by_name("chunk_start").and_then(|c| c.as_primitive_opt::<Int64Type>()),
        t.column_by_name("chunk_end").and_then(|c| c.as_primitive_opt::<Int64Type>()),
        t.column_by_name("resume").and_then(|c| c.as_primitive_opt::<UInt64Type>()),
    ) else {
        let _ = writeln!(s, "    {} rows", t.num_rows());
        return;
    };
    let mut files: std::collections::BTreeMap<&str, (usize, usize, u64)> = Default::default();
    for i in 0..t.num_rows() {
        let e = files.entry(file.value(i)).or_default();
        if start.value(i) < 0 {
            e.2 = e.2.max(resume.value(i));
            continue;
        }
        e.0 += 1;
        if resume.value(i) >= end.value(i) as u64 {
            e.1 += 1;
        }
        e.2 = e.2.max(resume.value(i).min(end.value(i) as u64));
    }
    for (f, (chunks, done, furthest)) in files {
        if chunks == 0 {
            let _ = writeln!(s, "    {f}: read in order up to byte {furthest}");
        } else {
            let _ = writeln!(s, "    {f}: {done} of {chunks} chunks started are done; furthest byte {furthest}");
        }
    }
}
