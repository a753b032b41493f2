//! Keyed tables: the current value of every key, kept as events arrive, without windows.
//!
//! A table holds per key either running aggregates (`count`, `sum`, `min`, `max`, `last`...
//! over every row of the key so far) or the key's latest row (a changelog stream's current
//! state: the row with the newest event time, ties going to the later arrival). After each
//! batch it emits one change per key the batch changed: the key, its value now and
//! [`CHANGE_COLUMN`] (`insert` for a new key, `update`), at the newest event time among the
//! key's rows in the batch. With a TTL, a key not updated for that long (event time, by the
//! watermark) is forgotten and a `delete` change carrying its last value is emitted. Sinks in
//! upsert mode write the changes as upserts and deletes (PostgreSQL `ON CONFLICT` and
//! `DELETE`, Redis `HSET` and `DEL`, Kafka records and tombstones).
//!
//! Tables are queryable while the job runs ([`Tables`]): the HTTP port answers
//! `GET /tables/<id>/<key>` from the operator's own state, shared behind a lock that the
//! operator takes once per batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use weir_core::keys::{key_columns, KeyInterner};
use weir_core::metrics::StepMetrics;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

use crate::aggregate::{Accumulators, AggSpec};
use crate::{field_by_path, leaf_name};

pub use weir_core::changes::CHANGE_COLUMN;

/// What a table keeps per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableValues {
    /// Running aggregates over every row of the key.
    Aggregates(Vec<AggSpec>),
    /// The key's latest row (by event time).
    Latest,
}

/// Settings of a table step.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// The step id, under which queries find the table.
    pub id: String,
    /// Key column paths (at least one).
    pub keys: Vec<String>,
    /// What is kept per key.
    pub values: TableValues,
    /// Forget (and emit a `delete` for) a key not updated for this long, event time.
    pub state_ttl: Option<std::time::Duration>,
    /// Where the running table is published for queries.
    pub tables: Tables,
}

impl TableSpec {
    /// Checks the spec against the input schema and returns the factory and the schema of its
    /// changes: the key columns (by their last path segment) and the aggregates, or the input's
    /// columns for `latest`, then [`CHANGE_COLUMN`].
    ///
    /// # Errors
    /// No key, unknown or non-numeric columns, duplicate output names.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        weir_core::ensure_config!(!self.keys.is_empty(), "a table needs at least one key column");
        let mut key_types = Vec::new();
        let mut fields = Vec::new();
        for k in &self.keys {
            let f = field_by_path(input, k)?;
            key_types.push(f.data_type().clone());
            fields.push(Field::new(leaf_name(k), f.data_type().clone(), true));
        }
        match &self.values {
            TableValues::Latest => fields = input.fields().iter().map(|f| f.as_ref().clone()).collect(),
            TableValues::Aggregates(aggs) => {
                weir_core::ensure_config!(!aggs.is_empty(), "a table needs `aggregates` or `latest: true`");
                let inputs = crate::aggregate::input_types(aggs, input)?;
                fields.extend(Accumulators::fields(aggs, &inputs));
            }
        }
        let values = Arc::new(Schema::new(fields.clone()));
        fields.push(Field::new(CHANGE_COLUMN, DataType::Utf8, false));
        let mut seen = std::collections::HashSet::new();
        for f in &fields {
            weir_core::ensure_config!(
                seen.insert(f.name().clone()),
                "the table's changes would have two columns named `{}`; rename one",
                f.name()
            );
        }
        let out = Arc::new(Schema::new(fields));
        let factory = TableFactory { spec: self.clone(), out: out.clone(), values, key_types };
        Ok((Arc::new(factory), out))
    }
}

#[derive(Debug)]
struct TableFactory {
    spec: TableSpec,
    out: SchemaRef,
    /// The schema of a table's rows as queries see them: the changes without the change column.
    values: SchemaRef,
    key_types: Vec<DataType>,
}

impl OperatorFactory for TableFactory {
    fn create(&self, worker: usize, workers: usize) -> Result<Box<dyn Operator>> {
        let state = match &self.spec.values {
            TableValues::Aggregates(aggs) => {
                let funcs: Vec<_> = aggs.iter().map(|a| a.func).collect();
                Values::Aggregates { acc: Accumulators::new(&funcs), slots: Vec::new() }
            }
            TableValues::Latest => Values::Latest { rows: Vec::new(), times: Vec::new(), kept: Vec::new() },
        };
        let core = Arc::new(Mutex::new(Core {
            interner: KeyInterner::new(&self.key_types)?.with_ttl(self.spec.state_ttl),
            present: Vec::new(),
            live: 0,
            state,
            values: self.values.clone(),
            keys: self.spec.keys.len(),
        }));
        self.spec.tables.register(&self.spec.id, worker, workers, &self.key_types, core.clone());
        Ok(Box::new(Table { spec: self.spec.clone(), out: self.out.clone(), core }))
    }
}

/// Per key id, what the table holds.
#[derive(Debug)]
enum Values {
    Aggregates {
        acc: Accumulators,
        /// Accumulator slot per key id (`u32::MAX`: none).
        slots: Vec<u32>,
    },
    Latest {
        /// Per key id, (batch, row) of its latest row in `kept`.
        rows: Vec<Option<(u32, u32)>>,
        /// Per key id, that row's event time.
        times: Vec<i64>,
        /// Input batches holding latest rows; compacted when mostly superseded.
        kept: Vec<StructArray>,
    },
}

/// A table's state on one worker, shared with queries.
#[derive(Debug)]
pub(crate) struct Core {
    interner: KeyInterner,
    /// Per key id, whether the key is in the table.
    present: Vec<bool>,
    live: usize,
    state: Values,
    values: SchemaRef,
    keys: usize,
}

impl Core {
    /// The table's rows of the given key ids (present ones), as a batch of its value schema.
    fn rows(&self, ids: &[u32]) -> Result<RecordBatch> {
        match &self.state {
            Values::Aggregates { acc, slots } => {
                let mut cols = self.interner.columns(ids)?;
                let picked: Vec<u32> = ids.iter().map(|&k| slots[k as usize]).collect();
                for (i, c) in acc.finish(&picked).into_iter().enumerate() {
                    let want = self.values.field(self.keys + i).data_type();
                    cols.push(if c.data_type() == want { c } else { arrow_cast::cast(&c, want)? });
                }
                Ok(RecordBatch::try_new(self.values.clone(), cols)?)
            }
            Values::Latest { rows, kept, .. } => {
                let sources: Vec<&dyn Array> = kept.iter().map(|a| a as &dyn Array).collect();
                let refs: Vec<(usize, usize)> = ids
                    .iter()
                    .map(|&k| rows[k as usize].map(|(b, r)| (b as usize, r as usize)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| CoreError::Internal("a table key without a row".into()))?;
                if refs.is_empty() {
                    return Ok(RecordBatch::new_empty(self.values.clone()));
                }
                let s = arrow_select::interleave::interleave(&sources, &refs)?;
                Ok(RecordBatch::from(s.as_struct().clone()).with_schema(self.values.clone())?)
            }
        }
    }

    /// Ids of the keys present now, in id order.
    fn present_ids(&self) -> Vec<u32> {
        self.present.iter().enumerate().filter(|(_, p)| **p).map(|(i, _)| i as u32).collect()
    }

    fn grow(&mut self) {
        let n = self.interner.capacity();
        if self.present.len() < n {
            self.present.resize(n, false);
            match &mut self.state {
                Values::Aggregates { slots, .. } => slots.resize(n, u32::MAX),
                Values::Latest { rows, times, .. } => {
                    rows.resize(n, None);
                    times.resize(n, i64::MIN);
                }
            }
        }
    }

    /// Rewrites the kept batches into one holding only the latest rows, once they are mostly
    /// superseded rows.
    fn compact(&mut self) -> Result<()> {
        let live = self.live;
        let Values::Latest { rows, kept, .. } = &mut self.state else { return Ok(()) };
        let held: usize = kept.iter().map(Array::len).sum();
        if held <= 2 * live + 4096 {
            return Ok(());
        }
        let ids: Vec<usize> = (0..rows.len()).filter(|&k| rows[k].is_some()).collect();
        let refs: Vec<(usize, usize)> =
            ids.iter().filter_map(|&k| rows[k].map(|(b, r)| (b as usize, r as usize))).collect();
        let sources: Vec<&dyn Array> = kept.iter().map(|a| a as &dyn Array).collect();
        let one = arrow_select::interleave::interleave(&sources, &refs)?.as_struct().clone();
        for (i, &k) in ids.iter().enumerate() {
            rows[k] = Some((0, i as u32));
        }
        *kept = vec![one];
        Ok(())
    }
}

#[derive(Debug)]
struct Table {
    spec: TableSpec,
    out: SchemaRef,
    core: Arc<Mutex<Core>>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // A panic elsewhere while holding it leaves plain data, still consistent per batch.
    core.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Table {
    /// Emits the rows of `ids` as changes of kind `ops[i]` at `times[i]`.
    fn emit(&self, core: &Core, ids: &[u32], ops: Vec<&str>, times: Vec<i64>, cx: &mut OpContext<'_>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let rows = core.rows(ids)?;
        let mut cols = rows.columns().to_vec();
        cols.push(Arc::new(StringArray::from(ops)));
        let rb = RecordBatch::try_new(self.out.clone(), cols)?;
        StepMetrics::add(&cx.metrics.results_out, rb.num_rows() as u64);
        cx.emit(Batch::new(rb, Int64Array::from(times))?);
        Ok(())
    }
}

impl Operator for Table {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let n = batch.num_rows();
        let keys = key_columns(&batch.rows, &self.spec.keys)?;
        let core = self.core.clone();
        let mut core = lock(&core);
        let ids = core.interner.intern_at(&keys, Some(&batch.time))?.to_vec();
        core.grow();
        let times = batch.time.values();
        // Per key the batch touched: whether it is new, and its newest time in the batch.
        let mut touched: BTreeMap<u32, (bool, i64)> = BTreeMap::new();
        let mut added = 0;
        for (i, &k) in ids.iter().enumerate() {
            let new = !core.present[k as usize];
            if new {
                core.present[k as usize] = true;
                added += 1;
            }
            let e = touched.entry(k).or_insert((new, times[i]));
            e.1 = e.1.max(times[i]);
        }
        core.live += added;
        let c = &mut *core;
        match &mut c.state {
            Values::Aggregates { acc, slots } => {
                for &k in touched.keys() {
                    if slots[k as usize] == u32::MAX {
                        slots[k as usize] = acc.alloc();
                    }
                }
                let row_slots: Vec<u32> = ids.iter().map(|&k| slots[k as usize]).collect();
                let TableValues::Aggregates(aggs) = &self.spec.values else {
                    weir_core::bail_internal!("a table of aggregates without them")
                };
                let values = crate::aggregate::input_values(aggs, &batch.rows)?;
                acc.update(&row_slots, &values, &batch.time);
            }
            Values::Latest { rows, times: latest, kept } => {
                let b = kept.len() as u32;
                let mut used = false;
                for (i, &k) in ids.iter().enumerate() {
                    // Newest event time wins; a tie goes to the later arrival.
                    if rows[k as usize].is_none() || times[i] >= latest[k as usize] {
                        rows[k as usize] = Some((b, i as u32));
                        latest[k as usize] = times[i];
                        used = true;
                    }
                }
                if used {
                    kept.push(StructArray::from(batch.rows.clone()));
                }
            }
        }
        core.compact()?;
        StepMetrics::add(&cx.metrics.aggregated, n as u64);
        let ids: Vec<u32> = touched.keys().copied().collect();
        let ops = touched.values().map(|(new, _)| if *new { "insert" } else { "update" }).collect();
        let times = touched.values().map(|(_, t)| *t).collect();
        self.emit(&core, &ids, ops, times, cx)?;
        report(cx, core.live);
        Ok(())
    }

    fn on_watermark(&mut self, wm: i64, cx: &mut OpContext<'_>) -> Result<()> {
        // The end of a bounded input is not time passing: the table keeps what it holds.
        if self.spec.state_ttl.is_none() || wm == weir_core::batch::END_OF_TIME {
            return Ok(());
        }
        let core = self.core.clone();
        let mut core = lock(&core);
        let gone = core.interner.expire(wm, |_| false);
        let gone: Vec<u32> = gone.into_iter().filter(|k| core.present.get(*k as usize) == Some(&true)).collect();
        if gone.is_empty() {
            return Ok(());
        }
        // The last values go out with the deletes, then the state.
        let n = gone.len();
        self.emit(&core, &gone, vec!["delete"; n], vec![wm.saturating_sub(1); n], cx)?;
        let c = &mut *core;
        for &k in &gone {
            c.present[k as usize] = false;
            match &mut c.state {
                Values::Aggregates { acc, slots } => {
                    acc.release(slots[k as usize]);
                    slots[k as usize] = u32::MAX;
                }
                Values::Latest { rows, times, .. } => {
                    rows[k as usize] = None;
                    times[k as usize] = i64::MIN;
                }
            }
        }
        c.live -= n;
        c.compact()?;
        report(cx, c.live);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<RecordBatch>> {
        let core = lock(&self.core);
        let ids = core.present_ids();
        if ids.is_empty() {
            return Ok(None);
        }
        let (fields, cols): (Vec<Field>, Vec<ArrayRef>) = match &core.state {
            Values::Aggregates { acc, slots } => {
                let stride = acc.stride();
                let mut fields = Vec::new();
                let mut cols: Vec<ArrayRef> = Vec::new();
                for j in 0..stride {
                    fields.push(Field::new(format!("acc{j}"), DataType::Float64, false));
                    cols.push(Arc::new(Float64Array::from_iter_values(
                        ids.iter().map(|&k| acc.raw(slots[k as usize])[j]),
                    )));
                }
                (fields, cols)
            }
            Values::Latest { times, .. } => {
                let rows = core.rows(&ids)?;
                let row = StructArray::from(rows);
                (
                    vec![Field::new("ts", DataType::Int64, false), Field::new("row", row.data_type().clone(), false)],
                    vec![Arc::new(Int64Array::from_iter_values(ids.iter().map(|&k| times[k as usize]))), Arc::new(row)],
                )
            }
        };
        crate::snapshot::keyed_table(&core.interner, true, &ids, fields, cols).map(Some)
    }

    fn restore(&mut self, state: RecordBatch) -> Result<()> {
        let mut core = lock(&self.core);
        let nkeys = core.keys;
        let ids = crate::snapshot::read_keys(&mut core.interner, nkeys, &state)?;
        core.grow();
        let c = &mut *core;
        match &mut c.state {
            Values::Aggregates { acc, slots } => {
                let stride = acc.stride();
                let cols: Vec<Float64Array> = (0..stride)
                    .map(|j| crate::snapshot::f64s(&state, &format!("acc{j}")).cloned())
                    .collect::<Result<_>>()?;
                let mut raw = vec![0.0; stride];
                for (i, &k) in ids.iter().enumerate() {
                    for (j, c) in cols.iter().enumerate() {
                        raw[j] = c.value(i);
                    }
                    slots[k as usize] = acc.alloc_raw(&raw);
                }
            }
            Values::Latest { rows, times, kept } => {
                let ts = crate::snapshot::i64s(&state, "ts")?;
                let row = state
                    .column_by_name("row")
                    .ok_or_else(|| CoreError::Config("table state has no column `row`".into()))?
                    .as_struct()
                    .clone();
                let b = kept.len() as u32;
                for (i, &k) in ids.iter().enumerate() {
                    rows[k as usize] = Some((b, i as u32));
                    times[k as usize] = ts.value(i);
                }
                kept.push(row);
            }
        }
        for &k in &ids {
            c.present[k as usize] = true;
        }
        c.live = c.present.iter().filter(|p| **p).count();
        Ok(())
    }
}

/// Key values given as text, as one-row columns of the key's types.
fn parse_key(key: &[&str], types: &[DataType]) -> Result<Vec<ArrayRef>> {
    if key.len() != types.len() {
        return Err(CoreError::Config(format!(
            "the table has {} key column(s); the query gives {} value(s)",
            types.len(),
            key.len()
        )));
    }
    key.iter()
        .zip(types)
        .map(|(v, t)| {
            let s: ArrayRef = Arc::new(StringArray::from(vec![*v]));
            let c = arrow_cast::cast(&s, t)?;
            if c.is_null(0) {
                return Err(CoreError::Config(format!("`{v}` is not a value of the key's type {t}")));
            }
            Ok(c)
        })
        .collect()
}

fn report(cx: &mut OpContext<'_>, live: usize) {
    let worker = cx.worker.to_string();
    cx.registry.connectors.set(
        "weir_table_keys",
        "Keys a table holds on one worker.",
        &[("step", cx.step.as_str()), ("worker", worker.as_str())],
        live as f64,
    );
}

type SharedCore = Arc<Mutex<Core>>;

/// One table's shards, one per worker, with what a query needs to read them.
#[derive(Debug)]
struct Shards {
    key_types: Vec<DataType>,
    cores: Vec<Option<Arc<Mutex<Core>>>>,
}

/// The running job's tables, for queries (`GET /tables/...`): each table's state on every
/// worker of this process. Cloning shares it.
#[derive(Clone, Default)]
pub struct Tables {
    shards: Arc<Mutex<BTreeMap<String, Shards>>>,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables").field("ids", &self.ids()).finish_non_exhaustive()
    }
}

/// A table query's answer.
#[derive(Debug)]
pub enum TableAnswer {
    /// The rows found (for a key lookup at most one), and whether a scan stopped at its limit.
    Rows(RecordBatch, bool),
    /// No table of that id runs in this process.
    NoTable,
}

impl Tables {
    fn register(&self, id: &str, worker: usize, workers: usize, key_types: &[DataType], core: Arc<Mutex<Core>>) {
        let mut all = self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let shards =
            all.entry(id.to_string()).or_insert_with(|| Shards { key_types: key_types.to_vec(), cores: Vec::new() });
        if shards.cores.len() != workers {
            // A new run (restarted, or with another number of workers) replaces the old shards.
            shards.cores = vec![None; workers];
        }
        shards.cores[worker] = Some(core);
    }

    /// The ids of the tables running here.
    pub fn ids(&self) -> Vec<String> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect()
    }

    /// The shards of table `id`, and its key types.
    fn shards(&self, id: &str) -> Option<(Vec<DataType>, Vec<SharedCore>)> {
        let all = self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.get(id).map(|s| (s.key_types.clone(), s.cores.iter().flatten().cloned().collect()))
    }

    /// The row of table `id` whose key columns are `key` (each a string, parsed as its
    /// column's type).
    ///
    /// # Errors
    /// Not as many values as key columns, or a value that is not of its column's type.
    pub fn get(&self, id: &str, key: &[&str]) -> Result<TableAnswer> {
        let Some((types, cores)) = self.shards(id) else { return Ok(TableAnswer::NoTable) };
        let cols = parse_key(key, &types)?;
        let mut schema = None;
        for core in cores {
            let core = lock(&core);
            if let Some(k) = core.interner.find(&cols)?[0] {
                if core.present.get(k as usize) == Some(&true) {
                    return Ok(TableAnswer::Rows(core.rows(&[k])?, false));
                }
            }
            schema.get_or_insert_with(|| core.values.clone());
        }
        let schema = schema.unwrap_or_else(|| Arc::new(Schema::empty()));
        Ok(TableAnswer::Rows(RecordBatch::new_empty(schema), false))
    }

    /// Key values given as text for table `id`, as one-row columns of its key's types
    /// (`None` when no such table runs here).
    ///
    /// # Errors
    /// Not as many values as key columns, or a value that is not of its column's type.
    pub fn key_columns(&self, id: &str, key: &[&str]) -> Result<Option<Vec<ArrayRef>>> {
        let Some((types, _)) = self.shards(id) else { return Ok(None) };
        parse_key(key, &types).map(Some)
    }

    /// Up to `limit` rows of table `id` whose first key column, as text, starts with `prefix`
    /// (every row for an empty prefix, a null key included), in no particular order.
    ///
    /// # Errors
    /// A key column that cannot be shown as text.
    pub fn scan(&self, id: &str, prefix: &str, limit: usize) -> Result<TableAnswer> {
        let Some((_, cores)) = self.shards(id) else { return Ok(TableAnswer::NoTable) };
        let mut parts = Vec::new();
        let mut found = 0;
        let mut truncated = false;
        let mut schema = None;
        for core in cores {
            let core = lock(&core);
            schema.get_or_insert_with(|| core.values.clone());
            let ids = core.present_ids();
            if ids.is_empty() {
                continue;
            }
            let first = core.interner.columns(&ids)?.swap_remove(0);
            let text = arrow_cast::cast(&first, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            let mut picked = Vec::new();
            for (i, &k) in ids.iter().enumerate() {
                // A null key has no text: only a scan of everything finds it.
                let hit = if text.is_valid(i) { text.value(i).starts_with(prefix) } else { prefix.is_empty() };
                if hit {
                    if found == limit {
                        truncated = true;
                        break;
                    }
                    picked.push(k);
                    found += 1;
                }
            }
            parts.push(core.rows(&picked)?);
        }
        let schema = schema.unwrap_or_else(|| Arc::new(Schema::empty()));
        Ok(TableAnswer::Rows(arrow_select::concat::concat_batches(&schema, &parts)?, truncated))
    }
}

#[cfg(test)]
mod tests;
