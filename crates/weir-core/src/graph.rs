//! A job as a dataflow graph: sources, operators and sinks joined by edges, and the plan that
//! fuses them into tasks.
//!
//! [`JobGraph`] is what the runtime runs. A straight pipeline ([`JobSpec`]: one source, a chain
//! of stages, one sink) converts into one, and plans to exactly the tasks it always had: one
//! per stage and worker, or a single task at one worker.
//!
//! Fusion ([`plan_tasks`]): a node runs in its producer's task, with no channel between them,
//! when it has one input and that edge keeps rows on their worker (`Forward`, or any edge when
//! there is one worker). A node whose input is repartitioned by key, or that has several
//! inputs (a union, a join), heads a task of its own. A node feeding several others keeps them
//! all in its task where they can fuse, so a fan-out costs no channel and no copy: each
//! consumer gets the same Arrow arrays.

use std::sync::Arc;

use crate::deadletter::DeadLetterSink;
use crate::error::{CoreError, Result};
use crate::ids::StepId;
use crate::operator::{OperatorFactory, SinkFactory, SourceFactory};
use crate::runtime::{CheckpointSpec, JobSpec, RetryPolicy, Upstream, WatermarkSpec};

/// Index of a node in [`JobGraph::nodes`].
pub type NodeId = usize;

/// How rows travel along an edge between workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioning {
    /// Each row stays on the worker that made it.
    Forward,
    /// Rows go to the worker owning their key (these column paths); no columns sends every row
    /// to worker 0.
    Hash(Vec<String>),
}

/// An input of a node.
#[derive(Debug, Clone)]
pub struct Edge {
    /// The producing node.
    pub from: NodeId,
    /// How rows are spread over the workers on the way.
    pub part: Partitioning,
}

/// What a node is.
#[derive(Debug, Clone)]
pub enum NodeKind {
    /// Reads input; has no inputs of its own.
    Source {
        /// Its instances.
        factory: Arc<dyn SourceFactory>,
        /// How its partitions' watermarks are made.
        watermark: WatermarkSpec,
    },
    /// Transforms its inputs' rows; input `i` is [`Node::inputs`]`[i]`.
    Op(Arc<dyn OperatorFactory>),
    /// Writes its one input out.
    Sink {
        /// Its instances.
        factory: Arc<dyn SinkFactory>,
        /// A column holding each row's creation time in µs since the epoch; when set, the sink
        /// records creation-to-write latency.
        latency_column: Option<String>,
        /// How a failing write is retried.
        retry: RetryPolicy,
    },
}

/// A step of the graph.
#[derive(Debug, Clone)]
pub struct Node {
    /// The step's id: metrics, logs, dead letters and checkpointed state are keyed by it.
    pub id: StepId,
    /// Source, operator or sink.
    pub kind: NodeKind,
    /// Where its rows come from, in input order (empty for a source).
    pub inputs: Vec<Edge>,
}

/// A planned job as a graph; see the module documentation.
#[derive(Debug, Clone)]
pub struct JobGraph {
    /// Name of the job (metrics label, logs).
    pub name: String,
    /// Number of workers; each runs every task.
    pub workers: usize,
    /// The nodes, each after every node it reads from.
    pub nodes: Vec<Node>,
    /// Where dead letters go.
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Capacity of each channel, in messages (batches).
    pub channel_capacity: usize,
    /// Keys that keep failing are diverted by every source while quarantined.
    pub quarantine: Option<Arc<crate::quarantine::Quarantine>>,
    /// Opt-in load shedding at the sources.
    pub shedding: Option<(crate::shed::OverloadSpec, Arc<dyn crate::shed::ShedPredicate>)>,
    /// Checkpoints: where, how often, and whether to ignore earlier ones.
    pub checkpoint: Option<CheckpointSpec>,
    /// The part of the pipeline before a repartition topic, run alongside.
    pub upstream: Option<Upstream>,
    /// Records read count as the job's input.
    pub counts_input: bool,
    /// Rows written count as the job's output.
    pub counts_output: bool,
}

impl From<JobSpec> for JobGraph {
    fn from(s: JobSpec) -> Self {
        let mut nodes = vec![Node {
            id: s.source_step.clone(),
            kind: NodeKind::Source { factory: s.source.clone(), watermark: s.watermark },
            inputs: Vec::new(),
        }];
        // The key of a stage's exchange sits on the edge into the stage's first node, which is
        // the sink when the stage has no operators.
        let mut pending: Option<Partitioning> = None;
        for stage in &s.stages {
            if let Some(k) = &stage.key {
                pending = Some(Partitioning::Hash(k.clone()));
            }
            for (id, f) in &stage.ops {
                let from = nodes.len() - 1;
                let part = pending.take().unwrap_or(Partitioning::Forward);
                nodes.push(Node { id: id.clone(), kind: NodeKind::Op(f.clone()), inputs: vec![Edge { from, part }] });
            }
        }
        let from = nodes.len() - 1;
        nodes.push(Node {
            id: s.sink_step.clone(),
            kind: NodeKind::Sink {
                factory: s.sink.clone(),
                latency_column: s.latency_column.clone(),
                retry: s.sink_retry,
            },
            inputs: vec![Edge { from, part: pending.unwrap_or(Partitioning::Forward) }],
        });
        Self {
            name: s.name,
            workers: s.workers,
            nodes,
            dead_letters: s.dead_letters,
            channel_capacity: s.channel_capacity,
            quarantine: s.quarantine,
            shedding: s.shedding,
            checkpoint: s.checkpoint,
            upstream: s.upstream,
            counts_input: s.counts_input,
            counts_output: s.counts_output,
        }
    }
}

impl JobGraph {
    /// Checks the shape: inputs point backwards, sources have none, other nodes have some,
    /// ids are unique and every node but a sink feeds something.
    ///
    /// # Errors
    /// A [`CoreError::Config`] naming the step.
    pub fn check(&self) -> Result<()> {
        crate::ensure_config!(self.workers >= 1, "workers must be at least 1");
        crate::ensure_config!(
            self.nodes.iter().any(|n| matches!(n.kind, NodeKind::Source { .. })),
            "a job needs a source"
        );
        let mut seen = std::collections::HashSet::new();
        let mut used = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if !seen.insert(n.id.as_str()) {
                return Err(CoreError::Config(format!("two steps are called `{}`", n.id)));
            }
            match n.kind {
                NodeKind::Source { .. } if !n.inputs.is_empty() => {
                    return Err(CoreError::Config("a source has no inputs".into()).in_step(&n.id));
                }
                NodeKind::Op(_) | NodeKind::Sink { .. } if n.inputs.is_empty() => {
                    return Err(CoreError::Config("this step has no input".into()).in_step(&n.id));
                }
                NodeKind::Sink { .. } if n.inputs.len() > 1 => {
                    return Err(CoreError::Config("a sink has one input".into()).in_step(&n.id));
                }
                _ => {}
            }
            for e in &n.inputs {
                if e.from >= i {
                    return Err(CoreError::Internal(format!("step `{}` reads a step planned after it", n.id)));
                }
                if matches!(self.nodes[e.from].kind, NodeKind::Sink { .. }) {
                    return Err(CoreError::Config(format!(
                        "`{}` is a sink: nothing reads from it",
                        self.nodes[e.from].id
                    ))
                    .in_step(&n.id));
                }
                used[e.from] = true;
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if !used[i] && !matches!(n.kind, NodeKind::Sink { .. }) {
                return Err(CoreError::Config(
                    "nothing reads this step's output; add a sink or another step after it".into(),
                )
                .in_step(&n.id));
            }
        }
        Ok(())
    }

    /// The source nodes.
    pub fn sources(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().filter(|(_, n)| matches!(n.kind, NodeKind::Source { .. }))
    }

    /// The sink nodes with their factories.
    pub fn sinks(&self) -> impl Iterator<Item = (&StepId, &Arc<dyn SinkFactory>)> {
        self.nodes.iter().filter_map(|n| match &n.kind {
            NodeKind::Sink { factory, .. } => Some((&n.id, factory)),
            _ => None,
        })
    }
}

/// Where a node's output goes inside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Into operator `link` of the task (an index into [`TaskPlan::ops`]), as its input `port`.
    Link {
        /// The operator.
        link: usize,
        /// Which of its inputs.
        port: usize,
    },
    /// Out of the task through output `out` (an index into [`TaskPlan::outputs`]).
    Out(usize),
}

/// Where rows leave a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutput {
    /// Into another task's input, over channels.
    Edge {
        /// The consuming node (the head of its task).
        to: NodeId,
        /// Which of its inputs.
        port: usize,
    },
    /// Written by a sink node.
    Sink(NodeId),
}

/// What the head of a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A source: its rows go to [`TaskPlan::root`].
    Source(NodeId),
    /// Channels from other tasks feed [`TaskPlan::root`] (one operator, or one sink).
    Inputs,
}

/// One task of the physical plan (it runs once per worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlan {
    /// What feeds the task.
    pub head: Head,
    /// The operators in the task, in graph order.
    pub ops: Vec<NodeId>,
    /// Where the head's rows go.
    pub root: Vec<Target>,
    /// Where each operator's output goes (parallel to `ops`).
    pub routes: Vec<Vec<Target>>,
    /// The operator or output whose output each of `routes`/`root` follows: for operator `i`,
    /// the link it reads from (`None`: the head). Used to pass watermarks along.
    pub feeds: Vec<Option<usize>>,
    /// Where rows leave the task.
    pub outputs: Vec<TaskOutput>,
    /// For each output, the operator whose rows it takes (`None`: the head).
    pub output_from: Vec<Option<usize>>,
}

/// Fuses the graph's nodes into tasks (see the module documentation). Task `t` of a chain is
/// its stage `t`.
///
/// # Errors
/// A graph that [`JobGraph::check`] refuses.
pub fn plan_tasks(g: &JobGraph) -> Result<Vec<TaskPlan>> {
    g.check()?;
    let n = g.nodes.len();
    let fuses = |i: NodeId| -> bool {
        let node = &g.nodes[i];
        node.inputs.len() == 1 && (node.inputs[0].part == Partitioning::Forward || g.workers == 1)
    };
    // task_of[node], and the node's link index in that task (operators only).
    let mut task_of: Vec<usize> = vec![usize::MAX; n];
    let mut link_of: Vec<Option<usize>> = vec![None; n];
    let mut tasks: Vec<TaskPlan> = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let t = match node.kind {
            NodeKind::Source { .. } => None,
            _ if fuses(i) => Some(task_of[node.inputs[0].from]),
            _ => None,
        };
        let t = t.unwrap_or_else(|| {
            let head = if matches!(node.kind, NodeKind::Source { .. }) { Head::Source(i) } else { Head::Inputs };
            tasks.push(TaskPlan {
                head,
                ops: Vec::new(),
                root: Vec::new(),
                routes: Vec::new(),
                feeds: Vec::new(),
                outputs: Vec::new(),
                output_from: Vec::new(),
            });
            tasks.len() - 1
        });
        task_of[i] = t;
        let task = &mut tasks[t];
        let head_of_task = !fuses(i);
        // The link (or head) this node reads from inside its task.
        let within: Option<usize> = if head_of_task { None } else { link_of[node.inputs[0].from] };
        let target = match node.kind {
            NodeKind::Source { .. } => continue,
            NodeKind::Op(_) => {
                task.ops.push(i);
                task.routes.push(Vec::new());
                task.feeds.push(within);
                let link = task.ops.len() - 1;
                link_of[i] = Some(link);
                Target::Link { link, port: 0 }
            }
            NodeKind::Sink { .. } => {
                task.outputs.push(TaskOutput::Sink(i));
                task.output_from.push(within);
                Target::Out(task.outputs.len() - 1)
            }
        };
        if head_of_task {
            // Fed by channels from other tasks: the producers' tasks get an output each.
            task.root.push(target);
            for (port, e) in node.inputs.iter().enumerate() {
                let up = task_of[e.from];
                let from_link = link_of[e.from];
                let up_task = &mut tasks[up];
                up_task.outputs.push(TaskOutput::Edge { to: i, port });
                up_task.output_from.push(from_link);
                let out = Target::Out(up_task.outputs.len() - 1);
                match from_link {
                    Some(l) => up_task.routes[l].push(out),
                    None => up_task.root.push(out),
                }
            }
        } else {
            match within {
                Some(l) => task.routes[l].push(target),
                None => task.root.push(target),
            }
        }
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::StageSpec;
    use crate::testing::{CollectSink, MemoryDeadLetters, VecSourceFactory};

    #[derive(Debug)]
    struct Nop;
    impl OperatorFactory for Nop {
        fn create(&self, _: usize, _: usize) -> Result<Box<dyn crate::operator::Operator>> {
            Err(CoreError::Internal("not run".into()))
        }
    }

    fn op(id: &str) -> (StepId, Arc<dyn OperatorFactory>) {
        (StepId::new(id), Arc::new(Nop))
    }

    fn chain(workers: usize, stages: Vec<StageSpec>) -> JobGraph {
        let schema = Arc::new(arrow_schema::Schema::empty());
        JobSpec {
            name: "t".into(),
            workers,
            source_step: StepId::new("src"),
            source: Arc::new(VecSourceFactory::new(schema, Vec::new())),
            stages,
            sink_step: StepId::new("out"),
            sink: Arc::new(CollectSink::default()),
            dead_letters: Arc::new(MemoryDeadLetters::default()),
            watermark: WatermarkSpec { bound: std::time::Duration::ZERO, idle_timeout: None },
            channel_capacity: 4,
            latency_column: None,
            sink_retry: RetryPolicy::default(),
            quarantine: None,
            shedding: None,
            checkpoint: None,
            upstream: None,
            counts_input: true,
            counts_output: true,
        }
        .into()
    }

    /// A chain plans to one task per stage at several workers, and to one task at one
    /// worker: the tasks it always had.
    #[test]
    fn a_chain_plans_to_its_stages_or_to_one_task_at_one_worker() {
        let stages = || {
            vec![
                StageSpec { key: None, ops: vec![op("parse"), op("filter")] },
                StageSpec { key: Some(vec!["k".into()]), ops: vec![op("window")] },
                StageSpec { key: Some(vec![]), ops: vec![] },
            ]
        };
        let g = chain(2, stages());
        let plan = plan_tasks(&g).unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0].head, Head::Source(0));
        assert_eq!(plan[0].ops, vec![1, 2]);
        assert_eq!(plan[0].root, vec![Target::Link { link: 0, port: 0 }]);
        assert_eq!(plan[0].routes, vec![vec![Target::Link { link: 1, port: 0 }], vec![Target::Out(0)]]);
        assert_eq!(plan[0].outputs, vec![TaskOutput::Edge { to: 3, port: 0 }]);
        assert_eq!(plan[1].ops, vec![3]);
        assert_eq!(plan[1].outputs, vec![TaskOutput::Edge { to: 4, port: 0 }]);
        assert_eq!(plan[2].head, Head::Inputs);
        assert!(plan[2].ops.is_empty());
        assert_eq!(plan[2].root, vec![Target::Out(0)]);
        assert_eq!(plan[2].outputs, vec![TaskOutput::Sink(4)]);
        assert_eq!(g.nodes[4].inputs[0].part, Partitioning::Hash(vec![]));

        let one = plan_tasks(&chain(1, stages())).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].ops, vec![1, 2, 3]);
        assert_eq!(one[0].outputs, vec![TaskOutput::Sink(4)]);
        assert_eq!(one[0].output_from, vec![Some(2)]);
    }

    /// Two sources into a two-input step: each source is a task, and the join heads a task of
    /// its own that the steps after it fuse into; a fan-out after it stays in that task.
    #[test]
    fn a_join_heads_its_task_and_a_fan_out_stays_fused() {
        let mut g = chain(1, vec![StageSpec { key: None, ops: vec![] }]);
        let src = g.nodes[0].clone();
        let mut b = src.clone();
        b.id = StepId::new("b");
        let sink_kind = g.nodes[1].kind.clone();
        let sink = |id: &str, from: NodeId| Node {
            id: StepId::new(id),
            kind: sink_kind.clone(),
            inputs: vec![Edge { from, part: Partitioning::Forward }],
        };
        let fwd = |from| Edge { from, part: Partitioning::Forward };
        g.nodes = vec![
            src,
            b,
            Node { id: StepId::new("j"), kind: NodeKind::Op(Arc::new(Nop)), inputs: vec![fwd(0), fwd(1)] },
            Node { id: StepId::new("sel"), kind: NodeKind::Op(Arc::new(Nop)), inputs: vec![fwd(2)] },
            sink("o1", 3),
            sink("o2", 2),
        ];
        let plan = plan_tasks(&g).unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0].outputs, vec![TaskOutput::Edge { to: 2, port: 0 }]);
        assert_eq!(plan[1].outputs, vec![TaskOutput::Edge { to: 2, port: 1 }]);
        assert_eq!(plan[0].root, vec![Target::Out(0)]);
        let j = &plan[2];
        assert_eq!(j.head, Head::Inputs);
        assert_eq!(j.ops, vec![2, 3]);
        assert_eq!(j.root, vec![Target::Link { link: 0, port: 0 }]);
        assert_eq!(j.routes, vec![vec![Target::Link { link: 1, port: 0 }, Target::Out(1)], vec![Target::Out(0)]]);
        assert_eq!(j.outputs, vec![TaskOutput::Sink(4), TaskOutput::Sink(5)]);
        assert_eq!(j.output_from, vec![Some(1), Some(0)]);
        assert_eq!(j.feeds, vec![None, Some(0)]);
    }

    #[test]
    fn a_step_nothing_reads_is_refused() {
        let mut g = chain(1, vec![StageSpec { key: None, ops: vec![op("a")] }]);
        g.nodes.insert(
            2,
            Node {
                id: StepId::new("lost"),
                kind: NodeKind::Op(Arc::new(Nop)),
                inputs: vec![Edge { from: 1, part: Partitioning::Forward }],
            },
        );
        let e = plan_tasks(&g).unwrap_err().to_string();
        assert!(e.contains("lost") && e.contains("nothing reads"), "{e}");
    }
}
