use std::collections::BTreeMap;

use arrow_array::types::{Float64Type, Int64Type};
use proptest::prelude::*;
use weir_core::testing::OpHarness;

use super::*;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true), Field::new("v", DataType::Int64, true)]))
}

/// (key, value, time) rows as a batch.
fn batch(rows: &[(&str, Option<i64>, i64)]) -> Batch {
    let k = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let v = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let t = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
    Batch::new(RecordBatch::try_new(schema(), vec![Arc::new(k), Arc::new(v)]).unwrap(), t).unwrap()
}

fn aggs() -> TableValues {
    TableValues::Aggregates(vec![
        AggSpec::parse("n", "count()").unwrap(),
        AggSpec::parse("total", "sum(v)").unwrap(),
        AggSpec::parse("top", "max(v)").unwrap(),
        AggSpec::parse("newest", "last(v)").unwrap(),
    ])
}

fn spec(values: TableValues, ttl_ms: Option<u64>) -> (TableSpec, Arc<dyn OperatorFactory>) {
    let s = TableSpec {
        id: "t".into(),
        keys: vec!["k".into()],
        values,
        state_ttl: ttl_ms.map(std::time::Duration::from_millis),
        tables: Tables::default(),
    };
    let (f, _) = s.plan(&schema()).unwrap();
    (s, f)
}

/// What a key's aggregates are after some rows: (count, sum, max, last by (time, arrival)).
type Agg = (i64, Option<i64>, Option<i64>, Option<i64>);

fn brute(rows: &[(String, Option<i64>, i64)]) -> BTreeMap<String, Agg> {
    let mut out: BTreeMap<String, Agg> = BTreeMap::new();
    let mut last: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (k, v, t) in rows {
        let e = out.entry(k.clone()).or_insert((0, None, None, None));
        e.0 += 1;
        if let Some(v) = v {
            e.1 = Some(e.1.unwrap_or(0) + v);
            e.2 = Some(e.2.map_or(*v, |m| m.max(*v)));
            if last.get(k).is_none_or(|(lt, _)| t >= lt) {
                last.insert(k.clone(), (*t, *v));
                e.3 = Some(*v);
            }
        }
    }
    out
}

/// Changes as (op, key, aggregates), in order.
fn changes(out: &[Batch]) -> Vec<(String, String, Agg)> {
    let mut v = Vec::new();
    for b in out {
        let r = &b.rows;
        let k = r.column_by_name("k").unwrap().as_string::<i32>();
        let op = r.column_by_name(CHANGE_COLUMN).unwrap().as_string::<i32>();
        let n = r.column_by_name("n").unwrap().as_primitive::<Int64Type>();
        let total = r.column_by_name("total").unwrap().as_primitive::<Int64Type>();
        let top = r.column_by_name("top").unwrap().as_primitive::<Int64Type>();
        let newest = r.column_by_name("newest").unwrap().as_primitive::<Int64Type>();
        let opt = |a: &Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        for i in 0..b.num_rows() {
            v.push((
                op.value(i).to_string(),
                k.value(i).to_string(),
                (n.value(i), opt(total, i), opt(top, i), opt(newest, i)),
            ));
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// After every batch, each change carries its key's aggregates over every row so far,
    /// whatever the batch cuts and restarts from snapshots; a key's first change is an insert
    /// and the rest updates.
    #[test]
    fn changes_carry_the_aggregates_of_every_row_so_far(
        rows in prop::collection::vec((0..6u8, prop::option::weighted(0.8, -50..50i64), 0..100i64), 1..80),
        cuts in prop::collection::vec((1..9usize, any::<bool>()), 1..40),
    ) {
        let rows: Vec<(String, Option<i64>, i64)> = rows.into_iter().map(|(k, v, t)| (format!("k{k}"), v, t)).collect();
        let (_, f) = spec(aggs(), None);
        let mut h = OpHarness::new(f.as_ref()).unwrap();
        let (mut pos, mut c) = (0, 0);
        let mut seen: std::collections::HashSet<String> = Default::default();
        while pos < rows.len() {
            let (n, restart) = cuts[c % cuts.len()];
            c += 1;
            let end = (pos + n).min(rows.len());
            let part: Vec<(&str, Option<i64>, i64)> = rows[pos..end].iter().map(|r| (r.0.as_str(), r.1, r.2)).collect();
            let out = h.process(batch(&part)).unwrap();
            let want = brute(&rows[..end]);
            let got = changes(&out);
            let keys: std::collections::BTreeSet<&str> = part.iter().map(|r| r.0).collect();
            prop_assert_eq!(got.len(), keys.len(), "one change per key touched");
            for (op, k, agg) in got {
                prop_assert_eq!(&agg, &want[&k], "key {}", k);
                prop_assert_eq!(op, if seen.insert(k.clone()) { "insert" } else { "update" });
            }
            pos = end;
            if restart {
                let snap = h.snapshot().unwrap();
                h = OpHarness::restored(f.as_ref(), snap, None).unwrap();
            }
        }
    }
}

/// `latest` keeps the row with the newest event time per key (a tie: the later arrival), and
/// queries read it.
#[test]
fn latest_keeps_each_keys_newest_row_and_answers_queries() {
    let (s, f) = spec(TableValues::Latest, None);
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    h.process(batch(&[("a", Some(1), 10), ("b", Some(2), 10), ("a", Some(3), 5)])).unwrap();
    let out = h.process(batch(&[("a", Some(4), 10), ("b", Some(5), 9)])).unwrap();
    // b's row at 9 is older than its row at 10: no change for b.
    let v = out[0].rows.column_by_name("v").unwrap().as_primitive::<Int64Type>().clone();
    assert_eq!((out[0].num_rows(), v.value(0)), (2, 4));
    let get = |key: &str| match s.tables.get("t", &[key]).unwrap() {
        TableAnswer::Rows(r, _) if r.num_rows() == 1 => {
            Some(r.column_by_name("v").unwrap().as_primitive::<Int64Type>().value(0))
        }
        TableAnswer::Rows(..) => None,
        TableAnswer::NoTable => panic!("no table"),
    };
    assert_eq!((get("a"), get("b"), get("c")), (Some(4), Some(2), None));
    // Through a snapshot, and after many updates (the kept batches are compacted).
    let snap = h.snapshot().unwrap();
    let mut h = OpHarness::restored(f.as_ref(), snap, None).unwrap();
    for i in 0..10_000 {
        h.process(batch(&[("a", Some(i), 100 + i)])).unwrap();
    }
    assert_eq!((get("a"), get("b")), (Some(9_999), Some(2)));
    let shard = s.tables.shards("t").unwrap().1[0].clone();
    let core = lock(&shard);
    let Values::Latest { kept, .. } = &core.state else { panic!() };
    assert!(kept.iter().map(Array::len).sum::<usize>() < 5_000, "superseded rows are let go");
}

/// With a TTL, a key not updated for that long is deleted: a `delete` change with its last
/// values, gone from queries; a later row of it is an insert again.
#[test]
fn a_key_past_its_ttl_is_deleted_with_its_last_values() {
    let (s, f) = spec(aggs(), Some(1_000));
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    h.process(batch(&[("a", Some(1), 0), ("b", Some(2), 0)])).unwrap();
    h.process(batch(&[("b", Some(3), 2_000)])).unwrap();
    let mut out = Vec::new();
    for wm in (0..=2_750).step_by(250) {
        out.extend(h.watermark(wm).unwrap());
    }
    let c = changes(&out);
    assert_eq!(c, vec![("delete".to_string(), "a".to_string(), (1, Some(1), Some(1), Some(1)))]);
    assert!(out[0].time.value(0) < 2_750);
    let TableAnswer::Rows(r, _) = s.tables.scan("t", "", 10).unwrap() else { panic!() };
    assert_eq!(r.num_rows(), 1, "only b is left");
    let c = changes(&h.process(batch(&[("a", Some(7), 5_000)])).unwrap());
    assert_eq!(c[0].0, "insert");
    assert_eq!(c[0].2, (1, Some(7), Some(7), Some(7)), "a starts over");
}

/// Scans find keys by prefix, up to a limit; a key lookup parses the key as its column's type
/// and says when it cannot.
#[test]
fn scans_by_prefix_and_lookups_parse_keys() {
    let (s, f) = spec(aggs(), None);
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    h.process(batch(&[("dev-1", Some(1), 0), ("dev-2", Some(2), 0), ("pump-1", Some(3), 0)])).unwrap();
    let TableAnswer::Rows(r, more) = s.tables.scan("t", "dev-", 10).unwrap() else { panic!() };
    assert_eq!((r.num_rows(), more), (2, false));
    let TableAnswer::Rows(r, more) = s.tables.scan("t", "", 2).unwrap() else { panic!() };
    assert_eq!((r.num_rows(), more), (2, true));
    let total = r.column_by_name("total").unwrap();
    assert!(total.as_primitive_opt::<Int64Type>().is_some(), "a sum of integers is an integer");
    assert!(matches!(s.tables.get("nope", &["x"]).unwrap(), TableAnswer::NoTable));
    let e = s.tables.get("t", &["a", "b"]).unwrap_err().to_string();
    assert!(e.contains("1 key column"), "{e}");

    // An integer key: parsed from the path, refused when it is not a number.
    let ints =
        Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true), Field::new("x", DataType::Float64, true)]));
    let spec = TableSpec {
        id: "ints".into(),
        keys: vec!["k".into()],
        values: TableValues::Aggregates(vec![AggSpec::parse("m", "mean(x)").unwrap()]),
        state_ttl: None,
        tables: s.tables.clone(),
    };
    let (f, _) = spec.plan(&ints).unwrap();
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    let rb = RecordBatch::try_new(
        ints,
        vec![Arc::new(Int64Array::from(vec![7, 7])), Arc::new(Float64Array::from(vec![1.0, 2.0]))],
    )
    .unwrap();
    h.process(Batch::new(rb, Int64Array::from(vec![0, 0])).unwrap()).unwrap();
    let TableAnswer::Rows(r, _) = s.tables.get("ints", &["7"]).unwrap() else { panic!() };
    assert_eq!(r.column_by_name("m").unwrap().as_primitive::<Float64Type>().value(0), 1.5);
    let e = s.tables.get("ints", &["seven"]).unwrap_err().to_string();
    assert!(e.contains("seven"), "{e}");
    assert_eq!(s.tables.ids(), vec!["ints".to_string(), "t".to_string()]);
}

#[test]
fn plans_name_their_mistakes() {
    let s = |values, keys: Vec<&str>| TableSpec {
        id: "t".into(),
        keys: keys.into_iter().map(String::from).collect(),
        values,
        state_ttl: None,
        tables: Tables::default(),
    };
    let e = |spec: TableSpec| spec.plan(&schema()).err().unwrap().to_string();
    assert!(e(s(aggs(), vec![])).contains("at least one key"));
    assert!(e(s(TableValues::Aggregates(vec![AggSpec::parse("n", "sum(k)").unwrap()]), vec!["k"])).contains("numeric"));
    assert!(e(s(TableValues::Aggregates(vec![AggSpec::parse("k", "count()").unwrap()]), vec!["k"]))
        .contains("two columns named `k`"));
    assert!(e(s(TableValues::Latest, vec!["nope"])).contains("unknown column `nope`"));
}
