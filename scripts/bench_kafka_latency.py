"""End-to-end latency of Kafka -> Weir -> Kafka at a steady rate, for scripts/bench-kafka.sh.

A producer writes sensor events at a steady rate, each stamped with the wall-clock time it was
produced (`ts`, which is also the event time). A `read_committed` consumer reads the job's
output and measures, per output record:

- `passthrough` (select three columns): the time from the event's production to its result
  being readable;
- `w1` (10 s tumbling windows, 2 s out-of-orderness): the time from the moment the window
  could first close (its end plus the 2 s allowance, in event time, which here is wall time)
  to its result being readable, i.e. what the engine and the brokers add to the window.

`--pipeline none` runs no job: the consumer reads the input topic itself, which is what the
brokers alone add (production to readable, through one topic instead of two).

`--source-property KEY=VALUE` passes a librdkafka property to the job's Kafka source,
`--sink-property KEY=VALUE` one to its Kafka sink; `--max-linger` sets the source's
`max_linger` (Weir's default when not given).

Weir's own share (pass-through only): the source adds a `received` metadata column (when Weir
took the record from its consumer, µs) and the sink measures from it (`latency_column`), so
Weir's run summary gives the time each row spent inside Weir, between the two clients; the
last columns of the table are its p50 / p99 / max. The brokers' hops and the sink producer's
`linger.ms` are outside it.

`--brokers mock` runs librdkafka's mock cluster inside this process (the only broker here
that serves transactions); otherwise a real broker address (Tansu from scripts/services.sh).

Usage: python3 scripts/bench_kafka_latency.py --weir target/release/weir --brokers mock \
           --mode exactly_once --pipeline passthrough --rate 50000 --seconds 20
"""

import argparse
import logging
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

STEPS = {
    "passthrough": "  - select: { id: columns, columns: [device_id, ts, \"readings.temp AS temp\", received_us] }\n",
    "w1": (
        "  - key_by: { id: by-device, keys: [device_id] }\n"
        "  - window:\n      id: per-device-10s\n      tumbling: 10s\n"
        "      aggregates: { count: count(), avg_temp: mean(readings.temp) }\n"
        "  - select: { id: columns, columns: [device_id, window_start, count, avg_temp] }\n"
    ),
}


def pipeline(a, brokers, run):
    ck = f"checkpoints: {{ dir: {a.work}/ck-{run}, interval: {a.checkpoint_interval} }}\n" if a.mode == "exactly_once" else ""
    header = ", checkpoint_header: weir-checkpoint" if a.mode == "exactly_once" else ""
    def properties(pairs):
        props = dict(kv.split("=", 1) for kv in pairs)
        return ", properties: {" + ", ".join(f'"{k}": "{v}"' for k, v in props.items()) + "}" if props else ""

    linger = f"  max_linger: {a.max_linger}\n" if a.max_linger else ""
    received = ", metadata: { received: received_us }" if a.pipeline == "passthrough" else ""
    latency = "  latency_column: received_us\n" if a.pipeline == "passthrough" else ""
    return f"""name: latency-{a.pipeline}
source:
  id: events
  kafka: {{ brokers: "{brokers}", topics: [{run}-in], group_id: {run}, start: latest, format: json{properties(a.source_property)}{received} }}
  schema:
    fields:
      - {{ name: device_id, type: string }}
      - {{ name: ts, type: int64 }}
      - {{ name: readings, type: struct, fields: [ {{ name: temp, type: float64 }} ] }}
  event_time: {{ column: ts, format: ms }}
  watermark: {{ max_out_of_orderness: 2s, idle_timeout: 5s }}
{linger}steps:
{STEPS[a.pipeline]}sink:
  id: out
  kafka: {{ brokers: "{brokers}", topic: {run}-out, key: device_id, mode: {a.mode}, transactional_id: {run}{header}{properties(a.sink_property)} }}
{latency}
dead_letters: {{ path: {a.work}/{run}-dead.jsonl }}
{ck}"""


def start_mock():
    """A mock cluster inside this process; its address comes from librdkafka's log line."""
    lines = queue.Queue()

    class Grab(logging.Handler):
        def emit(self, record):
            lines.put(record.getMessage())

    log = logging.getLogger("mock")
    log.addHandler(Grab())
    log.setLevel(logging.DEBUG)
    holder = Producer({"test.mock.num.brokers": 1, "logger": log, "bootstrap.servers": "unused:1"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        holder.poll(0.1)
        try:
            msg = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if "replaced with" in msg:
            return holder, msg.rsplit("replaced with", 1)[1].strip().split()[0].rstrip(",")
    sys.exit("could not learn the mock cluster's address from librdkafka's log")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weir", required=True)
    ap.add_argument("--brokers", default="mock")
    ap.add_argument("--mode", choices=["at_least_once", "exactly_once"], default="at_least_once")
    ap.add_argument("--pipeline", choices=sorted(STEPS) + ["none"], default="passthrough")
    ap.add_argument("--source-property", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sink-property", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-linger", default="", help="the source's max_linger (default: Weir's)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rate", type=int, default=50000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--checkpoint-interval", default="1s")
    a = ap.parse_args()
    a.work = tempfile.mkdtemp(prefix="weir-latency-")

    holder = None
    brokers = a.brokers
    if brokers == "mock":
        holder, brokers = start_mock()
    run = f"lat{int(time.time() * 1000) % 10**9}"
    if holder is None:
        admin = AdminClient({"bootstrap.servers": brokers})
        for f in admin.create_topics([NewTopic(f"{run}-in", a.partitions, 1), NewTopic(f"{run}-out", a.partitions, 1)]).values():
            f.result()
    else:
        # The mock cluster does not serve CreateTopics; it makes a topic (4 partitions) the first
        # time a producer asks for its metadata. The sink's commit topic is made the same way.
        for t in (f"{run}-in", f"{run}-out", f"{run}.commits"):
            holder.list_topics(t, timeout=10)
    job = None
    if a.pipeline != "none":
        path = f"{a.work}/pipeline.yaml"
        with open(path, "w") as f:
            f.write(pipeline(a, brokers, run))
        # The run summary (with Weir's own share, for the pass-through) goes to weir.log.
        job = subprocess.Popen([a.weir, "run", path, "--workers", str(a.workers), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=open(f"{a.work}/weir.log", "w"))
    read_topic = f"{run}-in" if job is None else f"{run}-out"

    lat, got, stop = [], [0], threading.Event()
    measure_from = [float("inf")]

    def consume():
        c = Consumer({"bootstrap.servers": brokers, "group.id": f"{run}-reader", "auto.offset.reset": "earliest",
                      "isolation.level": "read_committed", "fetch.wait.max.ms": 5})
        # Exactly once, a result counts as readable when its transaction's record reaches the
        # commit topic (the same transaction): the mock cluster shows uncommitted records to
        # read_committed consumers, so their own arrival says nothing about the commit.
        commits = f"{run}.commits"
        eo = job is not None and a.mode == "exactly_once"
        c.subscribe([read_topic, commits] if eo else [read_topic])
        import json

        committed, waiting = set(), {}
        while not stop.is_set():
            for m in c.consume(1000, 0.05):
                if m.error():
                    continue
                now = time.time() * 1000
                r = json.loads(m.value())
                if m.topic() == commits:
                    txn = f"{r['run']}:{r['checkpoint']}"
                    committed.add(txn)
                    lat.extend(now - due for due in waiting.pop(txn, []))
                    continue
                due = r["window_start"] + 12000 if "window_start" in r else r["ts"]
                got[0] += 1
                if due < measure_from[0]:
                    continue
                if eo:
                    txn = dict(m.headers() or [])["weir-checkpoint"].decode()
                    if txn not in committed:
                        waiting.setdefault(txn, []).append(due)
                        continue
                lat.append(now - due)
        c.close()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 1, "partitioner": "murmur2_random",
                  "queue.buffering.max.messages": 1000000})
    time.sleep(2)  # the job joins its group and is assigned the partitions
    rnd = random.Random(7)
    devices = [f"dev-{i:05d}" for i in range(10000)]
    start = time.monotonic()
    t0_ms = time.time() * 1000
    measure_from[0] = t0_ms + a.warmup * 1000
    sent, tick = 0, 0.001
    total = a.warmup + a.seconds
    while (elapsed := time.monotonic() - start) < total:
        due = int(elapsed * a.rate)
        now_ms = int(time.time() * 1000)
        while sent < due:
            d = devices[sent % len(devices)]
            v = f'{{"device_id":"{d}","ts":{now_ms},"readings":{{"temp":{20 + rnd.random() * 5:.3f}}}}}'
            try:
                p.produce(f"{run}-in", v, d)
                sent += 1
            except BufferError:
                p.poll(0.001)
        p.poll(0)
        time.sleep(tick)
    p.flush(30)
    produced_for = time.monotonic() - start
    # Results of the last events (and, for w1, the windows they close) arrive a little later.
    time.sleep(3 if a.pipeline == "passthrough" else 14)
    stop.set()
    reader.join(10)
    if job is not None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(30)
        except subprocess.TimeoutExpired:
            job.kill()
    if not lat:
        sys.exit(f"no output measured; see {a.work}/weir.log")
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
    share = "- | - | -"
    if job is not None and a.pipeline == "passthrough":
        import re

        with open(f"{a.work}/weir.log") as f:
            m = re.search(r"latency from creation to sink: p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms", f.read())
        share = " | ".join(m.groups()) if m else "? | ? | ?"
    print(f"| {a.pipeline} | {a.mode} | {a.workers} | {sent / produced_for:,.0f} | {len(lat):,} | "
          f"{q(0.5):.1f} | {q(0.99):.1f} | {lat[-1]:.1f} | {share} |")
    del holder


if __name__ == "__main__":
    main()
