"""The Python examples: W1-W3 equal their YAML pipelines; the model example finds the
injected anomalies."""

import importlib.util
import os
import sys

import pytest

import weir
from conftest import ROOT, read_jsonl, sorted_rows


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "python" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("workload,yaml", [("w2", "w2-filter-project.yaml"), ("w3", "w3-ewma-anomaly.yaml")])
def test_workloads_equal_their_yaml_pipelines(events_file, tmp_path, workload, yaml, monkeypatch):
    wl = load("workloads")
    py_out = str(tmp_path / "py.jsonl")
    assert wl.main([workload, str(events_file), py_out, "--workers", "2"]) == 0
    monkeypatch.setenv("INPUT", str(events_file))
    monkeypatch.setenv("OUTPUT", str(tmp_path / "yaml.jsonl"))
    monkeypatch.setenv("DEAD_LETTERS", str(tmp_path / "dl.jsonl"))
    weir.run_yaml(ROOT / "examples" / yaml, workers=1)
    ours, theirs = read_jsonl(py_out), read_jsonl(tmp_path / "yaml.jsonl")
    assert len(ours) > 0
    assert sorted_rows(ours) == sorted_rows(theirs)


def test_the_model_example_finds_the_injected_anomalies(tmp_path):
    ex = load("sensor_anomaly_model")
    out = str(tmp_path / "anomalies.jsonl")
    s = ex.pipeline(20_000, out).run()
    assert s.source_records == 20_000
    rows = read_jsonl(out)
    # About 20 anomalies are injected (rate 0.001): temp +15 and vibration x20.
    assert 5 <= len(rows) <= 100, len(rows)
    assert sum(r["vibration"] > 1.0 or r["temp"] > 35 for r in rows) >= 0.8 * len(rows)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    import re

    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    rows = read_jsonl(tmp_path / "hot.jsonl")
    assert rows and all(r["readings"]["temp"] > 25.0 and "temp_f" in r and "score" in r for r in rows)


def test_the_guide_testing_example_runs():
    import re

    guide = (ROOT / "docs" / "python.md").read_text()
    section = guide[guide.index("## Testing pipelines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/python.md", "exec"), {})


def test_the_faust_style_example_counts_per_page_and_per_country_at_view_time(tmp_path):
    ex = load("page_views")
    views_path, users_path = ex.make_input(str(tmp_path), views=3000)
    p = ex.pipeline(views_path, users_path, str(tmp_path))
    p.run(workers=2)
    views = read_jsonl(views_path)
    users = read_jsonl(users_path)
    per_page = {}
    for v in views:
        per_page[v["page"]] = per_page.get(v["page"], 0) + 1
    assert {r["page"]: r["views"] for r in p.table_rows("views_per_page")} == per_page
    # The country of a view is its user's newest change at or before the view (None before).
    per_country = {}
    for v in views:
        changes = [u for u in users if u["user_id"] == v["user_id"] and u["ts"] <= v["ts"]]
        # Of changes at the same time, the one that came last.
        country = changes[max(range(len(changes)), key=lambda j: (changes[j]["ts"], j))]["country"] if changes else None
        per_country[country] = per_country.get(country, 0) + 1
    got = {r["country"]: r["views"] for r in p.table_rows("views_per_country")}
    assert got == per_country
    assert p.table_value("views_per_country", "de")["views"] == per_country["de"]
    assert p.table_value("views_per_page", "/nowhere") is None
    # The change log ends at each key's value.
    last = {}
    for r in read_jsonl(tmp_path / "views_per_page.jsonl"):
        last[r["page"]] = r["views"]
    assert last == per_page
