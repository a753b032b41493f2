//! What `weir plan` prints: a pipeline's graph (sources, steps, sinks, and how rows travel
//! between them) and the tasks it runs as, as text, Graphviz DOT or Mermaid.
//!
//! The tasks come from the same planner the runtime uses ([`weir_core::graph::plan_tasks`]),
//! so what is printed is what runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arrow_schema::{DataType, SchemaRef};
use weir_core::graph::{plan_tasks, Head, JobGraph, NodeKind, Partitioning, TaskOutput};
use weir_core::Result;

use crate::config::PipelineConfig;

/// How to print a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanFormat {
    /// For people.
    Text,
    /// Graphviz DOT.
    Dot,
    /// A Mermaid flowchart (renders in Markdown on GitHub).
    Mermaid,
}

/// A planned pipeline with what it says about each node.
#[derive(Debug)]
pub struct PlanView {
    /// The graph the runtime would run.
    pub graph: JobGraph,
    /// Each node's kind as written (`file`, `filter`, `interval_join`...).
    pub kinds: BTreeMap<String, String>,
    /// The rows each source and step makes: schema and key columns.
    pub streams: BTreeMap<String, (SchemaRef, Vec<String>)>,
}

/// A node's kind as the pipeline file names it.
pub(crate) fn kinds(cfg: &PipelineConfig) -> BTreeMap<String, String> {
    let mut k = BTreeMap::new();
    for s in &cfg.sources {
        k.insert(s.id.clone(), s.connector.name().to_string());
    }
    for s in &cfg.steps {
        let v = serde_json::to_value(s).unwrap_or_default();
        let kind = v.as_object().and_then(|m| m.keys().next().cloned()).unwrap_or_else(|| "step".into());
        k.insert(s.id().to_string(), kind);
    }
    for s in cfg.sink_nodes() {
        k.insert(s.id.clone(), s.connector.name().to_string());
    }
    k
}

/// A column type, briefly: `string`, `float64`, `struct<temp float64>`.
fn brief(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Struct(fields) => {
            format!(
                "struct<{}>",
                fields.iter().map(|f| format!("{} {}", f.name(), brief(f.data_type()))).collect::<Vec<_>>().join(", ")
            )
        }
        DataType::List(f) | DataType::LargeList(f) => format!("list<{}>", brief(f.data_type())),
        DataType::Dictionary(_, v) => brief(v),
        DataType::Timestamp(_, _) => "timestamp".into(),
        other => other.to_string().to_lowercase(),
    }
}

fn columns(schema: &SchemaRef) -> String {
    schema.fields().iter().map(|f| format!("{} {}", f.name(), brief(f.data_type()))).collect::<Vec<_>>().join(", ")
}

fn edge_label(p: &Partitioning) -> String {
    match p {
        Partitioning::Forward => String::new(),
        Partitioning::Hash(k) if k.is_empty() => "all to one worker".into(),
        Partitioning::Hash(k) => format!("by {}", k.join(", ")),
    }
}

impl PlanView {
    fn kind(&self, id: &str) -> &str {
        self.kinds.get(id).map_or("step", String::as_str)
    }

    /// The plan in `format`.
    ///
    /// # Errors
    /// A graph the runtime's planner refuses (it was checked when planned, so not in practice).
    pub fn render(&self, format: PlanFormat) -> Result<String> {
        match format {
            PlanFormat::Text => self.text(),
            PlanFormat::Dot => Ok(self.dot()),
            PlanFormat::Mermaid => Ok(self.mermaid()),
        }
    }

    fn text(&self) -> Result<String> {
        let g = &self.graph;
        let mut s = String::new();
        let _ = writeln!(s, "pipeline `{}` at {} worker{}", g.name, g.workers, if g.workers == 1 { "" } else { "s" });
        let width = g.nodes.iter().map(|n| n.id.as_str().len()).max().unwrap_or(0);
        for (title, want) in [("sources", 0), ("steps", 1), ("sinks", 2)] {
            let _ = writeln!(s, "\n{title}:");
            for n in &g.nodes {
                let class = match n.kind {
                    NodeKind::Source { .. } => 0,
                    NodeKind::Op(_) => 1,
                    NodeKind::Sink { .. } => 2,
                };
                if class != want {
                    continue;
                }
                let id = n.id.as_str();
                let _ = write!(s, "  {id:width$}  {}", self.kind(id));
                if !n.inputs.is_empty() {
                    let ins: Vec<String> = n
                        .inputs
                        .iter()
                        .map(|e| {
                            let from = g.nodes[e.from].id.as_str();
                            match edge_label(&e.part) {
                                l if l.is_empty() => from.to_string(),
                                l => format!("{from} ({l})"),
                            }
                        })
                        .collect();
                    let _ = write!(s, " <- {}", ins.join(", "));
                }
                let _ = writeln!(s);
                if let Some((schema, keys)) = self.streams.get(id) {
                    let _ = writeln!(s, "  {:width$}    rows: {}", "", columns(schema));
                    if !keys.is_empty() {
                        let _ = writeln!(s, "  {:width$}    keyed by: {}", "", keys.join(", "));
                    }
                }
            }
        }
        let _ = writeln!(s, "\ntasks (each runs once per worker; a channel between tasks, none inside one):");
        for (t, task) in plan_tasks(g)?.iter().enumerate() {
            let mut names: Vec<&str> = Vec::new();
            if let Head::Source(n) = task.head {
                names.push(g.nodes[n].id.as_str());
            }
            names.extend(task.ops.iter().map(|&n| g.nodes[n].id.as_str()));
            names.extend(task.outputs.iter().filter_map(|o| match o {
                TaskOutput::Sink(n) => Some(g.nodes[*n].id.as_str()),
                TaskOutput::Edge { .. } => None,
            }));
            let _ = writeln!(s, "  {t}: {}", names.join(" -> "));
        }
        Ok(s)
    }

    fn dot(&self) -> String {
        let g = &self.graph;
        let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n", g.name);
        for n in &g.nodes {
            let id = n.id.as_str();
            let shape = match n.kind {
                NodeKind::Source { .. } => "cds",
                NodeKind::Op(_) => "box",
                NodeKind::Sink { .. } => "cylinder",
            };
            let _ = writeln!(s, "  \"{id}\" [shape={shape}, label=\"{id}\\n{}\"];", self.kind(id));
        }
        for n in &g.nodes {
            for e in &n.inputs {
                let (from, to) = (g.nodes[e.from].id.as_str(), n.id.as_str());
                let _ = match edge_label(&e.part) {
                    l if l.is_empty() => writeln!(s, "  \"{from}\" -> \"{to}\";"),
                    l => writeln!(s, "  \"{from}\" -> \"{to}\" [label=\"{l}\"];"),
                };
            }
        }
        s.push_str("}\n");
        s
    }

    fn mermaid(&self) -> String {
        let g = &self.graph;
        // Mermaid ids cannot hold every character a step id can: number the nodes.
        let mut s = String::from("flowchart LR\n");
        for (i, n) in g.nodes.iter().enumerate() {
            let id = n.id.as_str();
            let label = format!("{id}: {}", self.kind(id));
            let _ = match n.kind {
                NodeKind::Source { .. } => writeln!(s, "  n{i}([\"{label}\"])"),
                NodeKind::Op(_) => writeln!(s, "  n{i}[\"{label}\"]"),
                NodeKind::Sink { .. } => writeln!(s, "  n{i}[(\"{label}\")]"),
            };
        }
        for (i, n) in g.nodes.iter().enumerate() {
            for e in &n.inputs {
                let _ = match edge_label(&e.part) {
                    l if l.is_empty() => writeln!(s, "  n{} --> n{i}", e.from),
                    l => writeln!(s, "  n{} -- \"{l}\" --> n{i}", e.from),
                };
            }
        }
        s
    }
}
