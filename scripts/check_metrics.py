#!/usr/bin/env python3
"""Parses Prometheus text on stdin with the reference Python parser and prints every sample
as JSON lines ({"family", "type", "name", "labels", "value"}). Exits non-zero, naming the
problem, when the text does not parse. Used by the metrics tests; handy by hand too:

    curl -s localhost:9464/metrics | python3 scripts/check_metrics.py
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            print(json.dumps({"family": family.name, "type": family.type, "name": s.name,
                              "labels": s.labels, "value": s.value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
