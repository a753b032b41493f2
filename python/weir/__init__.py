"""Weir: real-time stream processing on Arrow micro-batches, built and run from Python.

A :class:`Pipeline` here is the Rust builder mirrored one to one: the same step kinds, the same
step ids and the same setting names as the YAML form (``docs/pipelines.md``). Python functions
join it as steps that run in-process on whole ``pyarrow.RecordBatch`` es:

>>> import weir
>>> p = weir.Pipeline("hot")
>>> _ = p.source("events", weir.generator(count=1000, seed=1))
>>> _ = p.filter("hot", "readings.temp > 25.0")
>>> _ = p.map_batches("fahrenheit", lambda b: b)
>>> _ = p.sink("out", weir.stdout())
>>> sorted(p.config()["steps"][1])
['function']

The engine runs with the GIL released and takes it once per batch for a Python step.
"""

from __future__ import annotations

import json
import os

from . import errors
from ._retry import RetrySettings
from .errors import ConfigError, Retryable, WeirError

# `import weir` is part of every run's start-up, so it loads only what building a pipeline
# needs: pyarrow where a Python step or schema needs it, threading for `run_in_thread`, and
# `typing` (like dataclasses, several milliseconds of imports) only for type checkers; the
# annotations are strings (`from __future__ import annotations`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

    import pyarrow as pa

    Json = Dict[str, Any]
    Duration = Union[str, float, int]

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "Sink",
    "Source",
    "SourcePartition",
    "RunSummary",
    "Retry",
    "Retryable",
    "WeirError",
    "ConfigError",
    "errors",
    "run_yaml",
    "load_yaml",
    "file",
    "stdin",
    "generator",
    "kafka",
    "mqtt",
    "nats",
    "rabbitmq",
    "redis_streams",
    "http_ingest",
    "connector",
    "file_sink",
    "file_table",
    "postgres_table",
    "redis_table",
    "stdout",
    "kafka_sink",
    "postgres_sink",
    "schema_spec",
]



def _join(id: str, left: str, right: str, on: Union[str, Sequence[str]], kind: str,
          right_on: Optional[Sequence[str]], names: Optional[Tuple[str, str]]) -> Json:
    """The settings every join of two streams shares."""
    settings: Json = {"id": id, "left": left, "right": right, "on": [on] if isinstance(on, str) else list(on),
                      "kind": kind}
    if right_on is not None:
        settings["right_on"] = list(right_on)
    if names is not None:
        settings["as"] = list(names)
    return settings


def _duration(d: Duration) -> str:
    """Durations are strings like ``"10s"`` or ``"250ms"`` (as in YAML); numbers are seconds."""
    if isinstance(d, str):
        return d
    return f"{int(round(float(d) * 1000))}ms"


def _duration_ms(d: Duration) -> int:
    """A duration (``"1h 30m"``, ``"250ms"``, or seconds as a number) in milliseconds."""
    if not isinstance(d, str):
        return int(round(float(d) * 1000))
    import re

    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", d)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)|\s", "", d):
        raise ConfigError(f"`{d}` is not a duration; write it like 10s, 250ms or 1h 30m")
    return int(sum(float(n) * units[u] for n, u in parts))


def _clean(d: Mapping[str, Any]) -> Json:
    out: Json = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = v
    return out


# --- sources -------------------------------------------------------------------------------


def file(path: str, format: Union[str, Json] = "json", *, follow: bool = False, poll_interval: Optional[Duration] = None, chunk_size: Optional[int] = None) -> Json:
    """Reads JSON Lines, CSV or MessagePack files (a path or a glob)."""
    return {"file": _clean({"path": str(path), "format": format, "follow": follow or None,
                            "poll_interval": None if poll_interval is None else _duration(poll_interval),
                            "chunk_size": chunk_size})}


def stdin(format: Union[str, Json] = "json") -> Json:
    """Reads standard input (needs a declared schema)."""
    return {"stdin": {"format": format}}


def generator(**settings: Any) -> Json:
    """Synthetic sensor events: ``devices``, ``rate``, ``count``, ``duration``, ``disorder``,
    ``max_delay``, ``anomaly_rate``, ``seed``, ``stamp_created``, as in YAML."""
    for k in ("duration", "max_delay"):
        if k in settings and settings[k] is not None:
            settings[k] = _duration(settings[k])
    return {"generator": _clean(settings)}


def kafka(brokers: str, topics: Sequence[str], *, format: Union[str, Json] = "json", **settings: Any) -> Json:
    """Reads Kafka topics through a consumer group (``group_id``, ``start``, ``metadata``,
    ``properties``, ``stop_at_end``, as in YAML). ``avro={"schema_registry": {"url": ...}}`` or
    ``protobuf={...}`` read payloads in the Confluent wire format with their schemas from a
    registry; ``json_schema=`` checks JSON payloads against a JSON Schema."""
    return {"kafka": _clean({"brokers": brokers, "topics": list(topics), "format": format, **settings})}


def mqtt(url: str, topics: Sequence[str], *, format: Union[str, Json] = "json", **settings: Any) -> Json:
    """Reads MQTT topic filters (``qos``, ``client_id``, ``clean_session``, ``protocol``,
    ``topic_column``, ``topic_fields``, ``username``, ``password``, ``end_when_idle``, ... as in
    YAML); QoS 1 messages are acknowledged once the checkpoint covering them completes."""
    return connector("mqtt", url=url, topics=list(topics), format=format, **settings)


def redis_streams(url: str, streams: Sequence[str], *, group: Optional[str] = None, format: Union[str, Json] = "json",
                  **settings: Any) -> Json:
    """Reads Redis Streams, through a consumer ``group`` (acknowledged once the checkpoint
    covering an entry completes) or, without one, from the ids in the checkpoint
    (``consumer``, ``start``, ``field``, ``id_column``, ``stream_column``, ``claim_after``,
    ``end_when_idle``, as in YAML)."""
    return connector("redis_streams", url=url, streams=list(streams), group=group, format=format, **settings)


def nats(url: str, subjects: Sequence[str], *, stream: Optional[str] = None, format: Union[str, Json] = "json",
         **settings: Any) -> Json:
    """Reads NATS subjects: through a JetStream ``stream``'s durable ``consumer`` (acknowledged
    once the checkpoint covering a message completes), or core NATS without one (at most once;
    ``queue``, ``create_stream``, ``deliver``, ``ack_wait``, ``subject_fields``, ``headers_column``,
    ``end_when_idle``, ... as in YAML)."""
    return connector("nats", url=url, subjects=list(subjects), stream=stream, format=format, **settings)


def rabbitmq(url: str, queue: str, *, format: Union[str, Json] = "json", **settings: Any) -> Json:
    """Consumes a RabbitMQ queue, acknowledged once the checkpoint covering a delivery completes
    (``prefetch``, ``declare``, ``exchange``, ``binding_key``, ``routing_key_fields``,
    ``headers_column``, ``end_when_idle``, ... as in YAML)."""
    return connector("rabbitmq", url=url, queue=queue, format=format, **settings)


def http_ingest(*, token: Optional[str] = None, queue: Optional[int] = None, max_body: Optional[int] = None,
                respond: Optional[str] = None) -> Json:
    """Records posted to the API port, ``POST /ingest/<source id>`` with a bearer ``token``
    (default the API's); ``respond="checkpointed"`` answers once the rows are committed."""
    return connector("http", token=token, queue=queue, max_body=max_body, respond=respond)


def connector(kind: str, **settings: Any) -> Json:
    """Any source or sink connector by its YAML key, with its YAML settings as keyword
    arguments: ``weir.connector("mqtt", url="mqtt://127.0.0.1:1883", topics=["sensors/#"])``.
    Durations are strings as in YAML (``"10s"``) or ``datetime.timedelta``; ``None`` leaves a
    setting at its default. The engine checks the settings when the pipeline is built: an
    unknown key or connector is an error that names it."""
    import datetime

    def value(v: Any) -> Any:
        if isinstance(v, datetime.timedelta):
            return f"{int(round(v.total_seconds() * 1000))}ms"
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return v

    return {kind: value(_clean(settings))}


# --- sinks ---------------------------------------------------------------------------------


def file_table(path: Union[str, os.PathLike], format: Union[str, Json] = "csv", *, key: Optional[Union[str, Sequence[str]]] = None,
               columns: Optional[Sequence[str]] = None, schema: Any = None, reload: Optional[Duration] = "10s") -> Json:
    """A lookup table read from a file (CSV with a header, or JSON Lines) and held in memory,
    read again when it changes (checked every ``reload``; ``None`` for never). ``key`` is the
    table's key column(s) (default: the step's key names), ``columns`` the columns a found
    row brings (default: all but the key), ``schema`` its types (default: inferred)."""
    return _clean({
        "file": {"path": str(path), "format": format, "reload": None if reload is None else _duration(reload)},
        "key": None if key is None else ([key] if isinstance(key, str) else list(key)),
        "columns": None if columns is None else list(columns),
        "schema": None if schema is None else schema_spec(schema),
    })


def postgres_table(url: str, table: str, *, key: Optional[Union[str, Sequence[str]]] = None,
                   columns: Optional[Sequence[str]] = None, cache_size: int = 100_000, cache_ttl: Duration = "60s",
                   ca_file: Optional[str] = None) -> Json:
    """A lookup table in PostgreSQL: each batch asks it once for the keys the cache lacks;
    answers (rows, and keys without one) are kept ``cache_ttl``, up to ``cache_size`` keys."""
    return _clean({
        "postgres": _clean({"url": url, "table": table, "ca_file": ca_file}),
        "key": None if key is None else ([key] if isinstance(key, str) else list(key)),
        "columns": None if columns is None else list(columns),
        "cache": {"size": cache_size, "ttl": _duration(cache_ttl)},
    })


def redis_table(url: str, prefix: str = "", *, columns: Optional[Sequence[str]] = None, schema: Any = None,
                cache_size: int = 100_000, cache_ttl: Duration = "60s") -> Json:
    """A lookup table of Redis hashes, ``<prefix><key>``: fields read as ``schema``'s types, or
    as text with ``columns``; asked once per batch for the keys the cache lacks."""
    return _clean({
        "redis": {"url": url, "prefix": prefix},
        "columns": None if columns is None else list(columns),
        "schema": None if schema is None else schema_spec(schema),
        "cache": {"size": cache_size, "ttl": _duration(cache_ttl)},
    })


def file_sink(path: str, format: Union[str, Json] = "json") -> Json:
    """Writes a file (a directory of part files when checkpoints are on)."""
    return {"file": {"path": str(path), "format": format}}


def stdout(format: Union[str, Json] = "json") -> Json:
    """Writes standard output."""
    return {"stdout": {"format": format}}


def kafka_sink(brokers: str, topic: str, *, format: Union[str, Json] = "json", **settings: Any) -> Json:
    """Produces to a Kafka topic (``key``, ``partition``, ``headers``, ``mode``,
    ``properties``, as in YAML)."""
    return {"kafka": _clean({"brokers": brokers, "topic": topic, "format": format, **settings})}


def postgres_sink(url: str, table: str, *, mode: str = "append", key: Optional[Sequence[str]] = None,
                  create_table: bool = False, **settings: Any) -> Json:
    """Writes a PostgreSQL table: appended by binary COPY (``mode="append"``) or the latest row
    per ``key`` (``mode="upsert"``); exactly once under checkpoints (``delivery``,
    ``progress_table``, ``progress_key``, ``ca_file``, as in YAML). The password is best left
    to ``PGPASSWORD``."""
    return connector("postgres", url=url, table=table, mode=mode, key=list(key) if key else None,
                     create_table=create_table or None, **settings)


# --- schemas -------------------------------------------------------------------------------

def schema_spec(schema: Union["pa.Schema", Sequence[Any], Json]) -> Json:
    """A source schema in the YAML form, from a ``pyarrow.Schema`` (types bool, int64, float64,
    string, timestamp[ms] and structs of them), a list of field dicts, or the YAML dict."""
    if isinstance(schema, dict):
        return schema
    if type(schema).__module__.startswith("pyarrow"):
        return {"fields": [_field_spec(f) for f in schema]}
    return {"fields": list(schema)}


def _field_spec(f: "pa.Field") -> Json:
    import pyarrow as pa

    to_spec = {pa.bool_(): "bool", pa.int64(): "int64", pa.float64(): "float64", pa.string(): "string", pa.timestamp("ms"): "timestamp"}
    spec: Json = {"name": f.name}
    if pa.types.is_struct(f.type):
        spec["type"] = "struct"
        spec["fields"] = [_field_spec(f.type.field(i)) for i in range(f.type.num_fields)]
    else:
        name = to_spec.get(f.type)
        if name is None:
            raise ConfigError(f"field `{f.name}`: source schemas take bool, int64, float64, string, timestamp[ms] or struct, not {f.type}")
        spec["type"] = name
    if f.nullable:
        spec["required"] = False
    return spec


# --- Python steps --------------------------------------------------------------------------


class Retry:
    """How a Python step retries a :class:`weir.errors.Retryable` failure before it
    dead-letters the rows."""

    __slots__ = ("max_attempts", "initial_backoff", "max_backoff")

    def __init__(self, max_attempts: int = 3, initial_backoff: float = 0.1, max_backoff: float = 5.0):
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff

    def __repr__(self) -> str:
        return f"Retry(max_attempts={self.max_attempts!r}, initial_backoff={self.initial_backoff!r}, max_backoff={self.max_backoff!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Retry):
            return NotImplemented
        return (self.max_attempts, self.initial_backoff, self.max_backoff) == (other.max_attempts, other.initial_backoff, other.max_backoff)

    def _settings(self) -> RetrySettings:
        return RetrySettings(self.max_attempts, self.initial_backoff, self.max_backoff)


class _Function:
    """A Python step as the engine sees it (read by the native module)."""

    def __init__(self, kind: str, fn: Callable[..., Any], schema: Optional[pa.Schema] = None,
                 retry: Optional[RetrySettings] = None, on_error: str = "dead_letter",
                 features: Optional[List[str]] = None, output: str = "score", max_batch: int = 1024,
                 max_latency_ms: float = 10.0, state_ttl_ms: Optional[int] = None):
        self.kind = kind
        self.fn = fn
        self.schema = schema
        self.retry = retry if retry is not None else RetrySettings()
        self.on_error = on_error
        self.features = features
        self.output = output
        self.max_batch = max_batch
        self.max_latency_ms = max_latency_ms
        self.state_ttl_ms = state_ttl_ms


def _schema_arg(schema: Any) -> Optional["pa.Schema"]:
    if schema is None:
        return None
    import pyarrow as pa

    if isinstance(schema, pa.Schema):
        return schema
    if isinstance(schema, dict):
        return pa.schema([(k, v) for k, v in schema.items()])
    return pa.schema(schema)


class RunSummary:
    """What a finished run reports (the CLI's end-of-run summary).

    ``steps`` holds, per step in pipeline order, its counters (rows in, rows out, filtered,
    dead-lettered, ...); ``latency_us`` the creation-to-sink latency (p50, p99, max) in µs when
    the sink measured it (``latency_column``), and ``latency_to_sink_entry_us`` the same up to
    the start of the sink's write (the difference is the write); ``output`` what a sink written
    in code collected (see :mod:`weir.testing`)."""

    __slots__ = ("elapsed_s", "source_records", "sink_rows", "steps", "latency_us", "latency_to_sink_entry_us",
                 "output")

    def __init__(self, elapsed_s: float, source_records: int, sink_rows: int, steps: Dict[str, Dict[str, int]],
                 latency_us: Optional[tuple] = None, output: Optional[pa.Table] = None,
                 latency_to_sink_entry_us: Optional[tuple] = None):
        self.elapsed_s = elapsed_s
        self.source_records = source_records
        self.sink_rows = sink_rows
        self.steps = steps
        self.latency_us = latency_us
        self.latency_to_sink_entry_us = latency_to_sink_entry_us
        self.output = output

    def __repr__(self) -> str:
        return (f"RunSummary(elapsed_s={self.elapsed_s!r}, source_records={self.source_records!r}, "
                f"sink_rows={self.sink_rows!r}, steps={self.steps!r}, latency_us={self.latency_us!r})")

    def __str__(self) -> str:
        rate = self.source_records / self.elapsed_s if self.elapsed_s > 0 else 0.0
        dead = sum(s.get("dead_lettered", 0) for s in self.steps.values())
        return (f"{self.source_records} records in, {self.sink_rows} rows out, {dead} dead-lettered, "
                f"in {self.elapsed_s:.2f} s ({rate:,.0f} records/s)")


class Pipeline:
    """A pipeline under construction. Step ids must be unique and stable: they name steps in
    metrics, logs and dead letters, and key their state in checkpoints."""

    def __init__(self, name: str, *, workers: Optional[int] = None):
        self._cfg: Json = {"name": name, "steps": []}
        if workers is not None:
            self._cfg["workers"] = workers
        self._functions: Dict[str, _Function] = {}
        self._code_source: Any = None
        self._code_sink: Any = None
        # The native pipeline of the last run, whose tables stay readable after it.
        self._last_native: Any = None

    # -- construction from YAML -----------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "Pipeline":
        """Loads a YAML pipeline (with ``${VAR}`` expansion). Its ``function`` steps are placed
        by id; give their code with :meth:`register`."""
        from . import _weir

        p = cls("")
        p._cfg = json.loads(_weir.load_yaml(os.fspath(path)))
        return p

    def register(self, step_id: str, kind: str, fn: Callable[..., Any], **options: Any) -> "Pipeline":
        """Gives the code of a ``function`` step placed in YAML: ``kind`` is ``map_batches``,
        ``map``, ``filter``, ``stateful_map`` or ``infer``; options as for those methods."""
        if not any(s.get("function", {}).get("id") == step_id for s in self._cfg["steps"]):
            raise ConfigError(f"no `function` step with id `{step_id}` in pipeline `{self.name}`", step=step_id)
        self._functions[step_id] = _make_function(kind, fn, **options)
        return self

    @property
    def name(self) -> str:
        return self._cfg["name"]

    def config(self) -> Json:
        """The pipeline in its YAML form, as a dict."""
        return json.loads(json.dumps(self._cfg))

    # -- ends -----------------------------------------------------------------------------

    def source(self, id: str, connector: Union[Json, _CodeSource], *, schema: Any = None, event_time: Optional[Union[str, Json]] = None,
               time_format: str = "ms", max_out_of_orderness: Optional[Duration] = None, idle_timeout: Optional[Duration] = None,
               batch_size: Optional[int] = None, max_linger: Optional[Duration] = None,
               max_future_skew: Optional[Duration] = None, max_age: Optional[Duration] = None) -> "Pipeline":
        """Sets the source. ``connector`` is :func:`file`, :func:`generator`, :func:`kafka`,
        :func:`mqtt`, :func:`stdin`, any connector by :func:`connector`, or a :mod:`weir.testing` source; ``event_time`` names the event-time
        column (its ``time_format``: ``ms``, ``s``, ``us``, ``rfc3339``)."""
        if isinstance(connector, Source):
            if schema is not None:
                raise ConfigError(f"source `{id}`: a weir.Source brings its schema (its `schema` attribute); leave out schema=")
            if getattr(connector, "schema", None) is None:
                raise ConfigError(f"source `{id}`: {type(connector).__name__} has no `schema` (a pyarrow.Schema, or a list of (name, type))")
            connector.schema = _schema_arg(connector.schema)
        if isinstance(connector, _CodeSource):
            self._code_source = connector
            src: Json = {"id": id, "code": {}}
        else:
            src = {"id": id, **connector}
        if schema is not None:
            src["schema"] = schema_spec(schema)
        if event_time is not None:
            et = {"column": event_time, "format": time_format} if isinstance(event_time, str) else dict(event_time)
            if max_future_skew is not None:
                et["max_future_skew"] = _duration(max_future_skew)
            if max_age is not None:
                et["max_age"] = _duration(max_age)
            src["event_time"] = et
        wm = _clean({"max_out_of_orderness": None if max_out_of_orderness is None else _duration(max_out_of_orderness),
                     "idle_timeout": None if idle_timeout is None else _duration(idle_timeout)})
        if wm:
            src["watermark"] = wm
        if batch_size is not None:
            src["batch_size"] = batch_size
        if max_linger is not None:
            src["max_linger"] = _duration(max_linger)
        self._cfg.pop("sources", None)
        self._cfg["source"] = src
        return self

    def add_source(self, id: str, connector: Union[Json, _CodeSource], **settings: Any) -> "Pipeline":
        """Adds a source beside the ones already set (same settings as :meth:`source`); steps
        then say which they read with :meth:`input`, :meth:`union` or :meth:`interval_join`."""
        sources = self._cfg.pop("sources", None)
        earlier = sources if isinstance(sources, list) else [sources] if sources else []
        if "source" in self._cfg:
            earlier.append(self._cfg.pop("source"))
        self.source(id, connector, **settings)
        self._cfg["sources"] = earlier + [self._cfg.pop("source")]
        return self

    def sink(self, id: str, connector: Union[Json, _CodeSink], *, latency_column: Optional[str] = None, retry: Optional[Json] = None,
             input: Optional[str] = None) -> "Pipeline":
        """Sets the sink: :func:`file_sink`, :func:`stdout`, :func:`kafka_sink`, any connector
        by :func:`connector`, or a :mod:`weir.testing` sink. ``input`` names the step it writes
        (default: the last)."""
        if isinstance(connector, _CodeSink):
            self._code_sink = connector
            snk: Json = {"id": id, "code": {}}
        else:
            snk = {"id": id, **connector}
        if latency_column is not None:
            snk["latency_column"] = latency_column
        if retry is not None:
            snk["retry"] = retry
        if input is not None:
            snk["input"] = input
        self._cfg.pop("sinks", None)
        self._cfg["sink"] = snk
        return self

    def add_sink(self, id: str, connector: Json, *, input: str, **settings: Any) -> "Pipeline":
        """Adds a sink of its own that writes step ``input``'s rows, beside the sinks already
        set (each writing the step it names)."""
        current = self._cfg.pop("sinks", None) or self._cfg.pop("sink", None)
        earlier = current if isinstance(current, list) else [current] if current else []
        self.sink(id, connector, input=input, **settings)
        self._cfg["sinks"] = earlier + [self._cfg.pop("sink")]
        return self

    def dead_letters(self, path: str) -> "Pipeline":
        """Sets the dead-letter file."""
        self._cfg.setdefault("dead_letters", {})["path"] = str(path)
        return self

    def quarantine(self, **settings: Any) -> "Pipeline":
        """Quarantine settings (``enabled``, ``keys``, ``max_dead_letters``, ``within``,
        ``cool_down``, ``output``), as in YAML."""
        self._cfg["quarantine"] = {k: (_duration(v) if k in ("within", "cool_down") else v) for k, v in settings.items()}
        return self

    def checkpoints(
        self,
        dir: str,
        interval: Duration = "10s",
        *,
        keep: int = 3,
        options: Optional[Dict[str, str]] = None,
        member: Optional[str] = None,
    ) -> "Pipeline":
        """Takes a checkpoint every ``interval`` into ``dir`` (a directory or URL).

        ``member`` names this process among several that run the pipeline over one Kafka
        consumer group and share ``dir``: keyed state then follows partitions between them
        (``docs/deployment.md``)."""
        self._cfg["checkpoints"] = _clean(
            {"dir": str(dir), "interval": _duration(interval), "keep": keep, "options": options, "member": member}
        )
        return self

    def workers(self, n: int) -> "Pipeline":
        """Sets the default worker count."""
        self._cfg["workers"] = n
        return self

    # -- configured steps -----------------------------------------------------------------

    def _step(self, kind: str, settings: Json) -> "Pipeline":
        self._cfg["steps"].append({kind: settings})
        return self

    def input(self, id: str) -> "Pipeline":
        """Makes the step added last read ``id`` (a source or an earlier step) instead of the
        step before it: ``p.filter("hot", "temp > 30").input("plant-a")``."""
        if not self._cfg["steps"]:
            raise ConfigError(f"input({id!r}) before any step")
        ((kind, settings),) = self._cfg["steps"][-1].items()
        if kind in ("union", "interval_join", "window_join", "temporal_join"):
            raise ConfigError(f"input({id!r}) after a {kind}: it names its inputs itself", step=settings.get("id"))
        settings["input"] = id
        return self

    def union(self, id: str, inputs: Sequence[str]) -> "Pipeline":
        """Every row of several streams (sources or steps) with the same columns, as one."""
        return self._step("union", {"id": id, "inputs": list(inputs)})

    def interval_join(self, id: str, left: str, right: str, *, on: Union[str, Sequence[str]],
                      between: Tuple[Duration, Duration], kind: str = "inner",
                      right_on: Optional[Sequence[str]] = None, names: Optional[Tuple[str, str]] = None) -> "Pipeline":
        """Pairs each row of ``left`` with each row of ``right`` that has the same key and
        ``left.time + between[0] <= right.time <= left.time + between[1]`` (event time; a
        ``between`` end is a duration, negative for before: ``("-50ms", "50ms")`` or
        ``(-0.05, 0.05)`` seconds). The output has one struct column per side (named by
        ``names``, default the inputs' ids) holding its whole row. ``kind``: ``inner``,
        ``left``, ``right`` or ``full``."""
        def signed(d: Duration) -> str:
            if isinstance(d, str):
                return d
            return f"-{_duration(-d)}" if d < 0 else _duration(d)
        settings = _join(id, left, right, on, kind, right_on, names)
        settings["between"] = [signed(between[0]), signed(between[1])]
        return self._step("interval_join", settings)

    def window_join(self, id: str, left: str, right: str, *, on: Union[str, Sequence[str]],
                    tumbling: Optional[Duration] = None, hopping: Optional[Mapping[str, Duration]] = None,
                    session: Optional[Mapping[str, Duration]] = None, kind: str = "inner",
                    right_on: Optional[Sequence[str]] = None, names: Optional[Tuple[str, str]] = None) -> "Pipeline":
        """Pairs the rows of ``left`` and ``right`` that have the same key and fall in the
        same window (``tumbling="10s"``, ``hopping={"size": "1m", "slide": "10s"}`` or
        ``session={"gap": "30s"}``, a session made by the rows of both), when the window
        closes. The output has the two sides' struct columns, ``window_start`` and
        ``window_end``. ``kind``: ``inner``, ``left``, ``right`` or ``full`` (a window's rows
        of one side with no partner there, with the other side null)."""
        settings = _join(id, left, right, on, kind, right_on, names)
        if tumbling is not None:
            settings["tumbling"] = _duration(tumbling)
        if hopping is not None:
            settings["hopping"] = {k: _duration(v) for k, v in hopping.items()}
        if session is not None:
            settings["session"] = {k: _duration(v) for k, v in session.items()}
        return self._step("window_join", settings)

    def temporal_join(self, id: str, left: str, right: str, *, on: Union[str, Sequence[str]], kind: str = "inner",
                      state_ttl: Optional[Duration] = None, right_on: Optional[Sequence[str]] = None,
                      names: Optional[Tuple[str, str]] = None) -> "Pipeline":
        """Joins each row of ``left`` with the row of ``right`` (a changelog: each row a new
        version of its key) that was its key's newest at the left row's event time, e.g. the
        device's configuration when the reading was taken. ``kind``: ``inner`` (rows whose
        key had no version yet are dropped) or ``left`` (kept, with the right side null).
        ``state_ttl="1d"`` forgets keys with no new version for that long (event time)."""
        settings = _join(id, left, right, on, kind, right_on, names)
        if state_ttl is not None:
            settings["state_ttl"] = _duration(state_ttl)
        return self._step("temporal_join", settings)

    def table(self, id: str, key: Union[str, Sequence[str]], *, aggregates: Optional[Mapping[str, str]] = None,
              latest: bool = False, state_ttl: Optional[Duration] = None) -> "Pipeline":
        """Keeps the current value of every key: running ``aggregates`` over all its rows so
        far (``{"n": "count()", "total": "sum(amount)"}``), or its ``latest`` row. Emits one
        change per key a batch changed, with an ``_op`` column (``insert``, ``update``,
        ``delete``) that upsert sinks apply; ``state_ttl="1h"`` deletes keys not updated for
        that long (event time). While the job runs, ``GET /tables/<id>/<key>`` on the API port
        reads a key's value, and :meth:`table_value` / :meth:`table_rows` read it from Python
        (during a run, from another thread, and after it)."""
        t: Json = {"id": id, "key": [key] if isinstance(key, str) else list(key)}
        if aggregates is not None:
            t["aggregates"] = dict(aggregates)
        if latest:
            t["latest"] = True
        if state_ttl is not None:
            t["state_ttl"] = _duration(state_ttl)
        return self._step("table", t)

    def filter(self, id: str, predicate: Union[str, Callable[[Dict[str, Any]], bool]], *, retry: Optional[Retry] = None) -> "Pipeline":
        """Keeps rows matching a SQL predicate (a string), or for which a Python function of
        the row (a dict) returns true."""
        if isinstance(predicate, str):
            return self._step("filter", {"id": id, "where": predicate})
        return self._function(id, _make_function("filter", predicate, retry=retry))

    def select(self, id: str, columns: Sequence[str]) -> "Pipeline":
        """Chooses, renames and computes columns (``"a.b * 2 AS c"``)."""
        return self._step("select", {"id": id, "columns": list(columns)})

    def lookup(self, id: str, key: Union[str, Sequence[str]], table: Json, *, join: str = "inner",
               missing: Union[str, Json] = "drop") -> "Pipeline":
        """Enriches each row with the columns of the row of ``table`` (:func:`file_table`,
        :func:`postgres_table`, :func:`redis_table`) that has its ``key``. ``join="left"`` keeps rows whose key the
        table lacks (nulls); an inner join leaves them out and ``missing`` says where they go:
        ``"drop"`` (counted), ``"dead_letter"`` or ``{"side_output": path}``."""
        keys = [key] if isinstance(key, str) else list(key)
        return self._step("lookup", {"id": id, "key": keys, "table": table, "join": join, "missing": missing})

    def key_by(self, id: str, keys: Union[str, Sequence[str]]) -> "Pipeline":
        """Partitions by key columns for the keyed steps that follow."""
        return self._step("key_by", {"id": id, "keys": [keys] if isinstance(keys, str) else list(keys)})

    def window(self, id: str, *, aggregates: Mapping[str, str], tumbling: Optional[Duration] = None,
               hopping: Optional[Mapping[str, Duration]] = None, session: Optional[Mapping[str, Duration]] = None,
               time: Optional[str] = None, late: Optional[Union[str, Json]] = None,
               state_ttl: Optional[Duration] = None) -> "Pipeline":
        """Aggregates in windows: ``tumbling="10s"``, ``hopping={"size": "1m", "slide": "10s"}``
        or ``session={"gap": "30s"}``; ``aggregates={"avg_temp": "mean(readings.temp)"}``.
        ``state_ttl="1h"`` forgets keys not seen for that long (event time)."""
        w: Json = {"id": id, "aggregates": dict(aggregates)}
        if state_ttl is not None:
            w["state_ttl"] = _duration(state_ttl)
        if tumbling is not None:
            w["tumbling"] = _duration(tumbling)
        if hopping is not None:
            w["hopping"] = {k: _duration(v) for k, v in hopping.items()}
        if session is not None:
            w["session"] = {k: _duration(v) for k, v in session.items()}
        if time is not None:
            w["time"] = time
        if late is not None:
            w["late"] = late
        return self._step("window", w)

    def ewma_zscore(self, id: str, value: str, *, alpha: Optional[float] = None, threshold: Optional[float] = None,
                    warmup: Optional[int] = None, state_ttl: Optional[Duration] = None) -> "Pipeline":
        """Keyed EWMA z-score anomaly detector on a numeric column; ``state_ttl="1h"`` forgets
        keys not seen for that long (event time)."""
        ttl = None if state_ttl is None else _duration(state_ttl)
        return self._step("ewma_zscore", _clean({"id": id, "value": value, "alpha": alpha, "threshold": threshold,
                                                  "warmup": warmup, "state_ttl": ttl}))

    def detect(self, id: str, rules: Sequence[Json], *, emit: str = "anomalies",
               state_ttl: Optional[Duration] = None) -> "Pipeline":
        """Keyed detection rules (after :meth:`key_by`), in the YAML form, e.g.
        ``{"name": "hot", "severity": "critical", "threshold": {"value": "readings.temp", "above": 35}}``;
        kinds: ``threshold``, ``ewma``, ``mad``, ``rate_of_change``, ``silence``, and ``model``
        (an ONNX file scored in Rust: ``{"path": "m.onnx", "inputs": [...], "threshold": 0.9}``)."""
        out = []
        for r in rules:
            r = dict(r)
            if "silence" in r and "timeout" in r["silence"]:
                r["silence"] = {**r["silence"], "timeout": _duration(r["silence"]["timeout"])}
            out.append(r)
        d: Json = {"id": id, "emit": emit, "rules": out}
        if state_ttl is not None:
            d["state_ttl"] = _duration(state_ttl)
        return self._step("detect", d)

    def alert(self, id: str, *, resolve_after: Duration = "60s", resolve_after_count: Optional[int] = None,
              cool_down: Duration = "5m", escalate_after: Optional[Duration] = None, escalate_to: str = "critical",
              retain: Duration = "1h", events: Optional[Sequence[str]] = None,
              routes: Optional[Sequence[Json]] = None, drain_timeout: Duration = "30s") -> "Pipeline":
        """The alert lifecycle over :meth:`detect`'s detections: one alert per rule and key,
        repeats update it, flaps within ``cool_down`` re-open it, unacknowledged alerts escalate
        after ``escalate_after``, and alerts resolve after ``resolve_after`` without an anomaly.

        ``routes`` send events elsewhere as they happen, in the YAML form, e.g.
        ``{"name": "pager", "match": {"severity": ["critical"]}, "webhook": {"url": "https://..."}}``;
        targets: ``webhook`` (``slack: True`` for chat), ``redis``, ``kafka``, ``file``, ``stdout``."""
        a: Json = {"id": id, "resolve_after": _duration(resolve_after), "cool_down": _duration(cool_down),
                   "escalate_to": escalate_to, "retain": _duration(retain)}
        if resolve_after_count is not None:
            a["resolve_after_count"] = resolve_after_count
        if escalate_after is not None:
            a["escalate_after"] = _duration(escalate_after)
        if events is not None:
            a["events"] = list(events)
        if routes:
            out = []
            for r in routes:
                r = dict(r)
                if "webhook" in r and "timeout" in r["webhook"]:
                    r["webhook"] = {**r["webhook"], "timeout": _duration(r["webhook"]["timeout"])}
                if "retry" in r:
                    r["retry"] = {k: (_duration(v) if k.endswith("backoff") else v) for k, v in r["retry"].items()}
                out.append(r)
            a["routes"] = out
            a["drain_timeout"] = _duration(drain_timeout)
        return self._step("alert", a)

    def api(self, addr: str = "127.0.0.1:9464", *, token: Optional[str] = None) -> "Pipeline":
        """Serves metrics, health and the alert API on ``addr`` while the pipeline runs (a bare
        port means loopback). Acknowledging and resolving alerts need ``token`` (or the
        ``WEIR_API_TOKEN`` environment variable) as a bearer token."""
        cfg: Json = {"addr": addr}
        if token is not None:
            cfg["token"] = token
        self._cfg["api"] = cfg
        return self

    def traces(
        self,
        endpoint: str,
        *,
        sample_ratio: float = 0.01,
        service_name: str = "weir",
        headers: Optional[Dict[str, str]] = None,
        timeout: Duration = "10s",
        export_delay: Duration = "2s",
    ) -> "Pipeline":
        """Exports OpenTelemetry traces over OTLP/HTTP to ``endpoint`` (``http://host:4318``):
        a span per traced batch at its source, per step and per sink write (and retry), and one
        per checkpoint. ``sample_ratio`` of the batches are traced (checkpoints always)."""
        cfg: Json = {
            "endpoint": endpoint,
            "sample_ratio": sample_ratio,
            "service_name": service_name,
            "timeout": _duration(timeout),
            "export_delay": _duration(export_delay),
        }
        if headers:
            cfg["headers"] = dict(headers)
        self._cfg["traces"] = cfg
        return self

    # -- Python steps ---------------------------------------------------------------------

    def _function(self, id: str, f: _Function) -> "Pipeline":
        if id in self._functions:
            raise ConfigError(f"step id `{id}` is used twice; ids must be unique", step=id)
        self._functions[id] = f
        return self._step("function", {"id": id})

    def map_batches(self, id: str, fn: Callable[["pa.RecordBatch"], Any], *, schema: Any = None,
                    on_error: str = "dead_letter", retry: Optional[Retry] = None) -> "Pipeline":
        """Applies ``fn`` to each whole batch: it gets a ``pyarrow.RecordBatch`` (zero-copy) and
        returns a RecordBatch, a Table or a dict of arrays with the same number of rows.

        ``schema`` is the output schema; when omitted, Weir learns it by calling ``fn`` once on
        an empty batch. ``on_error``: ``"dead_letter"`` (the batch's rows, with the
        traceback) or ``"fail"`` (stop the job). A :class:`Retryable` is retried first."""
        return self._function(id, _make_function("map_batches", fn, schema=schema, on_error=on_error, retry=retry))

    def map(self, id: str, fn: Callable[[Dict[str, Any]], Optional[Dict[str, Any]]], *, schema: Any = None,
            retry: Optional[Retry] = None) -> "Pipeline":
        """Applies ``fn`` to each row as a dict; it returns a dict (``None`` drops the row). The
        output has the input's schema unless ``schema`` says otherwise. An exception
        dead-letters that row with its traceback."""
        return self._function(id, _make_function("map", fn, schema=schema, retry=retry))

    def stateful_map(self, id: str, fn: Callable[[Any, Dict[str, Any]], Any], *, schema: Any = None,
                     retry: Optional[Retry] = None, state_ttl: Optional[Duration] = None) -> "Pipeline":
        """Per-key state after a :meth:`key_by`: ``fn(state, row) -> (state, out_row)``. The
        state starts as ``None``; returning ``None`` as state forgets the key; an ``out_row`` of
        ``None`` emits nothing. States must be picklable: they go into checkpoints.
        ``state_ttl="1h"`` forgets keys not seen for that long (event time)."""
        f = _make_function("stateful_map", fn, schema=schema, retry=retry)
        if state_ttl is not None:
            f.state_ttl_ms = _duration_ms(state_ttl)
        return self._function(id, f)

    def infer(self, id: str, fn: Callable[[Any], Any], *, features: Optional[Sequence[str]] = None, output: str = "score",
              max_batch: int = 1024, max_latency_ms: float = 10.0, on_error: str = "dead_letter",
              retry: Optional[Retry] = None) -> "Pipeline":
        """Scores rows with a model in batches whose size follows the arrival rate: a quiet
        stream is scored at once, a burst in batches of up to ``max_batch`` rows, and no row
        waits more than ``max_latency_ms``. ``fn`` gets a float64 matrix of the ``features``
        columns (or the RecordBatch when ``features`` is omitted) and returns one score per row,
        added as the float64 column ``output``."""
        return self._function(id, _make_function("infer", fn, features=features, output=output, max_batch=max_batch,
                                                 max_latency_ms=max_latency_ms, on_error=on_error, retry=retry))

    # -- running --------------------------------------------------------------------------

    def _native(self):
        from . import _weir

        return _weir.NativePipeline(json.dumps(self._cfg), self._functions, self._code_source, self._code_sink)

    def validate(self) -> None:
        """Checks structure, settings and (with a declared schema) columns and expressions,
        without reading input. Raises :class:`weir.errors.ConfigError`."""
        self._native().validate()

    def output_schema(self, *, workers: Optional[int] = None) -> "pa.Schema":
        """The schema of the rows reaching the sink (plans the pipeline, which may read the input
        to infer its schema)."""
        return self._native().output_schema(workers)

    def run(self, *, workers: Optional[int] = None, fresh: bool = False, metrics_addr: Optional[str] = None,
            progress: Union[bool, float, None] = None) -> RunSummary:
        """Runs to the end of the input (or until Ctrl-C, which stops it cleanly: the current
        batches are finished and, with checkpoints, a final checkpoint is taken; then
        ``KeyboardInterrupt`` is raised). ``metrics_addr`` (``"127.0.0.1:9100"``) serves
        Prometheus metrics while it runs.

        ``progress`` prints the command's progress line (events/s, records in, rows out,
        watermark, lag) on stderr: every second, rewritten in place, when stderr is a
        terminal (the default, ``None``, does only that); ``True`` also off a terminal, a line
        every 10 s; a number, every that many seconds; ``False``, never."""
        native = self._native()
        self._last_native = native
        raw = native.run(workers, fresh, metrics_addr, _progress_every(progress))
        return _summary(raw, self._code_sink)

    def table_value(self, id: str, *key: Any) -> Optional[Dict[str, Any]]:
        """The current row of table ``id`` for ``key`` (one value per key column), as a dict,
        or ``None`` when the table has no such key. Works while the pipeline runs (from
        another thread, or on a :class:`RunningPipeline`) and after it ended."""
        rows = self._native_for_tables().table_rows(id, [str(k) for k in key]).to_pylist()
        return rows[0] if rows else None

    def table_rows(self, id: str, *, prefix: str = "", limit: int = 1000) -> List[Dict[str, Any]]:
        """Up to ``limit`` rows of table ``id`` whose (first) key starts with ``prefix``."""
        rows: List[Dict[str, Any]] = self._native_for_tables().table_rows(id, None, prefix, limit).to_pylist()
        return rows

    def _native_for_tables(self) -> Any:
        if self._last_native is None:
            raise ConfigError("the pipeline has not run: its tables are read while it runs and after")
        return self._last_native

    def run_in_thread(self, **kwargs: Any) -> "RunningPipeline":
        """Starts :meth:`run` in a thread; :meth:`RunningPipeline.stop` stops it cleanly."""
        return RunningPipeline(self, kwargs)


class RunningPipeline:
    """A pipeline running in a background thread."""

    def __init__(self, p: Pipeline, kwargs: Dict[str, Any]):
        self._native = p._native()
        p._last_native = self._native
        self._sink = p._code_sink
        self._result: Any = None
        self._error: Optional[BaseException] = None

        def body() -> None:
            try:
                self._result = self._native.run(kwargs.get("workers"), kwargs.get("fresh", False), kwargs.get("metrics_addr"),
                                                _progress_every(kwargs.get("progress", False)))
            except BaseException as e:  # noqa: BLE001 - handed to join()
                self._error = e

        import threading

        self._thread = threading.Thread(target=body, name=f"weir-{p.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Asks the pipeline to stop reading and finish; returns at once."""
        self._native.stop()

    def progress(self) -> Optional[Dict[str, Any]]:
        """The run's live counters, ``None`` before it starts and after it ends:
        ``source_records``, ``sink_rows``, ``watermark_ms`` (``None`` until there is one) and
        ``steps`` (per step, the counters of :attr:`RunSummary.steps`)."""
        p: Optional[Dict[str, Any]] = self._native.progress()
        return p

    def join(self, timeout: Optional[float] = None) -> RunSummary:
        """Waits for the run to end and returns its summary (or raises its error)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the pipeline is still running")
        if self._error is not None:
            raise self._error
        return _summary(self._result, self._sink)


def _progress_every(progress: Union[bool, float, None]) -> Optional[float]:
    """Seconds between progress lines, or ``None`` for none (see :meth:`Pipeline.run`)."""
    import sys

    if progress is None:
        return 1.0 if sys.stderr is not None and sys.stderr.isatty() else None
    if progress is True:
        return 1.0 if sys.stderr is not None and sys.stderr.isatty() else 10.0
    if progress is False:
        return None
    if isinstance(progress, (int, float)) and progress > 0:
        return float(progress)
    raise ConfigError(f"progress must be True, False, None or a number of seconds above 0, not {progress!r}")


def _summary(raw: Dict[str, Any], sink: Any) -> RunSummary:
    out = None
    if sink is not None and hasattr(sink, "_table"):
        out = sink._table()
    return RunSummary(elapsed_s=raw["elapsed_s"], source_records=raw["source_records"], sink_rows=raw["sink_rows"],
                      steps=raw["steps"], latency_us=raw.get("latency_us"), output=out,
                      latency_to_sink_entry_us=raw.get("latency_to_sink_entry_us"))


_KINDS = ("map_batches", "map", "filter", "stateful_map", "infer")


def _make_function(kind: str, fn: Callable[..., Any], *, schema: Any = None, on_error: str = "dead_letter",
                   retry: Optional[Retry] = None, features: Optional[Sequence[str]] = None, output: str = "score",
                   max_batch: int = 1024, max_latency_ms: float = 10.0) -> _Function:
    if kind not in _KINDS:
        raise ConfigError(f"unknown function kind `{kind}`; expected one of {', '.join(_KINDS)}")
    if not callable(fn):
        raise ConfigError(f"{kind}: expected a callable, got {type(fn).__name__}")
    if on_error not in ("dead_letter", "fail"):
        raise ConfigError(f"{kind}: on_error must be `dead_letter` or `fail`, not `{on_error}`")
    if max_batch < 1:
        raise ConfigError(f"{kind}: max_batch must be at least 1")
    if max_latency_ms < 0:
        raise ConfigError(f"{kind}: max_latency_ms must not be negative")
    return _Function(kind=kind, fn=fn, schema=_schema_arg(schema), retry=(retry or Retry())._settings(), on_error=on_error,
                     features=None if features is None else list(features), output=output, max_batch=max_batch,
                     max_latency_ms=float(max_latency_ms))


class _CodeSource:
    """Marker base of sources implemented by the native module (see :mod:`weir.testing`)."""


class _CodeSink:
    """Marker base of sinks implemented by the native module (see :mod:`weir.testing`)."""


class Sink(_CodeSink):
    """Base of sinks written in Python: subclass it and define :meth:`write`.

    ``open(worker, workers)`` runs once for each worker before its first batch (every worker
    shares this one object), ``write(batch)`` gets each batch as a ``pyarrow.RecordBatch``, and
    ``close()`` runs at the end. Raise :class:`weir.Retryable` from ``write`` for a failure
    that may pass (a server that is down): the batch is written again with the sink's ``retry``
    backoff while the pipeline waits. Any other exception sends the batch's rows to the
    dead-letter output with the traceback, and the job goes on."""

    _weir_user_sink = True

    def open(self, worker: int, workers: int) -> None:
        """Called once per worker before its first batch."""

    def write(self, batch: "pa.RecordBatch") -> None:
        """Writes one batch."""
        raise NotImplementedError("a weir.Sink subclass must define write(batch)")

    def close(self) -> None:
        """Called once per worker at the end."""


class SourcePartition:
    """The reader of one partition of a :class:`Source`, made by :meth:`Source.open`.

    Weir calls :meth:`read` in a loop on the worker that reads the partition, and
    :meth:`position` after each read that gave rows: what it returns is kept in the next
    checkpoint, and a run resuming from that checkpoint opens the partition again with it."""

    def read(self) -> "Union[pa.RecordBatch, List[Dict[str, Any]], None]":
        """The next rows: a ``pyarrow.RecordBatch`` or a list of dicts in the source's schema;
        an empty list when nothing is ready now (Weir asks again after the source's
        ``poll_interval``); ``None`` when the partition is finished. Raise
        :class:`weir.Retryable` for a failure that may pass (a server that is down): the read
        is tried again with backoff."""
        raise NotImplementedError("a weir.SourcePartition subclass must define read()")

    def position(self) -> Any:
        """Where the partition stands after the rows read so far, as a JSON value (a number, a
        string, a dict...): given back to :meth:`Source.open` to resume right after them."""
        raise NotImplementedError("a weir.SourcePartition subclass must define position()")

    def close(self) -> None:
        """Called once when :meth:`read` has returned ``None``."""


class Source(_CodeSource):
    """Base of sources written in Python: subclass it, set :attr:`schema`, and define
    :meth:`open` (and :meth:`partitions` for more than one partition).

    Partition ``i`` of :meth:`partitions` is read by worker ``i % workers``; each worker
    opens its partitions with ``open(name, position)``, where ``position`` is ``None`` on a
    fresh start and otherwise the :meth:`SourcePartition.position` kept by the checkpoint the
    run resumes from, so with checkpoints a source that can seek (an API with a cursor, a
    device log with sequence numbers) loses and repeats nothing across a crash. A dict that
    does not fit the schema, or whose event time is missing, goes to the dead-letter output
    with the reason; any exception but :class:`weir.Retryable` from ``open``/``read`` fails
    the run with its traceback.

    >>> import pyarrow as pa, weir, weir.testing
    >>> class Counter(weir.Source):
    ...     schema = pa.schema([("n", pa.int64())])
    ...     def open(self, partition, position):
    ...         return CounterReader(position or 0)
    >>> class CounterReader(weir.SourcePartition):
    ...     def __init__(self, start): self.n = start
    ...     def read(self):
    ...         if self.n >= 3: return None
    ...         self.n += 1
    ...         return [{"n": self.n - 1}]
    ...     def position(self): return self.n
    >>> out = weir.testing.CollectSink()
    >>> weir.Pipeline("count").source("c", Counter()).sink("out", out).run(workers=1).sink_rows
    3
    """

    _weir_user_source = True
    #: The rows' schema: a ``pyarrow.Schema`` (or a list of ``(name, type)`` pairs).
    schema: Any = None
    #: Seconds to wait before asking a partition again after it had nothing.
    poll_interval: float = 0.1

    def partitions(self) -> "Sequence[str]":
        """The names of the partitions, the same in every process and run (positions are kept
        by name; a new name starts from ``None``)."""
        return ["0"]

    def open(self, partition: str, position: Any) -> SourcePartition:
        """Opens ``partition`` at ``position`` (``None``: from its start)."""
        raise NotImplementedError("a weir.Source subclass must define open(partition, position)")


def load_yaml(path: Union[str, os.PathLike]) -> Pipeline:
    """Loads a YAML pipeline file; same as :meth:`Pipeline.from_yaml`."""
    return Pipeline.from_yaml(path)


def run_yaml(path: Union[str, os.PathLike], *, workers: Optional[int] = None, fresh: bool = False) -> RunSummary:
    """Runs a YAML pipeline file, as ``weir run`` does."""
    return Pipeline.from_yaml(path).run(workers=workers, fresh=fresh)
