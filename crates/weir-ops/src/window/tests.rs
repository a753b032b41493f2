use std::sync::Mutex;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::StringArray;
use proptest::prelude::*;
use weir_core::testing::OpHarness;

use super::*;
use crate::aggregate::AggFunc;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false), Field::new("v", DataType::Float64, true)]))
}

fn batch(rows: &[(&str, f64, i64)]) -> Batch {
    let k = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let v = Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let t = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
    Batch::new(RecordBatch::try_new(schema(), vec![Arc::new(k), Arc::new(v)]).unwrap(), t).unwrap()
}

fn spec(kind: WindowKind, late: LatePolicy) -> WindowSpec {
    WindowSpec {
        keys: vec!["k".into()],
        kind,
        domain: TimeDomain::Event,
        aggs: vec![
            AggSpec { name: "n".into(), func: AggFunc::Count, column: None },
            AggSpec { name: "s".into(), func: AggFunc::Sum, column: Some("v".into()) },
        ],
        late,
        state_ttl: None,
    }
}

/// (key, start, end, count, sum) rows of the output, sorted.
fn rows(out: &[Batch]) -> Vec<(String, i64, i64, i64, f64)> {
    let mut v = Vec::new();
    for b in out {
        let r = &b.rows;
        for i in 0..r.num_rows() {
            v.push((
                r.column(0).as_string::<i32>().value(i).to_string(),
                r.column(1).as_primitive::<Int64Type>().value(i),
                r.column(2).as_primitive::<Int64Type>().value(i),
                r.column(3).as_primitive::<Int64Type>().value(i),
                r.column(4).as_primitive::<Float64Type>().value(i),
            ));
        }
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn harness(s: &WindowSpec) -> OpHarness {
    let (f, _) = s.plan(&schema()).unwrap();
    OpHarness::new(f.as_ref()).unwrap()
}

#[test]
fn tumbling_assigns_by_start_and_fires_on_watermark() {
    let mut h = harness(&spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Drop));
    assert!(h.process(batch(&[("a", 1.0, 0), ("a", 2.0, 9), ("b", 5.0, 10), ("a", 4.0, -1)])).unwrap().is_empty());
    // Window [-10,0) closes at watermark 9; [0,10) only at 10.
    assert_eq!(rows(&h.watermark(9).unwrap()), vec![("a".into(), -10, 0, 1, 4.0)]);
    let out = h.watermark(10).unwrap();
    assert_eq!(rows(&out), vec![("a".into(), 0, 10, 2, 3.0)]);
    assert_eq!(out[0].time.value(0), 9, "result time is end - 1");
    let out = h.end().unwrap();
    assert_eq!(rows(&out), vec![("b".into(), 10, 20, 1, 5.0)]);
}

#[test]
fn hopping_puts_a_row_in_size_over_slide_windows() {
    let mut h = harness(&spec(WindowKind::Hopping { size_ms: 10, slide_ms: 5 }, LatePolicy::Drop));
    h.process(batch(&[("a", 1.0, 7)])).unwrap();
    let out = h.end().unwrap();
    assert_eq!(rows(&out), vec![("a".into(), 0, 10, 1, 1.0), ("a".into(), 5, 15, 1, 1.0)]);
    assert_eq!(h.metrics().aggregated, 1, "one row, counted once");
}

//  key a:  1    4        12        (gap 5)
//          [1 ........ 9) and [12 .. 17) -> then 8 arrives, [8, 13) overlaps both: [1 ...... 17)
#[test]
fn sessions_merge_when_a_row_bridges_them() {
    let mut h = harness(&spec(WindowKind::Session { gap_ms: 5 }, LatePolicy::Drop));
    h.process(batch(&[("a", 1.0, 1), ("a", 1.0, 4), ("a", 1.0, 12), ("b", 2.0, 3)])).unwrap();
    assert_eq!(rows(&h.watermark(8).unwrap()), vec![("b".into(), 3, 8, 1, 2.0)]);
    h.process(batch(&[("a", 10.0, 8)])).unwrap();
    assert_eq!(rows(&h.end().unwrap()), vec![("a".into(), 1, 17, 4, 13.0)]);
}

#[test]
fn late_rows_are_dropped_and_counted() {
    let mut h = harness(&spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Drop));
    h.process(batch(&[("a", 1.0, 5)])).unwrap();
    h.watermark(10).unwrap();
    h.process(batch(&[("a", 1.0, 6), ("a", 1.0, 15)])).unwrap();
    let m = h.metrics();
    assert_eq!((m.late_dropped, m.aggregated, m.rows_in), (1, 2, 3));
    assert!(m.balanced());
}

#[derive(Debug, Default)]
struct MemSide(Mutex<usize>);
impl SideWriter for MemSide {
    fn write(&self, rows: &RecordBatch) -> Result<()> {
        *self.0.lock().unwrap() += rows.num_rows();
        Ok(())
    }
}

#[test]
fn late_rows_can_go_to_a_side_output() {
    let side = Arc::new(MemSide::default());
    let mut h = harness(&spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Side(side.clone())));
    h.watermark(100).unwrap();
    h.process(batch(&[("a", 1.0, 5), ("a", 1.0, 6)])).unwrap();
    assert_eq!(*side.0.lock().unwrap(), 2);
    assert_eq!(h.metrics().late_side, 2);
    assert!(h.metrics().balanced());
}

#[test]
fn allowed_lateness_updates_and_reemits() {
    let mut h = harness(&spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Update { allowed_ms: 5 }));
    h.process(batch(&[("a", 1.0, 5)])).unwrap();
    assert_eq!(rows(&h.watermark(12).unwrap()), vec![("a".into(), 0, 10, 1, 1.0)]);
    // Within lateness: updated result right away.
    assert_eq!(rows(&h.process(batch(&[("a", 2.0, 6)])).unwrap()), vec![("a".into(), 0, 10, 2, 3.0)]);
    h.watermark(15).unwrap();
    // Past lateness: dropped.
    assert!(h.process(batch(&[("a", 2.0, 7)])).unwrap().is_empty());
    assert_eq!(h.metrics().late_dropped, 1);
}

#[test]
fn processing_time_windows_fire_on_ticks() {
    let mut s = spec(WindowKind::Tumbling { size_ms: 1000 }, LatePolicy::Drop);
    s.domain = TimeDomain::Processing;
    let mut h = harness(&s);
    h.process(batch(&[("a", 1.0, 0)])).unwrap();
    let now = weir_core::deadletter::now_ms();
    assert!(h.tick(now - 2000).unwrap().is_empty());
    let out = h.tick(now + 2000).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].rows.column(3).as_primitive::<Int64Type>().value(0), 1);
}

#[test]
fn plan_names_bad_columns() {
    let mut s = spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Drop);
    s.aggs[1].column = Some("nope".into());
    let e = s.plan(&schema()).unwrap_err().to_string();
    assert!(e.contains("aggregate `s`: unknown column `nope`; available: k, v"), "{e}");
    s.aggs[1].column = Some("k".into());
    assert!(s.plan(&schema()).unwrap_err().to_string().contains("needs a numeric column"));
}

proptest! {
    /// Streams whose disorder stays within the bound give exactly the reference result.
    #[test]
    fn tumbling_matches_reference(events in prop::collection::vec((0u8..4, 0i64..2000, -50i32..50), 1..400), bound in 0i64..300, cut in 1usize..50) {
        // Make the stream's disorder respect the bound: t >= running max - bound.
        let mut max = i64::MIN;
        let mut evs = Vec::new();
        for (k, t, v) in events {
            let t = if max != i64::MIN && t < max - bound { max - bound } else { t };
            max = max.max(t);
            evs.push((format!("k{k}"), f64::from(v), t));
        }
        let mut expect = BTreeMap::new();
        for (k, v, t) in &evs {
            let start = t - t.rem_euclid(100);
            let e = expect.entry((k.clone(), start)).or_insert((0i64, 0.0f64));
            e.0 += 1;
            e.1 += v;
        }
        let mut h = harness(&spec(WindowKind::Tumbling { size_ms: 100 }, LatePolicy::Drop));
        let mut out = Vec::new();
        let mut seen = i64::MIN;
        for chunk in evs.chunks(cut) {
            let refs: Vec<(&str, f64, i64)> = chunk.iter().map(|(k, v, t)| (k.as_str(), *v, *t)).collect();
            out.extend(h.process(batch(&refs)).unwrap());
            seen = seen.max(chunk.iter().map(|c| c.2).max().unwrap());
            out.extend(h.watermark(seen - bound).unwrap());
        }
        out.extend(h.end().unwrap());
        let got: Vec<_> = rows(&out).into_iter().map(|(k, s, _, n, sum)| ((k, s), (n, sum))).collect();
        let want: Vec<_> = expect.into_iter().collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(h.metrics().late_dropped, 0);
    }
}

/// Runs `evs` through a window in chunks of `cut` rows with watermarks `bound` behind, and,
/// when `restart_at` is set, snapshots after that many chunks and goes on in a restored
/// instance, as a recovery would.
fn run_with_restart(
    s: &WindowSpec,
    evs: &[(String, f64, i64)],
    cut: usize,
    bound: i64,
    restart_at: Option<usize>,
) -> Vec<(String, i64, i64, i64, f64)> {
    let (f, _) = s.plan(&schema()).unwrap();
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    let mut out = Vec::new();
    let mut seen = i64::MIN;
    for (i, chunk) in evs.chunks(cut).enumerate() {
        if restart_at == Some(i) {
            let state = h.snapshot().unwrap();
            h = OpHarness::restored(f.as_ref(), state, h.current_watermark()).unwrap();
        }
        let refs: Vec<(&str, f64, i64)> = chunk.iter().map(|(k, v, t)| (k.as_str(), *v, *t)).collect();
        out.extend(h.process(batch(&refs)).unwrap());
        seen = seen.max(chunk.iter().map(|c| c.2).max().unwrap());
        out.extend(h.watermark(seen - bound).unwrap());
    }
    out.extend(h.end().unwrap());
    rows(&out)
}

proptest! {
    /// Snapshot and restore at any point give the output of an uninterrupted run, for every
    /// window shape and for late updates (windows kept open past their end).
    #[test]
    fn restoring_a_snapshot_changes_nothing(
        events in prop::collection::vec((0u8..5, 0i64..3000, -50i32..50), 1..300),
        bound in 0i64..400,
        cut in 1usize..40,
        restart in 0usize..20,
        shape in 0u8..4,
    ) {
        let mut evs: Vec<(String, f64, i64)> = events.into_iter().map(|(k, t, v)| (format!("k{k}"), f64::from(v), t)).collect();
        evs.sort_by_key(|e| e.2 / 7);
        let (kind, late) = match shape {
            0 => (WindowKind::Tumbling { size_ms: 100 }, LatePolicy::Drop),
            1 => (WindowKind::Hopping { size_ms: 200, slide_ms: 50 }, LatePolicy::Drop),
            2 => (WindowKind::Session { gap_ms: 60 }, LatePolicy::Drop),
            _ => (WindowKind::Tumbling { size_ms: 100 }, LatePolicy::Update { allowed_ms: 150 }),
        };
        let s = spec(kind, late);
        let want = run_with_restart(&s, &evs, cut, bound, None);
        let got = run_with_restart(&s, &evs, cut, bound, Some(restart));
        prop_assert_eq!(got, want);
    }
}

/// Aggregates keep their input's type: a sum of integers is an integer, `min`/`max`/`first`/
/// `last` are values of the column, `mean` is a float.
#[test]
fn aggregates_keep_their_input_types() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("n", DataType::Int32, false),
        Field::new("hot", DataType::Boolean, false),
    ]));
    let agg = |name: &str, func, column: &str| AggSpec { name: name.into(), func, column: Some(column.into()) };
    let s = WindowSpec {
        aggs: vec![
            agg("total", AggFunc::Sum, "n"),
            agg("lo", AggFunc::Min, "n"),
            agg("last", AggFunc::Last, "n"),
            agg("mean", AggFunc::Mean, "n"),
            agg("hot_count", AggFunc::Sum, "hot"),
        ],
        ..spec(WindowKind::Tumbling { size_ms: 10 }, LatePolicy::Drop)
    };
    let (f, out) = s.plan(&schema).unwrap();
    let types: Vec<DataType> = out.fields().iter().skip(3).map(|f| f.data_type().clone()).collect();
    assert_eq!(types, [DataType::Int64, DataType::Int32, DataType::Int32, DataType::Float64, DataType::Int64]);
    let rb = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["a", "a", "a"])),
            Arc::new(arrow_array::Int32Array::from(vec![3, 1, 7])),
            Arc::new(arrow_array::BooleanArray::from(vec![true, false, true])),
        ],
    )
    .unwrap();
    let mut h = OpHarness::new(f.as_ref()).unwrap();
    h.process(Batch::new(rb, Int64Array::from(vec![1, 2, 3])).unwrap()).unwrap();
    let out = h.end().unwrap();
    let r = &out[0].rows;
    assert_eq!(r.column(3).as_primitive::<Int64Type>().value(0), 11);
    assert_eq!(r.column(4).as_primitive::<arrow_array::types::Int32Type>().value(0), 1);
    assert_eq!(r.column(5).as_primitive::<arrow_array::types::Int32Type>().value(0), 7);
    assert!((r.column(6).as_primitive::<Float64Type>().value(0) - 11.0 / 3.0).abs() < 1e-12);
    assert_eq!(r.column(7).as_primitive::<Int64Type>().value(0), 2);
}

/// A stream of ever-new keys (each seen for 10 ms of event time) through a window with a
/// `state_ttl`: the keys held stay flat at those of the last TTL, every other key is forgotten,
/// and the results are those of the same window without a TTL.
#[test]
fn a_state_ttl_keeps_keys_flat_over_ten_million_events() {
    let ttl = spec(WindowKind::Tumbling { size_ms: 100 }, LatePolicy::Drop);
    let with_ttl = WindowSpec { state_ttl: Some(std::time::Duration::from_secs(1)), ..ttl.clone() };
    let (mut plain, mut expiring) = (harness(&ttl), harness(&with_ttl));
    const EVENTS: i64 = 10_000_000;
    const BATCH: i64 = 50_000;
    let (mut most_keys, mut checks) = (0u64, 0);
    let mut t0 = 0;
    while t0 < EVENTS {
        // Event i at i ms, key i / 10: a new key every 10 ms, never seen again.
        let keys = StringArray::from((t0..t0 + BATCH).map(|i| format!("k{}", i / 10)).collect::<Vec<_>>());
        let v = Float64Array::from(vec![1.0; BATCH as usize]);
        let rb = RecordBatch::try_new(schema(), vec![Arc::new(keys), Arc::new(v)]).unwrap();
        let b = Batch::new(rb, Int64Array::from((t0..t0 + BATCH).collect::<Vec<_>>())).unwrap();
        t0 += BATCH;
        // Only the keys matter for memory: the plain run is checked on the first million.
        if t0 <= 1_000_000 {
            let a = rows(&plain.process(b.clone()).unwrap());
            let a2 = rows(&plain.watermark(t0).unwrap());
            let e = rows(&expiring.process(b).unwrap());
            let e2 = rows(&expiring.watermark(t0).unwrap());
            assert_eq!((a, a2), (e, e2), "a TTL over the window's size changes no result");
        } else {
            expiring.process(b).unwrap();
            expiring.watermark(t0).unwrap();
        }
        let held = expiring.metrics_state().0;
        most_keys = most_keys.max(held);
        checks += 1;
    }
    // The last TTL (1 s = 100 keys) plus a sweep interval and one batch of keys.
    assert!(most_keys <= 6_000, "{most_keys} keys held at most");
    let (held, evicted) = expiring.metrics_state();
    assert_eq!(held + evicted, (EVENTS / 10) as u64, "every key is held or was forgotten");
    assert!(checks >= 200);
}
