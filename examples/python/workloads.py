"""W1-W3 of the shared benchmark workloads, built in Python; the same pipelines as
``examples/w1-sensor-window.yaml``, ``w2-filter-project.yaml`` and ``w3-ewma-anomaly.yaml``.

    python3 examples/python/workloads.py w1 events.jsonl w1.jsonl [--workers 2]

Make input with ``weir gen --count 2000000 --devices 10000 --output events.jsonl``.
"""

import argparse
import sys

import weir

# The schema in its YAML form (a pyarrow.Schema works too; this way pyarrow is not imported).
SCHEMA = [
    {"name": "device_id", "type": "string"},
    {"name": "ts", "type": "int64"},
    {"name": "readings", "type": "struct", "fields": [{"name": "temp", "type": "float64"}, {"name": "vibration", "type": "float64"}]},
]


def source(p: weir.Pipeline, path: str, schema=SCHEMA) -> weir.Pipeline:
    return p.source("events", weir.file(path), schema=schema, event_time="ts", max_out_of_orderness="2s")


def w1(path: str, out: str) -> weir.Pipeline:
    """Keyed event-time tumbling window: per device and 10 s, count, mean temp, max vibration."""
    p = source(weir.Pipeline("w1-sensor-window"), path)
    p.key_by("by-device", ["device_id"])
    p.window(
        "per-device-10s",
        tumbling="10s",
        aggregates={"count": "count()", "avg_temp": "mean(readings.temp)", "max_vibration": "max(readings.vibration)"},
    )
    p.select("columns", ["device_id", "window_start", "count", "avg_temp", "max_vibration"])
    return p.sink("out", weir.file_sink(out)).dead_letters(out + ".dead-letters.jsonl")


def w2(path: str, out: str) -> weir.Pipeline:
    """Stateless filter and projection."""
    schema = SCHEMA[:2] + [{"name": "readings", "type": "struct", "fields": [{"name": "temp", "type": "float64"}]}]
    p = source(weir.Pipeline("w2-filter-project"), path, schema)
    p.filter("hot", "readings.temp > 25.0")
    p.select("columns", ["device_id", "ts", "readings.temp AS temp"])
    return p.sink("out", weir.file_sink(out)).dead_letters(out + ".dead-letters.jsonl")


def w3(path: str, out: str) -> weir.Pipeline:
    """Per-device EWMA z-score anomalies."""
    p = source(weir.Pipeline("w3-ewma-anomaly"), path)
    p.key_by("by-device", ["device_id"])
    p.ewma_zscore("anomalies", "readings.temp", alpha=0.1, threshold=4.0, warmup=20)
    p.select("columns", ["device_id", "ts", "readings.temp AS temp", "mean", "z"])
    return p.sink("out", weir.file_sink(out)).dead_letters(out + ".dead-letters.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["w1", "w2", "w3"])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    summary = {"w1": w1, "w2": w2, "w3": w3}[a.workload](a.input, a.output).run(workers=a.workers)
    print(f"{summary.source_records} events -> {summary.sink_rows} rows in {summary.elapsed_s:.2f} s "
          f"({summary.source_records / max(summary.elapsed_s, 1e-9):,.0f} events/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
