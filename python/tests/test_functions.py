"""Python steps: map_batches, map, filter, stateful_map; zero-copy; errors and retries."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import weir
import weir.testing as wt
from conftest import read_jsonl


def readings(n=100, keys=("a", "b")):
    rows = [{"k": keys[i % len(keys)], "v": float(i)} for i in range(n)]
    return rows, [i * 100 for i in range(n)]


def test_map_batches_sees_zero_copy_arrow_and_numpy():
    rows, times = readings(1000)
    seen = []

    def fn(batch: pa.RecordBatch):
        if batch.num_rows == 0:  # the call that learns the output schema
            return batch
        col = batch.column(1)
        arr = col.to_numpy()  # a float64 column without nulls: a view, no copy
        assert arr.__array_interface__["data"][0] == col.buffers()[1].address + col.offset * 8
        seen.append(col.buffers()[1].address)
        return batch  # handed back as is

    p = weir.Pipeline("zc").source("in", wt.source(rows, times=times, batch_size=250)).map_batches("same", fn)
    out = wt.run(p.sink("out", wt.collect()))
    assert len(seen) == 4
    # What the sink collected is the very memory the function saw: no copy on the way in,
    # through the engine, or on the way out.
    got = sorted(b.column(1).buffers()[1].address for b in out.to_batches())
    assert got == sorted(seen)


def test_roundtrip_through_the_c_data_interface_is_zero_copy():
    batch = pa.RecordBatch.from_pydict({"x": np.arange(1000, dtype=np.float64), "s": ["a"] * 1000})
    back = weir._weir.roundtrip(batch)
    assert back.equals(batch)
    for i in range(batch.num_columns):
        assert [b.address for b in back.column(i).buffers() if b] == [b.address for b in batch.column(i).buffers() if b]


def test_map_batches_with_numpy_and_a_probed_schema():
    rows, times = readings(10)

    def fahrenheit(b):
        v = b.column("v").to_numpy()
        return {"k": b.column("k"), "v": b.column("v"), "f": v * 1.8 + 32}

    p = weir.Pipeline("np").source("in", wt.source(rows, times=times)).map_batches("f", fahrenheit)
    p.sink("out", wt.collect())
    assert p.output_schema().names == ["k", "v", "f"]
    out = wt.run(p)
    assert out.column("f").to_pylist() == [i * 1.8 + 32 for i in range(10)]


def test_map_batches_returning_a_table_or_a_declared_schema():
    rows, times = readings(10)
    schema = pa.schema([("k", pa.string()), ("double", pa.float64())])
    p = weir.Pipeline("tbl").source("in", wt.source(rows, times=times))
    p.map_batches("t", lambda b: pa.table({"k": b.column("k"), "double": pc.multiply(b.column("v"), 2)}), schema=schema)
    out = wt.run(p.sink("out", wt.collect()))
    assert out.schema.names == ["k", "double"]
    assert out.column("double").to_pylist() == [2.0 * i for i in range(10)]


def test_row_map_and_filter():
    rows, times = readings(20)
    out_schema = pa.schema([("k", pa.string()), ("v", pa.float64()), ("sq", pa.float64())])
    p = weir.Pipeline("rows").source("in", wt.source(rows, times=times, batch_size=7))
    p.filter("even", lambda r: int(r["v"]) % 2 == 0)
    p.map("square", lambda r: None if r["v"] == 4.0 else {**r, "sq": r["v"] ** 2}, schema=out_schema)
    p.sink("out", wt.collect())
    s = p.run(workers=1)
    got = s.output.to_pylist()
    assert [r["v"] for r in got] == [0.0, 2.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    assert got[2]["sq"] == 36.0
    assert s.steps["even"] == {**s.steps["even"], "rows_in": 20, "rows_out": 10, "filtered": 10}
    assert s.steps["square"]["filtered"] == 1


def test_a_row_exception_dead_letters_that_row_with_its_traceback(tmp_path):
    rows, times = readings(10)
    dead = tmp_path / "dl.jsonl"

    def fragile(r):
        if r["v"] == 3.0:
            raise ValueError("three is not allowed")
        return r

    p = weir.Pipeline("dl").source("in", wt.source(rows, times=times)).map("fragile", fragile)
    p.dead_letters(dead).sink("out", wt.collect())
    s = p.run(workers=1)
    assert s.sink_rows == 9
    entries = read_jsonl(dead)
    assert len(entries) == 1
    e = entries[0]
    assert e["kind"] == "function" and e["step"] == "fragile"
    assert "ValueError" in e["reason"] and "three is not allowed" in e["reason"] and "in fragile" in e["reason"]
    assert json.loads(e["payload"]) == {"k": "b", "v": 3.0}
    assert s.steps["fragile"]["dead_lettered"] == 1


def test_a_batch_exception_dead_letters_the_batch_or_fails_the_job(tmp_path):
    rows, times = readings(30)

    def boom(b):
        if pc.max(b.column("v")).as_py() >= 20:
            raise RuntimeError("model server said no")
        return b

    dead = tmp_path / "dl.jsonl"
    p = weir.Pipeline("batches").source("in", wt.source(rows, times=times, batch_size=10)).map_batches("boom", boom, schema=pa.schema([("k", pa.string()), ("v", pa.float64())]))
    s = p.dead_letters(dead).sink("out", wt.collect()).run(workers=1)
    assert s.sink_rows == 20
    entries = read_jsonl(dead)
    assert len(entries) == 10 and all("model server said no" in e["reason"] for e in entries)

    p = weir.Pipeline("fails").source("in", wt.source(rows, times=times, batch_size=10))
    p.map_batches("boom", boom, on_error="fail", schema=pa.schema([("k", pa.string()), ("v", pa.float64())]))
    p.dead_letters(tmp_path / "dl2.jsonl").sink("out", wt.collect())
    with pytest.raises(weir.errors.FunctionError) as e:
        p.run(workers=1)
    assert e.value.step == "boom"
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "model server said no" in str(e.value.__cause__)


def test_retryable_errors_are_retried_then_dead_lettered(tmp_path):
    rows, times = readings(4)
    calls = {}

    def flaky(r):
        n = calls.get(r["v"], 0) + 1
        calls[r["v"]] = n
        if r["v"] == 1.0 and n < 3:
            raise weir.Retryable("lookup timed out")  # succeeds on the third try
        if r["v"] == 2.0:
            raise weir.Retryable("always down")
        return r

    dead = tmp_path / "dl.jsonl"
    p = weir.Pipeline("retry").source("in", wt.source(rows, times=times))
    p.map("flaky", flaky, retry=weir.Retry(max_attempts=4, initial_backoff=0.001, max_backoff=0.002))
    s = p.dead_letters(dead).sink("out", wt.collect()).run(workers=1)
    assert calls == {0.0: 1, 1.0: 3, 2.0: 4, 3.0: 1}
    assert s.sink_rows == 3
    (entry,) = read_jsonl(dead)
    assert entry["attempts"] == 4 and "always down" in entry["reason"]


def test_a_row_that_does_not_fit_the_schema_fails_alone(tmp_path):
    rows, times = readings(5)
    dead = tmp_path / "dl.jsonl"
    p = weir.Pipeline("shape").source("in", wt.source(rows, times=times))
    p.map("bad-type", lambda r: {**r, "v": "oops"} if r["v"] == 2.0 else r)
    s = p.dead_letters(dead).sink("out", wt.collect()).run(workers=1)
    assert s.sink_rows == 4
    (entry,) = read_jsonl(dead)
    assert "does not fit" in entry["reason"]


def test_rows_look_the_same_as_pyarrow_makes_them_and_come_back_checked(tmp_path):
    """Plain columns are converted in Rust, others through pyarrow: a function sees exactly
    what ``to_pylist`` gives, and every value it returns is checked against the schema."""
    import datetime

    schema = pa.schema([
        ("s", pa.string()), ("i8", pa.int8()), ("i", pa.int64()), ("u", pa.uint32()), ("f", pa.float32()),
        ("d", pa.float64()), ("b", pa.bool_()), ("ls", pa.large_string()),
        ("nested", pa.struct([("x", pa.int64())])), ("when", pa.timestamp("ms")), ("tags", pa.list_(pa.string())),
    ])
    rows = [
        {"s": "a", "i8": -5, "i": 2**40, "u": 7, "f": 1.5, "d": 0.25, "b": True, "ls": "é", "nested": {"x": 1},
         "when": datetime.datetime(2026, 1, 2, 3, 4, 5), "tags": ["p", "q"]},
        {"s": None, "i8": None, "i": None, "u": None, "f": None, "d": None, "b": None, "ls": None, "nested": None,
         "when": None, "tags": None},
    ]
    table = pa.Table.from_pylist(rows, schema=schema)
    seen = []

    def same(r):
        seen.append(dict(r))
        return r

    p = weir.Pipeline("types").source("in", wt.source(rows, schema=schema, times=[0, 1])).map("same", same)
    out = wt.run(p.sink("out", wt.collect()))
    assert seen == table.to_pylist()
    assert out.to_pylist() == table.to_pylist()
    assert out.schema == table.schema

    # Back into the schema: ints widen into floats, a missing key is null, anything else that
    # does not fit fails its row alone, naming the column.
    out_schema = pa.schema([("k", pa.string()), ("v", pa.float64()), ("n", pa.int8()), ("ok", pa.bool_())])
    cases = [
        {"k": "int-as-float", "v": 3, "n": 1, "ok": True},
        {"k": "missing-is-null", "v": 1.0},
        {"k": "str-as-float", "v": "x", "n": 1, "ok": True},
        {"k": "too-big", "v": 1.0, "n": 300, "ok": True},
        {"k": "bool-as-int", "v": 1.0, "n": True, "ok": True},
        {"k": "int-as-bool", "v": 1.0, "n": 1, "ok": 1},
        {"k": 5, "v": 1.0},
    ]
    feed, ftimes = [{"i": i} for i in range(len(cases))], list(range(len(cases)))
    dead = tmp_path / "dl.jsonl"
    p = weir.Pipeline("back").source("in", wt.source(feed, times=ftimes)).map("back", lambda r: cases[r["i"]], schema=out_schema)
    got = p.dead_letters(dead).sink("out", wt.collect()).run(workers=1).output.to_pylist()
    assert got == [{"k": "int-as-float", "v": 3.0, "n": 1, "ok": True}, {"k": "missing-is-null", "v": 1.0, "n": None, "ok": None}]
    reasons = sorted(e["reason"] for e in read_jsonl(dead))
    assert len(reasons) == 5, reasons
    for needle in ("`v` is a str, not a number", "`n` = 300 does not fit in Int8", "`n` is a bool, not an int",
                   "`ok` is an int, not a bool", "`k` is an int, not a str"):
        assert any(needle in r for r in reasons), (needle, reasons)


def test_a_row_function_may_return_its_row_changed_reordered_or_not_at_all(tmp_path):
    """Rows a function returns as given, partly changed, reordered, with extra keys, dropped
    or broken: each comes back as it should, and a broken one fails alone."""
    schema = pa.schema([("k", pa.string()), ("v", pa.float64()), ("n", pa.int64())])
    rows = [{"k": f"row-{i}", "v": float(i), "n": None if i == 5 else i * 10} for i in range(9)]

    def fn(r):
        i = int(r["v"])
        if i == 1:
            return {**r, "v": r["v"] + 0.5}  # one column changed
        if i == 2:
            return None  # dropped
        if i == 3:
            return {"n": r["n"], "v": r["v"], "k": r["k"]}  # keys in another order
        if i == 4:
            return {**r, "extra": 1}  # a key the schema lacks
        if i == 6:
            return {**r, "k": "new"}
        if i == 7:
            return {**r, "n": "bad"}  # does not fit: dead-lettered alone
        return r  # 0, 5 (a null), 8: untouched

    dead = tmp_path / "dl.jsonl"
    p = weir.Pipeline("pass").source("in", wt.source(rows, schema=schema, times=list(range(9)))).map("fn", fn)
    got = p.dead_letters(dead).sink("out", wt.collect()).run(workers=1).output.to_pylist()
    want = [dict(r) for r in rows]
    want[1]["v"] = 1.5
    want[6]["k"] = "new"
    assert got == [w for i, w in enumerate(want) if i not in (2, 7)]
    (entry,) = read_jsonl(dead)
    assert "`n` is a str" in entry["reason"]


def test_stateful_map_keeps_state_per_key():
    rows = [{"k": k, "v": 1.0} for k in "aabab"]
    times = [0, 1, 2, 3, 4]

    def running(state, row):
        total = (state or 0.0) + row["v"]
        return total, {**row, "v": total}

    p = weir.Pipeline("sm").source("in", wt.source(rows, times=times, batch_size=2)).key_by("by-k", "k")
    p.stateful_map("sum", running)
    out = wt.run(p.sink("out", wt.collect()), workers=2)
    got = sorted((r["k"], r["v"]) for r in out.to_pylist())
    assert got == [("a", 1.0), ("a", 2.0), ("a", 3.0), ("b", 1.0), ("b", 2.0)]

    p = weir.Pipeline("unkeyed").source("in", wt.source(rows, times=times)).stateful_map("sum", running).sink("out", wt.collect())
    with pytest.raises(weir.errors.ConfigError, match="key_by"):
        p.validate()


def test_stateful_map_state_survives_a_restart_through_checkpoints(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"k": k, "ts": i * 1000}) + "\n" for i, k in enumerate("abab")))

    def count(state, row):
        n = (state or 0) + 1
        return n, {"k": row["k"], "ts": row["ts"], "n": n}

    def pipeline():
        p = weir.Pipeline("sm-ckpt").source("in", weir.file(src), event_time="ts")
        p.key_by("by-k", "k").stateful_map("count", count, schema=pa.schema([("k", pa.string()), ("ts", pa.int64()), ("n", pa.int64())]))
        p.sink("out", weir.file_sink(tmp_path / "out"))
        p.dead_letters(tmp_path / "dl.jsonl")
        return p.checkpoints(tmp_path / "ckpt", "1h")

    pipeline().run(workers=1, fresh=True)
    # Each key's state is stored with the key as text first, as the engine's keyed state is,
    # so it can follow its Kafka partition to another process.
    import pyarrow.ipc as ipc

    tables = [ipc.open_file(str(f)).read_all() for f in (tmp_path / "ckpt").glob("sm-ckpt/chk-*/*/count.operator.arrow")]
    assert tables and all(t.column_names[:2] == ["__key_group", "key0"] for t in tables)
    assert sorted(v for t in tables for v in t.column("key0").to_pylist()) == ["a", "b"]
    with src.open("a") as f:
        f.write(json.dumps({"k": "a", "ts": 5000}) + "\n")
    pipeline().run(workers=2)
    rows = [json.loads(line) for part in sorted((tmp_path / "out").glob("part-*")) for line in part.read_text().splitlines()]
    assert sorted((r["k"], r["n"]) for r in rows) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]


def test_a_state_that_cannot_be_pickled_is_reported(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"k": "a", "ts": 0}) + "\n")
    p = weir.Pipeline("sm-bad").source("in", weir.file(src), event_time="ts").key_by("by-k", "k")
    p.stateful_map("lock", lambda s, r: (lambda: None, r))
    p.sink("out", weir.file_sink(tmp_path / "out")).dead_letters(tmp_path / "dl.jsonl").checkpoints(tmp_path / "ckpt", "1h")
    with pytest.raises(weir.errors.WeirError, match="cannot be pickled"):
        p.run(workers=1)


def test_stateful_map_state_ttl_forgets_keys_not_seen():
    # `a` at 0 s, `b` at 30 s (the watermark moves past a's TTL), `a` again at 60 s.
    rows = [{"k": "a", "v": 1.0}, {"k": "b", "v": 1.0}, {"k": "b", "v": 1.0}, {"k": "a", "v": 1.0}]
    times = [0, 30_000, 31_000, 60_000]

    def running(state, row):
        total = (state or 0.0) + row["v"]
        return total, {**row, "v": total}

    def run(**ttl):
        p = weir.Pipeline("ttl").source("in", wt.source(rows, times=times, batch_size=1)).key_by("by-k", "k")
        p.stateful_map("sum", running, **ttl)
        return [(r["k"], r["v"]) for r in wt.run(p.sink("out", wt.collect()), workers=1).to_pylist()]

    assert run() == [("a", 1.0), ("b", 1.0), ("b", 2.0), ("a", 2.0)]
    assert run(state_ttl="10s") == [("a", 1.0), ("b", 1.0), ("b", 2.0), ("a", 1.0)], "a was forgotten"
    assert weir._duration_ms("1h 30m") == 5_400_000 and weir._duration_ms(0.25) == 250
    with pytest.raises(weir.errors.ConfigError, match="not a duration"):
        weir._duration_ms("soon")
