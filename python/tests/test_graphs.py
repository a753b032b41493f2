"""Graphs from Python: several sources, a union, an interval join, branches with sinks of their own."""

import json

import pytest

import weir
import weir.testing as wt
from conftest import read_jsonl

SCHEMA = {"fields": [{"name": "device_id", "type": "string"}, {"name": "ts", "type": "int64"},
                     {"name": "temp", "type": "float64"}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def feeds(tmp_path):
    # Two feeds of three devices, a reading every 7 ms (a) and 11 ms (b), a little out of order.
    a = [{"device_id": f"d{i % 3}", "ts": 1_000 + i * 7 - (i % 4) * 3, "temp": 20.0 + i % 5} for i in range(400)]
    b = [{"device_id": f"d{i % 3}", "ts": 1_000 + i * 11 - (i % 3) * 5, "temp": 30.0 + i % 7} for i in range(300)]
    return a, b, write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)


def two_sources(name, pa_, pb):
    p = weir.Pipeline(name)
    p.add_source("a", weir.file(pa_), schema=SCHEMA, event_time="ts", max_out_of_orderness="100ms")
    p.add_source("b", weir.file(pb), schema=SCHEMA, event_time="ts", max_out_of_orderness="100ms")
    return p


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interval_join_pairs_what_a_nested_loop_pairs(tmp_path, workers):
    a, b, pa_, pb = feeds(tmp_path)
    p = two_sources("join", pa_, pb)
    p.interval_join("pairs", "a", "b", on="device_id", between=("-20ms", "10ms"))
    p.select("cols", ["a.device_id AS device_id", "a.ts AS a_ts", "b.ts AS b_ts"])
    out = tmp_path / "out.jsonl"
    p.sink("out", weir.file_sink(str(out)))
    p.dead_letters(str(tmp_path / "dead.jsonl"))
    summary = p.run(workers=workers)
    want = sorted((x["device_id"], x["ts"], y["ts"]) for x in a for y in b
                  if x["device_id"] == y["device_id"] and -20 <= y["ts"] - x["ts"] <= 10)
    got = sorted((r["device_id"], r["a_ts"], r["b_ts"]) for r in read_jsonl(out))
    assert want and got == want
    assert summary.source_records == 700
    assert summary.steps["pairs"]["late_dropped"] == 0


def test_a_left_join_keeps_rows_without_a_partner(tmp_path):
    a, b, pa_, pb = feeds(tmp_path)
    p = two_sources("left", pa_, pb)
    p.interval_join("pairs", "a", "b", on="device_id", between=(0, 0.001), kind="left", names=("l", "r"))
    p.select("cols", ["l.ts AS a_ts", "r.ts AS b_ts"])
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    partners = {x["ts"]: [y["ts"] for y in b if y["device_id"] == x["device_id"] and 0 <= y["ts"] - x["ts"] <= 1] for x in a}
    lonely = [t for t, ys in partners.items() if not ys]
    assert lonely, "the test needs rows without a partner"
    assert sorted(r["a_ts"] for r in out if r["b_ts"] is None) == sorted(lonely)
    assert len(out) == sum(max(1, len(ys)) for ys in partners.values())


def test_a_union_and_branches_with_sinks_of_their_own(tmp_path):
    a, b, pa_, pb = feeds(tmp_path)
    p = two_sources("branches", pa_, pb)
    p.union("both", ["a", "b"])
    p.filter("warm", "temp >= 30").input("both")
    p.filter("cool", "temp < 30").input("both")
    warm, cool = tmp_path / "warm.jsonl", tmp_path / "cool.jsonl"
    p.add_sink("warm-out", weir.file_sink(str(warm)), input="warm")
    p.add_sink("cool-out", weir.file_sink(str(cool)), input="cool")
    p.dead_letters(str(tmp_path / "dead.jsonl"))
    cfg = p.config()
    assert [s["id"] for s in cfg["sources"]] == ["a", "b"] and [s["input"] for s in cfg["sinks"]] == ["warm", "cool"]
    p.run(workers=2)
    assert len(read_jsonl(warm)) == sum(1 for r in a + b if r["temp"] >= 30)
    assert len(read_jsonl(cool)) == sum(1 for r in a + b if r["temp"] < 30)


def test_graph_mistakes_are_config_errors(tmp_path):
    _, _, pa_, pb = feeds(tmp_path)
    p = two_sources("bad", pa_, pb)
    p.filter("f", "temp > 0")
    p.sink("out", weir.stdout())
    with pytest.raises(weir.ConfigError, match="does not say what it reads"):
        p.validate()
    p = two_sources("bad", pa_, pb)
    p.union("u", ["a", "c"])
    p.sink("out", weir.stdout())
    with pytest.raises(weir.ConfigError, match="input `c`"):
        p.validate()
    with pytest.raises(weir.ConfigError, match="names its inputs itself"):
        p.input("a")


def test_a_window_join_pairs_rows_of_one_window(tmp_path):
    a, b, pa_, pb = feeds(tmp_path)
    p = two_sources("wjoin", pa_, pb)
    p.window_join("pairs", "a", "b", on="device_id", tumbling="500ms")
    p.select("cols", ["a.ts AS a_ts", "b.ts AS b_ts", "window_start"])
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    want = sorted((x["ts"], y["ts"], x["ts"] - x["ts"] % 500) for x in a for y in b
                  if x["device_id"] == y["device_id"] and x["ts"] // 500 == y["ts"] // 500)
    assert want and sorted((r["a_ts"], r["b_ts"], r["window_start"]) for r in out) == want


def test_a_temporal_join_takes_the_version_valid_at_each_rows_time(tmp_path):
    a, b, pa_, pb = feeds(tmp_path)
    p = two_sources("tjoin", pa_, pb)
    p.temporal_join("asof", "a", "b", on="device_id", kind="left", names=("reading", "setting"))
    p.select("cols", ["reading.ts AS ts", "setting.ts AS version_ts"])
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    def order(w):
        return (w[0], -1 if w[1] is None else w[1])
    want = sorted(((x["ts"], max((y["ts"] for y in b if y["device_id"] == x["device_id"] and y["ts"] <= x["ts"]),
                                 default=None)) for x in a), key=order)
    got = sorted(((r["ts"], r["version_ts"]) for r in out), key=order)
    assert any(v is None for _, v in want) and got == want
