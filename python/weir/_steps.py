"""What the engine calls, once per batch, to run a Python step.

Rust hands over a ``pyarrow.RecordBatch`` (zero-copy, through the Arrow C data interface) and
gets back a batch plus which input rows it came from and which rows failed, so that it can keep
event times aligned and dead-letter the failures with their tracebacks. Nothing here is public.
"""

from __future__ import annotations

import pickle
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from ._retry import RetrySettings
from .errors import Retryable

# (row index, attempts, traceback)
Failure = Tuple[int, int, str]


def _call_with_retry(fn: Callable[..., Any], args: tuple, retry: "RetrySettings") -> Tuple[bool, Any, int]:
    """Calls ``fn(*args)``; retries a :class:`Retryable` with backoff. Returns ``(ok, result or
    traceback, attempts)``."""
    try:
        return True, fn(*args), 1
    except Exception as e:  # noqa: BLE001 - any user error dead-letters the row
        return retry_row(fn, args, retry, e)


def retry_row(fn: Callable[..., Any], args: tuple, retry: "RetrySettings", exc: BaseException) -> Tuple[bool, Any, int]:
    """The first call of ``fn(*args)`` raised ``exc`` (here or in the engine's row loop):
    retries a :class:`Retryable` with backoff, else reports the traceback."""
    attempt = 1
    while True:
        if not isinstance(exc, Retryable) or attempt >= retry.max_attempts:
            return False, "".join(traceback.format_exception(exc)), attempt
        time.sleep(retry.delay(attempt))
        attempt += 1
        try:
            return True, fn(*args), attempt
        except Exception as e:  # noqa: BLE001
            exc = e


def to_batch(result: Any, schema: Optional[pa.Schema]) -> pa.RecordBatch:
    """Normalises what a batch function returned: a RecordBatch, a Table or a dict of arrays."""
    if isinstance(result, pa.Table):
        result = result.combine_chunks()
        batches = result.to_batches()
        result = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=result.schema)
    elif isinstance(result, dict):
        result = pa.RecordBatch.from_pydict(result, schema=schema)
    elif not isinstance(result, pa.RecordBatch):
        raise TypeError(
            f"a batch function must return a pyarrow.RecordBatch, a pyarrow.Table or a dict of arrays, not {type(result).__name__}"
        )
    if schema is not None and not result.schema.equals(schema):
        try:
            result = result.select(schema.names).cast(schema)
        except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TypeError(f"the function returned columns {result.schema} but the step's schema is {schema}: {e}") from e
    return result


def rows_to_batch(rows: List[Dict[str, Any]], kept: List[int], schema: pa.Schema, failures: List[Failure]) -> Tuple[pa.RecordBatch, List[int]]:
    """Builds the output batch; a row that does not fit the schema fails alone."""
    try:
        return pa.RecordBatch.from_pylist(rows, schema=schema), kept
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        good_rows, good_kept = [], []
        for r, i in zip(rows, kept):
            try:
                pa.RecordBatch.from_pylist([r], schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
                failures.append((i, 1, f"the function returned {r!r}, which does not fit the step's schema {schema}: {e}"))
                continue
            good_rows.append(r)
            good_kept.append(i)
        return pa.RecordBatch.from_pylist(good_rows, schema=schema), good_kept


def _key_of(row: Dict[str, Any], keys: Sequence[str]) -> Any:
    vals = []
    for path in keys:
        v: Any = row
        for part in path.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        vals.append(v)
    return vals[0] if len(vals) == 1 else tuple(vals)


class StatefulMap:
    """``stateful_map``: ``fn(state, row) -> (state, out)`` per key; the state starts as
    ``None``, a returned state of ``None`` forgets the key, an ``out`` of ``None`` emits
    nothing. States are pickled into checkpoints."""

    def __init__(self, fn: Callable, keys: Sequence[str], retry: RetrySettings, ttl_ms: Optional[int] = None):
        self.fn = fn
        self.keys = list(keys)
        self.retry = retry
        # key -> (key group, state)
        self.states: Dict[Any, Tuple[int, Any]] = {}
        # With a TTL: key -> newest event time seen (keys restored from a checkpoint start
        # their TTL at the first expiry check).
        self.ttl_ms = ttl_ms
        self.seen: Dict[Any, int] = {}
        self.swept_at: Optional[int] = None

    def expire(self, watermark: int) -> Tuple[int, int]:
        """Forgets the keys not seen for the TTL before ``watermark``; at most one pass per
        eighth of the TTL. Returns how many went and how many are held."""
        ttl = self.ttl_ms
        if ttl is None or (self.swept_at is not None and watermark < self.swept_at + max(ttl // 8, 1)):
            return 0, len(self.states)
        self.swept_at = watermark
        cutoff = watermark - ttl
        seen = self.seen
        gone = [k for k in self.states if seen.setdefault(k, watermark) < cutoff]
        for k in gone:
            del self.states[k]
            del seen[k]
        return len(gone), len(self.states)

    def apply(self, rows: List[Dict[str, Any]], groups: List[int], times: Optional[List[int]] = None):
        """Runs ``fn`` over one batch's rows (dicts, made by the engine, which also pauses the
        garbage collector around the call); returns the emitted dicts, the input rows they
        came from, and the failures. The engine builds the batch."""
        out: List[Dict[str, Any]] = []
        kept: List[int] = []
        failures: List[Failure] = []
        states = self.states
        for i, row in enumerate(rows):
            key = _key_of(row, self.keys)
            old = states.get(key)
            ok, r, attempts = _call_with_retry(self.fn, (None if old is None else old[1], row), self.retry)
            if not ok:
                failures.append((i, attempts, r))
                continue
            if not (isinstance(r, tuple) and len(r) == 2):
                failures.append((i, attempts, f"stateful_map functions return (state, row), not {type(r).__name__}"))
                continue
            new_state, emitted = r
            if new_state is None:
                states.pop(key, None)
                self.seen.pop(key, None)
            else:
                states[key] = (groups[i], new_state)
                if self.ttl_ms is not None and times is not None:
                    t = times[i]
                    if self.seen.get(key, t) <= t:
                        self.seen[key] = t
            if emitted is not None:
                if not isinstance(emitted, dict):
                    failures.append((i, attempts, f"stateful_map functions emit a dict (or None), not {type(emitted).__name__}"))
                    continue
                out.append(emitted)
                kept.append(i)
        return out, kept, failures

    def snapshot(self):
        """Each key's group, pickled key and pickled state, and the first key's text: what
        a handoff between processes places the key's partition by (the Kafka record key)."""
        groups, keys, states, firsts = [], [], [], []
        for key, (group, state) in self.states.items():
            groups.append(group)
            keys.append(pickle.dumps(key))
            first = key[0] if len(self.keys) > 1 else key
            firsts.append(None if first is None else str(first))
            try:
                states.append(pickle.dumps(state))
            except Exception as e:  # noqa: BLE001
                raise TypeError(f"the state of key {key!r} cannot be pickled for the checkpoint: {e}") from e
        return groups, keys, states, firsts

    def restore(self, groups: List[int], keys: List[bytes], states: List[bytes]) -> None:
        for g, k, s in zip(groups, keys, states):
            self.states[pickle.loads(k)] = (g, pickle.loads(s))


def apply_infer(fn: Callable, batch: pa.RecordBatch, features: Optional[Sequence[str]], output: str) -> pa.RecordBatch:
    """``infer``: ``fn`` scores a whole batch (a float64 matrix of ``features``, or the
    RecordBatch itself) and returns one score per row, appended as column ``output``."""
    import numpy as np

    if features:
        cols = [batch.column(batch.schema.get_field_index(f)) if "." not in f else _nested(batch, f) for f in features]
        x = np.column_stack([c.to_numpy(zero_copy_only=False).astype(np.float64, copy=False) for c in cols]) if cols else np.empty((batch.num_rows, 0))
        scores = fn(x)
    else:
        scores = fn(batch)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != batch.num_rows:
        raise ValueError(f"the model returned {len(scores)} scores for {batch.num_rows} rows")
    names = [n for n in batch.schema.names if n != output]
    arrays = [batch.column(batch.schema.get_field_index(n)) for n in names]
    return pa.RecordBatch.from_arrays(arrays + [pa.array(scores, type=pa.float64())], names=names + [output])


def _nested(batch: pa.RecordBatch, path: str):
    import pyarrow.compute as pc

    head, *rest = path.split(".")
    col = batch.column(batch.schema.get_field_index(head))
    for part in rest:
        col = pc.struct_field(col, part)
    return col
