"""The builder's configured steps (the YAML kinds) run from Python."""

import json
import os
import subprocess

import pyarrow as pa
import pytest

import weir
import weir.testing as wt
from conftest import ROOT, read_jsonl, sorted_rows

W1_SCHEMA = pa.schema(
    [
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("readings", pa.struct([pa.field("temp", pa.float64(), nullable=False), pa.field("vibration", pa.float64(), nullable=False)]), nullable=False),
    ]
)


def w1(path, out, dead):
    p = weir.Pipeline("w1-sensor-window")
    p.source("events", weir.file(path), schema=W1_SCHEMA, event_time="ts", max_out_of_orderness="2s")
    p.key_by("by-device", ["device_id"])
    p.window("per-device-10s", tumbling="10s", aggregates={"count": "count()", "avg_temp": "mean(readings.temp)", "max_vibration": "max(readings.vibration)"})
    p.select("columns", ["device_id", "window_start", "count", "avg_temp", "max_vibration"])
    p.sink("out", weir.file_sink(out))
    p.dead_letters(dead)
    return p


def test_w1_in_python_equals_the_yaml_pipeline(events_file, tmp_path):
    py_out = tmp_path / "py.jsonl"
    summary = w1(events_file, py_out, tmp_path / "dl1.jsonl").run(workers=2)
    assert summary.source_records == 20_000
    assert summary.steps["per-device-10s"]["aggregated"] == 20_000

    yaml_out = tmp_path / "yaml.jsonl"
    env = dict(os.environ, INPUT=str(events_file), OUTPUT=str(yaml_out), DEAD_LETTERS=str(tmp_path / "dl2.jsonl"))
    # Same file through the YAML form, loaded and run from Python.
    old = dict(os.environ)
    os.environ.update(env)
    try:
        yaml_summary = weir.run_yaml(ROOT / "examples" / "w1-sensor-window.yaml", workers=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert yaml_summary.sink_rows == summary.sink_rows
    assert sorted_rows(read_jsonl(py_out)) == sorted_rows(read_jsonl(yaml_out))
    assert summary.sink_rows > 0


def test_a_sink_with_a_latency_column_reports_latency_to_its_entry_and_past_its_write(tmp_path):
    p = weir.Pipeline("latency")
    p.source("events", weir.generator(count=5000, stamp_created=True, seed=1))
    p.filter("warm", "readings.temp > 0.0")
    p.sink("out", weir.file_sink(str(tmp_path / "out.jsonl")), latency_column="created_us")
    s = p.run(workers=1)
    assert s.sink_rows > 0
    entry, taken = s.latency_to_sink_entry_us, s.latency_us
    assert entry is not None and taken is not None
    # Each row reaches the sink before its write ends: no quantile of the one exceeds the other's.
    assert len(entry) == len(taken) == 3 and all(e <= t for e, t in zip(entry, taken)), (entry, taken)


def test_the_builder_writes_the_yaml_form():
    p = w1("in.jsonl", "out.jsonl", "dl.jsonl")
    cfg = p.config()
    assert [list(s)[0] for s in cfg["steps"]] == ["key_by", "window", "select"]
    assert cfg["source"]["event_time"] == {"column": "ts", "format": "ms"}
    assert cfg["source"]["schema"]["fields"][2]["fields"][0] == {"name": "temp", "type": "float64"}
    p.validate()


def test_filter_select_and_ewma_on_a_test_source():
    rows = [{"device": "d1", "temp": float(20 + (i % 3))} for i in range(60)] + [{"device": "d1", "temp": 90.0}]
    src = wt.source(rows, times=list(range(0, 61_000, 1000)))
    p = weir.Pipeline("ewma").source("in", src)
    p.filter("warm", "temp >= 20")
    p.select("cols", ["device", "temp", "temp * 1.8 + 32 AS temp_f"])
    p.key_by("by-device", "device")
    p.ewma_zscore("z", "temp", threshold=4.0, warmup=20)
    out = wt.run(p.sink("out", wt.collect()))
    anomalies = out.to_pylist()
    assert len(anomalies) == 1
    assert anomalies[0]["temp"] == 90.0
    assert anomalies[0]["temp_f"] == pytest.approx(194.0)


def test_hopping_and_session_windows():
    rows = [{"k": "a", "v": 1.0}] * 3 + [{"k": "a", "v": 5.0}]
    times = [0, 1000, 2000, 60_000]
    src = wt.source(rows, times=times)
    p = weir.Pipeline("session").source("in", src).key_by("k", "k")
    p.window("s", session={"gap": "10s"}, aggregates={"n": "count()", "total": "sum(v)"})
    out = sorted(wt.run(p.sink("out", wt.collect())).to_pylist(), key=lambda r: r["window_start"])
    assert [(r["n"], r["total"]) for r in out] == [(3, 3.0), (1, 5.0)]

    src = wt.source(rows, times=times)
    p = weir.Pipeline("hop").source("in", src).key_by("k", "k")
    p.window("h", hopping={"size": "4s", "slide": "2s"}, aggregates={"n": "count()"})
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert sum(r["n"] for r in out) == 3 * 2 + 1 * 2


def test_errors_name_the_key_and_the_step(tmp_path):
    p = weir.Pipeline("bad").source("in", weir.file(tmp_path / "x.jsonl"), schema=W1_SCHEMA)
    p._cfg["steps"].append({"filter": {"id": "f", "wher": "x > 1"}})
    p.sink("out", weir.stdout())
    with pytest.raises(weir.errors.ConfigError, match="unknown field `wher`"):
        p.validate()

    p = weir.Pipeline("bad").source("in", weir.file(tmp_path / "x.jsonl"), schema=W1_SCHEMA)
    p.filter("hot", "readings.pressure > 1").sink("out", weir.stdout())
    with pytest.raises(weir.errors.ConfigError) as e:
        p.validate()
    assert e.value.step == "hot"
    assert "pressure" in str(e.value)
    assert isinstance(e.value.__cause__, weir.errors.EngineCause)

    p = weir.Pipeline("dup").source("in", weir.generator(count=1)).filter("x", "true").filter("x", "true").sink("out", weir.stdout())
    with pytest.raises(weir.errors.ConfigError, match="used twice"):
        p.validate()


def test_a_yaml_pipeline_with_a_python_step(tmp_path, events_file):
    yaml = tmp_path / "p.yaml"
    yaml.write_text(
        f"""
name: yaml-with-python
source:
  id: events
  file: {{ path: "{events_file}", format: json }}
steps:
  - function: {{ id: tag }}
  - select: {{ id: cols, columns: [device_id, hot] }}
sink:
  id: out
  file: {{ path: "{tmp_path / 'out.jsonl'}", format: json }}
dead_letters: {{ path: "{tmp_path / 'dl.jsonl'}" }}
"""
    )
    p = weir.Pipeline.from_yaml(yaml)
    with pytest.raises(weir.errors.ConfigError, match="no code is registered for function `tag`"):
        p.validate()
    import pyarrow.compute as pc

    def tag(b):
        return b.append_column("hot", pc.greater(pc.struct_field(b.column("readings"), "temp"), 25.0))

    p.register("tag", "map_batches", tag)
    s = p.run(workers=1)
    assert s.sink_rows == 20_000
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert set(rows[0]) == {"device_id", "hot"}
    with pytest.raises(weir.errors.ConfigError, match="no `function` step with id `nope`"):
        p.register("nope", "map", lambda r: r)


def test_detect_rules_from_python():
    rows = [{"k": "a", "v": v} for v in (70.0, 81.0, 79.0, 76.0, 74.0, 81.0)]
    src = wt.source(rows, times=list(range(0, 6000, 1000)))
    p = weir.Pipeline("detect").source("in", src).key_by("by-k", "k")
    p.detect("rules", [{"name": "hot", "severity": "critical", "threshold": {"value": "v", "above": 80, "clear_below": 75}},
                       {"name": "quiet", "silence": {"timeout": 30}}], emit="all")
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    hot = [r["anomaly"] for r in out if r["rule"] == "hot"]
    assert hot == [False, True, True, True, False, True]
    assert {r["severity"] for r in out if r["rule"] == "hot"} == {"critical"}
    assert all(not r["anomaly"] for r in out if r["rule"] == "quiet")


def test_every_connector_and_setting_builds_its_yaml_form(tmp_path):
    schema = [{"name": "device_id", "type": "string"}, {"name": "ts", "type": "int64"}]
    p = weir.Pipeline("kafka", workers=2)
    p.source("in", weir.kafka("127.0.0.1:9092", ["sensors"], group_id="g", start="earliest", properties={"security.protocol": "PLAINTEXT"}),
             schema=schema, event_time="ts", idle_timeout="30s", max_future_skew="1h")
    p.key_by("k", "device_id").window("w", tumbling=10, aggregates={"n": "count()"}, late={"allowed_lateness": "5s"})
    p.sink("out", weir.kafka_sink("127.0.0.1:9092", "out", key="device_id"))
    p.quarantine(enabled=True, max_dead_letters=5, within="1m", cool_down="10m")
    p.checkpoints(tmp_path / "ckpt", "5s", keep=2)
    p.validate()
    cfg = p.config()
    assert cfg["source"]["kafka"]["topics"] == ["sensors"]
    assert cfg["source"]["watermark"] == {"idle_timeout": "30s"}
    assert cfg["steps"][1]["window"]["tumbling"] == "10000ms"
    assert cfg["sink"]["kafka"]["key"] == "device_id"
    assert cfg["checkpoints"] == {"dir": str(tmp_path / "ckpt"), "interval": "5s", "keep": 2}

    p = weir.Pipeline("stdin").source("in", weir.stdin("csv"), schema=schema).sink("out", weir.stdout("msgpack"))
    p.validate()
    with pytest.raises(weir.errors.ConfigError, match="unknown field `colour`"):
        weir.Pipeline("bad").source("in", weir.kafka("b", ["t"], colour="red"), schema=schema).sink("o", weir.stdout()).validate()


def test_validate_and_output_schema_need_no_input_when_the_schema_is_declared(tmp_path):
    schema = [{"name": "device_id", "type": "string"}, {"name": "ts", "type": "int64"}]
    p = weir.Pipeline("no-input").source("in", weir.file(str(tmp_path / "missing.jsonl")), schema=schema, event_time="ts")
    p.select("cols", ["device_id", "ts * 2 AS t2"]).sink("out", weir.stdout())
    p.validate()
    assert p.output_schema().names == ["device_id", "t2"]
    with pytest.raises(weir.errors.WeirError, match="missing.jsonl"):
        p.run(workers=1)
    bad = weir.Pipeline("bad").source("in", weir.file(str(tmp_path / "missing.jsonl")), schema=schema)
    with pytest.raises(weir.errors.ConfigError, match="unknown column `nope`"):
        bad.select("cols", ["nope"]).sink("out", weir.stdout()).validate()


def test_import_weir_loads_only_what_building_a_pipeline_needs():
    """`import weir` is part of every run's start-up (W1 from Python is held to within 10% of
    the command), so pyarrow, dataclasses (which brings `inspect`), typing, random and
    threading stay out of it. `-S` leaves out `site`, which on some machines imports some of
    them itself."""
    import os
    import site
    import subprocess
    import sys

    heavy = ("pyarrow", "dataclasses", "inspect", "typing", "random", "threading")
    code = ("import sys, weir; p = weir.Pipeline('x'); p.source('s', weir.generator(count=1)); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    path = os.pathsep.join([os.path.dirname(os.path.dirname(weir.__file__)), *site.getsitepackages()])
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=path)).stdout.strip()
    assert out == "", f"`import weir` imported {out}"


def test_detections_become_alerts():
    rows = [{"k": "a", "v": v} for v in (90.0, 91.0, 92.0)] + [{"k": "b", "v": 95.0}]
    src = wt.source(rows, times=[0, 1000, 2000, 3000])
    p = weir.Pipeline("alerts").source("in", src).key_by("by-k", "k")
    p.detect("rules", [{"name": "hot", "threshold": {"value": "v", "above": 80}}])
    p.alert("alerts", resolve_after="1h", events=["fired", "updated"])
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert [(r["key"], r["event"], r["count"]) for r in out] == [("a", "fired", 1), ("a", "updated", 2), ("a", "updated", 3), ("b", "fired", 1)]
    assert out[0]["alert_id"] == "hot/a/0" and out[0]["state"] == "firing"
    with pytest.raises(weir.errors.ConfigError, match="alert takes detections"):
        weir.Pipeline("x").source("in", wt.source(rows, times=[0, 1, 2, 3])).alert("a").sink("o", wt.collect()).validate()


def test_alert_routes_and_the_model_rule_from_python(tmp_path):
    # The repository's ONNX model: about 0.02 for a normal reading, near 1 for an anomaly.
    normal = {"temp": 23.0, "humidity": 45.0, "pressure": 1013.0, "vibration": 0.02}
    hot = {"temp": 38.0, "humidity": 45.0, "pressure": 1013.0, "vibration": 0.4}
    rows = [{"k": k, "r": r} for k, r in [("a", normal), ("a", hot), ("b", normal), ("b", hot), ("a", hot)]]
    src = wt.source(rows, times=[0, 1000, 2000, 3000, 4000])
    p = weir.Pipeline("routes").source("in", src).key_by("by-k", "k")
    p.detect("rules", [{"name": "model", "severity": "critical",
                        "model": {"path": str(ROOT / "models" / "sensor_anomaly.onnx"),
                                  "inputs": ["r.temp", "r.humidity", "r.pressure", "r.vibration"], "threshold": 0.9}}])
    log = tmp_path / "pages.jsonl"
    p.alert("alerts", resolve_after="1h", routes=[{"name": "pager", "match": {"event": ["fired"]}, "file": {"path": str(log)},
                                                   "retry": {"initial_backoff": 0.01, "max_backoff": 0.1}}])
    p.api("0", token="t")
    assert p.config()["api"] == {"addr": "0", "token": "t"}
    del p._cfg["api"]  # no port needed to run
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert [(r["key"], r["event"]) for r in out] == [("a", "fired"), ("b", "fired"), ("a", "updated")]
    assert all(r["score"] > 0.99 for r in out)
    pages = read_jsonl(log)
    assert sorted((r["key"], r["event"], r["alert_id"]) for r in pages) == [("a", "fired", "model/a/1000"), ("b", "fired", "model/b/3000")]


def test_a_state_ttl_forgets_keys_without_changing_results():
    # A new key every second of event time, each seen three times within 2 s.
    rows = [{"k": f"dev-{i // 3}", "v": 1.0} for i in range(60)]
    times = [i * 700 for i in range(60)]

    def run(**ttl):
        p = weir.Pipeline("ttl").source("in", wt.source(rows, times=times)).key_by("k", "k")
        p.window("w", tumbling="1s", aggregates={"n": "count()", "total": "sum(v)"}, **ttl)
        assert p.config()["steps"][1]["window"].get("state_ttl") == ttl.get("state_ttl")
        return sorted(wt.run(p.sink("out", wt.collect())).to_pylist(), key=lambda r: (r["k"], r["window_start"]))

    assert run(state_ttl="5s") == run()
    with pytest.raises(weir.errors.ConfigError, match="state_ttl"):
        run(state_ttl="100ms")


def test_a_lookup_join_enriches_rows_from_a_file_table(tmp_path):
    table = tmp_path / "devices.csv"
    table.write_text("id,site,limit\nd1,north,20.5\nd2,south,30\n")
    rows = [{"device": "d1", "temp": 21.0}, {"device": "d9", "temp": 5.0}, {"device": "d2", "temp": 25.0}]

    def run(join, missing="drop"):
        p = weir.Pipeline("lookup")
        p.source("in", wt.source(rows))
        p.lookup("device", "device", weir.file_table(table, key="id"), join=join, missing=missing)
        p.sink("out", wt.collect()).dead_letters(str(tmp_path / "dead.jsonl"))
        return sorted(wt.run(p).to_pylist(), key=lambda r: r["device"])

    assert run("inner") == [{"device": "d1", "temp": 21.0, "site": "north", "limit": 20.5},
                            {"device": "d2", "temp": 25.0, "site": "south", "limit": 30.0}]
    assert run("left")[2] == {"device": "d9", "temp": 5.0, "site": None, "limit": None}
    run("inner", "dead_letter")
    dead = read_jsonl(tmp_path / "dead.jsonl")
    assert [(d["kind"], d["reason"]) for d in dead] == [("lookup", "no row in the lookup table for key `d9`")]
    # The table's key defaults to the rows' key names: this table has no `device` column.
    with pytest.raises(weir.ConfigError, match="no key column `device`"):
        weir.Pipeline("x").source("in", wt.source(rows)).lookup(
            "device", "device", weir.file_table(table)).sink("o", wt.collect()).validate()
