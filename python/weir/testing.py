"""Helpers for testing pipelines deterministically: an in-memory source whose rows carry
explicit event times, a sink that collects what reaches it, and :func:`run` to run a pipeline
to completion and get its output as a ``pyarrow.Table``.

>>> import weir, weir.testing as wt
>>> src = wt.source([{"k": "a", "v": 1.0}, {"k": "a", "v": 3.0}], times=[0, 1000])
>>> p = weir.Pipeline("t").source("in", src).map("double", lambda r: {**r, "v": r["v"] * 2})
>>> out = wt.run(p.sink("out", wt.collect()))
>>> out.column("v").to_pylist()
[2.0, 6.0]
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import pyarrow as pa

from . import Pipeline, RunSummary, _CodeSink, _CodeSource
from .errors import ConfigError

__all__ = ["source", "collect", "run", "MemorySource", "CollectSink"]


class MemorySource(_CodeSource):
    """Replays rows with explicit event times. Partition ``p`` is read by worker ``p %
    workers``; each partition's batches arrive in order, partitions interleave one batch at a
    time, and the watermark follows the event times as for any source."""

    def __init__(self, schema: pa.Schema, partitions: List[List[tuple]]):
        self._schema = schema
        # per partition: [(RecordBatch, [event time ms, ...]), ...]
        self._partitions = partitions


def source(rows: Sequence[Dict[str, Any]] = (), *, schema: Optional[pa.Schema] = None, times: Optional[Sequence[int]] = None,
           time_column: Optional[str] = None, batch_size: Optional[int] = None, partitions: int = 1,
           partition_by: Optional[Callable[[Dict[str, Any]], int]] = None) -> MemorySource:
    """An in-memory source.

    Event times (ms since the epoch) come from ``times`` (one per row), or from the integer
    column ``time_column``; without either, every row has time 0. Rows are cut into batches of
    ``batch_size`` (default: one batch per partition) and spread over ``partitions`` by
    ``partition_by(row)`` (default: all in partition 0)."""
    rows = list(rows)
    if times is not None and len(times) != len(rows):
        raise ConfigError(f"testing.source: {len(times)} times for {len(rows)} rows")
    if times is not None and time_column is not None:
        raise ConfigError("testing.source: give `times` or `time_column`, not both")
    if partitions < 1:
        raise ConfigError("testing.source: partitions must be at least 1")
    if schema is None:
        if not rows:
            raise ConfigError("testing.source: an empty source needs a `schema`")
        schema = pa.RecordBatch.from_pylist(rows).schema
    if time_column is not None:
        times = [int(r[time_column]) for r in rows]
    if times is None:
        times = [0] * len(rows)
    parts: List[List[int]] = [[] for _ in range(partitions)]
    for i, r in enumerate(rows):
        p = 0 if partition_by is None else int(partition_by(r))
        if not 0 <= p < partitions:
            raise ConfigError(f"testing.source: partition_by returned {p} for row {i}; expected 0..{partitions - 1}")
        parts[p].append(i)
    out: List[List[tuple]] = []
    for idx in parts:
        size = batch_size or max(1, len(idx))
        batches = []
        for start in range(0, len(idx), size):
            chunk = idx[start:start + size]
            batch = pa.RecordBatch.from_pylist([rows[i] for i in chunk], schema=schema)
            batches.append((batch, [int(times[i]) for i in chunk]))
        out.append(batches)
    return MemorySource(schema, out)


class CollectSink(_CodeSink):
    """Keeps every row that reaches the sink; after the run, :meth:`table` has them."""

    def __init__(self) -> None:
        self._batches: List[pa.RecordBatch] = []
        self._schema: Optional[pa.Schema] = None

    def _table(self) -> pa.Table:
        if self._schema is None:
            raise RuntimeError("the pipeline has not run yet")
        return pa.Table.from_batches(self._batches, schema=self._schema)

    def table(self) -> pa.Table:
        """Everything collected, in arrival order (per worker)."""
        return self._table()

    def rows(self) -> List[Dict[str, Any]]:
        """Everything collected, as dicts."""
        return self._table().to_pylist()


def collect() -> CollectSink:
    """A sink that collects rows in memory."""
    return CollectSink()


def run(pipeline: Pipeline, *, workers: int = 1) -> pa.Table:
    """Runs ``pipeline`` (whose sink is :func:`collect`) to completion and returns the output."""
    if pipeline._code_sink is None:
        raise ConfigError("testing.run: the pipeline's sink must be weir.testing.collect()")
    summary: RunSummary = pipeline.run(workers=workers, fresh=True)
    assert summary.output is not None
    return summary.output
