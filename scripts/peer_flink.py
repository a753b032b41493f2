#!/usr/bin/env python3
"""Runs benchmark workload W4 or W5 (shared/bench/WORKLOADS.md) in Apache Flink SQL through
PyFlink (`pip install apache-flink==2.3.0`; needs Java 11+), so that Weir can be compared with
Flink on the same machine and the same input files.

Usage: peer_flink.py w4 --events FILE --devices CSV --output DIR [--parallelism 1] [--mode M]
       peer_flink.py w5 --events FILE_A --events-b FILE_B --output DIR [--parallelism 1] [--mode M]

Writes DIR/result.jsonl (the rows, with the keys scripts/reference.py writes) and prints one
line of JSON to stdout:
  {"workload", "mode", "parallelism", "wall_s", "job_s", "rows", "peak_rss_mb"}
wall_s is the time from this script's start (before PyFlink is imported, so it includes the
JVM's start) to result.jsonl being complete; job_s is the job's net runtime as Flink reports it
(JobExecutionResult.getNetRuntime: no JVM start, no planning).

Each input file is a filesystem source table in JSON format with event time `ts` (epoch ms) and
the watermark `rt - INTERVAL '2' SECOND`, i.e. max ts seen - 2000 ms, as WORKLOADS.md says.
Flink drops a row that is behind the watermark without a word (a window counts it only in the
`numLateRecordsDropped` metric, the interval join not at all); gen_sensors.py's disorder is at
most 1,999 ms, so with this watermark no row is late, and compare.py against reference.py shows
that none was dropped.

--mode streaming (the default) runs the queries as a streaming job, the way Weir runs them:
watermarks close windows and expire join state.
  W4: the device table is joined with an event-time temporal join (FOR SYSTEM_TIME AS OF the
      event's time; every device row is valid from epoch 0), because a regular streaming join
      loses the time attribute and a TUMBLE window cannot follow it; Flink's filesystem
      connector offers no lookup join.
  W5: a rowtime interval join (Flink's IntervalJoin operator, bounds -50 ms and +50 ms, both
      inclusive), whose state is dropped as the watermarks of both inputs pass.
--mode batch runs the same queries as a batch job (W4 with a regular join): no watermarks,
nothing can be late, and Flink's batch operators (sort/hash based) are used instead.

Lines that reference.py skips (not JSON, no ts or readings.temp, ts more than an hour ahead of
now) are skipped here too: the JSON format ignores parse errors, such a row gets event time 0
(so it cannot move the watermark) and is filtered out before any time-based operator.
"""
import time

T0 = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


def sensor_table(name, path, max_ts):
    # Only the fields the workloads read are declared; the JSON format ignores the others.
    return f"""
CREATE TABLE {name}_raw (
  device_id STRING,
  ts BIGINT,
  readings ROW<temp DOUBLE>,
  rt AS TO_TIMESTAMP_LTZ(IF(ts IS NULL OR ts > {max_ts}, 0, ts), 3),
  WATERMARK FOR rt AS rt - INTERVAL '2' SECOND
) WITH (
  'connector' = 'filesystem',
  'path' = {sql_str(os.path.abspath(path))},
  'format' = 'json',
  'json.ignore-parse-errors' = 'true'
)"""


def sensor_view(name, max_ts):
    return f"""
CREATE TEMPORARY VIEW {name} AS
SELECT device_id, ts, readings.temp AS temp, rt FROM {name}_raw
WHERE device_id IS NOT NULL AND ts IS NOT NULL AND ts <= {max_ts} AND readings.temp IS NOT NULL"""


def devices_table(path, streaming):
    # The CSV format cannot skip a header line: with ignore-parse-errors the header becomes a
    # row with device_id 'device_id' and temp_limit NULL, which no event matches.
    # For the event-time temporal join (streaming) the table must be versioned: a primary key
    # and an event-time attribute; every row is valid from epoch 0.
    versioned = """,
  vt AS TO_TIMESTAMP_LTZ(0, 3),
  WATERMARK FOR vt AS vt,
  PRIMARY KEY (device_id) NOT ENFORCED""" if streaming else ""
    return f"""
CREATE TABLE devices (
  device_id STRING,
  site STRING,
  model STRING,
  temp_limit DOUBLE{versioned}
) WITH (
  'connector' = 'filesystem',
  'path' = {sql_str(os.path.abspath(path))},
  'format' = 'csv',
  'csv.ignore-parse-errors' = 'true'
)"""


def sink_table(columns, path):
    return f"""
CREATE TABLE sink ({columns}) WITH (
  'connector' = 'filesystem',
  'path' = {sql_str(path)},
  'format' = 'json'
)"""


def w4_statements(args, streaming, max_ts):
    if streaming:
        join = "JOIN devices FOR SYSTEM_TIME AS OF e.rt AS d ON e.device_id = d.device_id"
    else:
        join = "JOIN devices d ON e.device_id = d.device_id"
    # window_start is a TIMESTAMP(3) in the session time zone (UTC here); windows are 10 s
    # aligned, so whole seconds since the epoch x 1000 is its exact epoch-millisecond value.
    return [
        sensor_table("events", args.events, max_ts),
        sensor_view("events", max_ts),
        devices_table(args.devices, streaming),
        f"""
CREATE TEMPORARY VIEW over_limit AS
SELECT d.site, e.temp, e.rt FROM events e {join}
WHERE e.temp > d.temp_limit""",
    ], """
INSERT INTO sink
SELECT site,
       CAST(TIMESTAMPDIFF(SECOND, TIMESTAMP '1970-01-01 00:00:00', window_start) AS BIGINT) * 1000,
       COUNT(*),
       MAX(temp)
FROM TABLE(TUMBLE(TABLE over_limit, DESCRIPTOR(rt), INTERVAL '10' SECOND))
GROUP BY site, window_start, window_end""", "site STRING, window_start BIGINT, `count` BIGINT, max_temp DOUBLE"


def w5_statements(args, streaming, max_ts):
    return [
        sensor_table("a", args.events, max_ts),
        sensor_view("a", max_ts),
        sensor_table("b", args.events_b, max_ts),
        sensor_view("b", max_ts),
    ], """
INSERT INTO sink
SELECT a.device_id, a.ts, b.ts, a.temp, b.temp
FROM a JOIN b ON a.device_id = b.device_id
 AND b.rt BETWEEN a.rt - INTERVAL '0.05' SECOND AND a.rt + INTERVAL '0.05' SECOND""", \
        "device_id STRING, a_ts BIGINT, b_ts BIGINT, a_temp DOUBLE, b_temp DOUBLE"


def collect(parts_dir, result):
    """Concatenates Flink's finished part files into one JSON Lines file; returns its rows.
    Flink's JSON rows already have the sink's column names as keys, BIGINT as JSON integers
    and DOUBLE as Java's shortest round-tripping decimal, so bytes are copied as they are."""
    files = []
    for root, dirs, names in os.walk(parts_dir):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        # '.'/'_' files are in-progress or staging files; any left would mean an unfinished job.
        files += [os.path.join(root, n) for n in names if not n.startswith((".", "_"))]
    leftovers = [n for _, _, ns in os.walk(parts_dir) for n in ns if n.startswith((".", "_"))]
    if leftovers:
        sys.exit(f"unfinished part files left by Flink: {leftovers[:3]}")
    rows = 0
    with open(result, "wb") as out:
        for path in sorted(files):
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):
                data += b"\n"
            rows += data.count(b"\n")
            out.write(data)
    return rows


def peak_rss_mb():
    """Peak resident memory of this process plus its descendants (the JVM that PyFlink starts
    and that runs the job), from VmHWM in /proc: /usr/bin/time cannot see the JVM, which is
    not waited for. Both live at once, so the sum is the footprint's upper bound."""
    children = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total // 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=["w4", "w5"])
    ap.add_argument("--events", required=True, help="sensor events (W5: stream A)")
    ap.add_argument("--events-b", help="W5: stream B")
    ap.add_argument("--devices", help="W4: device table (gen_devices.py CSV)")
    ap.add_argument("--output", required=True, help="directory for result.jsonl")
    ap.add_argument("--parallelism", type=int, default=1)
    ap.add_argument("--mode", choices=["streaming", "batch"], default="streaming")
    ap.add_argument("--explain", action="store_true", help="print Flink's plan to stderr")
    args = ap.parse_args()
    if args.workload == "w4" and not args.devices:
        ap.error("w4 needs --devices")
    if args.workload == "w5" and not args.events_b:
        ap.error("w5 needs --events-b")
    streaming = args.mode == "streaming"
    # The same clock sanity rule as reference.py: ts more than an hour ahead of now is bad.
    max_ts = int(time.time() * 1000) + 3_600_000

    os.makedirs(args.output, exist_ok=True)
    parts = tempfile.mkdtemp(prefix=".flink-parts-", dir=args.output)
    result = os.path.join(args.output, "result.jsonl")

    from pyflink.table import EnvironmentSettings, TableEnvironment

    settings = (EnvironmentSettings.in_streaming_mode() if streaming
                else EnvironmentSettings.in_batch_mode())
    t_env = TableEnvironment.create(settings)
    t_jvm = time.monotonic()
    conf = t_env.get_config()
    conf.set("parallelism.default", str(args.parallelism))
    conf.set("table.exec.resource.default-parallelism", str(args.parallelism))
    conf.set("table.local-time-zone", "UTC")
    # No checkpointing: on a bounded input the streaming filesystem sink finishes its part
    # files when its input ends (AbstractStreamingWriter.endInput), so none is needed.

    build = w4_statements if args.workload == "w4" else w5_statements
    ddl, insert, sink_columns = build(args, streaming, max_ts)
    for stmt in ddl + [sink_table(sink_columns, parts)]:
        t_env.execute_sql(stmt)
    if args.explain:
        print(t_env.explain_sql(insert), file=sys.stderr)

    t_plan = time.monotonic()
    table_result = t_env.execute_sql(insert)
    t_submit = time.monotonic()
    job = table_result.get_job_client().get_job_execution_result().result()
    job_s = job.get_net_runtime() / 1000.0
    t_done = time.monotonic()

    rows = collect(parts, result)
    shutil.rmtree(parts)
    wall_s = time.monotonic() - T0
    # Where the time went, for the curious (stderr, so stdout stays one line of JSON).
    print(f"peer_flink: import+JVM {t_jvm - T0:.2f}s, DDL {t_plan - t_jvm:.2f}s, "
          f"plan+submit {t_submit - t_plan:.2f}s, until job end {t_done - t_submit:.2f}s "
          f"(net runtime {job_s:.2f}s), collect {time.monotonic() - t_done:.2f}s", file=sys.stderr)
    print(json.dumps({"workload": args.workload, "mode": args.mode, "parallelism": args.parallelism,
                      "wall_s": round(wall_s, 3), "job_s": round(job_s, 3), "rows": rows,
                      "peak_rss_mb": peak_rss_mb()}),
          flush=True)


if __name__ == "__main__":
    main()
