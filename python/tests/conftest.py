import json
from pathlib import Path

import pytest

import weir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def events_file(tmp_path_factory) -> Path:
    """20,000 generated sensor events over 200 devices, as JSON Lines (written by Weir)."""
    path = tmp_path_factory.mktemp("input") / "events.jsonl"
    p = weir.Pipeline("gen", workers=1)
    p.source("gen", weir.generator(count=20_000, devices=200, seed=7, disorder=0.05, anomaly_rate=0.01))
    p.sink("out", weir.file_sink(path))
    p.run(workers=1)
    return path


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sorted_rows(rows) -> list:
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
