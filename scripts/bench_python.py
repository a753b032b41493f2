"""Timings for scripts/bench-python.sh; prints Markdown tables for docs/benchmarks.md."""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "python"))


def cli_w1(a, workers):
    env = dict(os.environ, INPUT=a.input, OUTPUT=f"{a.work}/cli.jsonl", DEAD_LETTERS=f"{a.work}/cli-dl.jsonl")
    subprocess.run([a.weir, "run", str(ROOT / "examples" / "w1-sensor-window.yaml"), "--workers", str(workers), "--quiet", "--no-progress"], env=env, check=True)


def py_w1(a, workers):
    # A fresh interpreter, as the command gets: start-up and import are part of the time.
    # `--no-site` starts it without `site` (`-S`, the packages' directories on PYTHONPATH
    # instead), which leaves out the machine's `.pth` start-up hooks.
    flags, env = [], None
    if a.no_site:
        import site

        flags, env = ["-S"], dict(os.environ, PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    subprocess.run([sys.executable, *flags, str(ROOT / "examples" / "python" / "workloads.py"), "w1", a.input, f"{a.work}/py.jsonl", "--workers", str(workers)], check=True, stderr=subprocess.DEVNULL, env=env)


# -- the per-row cost of a Python step -----------------------------------------------------

# The step is chained STEPS times, so that its cost stands out of the run-to-run noise of the
# rest of the pipeline (reading, parsing, writing), which is large for Bytewax; `map_batches`
# is so cheap that it takes BATCH_STEPS chained steps to rise above that noise.
STEPS = 4
BATCH_STEPS = 64

WEIR_STEP = r'''
import sys, numpy as np, pyarrow as pa, pyarrow.compute as pc, weir
variant, path, out, STEPS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
schema = pa.schema([pa.field("device_id", pa.string(), nullable=False), pa.field("ts", pa.int64(), nullable=False),
                    pa.field("readings", pa.struct([pa.field("temp", pa.float64(), nullable=False)]), nullable=False)])
p = weir.Pipeline("step-cost").source("events", weir.file(path), schema=schema, event_time="ts")
p.select("flat", ["device_id", "ts", "readings.temp AS temp"])
out_schema = pa.schema([("device_id", pa.string()), ("ts", pa.int64()), ("temp", pa.float64()), ("temp_f", pa.float64())])
if variant == "none":
    p.select("same", ["device_id", "ts", "temp", "temp AS temp_f"])
elif variant == "map":
    p.map("to-f", lambda r: {**r, "temp_f": r["temp"] * 1.8 + 32.0}, schema=out_schema)
    for k in range(1, STEPS):
        p.map(f"to-f-{k}", lambda r: {**r, "temp_f": r["temp"] * 1.8 + 32.0}, schema=out_schema)
elif variant == "map_batches":
    p.map_batches("to-f", lambda b: b.append_column("temp_f", pa.array(b.column(2).to_numpy() * 1.8 + 32.0)), schema=out_schema)
    for k in range(1, STEPS):
        p.map_batches(f"to-f-{k}", lambda b: b.set_column(3, "temp_f", pa.array(b.column(2).to_numpy() * 1.8 + 32.0)), schema=out_schema)
p.sink("out", weir.file_sink(out)).dead_letters(out + ".dl")
p.run(workers=1)
'''

BYTEWAX_STEP = r'''
import sys, orjson
from bytewax.dataflow import Dataflow
import bytewax.operators as op
from bytewax.connectors.files import FileSource, FileSink
from bytewax.testing import run_main
variant, path, out, STEPS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
flow = Dataflow("step-cost")
lines = op.input("in", flow, FileSource(path))
def parse(line):
    e = orjson.loads(line)
    return {"device_id": e["device_id"], "ts": e["ts"], "temp": e["readings"]["temp"]}
rows = op.map("parse", lines, parse)
if variant == "map":
    for k in range(STEPS):
        rows = op.map(f"to-f-{k}", rows, lambda r: {**r, "temp_f": r["temp"] * 1.8 + 32.0})
text = op.map("dump", rows, lambda r: ("all", orjson.dumps(r).decode()))  # FileSink takes (key, line)
op.output("out", text, FileSink(out))
run_main(flow)
'''


def script_run(code, variant, a, name, steps=STEPS):
    out = f"{a.work}/{name}-{variant}.jsonl"
    subprocess.run([sys.executable, "-c", code, variant, a.input, out, str(steps)], check=True, stderr=subprocess.DEVNULL)


def rows_of(path):
    """Sorted rows, floats rounded: with two workers, sums add up in another order."""
    import json

    def norm(v):
        return float(f"{v:.12g}") if isinstance(v, float) else v

    return sorted(json.dumps({k: norm(v) for k, v in json.loads(line).items()}, sort_keys=True) for line in open(path))


def count(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--weir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["w1", "steps", "instructions"], default=None)
    ap.add_argument("--no-site", action="store_true", help="start the Python W1 with -S (no .pth start-up hooks)")
    ap.add_argument("--instruction-rows", type=int, default=50_000,
                    help="rows of the input the instruction counts run over (callgrind is ~50x slower)")
    a = ap.parse_args()
    n = count(a.input)

    if a.only in (None, "w1"):
        w1_table(a, n)
    if a.only in (None, "steps"):
        steps_table(a, n)
    if a.only in (None, "instructions"):
        instructions_table(a)


def child_cpu():
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def interleaved(fns, runs):
    """Median wall and CPU seconds of each function, run in turn (A B A B ...) after a warm-up,
    so that a drift in the machine's speed touches both alike."""
    for f in fns:
        f()
    walls, cpus = [[] for _ in fns], [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            c0, t0 = child_cpu(), time.perf_counter()
            f()
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(child_cpu() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def w1_table(a, n):
    print("W1, whole process, runs interleaved, median of", a.runs)
    print("| workers | `weir run` (YAML): wall / CPU, s | Python builder: wall / CPU, s | Python vs command: wall / CPU | Python builder, events/s |")
    print("|---|---|---|---|---|")
    for w in (1, 2):
        (c, cc), (p, pc) = interleaved([lambda: cli_w1(a, w), lambda: py_w1(a, w)], a.runs)
        print(f"| {w} | {c:.2f} / {cc:.2f} | {p:.2f} / {pc:.2f} | {p / c - 1:+.1%} / {pc / cc - 1:+.1%} | {n / p:,.0f} |")
    same = rows_of(f"{a.work}/cli.jsonl") == rows_of(f"{a.work}/py.jsonl")
    print(f"\nSame output rows from both (floats to 12 significant digits): {same}\n")



def steps_table(a, n):
    print("Cost of a Python step computing temp_f = temp * 1.8 + 32, 1 worker, runs interleaved, median of", a.runs)
    print("| engine and step | without the steps: wall / CPU, s | steps chained | with the steps: wall / CPU, s | cost per row of one step: wall / CPU |")
    print("|---|---|---|---|---|")
    weir = interleaved(
        [lambda: script_run(WEIR_STEP, "none", a, "weir"),
         lambda: script_run(WEIR_STEP, "map", a, "weir", STEPS),
         lambda: script_run(WEIR_STEP, "map_batches", a, "weir", BATCH_STEPS)],
        a.runs,
    )
    bytewax = interleaved(
        [lambda: script_run(BYTEWAX_STEP, "none", a, "bytewax"), lambda: script_run(BYTEWAX_STEP, "map", a, "bytewax")],
        a.runs,
    )

    def row(name, base, with_steps, k):
        (b, bc), (t, tc) = base, with_steps
        per = lambda x, y: f"{(y - x) / n / k * 1e9:,.1f} ns"
        print(f"| {name} | {b:.2f} / {bc:.2f} | {k} | {t:.2f} / {tc:.2f} | {per(b, t)} / {per(bc, tc)} |")

    row("Weir `map` (a dict per row)", weir[0], weir[1], STEPS)
    row("Weir `map_batches` (numpy on the batch)", weir[0], weir[2], BATCH_STEPS)
    row("Bytewax 0.21.1 `map` (a dict per row)", bytewax[0], bytewax[1], STEPS)


def instructions(code, variant, path, a, name, steps):
    """Instructions the whole process executes (every thread), counted by callgrind: unlike
    time, the count does not move with the machine's speed."""
    import re

    out = f"{a.work}/{name}-{variant}-instr.jsonl"
    r = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={a.work}/callgrind.out", sys.executable,
         "-c", code, variant, path, out, str(steps)],
        check=True, capture_output=True, text=True,
    )
    return int(re.search(r"Collected : (\d+)", r.stderr).group(1))


def instructions_table(a):
    k = a.instruction_rows
    path = f"{a.work}/first-{k}.jsonl"
    with open(a.input, "rb") as f, open(path, "wb") as out:
        for _, line in zip(range(k), f):
            out.write(line)
    print(f"Instructions per row of one step (callgrind, whole process, first {k:,} events), 1 worker")
    print("| engine and step | without the steps | steps chained | with the steps | per row of one step |")
    print("|---|---|---|---|---|")
    cases = [
        ("Weir `map` (a dict per row)", WEIR_STEP, "weir", "map", STEPS),
        ("Weir `map_batches` (numpy on the batch)", WEIR_STEP, "weir", "map_batches", BATCH_STEPS),
        ("Bytewax 0.21.1 `map` (a dict per row)", BYTEWAX_STEP, "bytewax", "map", STEPS),
    ]
    base = {}
    for label, code, name, variant, steps in cases:
        if name not in base:
            base[name] = instructions(code, "none", path, a, name, steps)
        with_steps = instructions(code, variant, path, a, name, steps)
        per = (with_steps - base[name]) / k / steps
        print(f"| {label} | {base[name]:,} | {steps} | {with_steps:,} | {per:,.0f} |")


if __name__ == "__main__":
    main()
