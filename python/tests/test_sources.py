"""Sources written in Python (`weir.Source`): partitions over workers, rows as dicts or Arrow,
bad rows dead-lettered, retries, and a position that survives `kill -9`."""

from __future__ import annotations

import doctest
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pyarrow as pa
import pytest

import weir
import weir.testing

from conftest import read_jsonl

SCHEMA = pa.schema([("part", pa.string()), ("seq", pa.int64()), ("ts", pa.int64())])
T0 = 1_796_000_000_000


class Parts(weir.Source):
    """Three partitions, each of its own kind: `dicts` gives lists of dicts (one bad), `arrow`
    record batches, `slow` nothing twice before its rows."""

    schema = SCHEMA
    poll_interval = 0.01

    def __init__(self) -> None:
        self.opened: List[tuple] = []

    def partitions(self) -> List[str]:
        return ["dicts", "arrow", "slow"]

    def open(self, partition: str, position: Any) -> weir.SourcePartition:
        self.opened.append((partition, position))
        return Reader(partition)


class Reader(weir.SourcePartition):
    def __init__(self, name: str) -> None:
        self.name, self.n, self.calls, self.closed = name, 0, 0, False

    def read(self) -> Union[pa.RecordBatch, List[Dict[str, Any]], None]:
        self.calls += 1
        if self.n >= 300:
            return None
        if self.name == "slow" and self.calls <= 2:
            return []
        seqs = range(self.n, self.n + 100)
        self.n += 100
        if self.name == "arrow":
            return pa.RecordBatch.from_pydict(
                {"ts": [T0 + s for s in seqs], "seq": list(seqs), "part": [self.name] * 100})
        rows: List[Dict[str, Any]] = [{"part": self.name, "seq": s, "ts": T0 + s} for s in seqs]
        if self.name == "dicts" and seqs[0] == 100:
            rows[5]["seq"] = "one hundred and five"
            rows[6]["ts"] = None
        return rows

    def position(self) -> int:
        return self.n


def test_partitions_are_read_on_every_worker_as_dicts_or_arrow_and_bad_rows_are_dead_lettered(tmp_path: Path) -> None:
    src = Parts()
    out = weir.testing.collect()
    p = weir.Pipeline("py-source")
    p.source("parts", src, event_time="ts").sink("out", out).dead_letters(str(tmp_path / "dead.jsonl"))
    summary = p.run(workers=2)
    rows = out.table().to_pylist()
    got = sorted((r["part"], r["seq"]) for r in rows)
    want = sorted((part, s) for part in ("dicts", "arrow", "slow") for s in range(300) if (part, s) not in
                  {("dicts", 105), ("dicts", 106)})
    assert got == want
    assert summary.source_records == 900
    assert sorted(src.opened) == [("arrow", None), ("dicts", None), ("slow", None)]
    dead = read_jsonl(tmp_path / "dead.jsonl")
    assert [d["kind"] for d in dead] == ["schema", "event_time"], dead
    assert "one hundred and five" in dead[0]["payload"] and "`seq` is a str, not an int" in dead[0]["reason"], dead[0]
    assert dead[0]["position"] == "partition dicts, after position 100", dead[0]
    assert json.loads(dead[1]["payload"])["seq"] == 106 and dead[1]["reason"] == "event time `ts` is null", dead[1]
    assert dead[1]["position"] == "partition dicts, after position 100", dead[1]


def test_a_retryable_failure_is_retried_and_another_fails_the_run_naming_the_partition() -> None:
    class Flaky(weir.Source):
        schema = pa.schema([("seq", pa.int64())])

        def __init__(self, error: Exception) -> None:
            self.error = error

        def open(self, partition: str, position: Any) -> weir.SourcePartition:
            return FlakyReader(self.error)

    class FlakyReader(weir.SourcePartition):
        def __init__(self, error: Exception) -> None:
            self.error: Optional[Exception] = error
            self.n = 0

        def read(self) -> Optional[List[Dict[str, Any]]]:
            if self.n == 10 and self.error is not None:
                e, self.error = self.error, None
                raise e
            if self.n == 20:
                return None
            self.n += 1
            return [{"seq": self.n - 1}]

        def position(self) -> int:
            return self.n

    out = weir.testing.collect()
    weir.Pipeline("flaky").source("s", Flaky(weir.Retryable("the API is busy"))).sink("out", out).run(workers=1)
    assert sorted(r["seq"] for r in out.table().to_pylist()) == list(range(20))

    with pytest.raises(weir.WeirError) as e:
        weir.Pipeline("broken").source("s", Flaky(KeyError("cursor"))).sink("out", weir.testing.collect()).run(workers=1)
    assert "read() of partition `0` raised" in str(e.value) and "KeyError" in str(e.value), str(e.value)


def test_settings_a_source_cannot_take_are_refused_with_the_reason() -> None:
    class NoSchema(weir.Source):
        def open(self, partition: str, position: Any) -> weir.SourcePartition:
            raise AssertionError("not opened")

    with pytest.raises(weir.ConfigError, match="has no `schema`"):
        weir.Pipeline("x").source("s", NoSchema())

    class Twice(NoSchema):
        schema = pa.schema([("a", pa.int64())])

        def partitions(self) -> List[str]:
            return ["p", "p"]

    with pytest.raises(ValueError, match="names partition `p` twice"):
        weir.Pipeline("x").source("s", Twice()).sink("o", weir.testing.collect()).run(workers=1)


def test_the_docstring_example_runs() -> None:
    runner = doctest.DocTestRunner()
    for t in doctest.DocTestFinder().find(weir.Source, "Source", globs={}):
        runner.run(t)
    assert runner.tries > 0 and runner.failures == 0


SCRIPT = textwrap.dedent('''
    import json, sys, time
    import pyarrow as pa
    import weir

    out, checkpoints, opens, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Seqs(weir.Source):
        """A device log per partition: rows by sequence number, resumable from any of them."""
        schema = pa.schema([("part", pa.string()), ("seq", pa.int64()), ("ts", pa.int64())])

        def partitions(self):
            return ["a", "b", "c"]

        def open(self, partition, position):
            with open(opens, "a") as f:
                f.write(json.dumps([partition, position]) + "\\n")
            return Log(partition, position["next"] if position else 0)

    class Log(weir.SourcePartition):
        def __init__(self, name, start):
            self.name, self.n = name, start

        def read(self):
            if self.n >= n:
                return None
            time.sleep(0.004)  # a device answers in a few ms
            rows = [{"part": self.name, "seq": i, "ts": %d + i} for i in range(self.n, min(self.n + 50, n))]
            self.n += len(rows)
            return rows

        def position(self):
            return {"next": self.n}

    p = weir.Pipeline("py-source-crash")
    p.source("log", Seqs(), event_time="ts").sink("out", weir.file_sink(out))
    p.checkpoints(checkpoints, interval="100ms")
    p.run(workers=2)
''' % T0)


def test_a_python_source_resumes_at_its_checkpointed_position_after_kill_9(tmp_path: Path) -> None:
    script, out, ck, opens = tmp_path / "job.py", tmp_path / "out", tmp_path / "ck", tmp_path / "opens.jsonl"
    script.write_text(SCRIPT)
    n = 20_000
    cmd = [sys.executable, str(script), str(out), str(ck), str(opens), str(n)]
    rng = random.Random(11)
    kills = 0
    for _ in range(5):
        with open(tmp_path / "killed-runs.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        # Killed at a random moment after a checkpoint completed in this run.
        deadline = time.monotonic() + 60
        before = _checkpoints(ck)
        while _checkpoints(ck) == before and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert kills >= 3, f"the job ended before it could be killed often enough ({kills} kills)"
    rows = [r for part in sorted(out.glob("part-*")) for r in read_jsonl(part)]
    got: Dict[tuple, int] = {}
    for r in rows:
        got[(r["part"], r["seq"])] = got.get((r["part"], r["seq"]), 0) + 1
    missing = [(p, s) for p in "abc" for s in range(n) if (p, s) not in got]
    twice = [k for k, c in got.items() if c > 1]
    assert not missing and not twice, f"{len(rows)} rows; missing {missing[:5]}, repeated {twice[:5]}"
    resumed = [o for o in map(json.loads, opens.read_text().splitlines()) if o[1] is not None]
    assert resumed and all(o[1]["next"] > 0 for o in resumed), "later runs opened partitions where they stopped"


def _checkpoints(ck: Path) -> List[str]:
    return sorted(p.name for p in ck.rglob("*") if p.is_file()) if ck.exists() else []
