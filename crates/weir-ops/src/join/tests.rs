use arrow_array::types::Int64Type;
use proptest::prelude::*;
use weir_core::testing::OpHarness;

use super::*;
use crate::window::WindowKind;

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
        let (out, mut h) = drive(&s, &left, &right, &cuts);
        prop_assert_eq!(pairs(&out), reference(&left, &right, lo, hi, kind));
        prop_assert!(h.snapshot().unwrap().is_none(), "state left after the end");
        prop_assert_eq!(h.metrics().late_dropped, 0);
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

/// Output rows of a window join as (left id, right id, window start, time), sorted.
fn window_pairs(out: &[Batch]) -> Vec<(Option<i64>, Option<i64>, i64, i64)> {
    let mut v = Vec::new();
    for b in out {
        let starts = b.rows.column_by_name("window_start").unwrap().as_primitive::<Int64Type>().clone();
        let ends = b.rows.column_by_name("window_end").unwrap().as_primitive::<Int64Type>().clone();
        for i in 0..b.num_rows() {
            let side = |name: &str| {
                let s = b.rows.column_by_name(name).unwrap().as_struct().clone();
                let ids = s.column_by_name("v").unwrap().as_primitive::<Int64Type>().clone();
                s.is_valid(i).then(|| ids.value(i))
            };
            assert_eq!(b.time.value(i), ends.value(i) - 1, "a window's rows are at its end - 1");
            v.push((side("a"), side("b"), starts.value(i), b.time.value(i)));
        }
    }
    v.sort_unstable();
    v
}

type Stream = [(Option<i64>, i64, i64)];

/// The window join by brute force: every window of every row, every key, all pairs or pads.
fn window_reference(
    left: &Stream,
    right: &Stream,
    w: WindowKind,
    kind: JoinKind,
) -> Vec<(Option<i64>, Option<i64>, i64, i64)> {
    let mut out = Vec::new();
    // (side, key, id, start, end) memberships.
    let mut member: Vec<(usize, Option<i64>, i64, i64, i64)> = Vec::new();
    match w {
        WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => {
            let slide = if let WindowKind::Hopping { slide_ms, .. } = w { slide_ms } else { size_ms };
            for (side, rows) in [left, right].into_iter().enumerate() {
                for r in rows {
                    let mut s = r.2 - r.2.rem_euclid(slide);
                    while s + size_ms > r.2 {
                        member.push((side, r.0, r.1, s, s + size_ms));
                        s -= slide;
                    }
                }
            }
        }
        WindowKind::Session { gap_ms } => {
            let mut all: Vec<(Option<i64>, i64, usize, i64)> = Vec::new();
            for (side, rows) in [left, right].into_iter().enumerate() {
                all.extend(rows.iter().map(|r| (r.0, r.2, side, r.1)));
            }
            all.sort_unstable();
            let mut i = 0;
            while i < all.len() {
                if all[i].0.is_none() {
                    member.push((all[i].2, None, all[i].3, all[i].1, all[i].1 + gap_ms));
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < all.len() && all[j].0 == all[i].0 && all[j].1 < all[j - 1].1 + gap_ms {
                    j += 1;
                }
                let end = all[j - 1].1 + gap_ms;
                for m in &all[i..j] {
                    member.push((m.2, m.0, m.3, all[i].1, end));
                }
                i = j;
            }
        }
    }
    let mut groups: BTreeMap<(Option<i64>, i64, i64), [Vec<i64>; 2]> = Default::default();
    for (side, key, id, s, e) in member {
        if key.is_none() {
            if kind.pads(side) {
                let pair = if side == 0 { (Some(id), None) } else { (None, Some(id)) };
                out.push((pair.0, pair.1, s, e - 1));
            }
            continue;
        }
        groups.entry((key, s, e)).or_default()[side].push(id);
    }
    for ((_, s, e), [l, r]) in groups {
        if !l.is_empty() && !r.is_empty() {
            for a in &l {
                for b in &r {
                    out.push((Some(*a), Some(*b), s, e - 1));
                }
            }
        } else {
            if kind.pads(0) {
                out.extend(l.iter().map(|a| (Some(*a), None, s, e - 1)));
            }
            if kind.pads(1) {
                out.extend(r.iter().map(|b| (None, Some(*b), s, e - 1)));
            }
        }
    }
    out.sort_unstable();
    out
}

/// Drives a two-input step as the runtime does: batches of either side in the order `cuts`
/// says, each input's watermark `BOUND` behind its newest row, the watermark of both together
/// after, and restarts from snapshots where `cuts` says.
fn drive(
    factory: &dyn OperatorFactory,
    left: &Stream,
    right: &Stream,
    cuts: &[(bool, usize, bool)],
) -> (Vec<Batch>, OpHarness) {
    let mut h = OpHarness::new(factory).unwrap();
    let mut out = Vec::new();
    let (mut pos, mut max_seen, mut wm) = ([0usize; 2], [i64::MIN; 2], [i64::MIN; 2]);
    let sides = [left, right];
    let mut c = 0;
    while pos[0] < left.len() || pos[1] < right.len() {
        let (pick, n, restart) = cuts[c % cuts.len()];
        c += 1;
        let side = if pos[0] >= left.len() {
            1
        } else if pos[1] >= right.len() {
            0
        } else {
            usize::from(pick)
        };
        let end = (pos[side] + n).min(sides[side].len());
        let rows = &sides[side][pos[side]..end];
        pos[side] = end;
        out.extend(h.process_from(side, batch(rows)).unwrap());
        max_seen[side] = rows.iter().map(|r| r.2).max().unwrap().max(max_seen[side]);
        let w = max_seen[side] - BOUND;
        if w > wm[side] {
            wm[side] = w;
            out.extend(h.input_watermark(side, w).unwrap());
            let both = wm[0].min(wm[1]);
            if both > i64::MIN && h.current_watermark().is_none_or(|c| both > c) {
                out.extend(h.watermark(both).unwrap());
            }
        }
        if restart {
            let snap = h.snapshot().unwrap();
            let at = h.current_watermark();
            h = OpHarness::restored(factory, snap, at).unwrap();
            for (i, w) in wm.iter().enumerate() {
                if *w > i64::MIN {
                    out.extend(h.input_watermark(i, *w).unwrap());
                }
            }
        }
    }
    out.extend(h.end().unwrap());
    (out, h)
}

fn window_spec(window: WindowKind, kind: JoinKind) -> WindowJoinSpec {
    let s = spec(0, 0, kind);
    WindowJoinSpec { schemas: s.schemas, keys: s.keys, names: s.names, window, kind }
}

fn windows() -> impl Strategy<Value = WindowKind> {
    prop_oneof![
        (1..12i64).prop_map(|size_ms| WindowKind::Tumbling { size_ms }),
        (1..6i64, 1..4i64).prop_map(|(slide, n)| WindowKind::Hopping { size_ms: slide * n, slide_ms: slide }),
        (1..8i64).prop_map(|gap_ms| WindowKind::Session { gap_ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever the windows, the batch cuts, the interleaving, the disorder within the bound
    /// and restarts from snapshots, the window join's output is the brute-force one's.
    #[test]
    fn window_join_equals_brute_force(
        left in stream(BOUND, 0),
        right in stream(BOUND, 1000),
        window in windows(),
        kind in prop::sample::select(vec![JoinKind::Inner, JoinKind::Left, JoinKind::Right, JoinKind::Full]),
        cuts in prop::collection::vec((any::<bool>(), 1..7usize, any::<bool>()), 1..80),
    ) {
        let s = window_spec(window, kind);
        let (out, mut h) = drive(&s, &left, &right, &cuts);
        prop_assert_eq!(window_pairs(&out), window_reference(&left, &right, window, kind));
        prop_assert!(h.snapshot().unwrap().is_none(), "state left after the end");
        prop_assert_eq!(h.metrics().late_dropped, 0);
    }
}

/// The temporal join by brute force: each left row with the right row of its key with the
/// greatest (time, arrival) at or before its time.
fn temporal_reference(left: &Stream, right: &Stream, kind: JoinKind) -> Vec<(Option<i64>, Option<i64>, i64)> {
    let mut out = Vec::new();
    for a in left {
        let v = right
            .iter()
            .enumerate()
            .filter(|(_, b)| a.0.is_some() && b.0 == a.0 && b.2 <= a.2)
            .max_by_key(|(j, b)| (b.2, *j))
            .map(|(_, b)| b.1);
        match v {
            Some(b) => out.push((Some(a.1), Some(b), a.2)),
            None if kind == JoinKind::Left => out.push((Some(a.1), None, a.2)),
            None => {}
        }
    }
    out.sort_unstable();
    out
}

fn temporal_spec(kind: JoinKind, state_ttl_ms: Option<i64>) -> TemporalJoinSpec {
    let s = spec(0, 0, kind);
    TemporalJoinSpec { schemas: s.schemas, keys: s.keys, names: s.names, kind, state_ttl_ms }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever the cuts, interleaving, disorder within the bound and restarts, each event
    /// gets the version its key held at its time.
    #[test]
    fn temporal_join_equals_brute_force(
        left in stream(BOUND, 0),
        right in stream(BOUND, 1000),
        kind in prop::sample::select(vec![JoinKind::Inner, JoinKind::Left]),
        cuts in prop::collection::vec((any::<bool>(), 1..7usize, any::<bool>()), 1..80),
    ) {
        let s = temporal_spec(kind, None);
        let (out, mut h) = drive(&s, &left, &right, &cuts);
        prop_assert_eq!(pairs(&out), temporal_reference(&left, &right, kind));
        prop_assert_eq!(h.metrics().late_dropped, 0);
        // What is left is at most one version per key.
        let left_over = h.snapshot().unwrap().map_or(0, |t| t.num_rows());
        prop_assert!(left_over <= 5, "{left_over} rows left");
    }
}

/// Versions superseded before the watermark are let go: a key updated every 10 ms keeps about
/// the versions of the watermark's bound, not all of them.
#[test]
fn temporal_join_keeps_only_the_versions_still_needed() {
    let s = temporal_spec(JoinKind::Inner, None);
    let mut h = OpHarness::new(&s).unwrap();
    for t in (0..10_000).step_by(10) {
        h.process_from(1, batch(&[(Some(1), t, t)])).unwrap();
        h.process_from(0, batch(&[(Some(1), t + 1, t + 5)])).unwrap();
        h.watermark(t - 20).unwrap();
    }
    let snap = h.snapshot().unwrap().unwrap();
    assert!(snap.num_rows() < 12, "{} rows kept", snap.num_rows());
}

/// With a TTL, a key whose newest version is older than the watermark by more than it is
/// forgotten: later events find no version.
#[test]
fn temporal_join_forgets_keys_past_their_ttl() {
    let s = temporal_spec(JoinKind::Left, Some(1_000));
    let mut h = OpHarness::new(&s).unwrap();
    h.process_from(1, batch(&[(Some(1), 100, 0), (Some(2), 101, 0)])).unwrap();
    h.process_from(1, batch(&[(Some(2), 102, 5_000)])).unwrap();
    h.process_from(0, batch(&[(Some(1), 1, 500)])).unwrap();
    let out = h.watermark(4_000).unwrap();
    assert_eq!(pairs(&out), vec![(Some(1), Some(100), 500)]);
    h.process_from(0, batch(&[(Some(1), 2, 6_000), (Some(2), 3, 6_000)])).unwrap();
    let out = h.end().unwrap();
    // Key 1's version (time 0) expired at 1,000; key 2's newest (5,000) had not.
    assert_eq!(pairs(&out), vec![(Some(2), None, 6_000), (Some(3), Some(102), 6_000)]);
}
