//! The lookup (enrichment) join: each row gets the columns of the table row with its key, from
//! a [`LookupTable`] that lives outside the stream (a file held in memory, a database).
//!
//! One lookup per batch for all its keys. An inner join leaves out the rows whose key the
//! table lacks; what happens to them is the step's [`Missing`] policy (dropped and counted,
//! dead-lettered, or written to a side output). A left join keeps them with nulls.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::{Field, Schema, SchemaRef};
use weir_core::deadletter::{now_ms, DeadLetter, ErrorKind, Payload};
use weir_core::lookup::{LookupKeys, LookupTable};
use weir_core::metrics::StepMetrics;
use weir_core::notify::SideWriter;
use weir_core::{Batch, CoreError, OpContext, Operator, OperatorFactory, Result};

/// Which rows a lookup join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// Only rows whose key the table has.
    Inner,
    /// Every row; the table's columns are null where its key is missing.
    Left,
}

/// What an inner join does with a row whose key the table lacks.
#[derive(Debug, Clone)]
pub enum Missing {
    /// Left out, counted in `weir_lookup_misses_total`.
    Drop,
    /// To the dead-letter output (kind `lookup`), with the key in the reason.
    DeadLetter,
    /// Written to a side output (the row as it came).
    Side(Arc<dyn SideWriter>),
}

/// A lookup join step.
#[derive(Debug, Clone)]
pub struct LookupSpec {
    /// Where rows are found.
    pub table: Arc<dyn LookupTable>,
    /// The stream's key column paths, matched in order against the table's key.
    pub key: Vec<String>,
    /// Inner or left.
    pub kind: JoinKind,
    /// What an inner join does with the rows it leaves out.
    pub missing: Missing,
    /// How often the table is asked to bring itself up to date (a file rewritten).
    pub refresh: Option<Duration>,
}

impl LookupSpec {
    /// Checks the key columns and the names against the input schema: the output is the input's
    /// columns and then the table's.
    ///
    /// # Errors
    /// A key column the rows lack, or a table column named like an input column.
    pub fn plan(&self, input: &SchemaRef) -> Result<(Arc<dyn OperatorFactory>, SchemaRef)> {
        for k in &self.key {
            crate::field_by_path(input, k).map_err(|e| CoreError::Config(format!("key: {e}")))?;
        }
        if self.key.is_empty() {
            return Err(CoreError::Config("key: name the column(s) rows are looked up by".into()));
        }
        let table = self.table.schema();
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        for f in table.fields() {
            if input.field_with_name(f.name()).is_ok() {
                return Err(CoreError::Config(format!(
                    "the table's column `{}` is also a column of the rows; leave it out with `columns:` or rename it",
                    f.name()
                )));
            }
            // A row without a match has nulls there, and so may a table row.
            fields.push(f.as_ref().clone().with_nullable(true));
        }
        let out = Arc::new(Schema::new(fields));
        Ok((Arc::new(LookupFactory { spec: self.clone(), out: out.clone() }), out))
    }
}

#[derive(Debug)]
struct LookupFactory {
    spec: LookupSpec,
    out: SchemaRef,
}

impl OperatorFactory for LookupFactory {
    fn create(&self, _: usize, _: usize) -> Result<Box<dyn Operator>> {
        Ok(Box::new(LookupOp { spec: self.spec.clone(), out: self.out.clone(), keys: LookupKeys::default() }))
    }
}

#[derive(Debug)]
struct LookupOp {
    spec: LookupSpec,
    out: SchemaRef,
    keys: LookupKeys,
}

impl LookupOp {
    fn set_aside(&self, batch: &Batch, found: &[bool], cx: &mut OpContext<'_>) -> Result<()> {
        let missed: Vec<usize> = (0..found.len()).filter(|&i| !found[i]).collect();
        if missed.is_empty() {
            return Ok(());
        }
        cx.registry.connectors.add(
            "weir_lookup_misses_total",
            "Rows whose key the lookup table lacks.",
            &[("step", cx.step.as_str())],
            missed.len() as f64,
        );
        match &self.spec.missing {
            Missing::Drop => {}
            Missing::DeadLetter => {
                let now = now_ms();
                let letters = missed
                    .iter()
                    .map(|&i| DeadLetter {
                        payload: Payload::Row(batch.rows.slice(i, 1)),
                        kind: ErrorKind::Lookup,
                        reason: match self.keys.get(i) {
                            Some(k) => format!(
                                "no row in the lookup table for key `{}`",
                                k.replace(weir_core::lookup::KEY_SEPARATOR, "|")
                            ),
                            None => "the lookup key is null".to_string(),
                        },
                        step: cx.step.clone(),
                        origin: "row".into(),
                        position: None,
                        time_ms: now,
                        attempts: 1,
                        first_failure_ms: None,
                    })
                    .collect();
                cx.dead_letter(letters)?;
            }
            Missing::Side(w) => {
                let mask = BooleanArray::from(found.iter().map(|f| !f).collect::<Vec<_>>());
                w.write(&batch.filter(&mask)?.rows)?;
            }
        }
        Ok(())
    }
}

impl Operator for LookupOp {
    fn process(&mut self, batch: Batch, cx: &mut OpContext<'_>) -> Result<()> {
        let cols = self
            .spec
            .key
            .iter()
            .map(|k| weir_core::time::column_by_path(&batch.rows, k))
            .collect::<Result<Vec<_>>>()?;
        self.keys.fill(&cols)?;
        let (found_rows, found) = self.spec.table.lookup(&self.keys)?;
        let mut columns = batch.rows.columns().to_vec();
        columns.extend(found_rows.columns().iter().cloned());
        let joined = RecordBatch::try_new(self.out.clone(), columns)?;
        let joined = Batch::new(joined, batch.time.clone())?;
        let hits = found.iter().filter(|f| **f).count();
        if self.spec.kind == JoinKind::Left || hits == found.len() {
            StepMetrics::add(&cx.metrics.rows_out, found.len() as u64);
            if hits < found.len() {
                cx.registry.connectors.add(
                    "weir_lookup_misses_total",
                    "Rows whose key the lookup table lacks.",
                    &[("step", cx.step.as_str())],
                    (found.len() - hits) as f64,
                );
            }
            cx.emit(joined);
            return Ok(());
        }
        StepMetrics::add(&cx.metrics.rows_out, hits as u64);
        self.set_aside(&batch, &found, cx)?;
        if !matches!(self.spec.missing, Missing::DeadLetter) {
            // Dead letters are counted as such; the rest leave the stream as filtered.
            StepMetrics::add(&cx.metrics.filtered, (found.len() - hits) as u64);
        }
        cx.emit(joined.filter(&BooleanArray::from(found))?);
        Ok(())
    }

    fn on_tick(&mut self, _now_ms: i64, cx: &mut OpContext<'_>) -> Result<()> {
        self.spec.table.refresh();
        report(self.spec.table.as_ref(), cx);
        Ok(())
    }

    fn on_end(&mut self, cx: &mut OpContext<'_>) -> Result<()> {
        report(self.spec.table.as_ref(), cx);
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.spec.refresh
    }
}

/// The table's size and, for a server's table, its questions and cache hits.
fn report(table: &dyn LookupTable, cx: &mut OpContext<'_>) {
    let m = &cx.registry.connectors;
    let step = [("step", cx.step.as_str())];
    m.set(
        "weir_lookup_table_rows",
        "Rows (or cached keys) of the lookup table held in memory.",
        &step,
        table.len() as f64,
    );
    let s = table.stats();
    if s != weir_core::lookup::LookupStats::default() {
        m.set_total(
            "weir_lookup_queries_total",
            "Questions the lookup table's server was asked.",
            &step,
            s.queries as f64,
        );
        m.set_total(
            "weir_lookup_keys_asked_total",
            "Keys asked of the lookup table's server.",
            &step,
            s.keys_asked as f64,
        );
        m.set_total("weir_lookup_cache_hits_total", "Keys answered from the lookup cache.", &step, s.cache_hits as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use arrow_array::cast::AsArray;
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::DataType;
    use weir_core::testing::OpHarness;

    use super::*;

    /// A table of `key -> site`, counting its lookups.
    #[derive(Debug)]
    struct Sites(HashMap<&'static str, &'static str>, Mutex<usize>);

    impl LookupTable for Sites {
        fn schema(&self) -> SchemaRef {
            Arc::new(Schema::new(vec![Field::new("site", DataType::Utf8, true)]))
        }
        fn lookup(&self, keys: &LookupKeys) -> Result<(RecordBatch, Vec<bool>)> {
            *self.1.lock().unwrap() += 1;
            let sites: StringArray = keys.iter().map(|k| k.and_then(|k| self.0.get(k).copied())).collect();
            let found = keys.iter().map(|k| k.is_some_and(|k| self.0.contains_key(k))).collect();
            Ok((RecordBatch::try_new(self.schema(), vec![Arc::new(sites) as ArrayRef])?, found))
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[derive(Debug, Default)]
    struct Side(Mutex<Vec<RecordBatch>>);
    impl SideWriter for Side {
        fn write(&self, rows: &RecordBatch) -> Result<()> {
            self.0.lock().unwrap().push(rows.clone());
            Ok(())
        }
    }

    fn input() -> (SchemaRef, Batch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("d1"), Some("d9"), None, Some("d2")])) as ArrayRef,
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
            ],
        )
        .unwrap();
        (schema, Batch::new(rows, Int64Array::from(vec![10, 20, 30, 40])).unwrap())
    }

    fn spec(kind: JoinKind, missing: Missing) -> (LookupSpec, Arc<Sites>) {
        let table = Arc::new(Sites(HashMap::from([("d1", "north"), ("d2", "south")]), Mutex::new(0)));
        (LookupSpec { table: table.clone(), key: vec!["device".into()], kind, missing, refresh: None }, table)
    }

    fn column(b: &Batch, name: &str) -> Vec<Option<String>> {
        b.rows.column_by_name(name).unwrap().as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn an_inner_join_keeps_the_rows_it_finds_with_their_times_and_sets_the_rest_aside() {
        let (schema, batch) = input();
        let side = Arc::new(Side::default());
        let (s, table) = spec(JoinKind::Inner, Missing::Side(side.clone()));
        let (f, out) = s.plan(&schema).unwrap();
        assert!(out.field_with_name("site").unwrap().is_nullable());
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        let got = h.process(batch).unwrap();
        assert_eq!(column(&got[0], "site"), [Some("north".into()), Some("south".into())]);
        assert_eq!(got[0].time.values(), &[10, 40]);
        assert_eq!(*table.1.lock().unwrap(), 1, "one lookup for the batch");
        let aside = side.0.lock().unwrap();
        assert_eq!(aside[0].column(1).as_primitive::<arrow_array::types::Int64Type>().values(), &[2, 3]);
        assert_eq!((h.metrics().rows_out, h.metrics().filtered), (2, 2));
        assert!(h.metrics().balanced(), "{:?}", h.metrics());
        assert_eq!(h.registry().connectors.get("weir_lookup_misses_total", &[("step", "under-test")]), Some(2.0));
    }

    #[test]
    fn a_left_join_keeps_every_row_and_dead_letters_name_the_missing_key() {
        let (schema, batch) = input();
        let (s, _) = spec(JoinKind::Left, Missing::Drop);
        let (f, _) = s.plan(&schema).unwrap();
        let got = OpHarness::new(f.as_ref()).unwrap().process(batch.clone()).unwrap();
        assert_eq!(column(&got[0], "site"), [Some("north".into()), None, None, Some("south".into())]);

        let (s, _) = spec(JoinKind::Inner, Missing::DeadLetter);
        let (f, _) = s.plan(&schema).unwrap();
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        h.process(batch).unwrap();
        let reasons: Vec<_> = h.dead_letters().iter().map(|d| (d.kind, d.reason.clone())).collect();
        assert_eq!(
            reasons,
            [
                (ErrorKind::Lookup, "no row in the lookup table for key `d9`".to_string()),
                (ErrorKind::Lookup, "the lookup key is null".to_string())
            ]
        );
        assert!(h.metrics().balanced(), "{:?}", h.metrics());
    }

    #[test]
    fn a_key_the_rows_lack_or_a_column_they_have_is_refused() {
        let (schema, _) = input();
        let (mut s, _) = spec(JoinKind::Inner, Missing::Drop);
        s.key = vec!["nope".into()];
        assert!(s.plan(&schema).unwrap_err().to_string().contains("key: "), "names the setting");
        let clash = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("site", DataType::Utf8, true),
        ]));
        let (s, _) = spec(JoinKind::Inner, Missing::Drop);
        let e = s.plan(&clash).unwrap_err().to_string();
        assert!(e.contains("the table's column `site` is also a column of the rows"), "{e}");
    }
}
