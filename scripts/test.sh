#!/usr/bin/env bash
# Every check CI runs, in the order CI runs them: formatting, lints, then all tests.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== lean build (no Kafka, no MQTT)"
# Warnings fail it too (RUSTFLAGS=-D warnings would rebuild every dependency).
lean=$(cargo check -p weir-cli --no-default-features --locked --message-format short 2>&1) || { echo "$lean"; exit 1; }
if grep -q '^warning\|: warning' <<<"$lean"; then echo "$lean"; exit 1; fi
echo "== services"
source scripts/services.sh
# The metrics tests check /metrics with the reference parser (scripts/check_metrics.py).
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'prometheus_client>=0.20,<1' >&2
fi
# The Python RabbitMQ test publishes its messages with pika (a pure-Python AMQP client).
if ! python3 -c 'import pika' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'pika>=1.3,<2' >&2
fi
# ...and the shipped alert rules with promtool (Debian's prometheus package; its server is not started).
if ! command -v promtool >/dev/null 2>&1; then
  apt-get install -y -qq prometheus >&2 || { apt-get update -qq >&2 && apt-get install -y -qq prometheus >&2; }
fi
# The dashboard test opens examples/dashboard.html in a real headless browser: Debian's Chromium,
# driven by Playwright's Python package (its driver ships in the wheel; no browser download).
if ! [ -x /usr/bin/chromium ]; then
  apt-get install -y -qq chromium >&2 || { apt-get update -qq >&2 && apt-get install -y -qq chromium >&2; }
fi
# The Helm chart's manifests are checked against Kubernetes' schemas, which this package carries.
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.30,<2' >&2
fi
if ! python3 -c 'import playwright.sync_api' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'playwright>=1.40,<2' >&2
fi
echo "== tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "== doc tests"
cargo test --workspace --doc --locked
echo "== python"
# The package is built from this checkout into the current Python, then tested from the
# repository root (so `python/weir`, which lacks the native module, is not imported instead).
scripts/python-dev.sh
python3 -m pytest -q python/tests
# The annotations and stubs that ship with the package (py.typed) are checked against the
# package itself, its examples and its tests.
python3 -m mypy --ignore-missing-imports python/weir examples/python python/tests
