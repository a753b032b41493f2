"""infer's adaptive batches, metrics, Ctrl-C, and running in a thread."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest

import weir
import weir.testing as wt


def sizes_seen(source, **infer):
    sizes = []

    def model(x):
        sizes.append(len(x))
        return x[:, 0] * 2.0

    p = weir.Pipeline("infer").source("gen", source, batch_size=infer.pop("source_batch", None))
    p.infer("score", model, features=["readings.temp"], **infer)
    p.sink("out", wt.collect())
    s = p.run(workers=1)
    return sizes, s


def test_a_quiet_stream_is_scored_at_once():
    sizes, s = sizes_seen(weir.generator(count=40, rate=40.0, seed=1), max_batch=256, max_latency_ms=10)
    assert s.sink_rows == 40
    assert sum(sizes) == 40
    # 25 ms between events and a 10 ms budget: nothing is worth waiting for, so rows are
    # scored as they come (the source may still hand over a few at once after a stall).
    assert len(sizes) >= 30 and np.median(sizes) == 1, sizes


def test_a_burst_is_scored_in_wide_batches():
    sizes, s = sizes_seen(weir.generator(count=20_000, seed=1), source_batch=16, max_batch=256, max_latency_ms=50)
    assert s.sink_rows == 20_000 and sum(sizes) == 20_000
    # The source cuts batches of 16 rows; infer gathers them up to max_batch.
    assert max(sizes) == 256
    assert np.median(sizes) >= 128, sizes[:50]


def test_infer_adds_the_score_column_and_dead_letters_a_failed_batch(tmp_path):
    rows = [{"k": "a", "x": float(i), "y": 1.0} for i in range(6)]

    def model(m):
        if (m[:, 0] >= 4).any():
            raise ValueError("bad input to model")
        return m.sum(axis=1)

    p = weir.Pipeline("inf").source("in", wt.source(rows, times=list(range(6)), batch_size=2))
    p.infer("s", model, features=["x", "y"], output="score", max_batch=2, max_latency_ms=0)
    p.dead_letters(tmp_path / "dl.jsonl").sink("out", wt.collect())
    s = p.run(workers=1)
    assert s.output.column("score").to_pylist() == [1.0, 2.0, 3.0, 4.0]
    assert s.output.schema.names == ["k", "x", "y", "score"]
    lines = (tmp_path / "dl.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("bad input to model" in json.loads(l)["reason"] for l in lines)


def test_infer_reports_metrics_while_running():
    def model(m):
        time.sleep(0.001)
        return m[:, 0]

    p = weir.Pipeline("inf-metrics").source("gen", weir.generator(rate=2000.0, seed=3))
    p.infer("score", model, features=["readings.temp"], max_batch=64)
    p.sink("out", wt.collect())
    run = p.run_in_thread(workers=1, metrics_addr="127.0.0.1:19477")
    try:
        body = ""
        for _ in range(100):
            time.sleep(0.1)
            try:
                body = urllib.request.urlopen("http://127.0.0.1:19477/metrics", timeout=2).read().decode()
            except OSError:
                continue
            if "weir_infer_batches_total" in body:
                break
        assert 'weir_infer_batches_total{job="inf-metrics",step="score"}' in body
        assert "weir_infer_batch_size" in body and "weir_infer_seconds_total" in body
    finally:
        run.stop()
    s = run.join(timeout=30)
    assert s.sink_rows == s.source_records > 0


def test_a_running_pipeline_reports_its_progress():
    p = weir.Pipeline("live").source("gen", weir.generator(rate=2000.0, seed=4))
    p.filter("hot", "readings.temp > 0.0").sink("out", wt.collect())
    run = p.run_in_thread(workers=1)
    try:
        seen = None
        for _ in range(100):
            time.sleep(0.05)
            seen = run.progress()
            if seen and seen["source_records"] > 0 and seen["steps"].get("hot", {}).get("rows_in", 0) > 0:
                break
        assert seen and seen["source_records"] > 0, seen
        assert seen["steps"]["hot"]["rows_in"] > 0 and "dead_lettered" in seen["steps"]["hot"]
        assert seen["watermark_ms"] is None or seen["watermark_ms"] > 1_500_000_000_000
    finally:
        run.stop()
    s = run.join(timeout=30)
    assert s.source_records >= seen["source_records"]
    assert run.progress() is None  # over


PROGRESS = textwrap.dedent(
    """
    import sys, weir
    p = weir.Pipeline("progress").source("gen", weir.generator(rate=2000.0, count=1600, seed=1))
    p.sink("out", weir.file_sink(sys.argv[1]))
    p.run(workers=1, progress=float(sys.argv[2]) if sys.argv[2] != "off" else False)
    """
)


def test_run_prints_progress_lines_when_asked(tmp_path):
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-c", PROGRESS, str(out), "0.2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "ev/s" in l]
    assert len(lines) >= 2, r.stderr  # about 0.8 s of work, a line each 0.2 s
    assert "| in " in lines[-1] and "| out " in lines[-1] and "watermark" in lines[-1]
    quiet = subprocess.run([sys.executable, "-c", PROGRESS, str(out), "off"], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and "ev/s" not in quiet.stderr, quiet.stderr
    with pytest.raises(weir.errors.ConfigError, match="progress must be"):
        weir.Pipeline("x").source("gen", weir.generator(count=1)).sink("o", weir.stdout()).run(progress=-1)


CTRL_C = textwrap.dedent(
    """
    import sys, weir
    p = weir.Pipeline("endless").source("gen", weir.generator(rate=5000.0, seed=1))
    p.map_batches("same", lambda b: b)
    p.sink("out", weir.file_sink(sys.argv[1])).dead_letters(sys.argv[2])
    try:
        p.run(workers=2)
    except KeyboardInterrupt:
        print("stopped cleanly", flush=True)
        sys.exit(3)
    """
)


def test_ctrl_c_stops_a_running_pipeline_cleanly(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(out), str(tmp_path / "dl.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if out.exists() and out.stat().st_size > 0:
                break
            time.sleep(0.05)
        assert out.stat().st_size > 0
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    assert "stopped cleanly" in stdout
    # Everything written is whole: the sink was flushed and closed.
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 0 and out.read_text().endswith("\n")
