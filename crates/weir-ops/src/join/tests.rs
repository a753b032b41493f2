use arrow_array::types::Int64Type;
use proptest::prelude::*;
use weir_core::testing::OpHarness;

use super::*;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true), Field::new("v", DataType::Int64, false)]))
}

fn spec(lo: i64, hi: i64, kind: JoinKind) -> IntervalJoinSpec {
    IntervalJoinSpec {
        schemas: [schema(), schema()],
        keys: [vec!["k".into()], vec!["k".into()]],
        names: ["a".into(), "b".into()],
        lo,
        hi,
        kind,
    }
}

/// (key, id, time) rows as a batch.
fn batch(rows: &[(Option<i64>, i64, i64)]) -> Batch {
    let k = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let v = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let t = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
    Batch::new(RecordBatch::try_new(schema(), vec![Arc::new(k), Arc::new(v)]).unwrap(), t).unwrap()
}

/// Output rows as (left id, right id, time), sorted; a missing side is `None`.
fn pairs(out: &[Batch]) -> Vec<(Option<i64>, Option<i64>, i64)> {
    let mut v = Vec::new();
    for b in out {
        let side = |name: &str| {
            let s = b.rows.column_by_name(name).unwrap().as_struct().clone();
            let ids = s.column_by_name("v").unwrap().as_primitive::<Int64Type>().clone();
            (s, ids)
        };
        let (a, av) = side("a");
        let (bb, bv) = side("b");
        for i in 0..b.num_rows() {
            let l = a.is_valid(i).then(|| av.value(i));
            let r = bb.is_valid(i).then(|| bv.value(i));
            v.push((l, r, b.time.value(i)));
        }
    }
    v.sort_unstable();
    v
}

/// Every pair by a nested loop over all rows, and the rows without a partner that `kind` pads.
fn reference(
    left: &[(Option<i64>, i64, i64)],
    right: &[(Option<i64>, i64, i64)],
    lo: i64,
    hi: i64,
    kind: JoinKind,
) -> Vec<(Option<i64>, Option<i64>, i64)> {
    let mut out = Vec::new();
    let mut r_matched = vec![false; right.len()];
    for a in left {
        let mut matched = false;
        for (j, b) in right.iter().enumerate() {
            if a.0.is_some() && a.0 == b.0 && (lo..=hi).contains(&(b.2 - a.2)) {
                out.push((Some(a.1), Some(b.1), a.2.max(b.2)));
                matched = true;
                r_matched[j] = true;
            }
        }
        if !matched && kind.pads(0) {
            out.push((Some(a.1), None, a.2));
        }
    }
    for (j, b) in right.iter().enumerate() {
        if !r_matched[j] && kind.pads(1) {
            out.push((None, Some(b.1), b.2));
        }
    }
    out.sort_unstable();
    out
}

/// A stream as a source would send it: times at most `bound - 1` behind the newest so far.
fn stream(bound: i64, id0: i64) -> impl Strategy<Value = Vec<(Option<i64>, i64, i64)>> {
    prop::collection::vec((prop::option::weighted(0.9, 0..5i64), 0..4i64, 0..bound), 0..60).prop_map(move |steps| {
        let mut clock = 0;
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (k, adv, back))| {
                clock += adv;
                (k, id0 + i as i64, clock - back)
            })
            .collect()
    })
}

const BOUND: i64 = 8;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever the interval, the batch cuts, the interleaving of the two sides, their
    /// disorder within the watermark bound and restarts from snapshots, the output is the
    /// nested-loop join's, and no state is left at the end.
    #[test]
    fn interval_join_equals_a_nested_loop(
        left in stream(BOUND, 0),
        right in stream(BOUND, 1000),
        lo in -6..=2i64,
        width in 0..=8i64,
        kind in prop::sample::select(vec![JoinKind::Inner, JoinKind::Left, JoinKind::Right, JoinKind::Full]),
        cuts in prop::collection::vec((any::<bool>(), 1..7usize, any::<bool>()), 1..80),
    ) {
        let hi = lo + width;
        let s = spec(lo, hi, kind);
        let mut h = OpHarness::new(&s).unwrap();
        let mut out = Vec::new();
        let (mut pos, mut max_seen, mut wm) = ([0usize; 2], [i64::MIN; 2], [i64::MIN; 2]);
        let sides = [&left, &right];
        let mut c = 0;
        while pos[0] < left.len() || pos[1] < right.len() {
            let (pick, n, restart) = cuts[c % cuts.len()];
            c += 1;
            let side = if pos[0] >= left.len() { 1 } else if pos[1] >= right.len() { 0 } else { usize::from(pick) };
            let end = (pos[side] + n).min(sides[side].len());
            let rows = &sides[side][pos[side]..end];
            pos[side] = end;
            out.extend(h.process_from(side, batch(rows)).unwrap());
            max_seen[side] = rows.iter().map(|r| r.2).max().unwrap().max(max_seen[side]);
            let w = max_seen[side] - BOUND;
            if w > wm[side] {
                wm[side] = w;
                out.extend(h.input_watermark(side, w).unwrap());
            }
            if restart {
                let snap = h.snapshot().unwrap();
                h = OpHarness::restored(&s, snap, None).unwrap();
                for (i, w) in wm.iter().enumerate() {
                    if *w > i64::MIN {
                        out.extend(h.input_watermark(i, *w).unwrap());
                    }
                }
            }
        }
        out.extend(h.end().unwrap());
        prop_assert_eq!(pairs(&out), reference(&left, &right, lo, hi, kind));
        prop_assert!(h.snapshot().unwrap().is_none(), "state left after the end");
        let m = h.metrics();
        prop_assert_eq!(m.late_dropped, 0);
    }
}

/// State stays bounded: with both watermarks moving, rows are dropped once no partner can come.
#[test]
fn state_is_dropped_as_the_other_side_passes() {
    let s = spec(-5, 5, JoinKind::Inner);
    let mut h = OpHarness::new(&s).unwrap();
    for t in (0..10_000).step_by(10) {
        h.process_from(0, batch(&[(Some(1), t, t)])).unwrap();
        h.process_from(1, batch(&[(Some(1), t + 1, t + 1)])).unwrap();
        h.input_watermark(0, t - 20).unwrap();
        h.input_watermark(1, t - 20).unwrap();
    }
    let snap = h.snapshot().unwrap().unwrap();
    // About (bound + interval + bucket) / 10 ms of rows per side.
    assert!(snap.num_rows() < 40, "{} rows kept", snap.num_rows());
}

/// A row behind its own input's watermark could have lost partners already: it is dropped and
/// counted, never joined with part of what it should meet.
#[test]
fn a_late_row_is_dropped_and_counted() {
    let s = spec(-5, 5, JoinKind::Inner);
    let mut h = OpHarness::new(&s).unwrap();
    h.input_watermark(0, 100).unwrap();
    let out = h.process_from(0, batch(&[(Some(1), 1, 99), (Some(1), 2, 100)])).unwrap();
    assert!(out.is_empty());
    assert_eq!(h.metrics().late_dropped, 1);
    assert_eq!(h.metrics().aggregated, 1);
}

#[test]
fn key_types_must_agree_and_the_interval_must_not_be_empty() {
    let mut s = spec(5, -5, JoinKind::Inner);
    assert!(s.output_schema().unwrap_err().to_string().contains("empty"));
    s = spec(-5, 5, JoinKind::Inner);
    s.schemas[1] =
        Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true), Field::new("v", DataType::Int64, false)]));
    let e = s.output_schema().unwrap_err().to_string();
    assert!(e.contains("Int64") && e.contains("Utf8"), "{e}");
}
