"""The sensor anomaly pipeline with a model scored in batches.

A model of normal readings is fitted on a training sample, then every event is scored in
micro-batches by ``infer`` (batch sizes follow the arrival rate), and events scoring above the
threshold are written out with per-device window statistics alongside.

    python3 examples/python/sensor_anomaly_model.py --count 200000 --out anomalies.jsonl

The model is scikit-learn's IsolationForest when scikit-learn is installed
(``pip install scikit-learn``), else a Gaussian model in numpy (squared Mahalanobis distance
of (temp, vibration) from the training sample), so the example runs with the package's own
dependencies alone.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import weir
import weir.testing as wt

FEATURES = ["readings.temp", "readings.vibration"]


class GaussianModel:
    """Squared Mahalanobis distance from the training data: about 2 on average for normal
    points, large for outliers."""

    def fit(self, x: np.ndarray) -> "GaussianModel":
        self.mean = x.mean(axis=0)
        self.inv_cov = np.linalg.inv(np.cov(x, rowvar=False) + 1e-9 * np.eye(x.shape[1]))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        d = x - self.mean
        return np.einsum("ij,jk,ik->i", d, self.inv_cov, d)


def train(sample: int, seed: int):
    """Fits the model on generated readings without injected anomalies."""
    p = weir.Pipeline("training").source("gen", weir.generator(count=sample, seed=seed + 1, anomaly_rate=0.0))
    p.select("features", ["readings.temp AS temp", "readings.vibration AS vibration"])
    table = wt.run(p.sink("out", wt.collect()))
    x = np.column_stack([table.column("temp").to_numpy(), table.column("vibration").to_numpy()])
    try:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=100, random_state=seed).fit(x)
        return "IsolationForest", (lambda m: -forest.score_samples(m)), 0.7
    except ImportError:
        model = GaussianModel().fit(x)
        return "gaussian", model.score, 30.0


def pipeline(count: int, out: str, seed: int = 7, workers: int = 1) -> weir.Pipeline:
    name, score, threshold = train(20_000, seed)
    print(f"model: {name}, threshold {threshold}", file=sys.stderr)
    p = weir.Pipeline("sensor-anomaly-model", workers=workers)
    p.source("gen", weir.generator(count=count, seed=seed, anomaly_rate=0.001, devices=1000))
    p.infer("model", score, features=FEATURES, output="score", max_batch=1024, max_latency_ms=20)
    p.filter("anomalous", f"score > {threshold}")
    p.select("columns", ["device_id", "ts", "readings.temp AS temp", "readings.vibration AS vibration", "score"])
    return p.sink("out", weir.file_sink(out)).dead_letters(out + ".dead-letters.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "anomalies.jsonl"))
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    s = pipeline(a.count, a.out, workers=a.workers).run()
    print(f"{s.source_records} events scored, {s.sink_rows} anomalies -> {a.out} ({s.elapsed_s:.2f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
