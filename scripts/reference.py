#!/usr/bin/env python3
"""Reference implementations of W1-W5 (shared/bench/WORKLOADS.md), written from the
definitions, to check Weir's output. Slow and obvious on purpose.

Usage: reference.py w1|w2|w3 INPUT > expected.jsonl
       reference.py w4 INPUT DEVICES.csv > expected.jsonl
       reference.py w5 INPUT_A INPUT_B > expected.jsonl
"""
import csv
import json
import math
import sys
import time


# Clock sanity: events more than an hour ahead of the wall clock are not good lines.
MAX_TS = int(time.time() * 1000) + 3_600_000


def events(path):
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
                ev["device_id"], ev["ts"], ev["readings"]["temp"]
            except Exception:
                continue
            if not isinstance(ev.get("ts"), int) or not isinstance(ev["readings"].get("temp"), (int, float)):
                continue
            if ev["ts"] > MAX_TS:
                continue
            yield ev


def w1(path):
    wins = {}
    for ev in events(path):
        r = ev["readings"]
        if not isinstance(r.get("vibration"), (int, float)):
            continue
        start = ev["ts"] - ev["ts"] % 10000
        w = wins.setdefault((ev["device_id"], start), [0, 0.0, -math.inf])
        w[0] += 1
        w[1] += r["temp"]
        w[2] = max(w[2], r["vibration"])
    for (dev, start), (n, s, mx) in wins.items():
        yield {"device_id": dev, "window_start": start, "count": n, "avg_temp": s / n, "max_vibration": mx}


def w2(path):
    for ev in events(path):
        t = ev["readings"]["temp"]
        if t > 25.0:
            yield {"device_id": ev["device_id"], "ts": ev["ts"], "temp": t}


def w3(path):
    st = {}
    for ev in events(path):
        x = ev["readings"]["temp"]
        d = ev["device_id"]
        s = st.get(d)
        if s is None:
            st[d] = [x, 0.0, 1]
            continue
        mean, var, n = s
        if n >= 20 and abs(x - mean) > 4 * math.sqrt(var):
            yield {"device_id": d, "ts": ev["ts"], "temp": x, "mean": mean, "z": (x - mean) / math.sqrt(var)}
        dd = x - mean
        s[0] = mean + 0.1 * dd
        s[1] = 0.9 * (var + 0.1 * dd * dd)
        s[2] = n + 1


def w4(path, devices_path):
    with open(devices_path, newline="") as f:
        table = {r["device_id"]: r for r in csv.DictReader(f)}
    wins = {}
    for ev in events(path):
        dev = table.get(ev["device_id"])
        if dev is None:
            continue
        t = ev["readings"]["temp"]
        if not t > float(dev["temp_limit"]):
            continue
        start = ev["ts"] - ev["ts"] % 10000
        w = wins.setdefault((dev["site"], start), [0, -math.inf])
        w[0] += 1
        w[1] = max(w[1], t)
    for (site, start), (n, mx) in wins.items():
        yield {"site": site, "window_start": start, "count": n, "max_temp": mx}


def w5(path_a, path_b):
    # Every pair of the same device with b.ts - a.ts in [-50, 50] ms, by a plain index on
    # device (a nested loop over 2M x 2M events would not finish).
    by_device = {}
    for b in events(path_b):
        by_device.setdefault(b["device_id"], []).append(b)
    for a in events(path_a):
        for b in by_device.get(a["device_id"], ()):
            if -50 <= b["ts"] - a["ts"] <= 50:
                yield {
                    "device_id": a["device_id"],
                    "a_ts": a["ts"],
                    "b_ts": b["ts"],
                    "a_temp": a["readings"]["temp"],
                    "b_temp": b["readings"]["temp"],
                }


if __name__ == "__main__":
    fn = {"w1": w1, "w2": w2, "w3": w3, "w4": w4, "w5": w5}[sys.argv[1]]
    out = sys.stdout
    for row in fn(*sys.argv[2:]):
        out.write(json.dumps(row, separators=(",", ":")))
        out.write("\n")
