//! The decoders' shared machinery: a plan of the schema as a tree of nodes, and growable column
//! buffers that a record can be rolled back from, turned into Arrow arrays at the end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_array::types::TimestampMillisecondType;
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, PrimitiveArray, RecordBatch, RecordBatchOptions, StringArray,
    StructArray,
};
use arrow_buffer::{BooleanBuffer, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Fields, Schema, SchemaRef, TimeUnit};

use crate::schema::join_path;
use crate::{FormatError, Result};

/// The node of the record itself; its children are the top-level fields.
pub(crate) const ROOT: usize = 0;

/// Above this many children a struct looks keys up in a hash map rather than by a linear scan.
const LINEAR_LOOKUP_MAX: usize = 12;

/// What a node holds.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Bool,
    Int64,
    Float64,
    Utf8,
    /// Milliseconds, with the schema's time zone.
    Timestamp(Option<Arc<str>>),
    /// The schema's child fields.
    Struct(Fields),
}

impl Kind {
    /// The type's name in error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Kind::Bool => "bool",
            Kind::Int64 => "int64",
            Kind::Float64 => "float64",
            Kind::Utf8 => "string",
            Kind::Timestamp(_) => "timestamp",
            Kind::Struct(_) => "struct",
        }
    }
}

/// One field of the schema (or the record itself, at [`ROOT`]).
#[derive(Debug)]
pub(crate) struct Node {
    /// The field's name (the key in the record).
    pub(crate) name: Box<str>,
    /// The dotted path from the top, for messages and CSV headers.
    pub(crate) path: Box<str>,
    /// Non-nullable.
    pub(crate) required: bool,
    pub(crate) kind: Kind,
    /// Node indices of the children, for structs.
    pub(crate) children: Box<[usize]>,
    /// Child node by name, for wide structs.
    lookup: Option<HashMap<Box<[u8]>, usize>>,
}

/// The schema as a tree of nodes in depth-first order, [`ROOT`] first.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) nodes: Vec<Node>,
}

impl Plan {
    /// Builds the plan of `schema`, failing on types the decoders do not support.
    pub(crate) fn new(schema: &Schema, format: &'static str) -> Result<Plan> {
        let mut plan = Plan { nodes: Vec::new() };
        plan.nodes.push(Node {
            name: "".into(),
            path: "".into(),
            required: true,
            kind: Kind::Struct(schema.fields().clone()),
            children: Box::new([]),
            lookup: None,
        });
        plan.add_children(ROOT, schema.fields(), format)?;
        Ok(plan)
    }

    fn add_children(&mut self, parent: usize, fields: &Fields, format: &'static str) -> Result<()> {
        let prefix = self.nodes[parent].path.to_string();
        let mut children = Vec::with_capacity(fields.len());
        let mut seen = HashSet::new();
        for field in fields.iter() {
            let path = join_path(&prefix, field.name());
            if !seen.insert(field.name().as_str()) {
                return Err(FormatError::InvalidSchema { field: path, reason: "the name appears twice".into() });
            }
            let kind = match field.data_type() {
                DataType::Boolean => Kind::Bool,
                DataType::Int64 => Kind::Int64,
                DataType::Float64 => Kind::Float64,
                DataType::Utf8 => Kind::Utf8,
                DataType::Timestamp(TimeUnit::Millisecond, tz) => Kind::Timestamp(tz.clone()),
                DataType::Struct(f) => Kind::Struct(f.clone()),
                other => return Err(FormatError::UnsupportedType { field: path, data_type: other.clone(), format }),
            };
            let id = self.nodes.len();
            children.push(id);
            let name = field.name().as_str();
            self.nodes.push(Node {
                name: name.into(),
                path: path.into(),
                required: !field.is_nullable(),
                kind: kind.clone(),
                children: Box::new([]),
                lookup: None,
            });
            if let Kind::Struct(f) = &kind {
                self.add_children(id, f, format)?;
            }
        }
        let lookup = (children.len() > LINEAR_LOOKUP_MAX)
            .then(|| children.iter().map(|&c| (Box::<[u8]>::from(self.nodes[c].name.as_bytes()), c)).collect());
        let node = &mut self.nodes[parent];
        node.children = children.into_boxed_slice();
        node.lookup = lookup;
        Ok(())
    }

    /// The child of struct node `s` called `key`.
    #[inline]
    pub(crate) fn find_child(&self, s: usize, key: &[u8]) -> Option<usize> {
        let node = &self.nodes[s];
        match &node.lookup {
            Some(map) => map.get(key).copied(),
            None => node.children.iter().copied().find(|&c| self.nodes[c].name.as_bytes() == key),
        }
    }

    /// The leaf (non-struct) nodes in depth-first order.
    pub(crate) fn leaves(&self) -> Vec<usize> {
        (1..self.nodes.len()).filter(|&i| !matches!(self.nodes[i].kind, Kind::Struct(_))).collect()
    }
}

/// The values of one column being built.
#[derive(Debug)]
pub(crate) enum Data {
    Bool(Vec<bool>),
    /// Int64 and timestamps.
    I64(Vec<i64>),
    F64(Vec<f64>),
    /// UTF-8 strings: `offsets` starts with 0 and has one more entry than there are values.
    Str {
        offsets: Vec<i32>,
        bytes: Vec<u8>,
    },
    /// Only validity: the values are in the children's columns.
    Struct,
}

/// One column being built: validity and values, always of the same length.
#[derive(Debug)]
pub(crate) struct Column {
    pub(crate) valid: Vec<bool>,
    pub(crate) data: Data,
}

impl Column {
    fn new(kind: &Kind) -> Column {
        let data = match kind {
            Kind::Bool => Data::Bool(Vec::new()),
            Kind::Int64 | Kind::Timestamp(_) => Data::I64(Vec::new()),
            Kind::Float64 => Data::F64(Vec::new()),
            Kind::Utf8 => Data::Str { offsets: vec![0], bytes: Vec::new() },
            Kind::Struct(_) => Data::Struct,
        };
        Column { valid: Vec::new(), data }
    }

    /// Number of values so far.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.valid.len()
    }

    /// Appends a null.
    #[inline]
    pub(crate) fn push_null(&mut self) {
        self.valid.push(false);
        match &mut self.data {
            Data::Bool(v) => v.push(false),
            Data::I64(v) => v.push(0),
            Data::F64(v) => v.push(0.0),
            Data::Str { offsets, bytes } => offsets.push(bytes.len() as i32),
            Data::Struct => {}
        }
    }

    /// Drops the values from index `n` on.
    pub(crate) fn truncate(&mut self, n: usize) {
        if self.valid.len() > n {
            self.valid.truncate(n);
            match &mut self.data {
                Data::Bool(v) => v.truncate(n),
                Data::I64(v) => v.truncate(n),
                Data::F64(v) => v.truncate(n),
                Data::Str { offsets, .. } => offsets.truncate(n + 1),
                Data::Struct => {}
            }
        }
        // Also drops the bytes of a string that failed half-way (not yet in `offsets`).
        if let Data::Str { offsets, bytes } = &mut self.data {
            if let Some(&end) = offsets.get(n) {
                bytes.truncate(end as usize);
            }
        }
    }

    fn reserve(&mut self, additional: usize) {
        self.valid.reserve(additional);
        match &mut self.data {
            Data::Bool(v) => v.reserve(additional),
            Data::I64(v) => v.reserve(additional),
            Data::F64(v) => v.reserve(additional),
            Data::Str { offsets, .. } => offsets.reserve(additional),
            Data::Struct => {}
        }
    }
}

/// The columns of every node of a plan, with the number of complete rows.
#[derive(Debug)]
pub(crate) struct Builders {
    pub(crate) cols: Vec<Column>,
    pub(crate) rows: usize,
}

impl Builders {
    pub(crate) fn new(plan: &Plan) -> Builders {
        Builders { cols: plan.nodes.iter().map(|n| Column::new(&n.kind)).collect(), rows: 0 }
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        for c in &mut self.cols {
            c.reserve(additional);
        }
    }

    /// Drops everything of rows from `n` on (a failed record's partial values).
    pub(crate) fn rollback(&mut self, n: usize) {
        for c in &mut self.cols {
            c.truncate(n);
        }
    }

    /// Builds the batch of all complete rows and starts afresh.
    pub(crate) fn finish(&mut self, plan: &Plan, schema: &SchemaRef) -> Result<RecordBatch> {
        let rows = self.rows;
        self.rollback(rows);
        self.rows = 0;
        let arrays = plan.nodes[ROOT]
            .children
            .iter()
            .map(|&c| build_array(plan, &mut self.cols, c))
            .collect::<Result<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(schema.clone(), arrays, &options)?)
    }
}

fn build_array(plan: &Plan, cols: &mut [Column], id: usize) -> Result<ArrayRef> {
    let node = &plan.nodes[id];
    let col = std::mem::replace(&mut cols[id], Column::new(&node.kind));
    let len = col.valid.len();
    let nulls = if col.valid.iter().all(|&v| v) { None } else { Some(NullBuffer::from(col.valid)) };
    let array: ArrayRef = match (col.data, &node.kind) {
        (Data::Bool(v), _) => Arc::new(BooleanArray::new(BooleanBuffer::from(v), nulls)),
        (Data::I64(v), Kind::Timestamp(tz)) => Arc::new(
            PrimitiveArray::<TimestampMillisecondType>::new(ScalarBuffer::from(v), nulls).with_timezone_opt(tz.clone()),
        ),
        (Data::I64(v), _) => Arc::new(Int64Array::new(ScalarBuffer::from(v), nulls)),
        (Data::F64(v), _) => Arc::new(Float64Array::new(ScalarBuffer::from(v), nulls)),
        (Data::Str { offsets, bytes }, _) => {
            if i32::try_from(bytes.len()).is_err() {
                return Err(FormatError::BatchTooLarge(format!(
                    "column `{}` holds {} bytes of strings, over the 2 GiB of one Utf8 array",
                    node.path,
                    bytes.len()
                )));
            }
            let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
            Arc::new(StringArray::try_new(offsets, Buffer::from_vec(bytes), nulls)?)
        }
        (Data::Struct, kind) => {
            // Struct columns belong to struct nodes; an empty field list would fail below.
            let fields = match kind {
                Kind::Struct(fields) => fields.clone(),
                _ => Fields::empty(),
            };
            let children = node.children.iter().map(|&c| build_array(plan, cols, c)).collect::<Result<Vec<_>>>()?;
            Arc::new(StructArray::try_new_with_length(fields, children, nulls, len)?)
        }
    };
    Ok(array)
}

/// Appends a null to node `id` and to all its descendants.
pub(crate) fn null_subtree(plan: &Plan, cols: &mut [Column], id: usize) {
    cols[id].push_null();
    for &c in plan.nodes[id].children.iter() {
        null_subtree(plan, cols, c);
    }
}

/// Truncates node `id` and all its descendants to `n` values.
pub(crate) fn truncate_subtree(plan: &Plan, cols: &mut [Column], id: usize, n: usize) {
    cols[id].truncate(n);
    for &c in plan.nodes[id].children.iter() {
        truncate_subtree(plan, cols, c, n);
    }
}

/// Completes row `n` of struct node `s` once its members have been read: a missing optional
/// child becomes null, a missing required one is an error; the struct itself becomes valid.
#[inline]
pub(crate) fn end_struct(plan: &Plan, cols: &mut [Column], s: usize, n: usize) -> Result<(), String> {
    for &c in plan.nodes[s].children.iter() {
        if cols[c].len() == n {
            if plan.nodes[c].required {
                return Err(format!("missing required field `{}`", plan.nodes[c].path));
            }
            null_subtree(plan, cols, c);
        }
    }
    if s != ROOT {
        cols[s].valid.push(true);
    }
    Ok(())
}

/// Milliseconds since the epoch of an RFC 3339 timestamp (`2023-11-14T22:13:20.123Z`).
pub(crate) fn parse_timestamp_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim()).ok().map(|t| t.timestamp_millis())
}

/// A decode pass of the decoders that read one record at a time from a tree (Avro, Protobuf):
/// `one` fills row `n` of the columns from a record or says why it cannot; a failed record is
/// rolled back and reported like every decoder's.
#[cfg(feature = "avro")]
pub(crate) fn decode_each(
    plan: &Plan,
    schema: &SchemaRef,
    builders: &mut Builders,
    buf: &[u8],
    records: &[std::ops::Range<usize>],
    mut one: impl FnMut(&[u8], usize, &mut [Column]) -> std::result::Result<(), (crate::RecordErrorKind, String)>,
) -> Result<crate::Decoded> {
    builders.reserve(records.len());
    let mut outcomes = Outcomes::default();
    for (index, range) in records.iter().enumerate() {
        let rec = crate::record_bytes(buf, index, range)?;
        let n = builders.rows;
        match one(rec, n, &mut builders.cols) {
            Ok(()) => {
                builders.rows += 1;
                outcomes.ok(index);
            }
            Err((kind, message)) => {
                builders.rollback(n);
                outcomes.failed(n, crate::RecordError { index, kind, message });
            }
        }
    }
    let batch = builders.finish(plan, schema)?;
    Ok(outcomes.into_decoded(batch))
}

/// What a decode pass tells about its records: the failures, and for each good row its record
/// (kept only once a record has failed, since until then row `i` is record `i`). Shared by
/// every decoder so that they report alike.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    errors: Vec<crate::RecordError>,
    row_records: Option<Vec<u32>>,
}

impl Outcomes {
    /// Record `index` became a row.
    pub(crate) fn ok(&mut self, index: usize) {
        if let Some(map) = &mut self.row_records {
            map.push(index as u32);
        }
    }

    /// A record failed when `rows` good rows had been built (the caller rolls the builders
    /// back to `rows`).
    pub(crate) fn failed(&mut self, rows: usize, error: crate::RecordError) {
        if self.row_records.is_none() {
            self.row_records = Some((0..rows as u32).collect());
        }
        self.errors.push(error);
    }

    /// The result of the pass.
    pub(crate) fn into_decoded(self, batch: RecordBatch) -> crate::Decoded {
        crate::Decoded { batch, errors: self.errors, row_records: self.row_records }
    }
}
