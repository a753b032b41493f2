#!/usr/bin/env python3
"""Compares two JSON Lines files as multisets of rows: same keys, equal strings and ints,
floats equal to 1e-9 relative. Exit 0 when equal; otherwise prints the first differences.

Usage: compare.py EXPECTED ACTUAL
"""
import json
import math
import sys


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def key(row):
    # Exact fields first, so rows that tie on rounded floats still pair up by their keys.
    exact = tuple(sorted((k, str(v)) for k, v in row.items() if not isinstance(v, float)))
    approx = tuple(sorted((k, round(v, 6)) for k, v in row.items() if isinstance(v, float)))
    return exact, approx


def same(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            if x is None or y is None:
                return x is y
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


def main():
    exp, act = load(sys.argv[1]), load(sys.argv[2])
    if len(exp) != len(act):
        print(f"row counts differ: expected {len(exp)}, got {len(act)}")
    exp.sort(key=key)
    act.sort(key=key)
    bad = 0
    for a, b in zip(exp, act):
        if not same(a, b):
            bad += 1
            if bad <= 5:
                print(f"expected {a}\n     got {b}")
    if bad or len(exp) != len(act):
        print(f"{bad} differing rows")
        sys.exit(1)
    print(f"{len(exp)} rows equal")


if __name__ == "__main__":
    main()
