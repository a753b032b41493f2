#!/usr/bin/env bash
# Builds the Python package from this checkout (debug profile, sharing the workspace's target
# directory with the Rust tests) and installs it with its dependencies into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "maturin>=1.9.4,<2" "pyarrow>=14" "numpy>=1.23" "pytest>=7" "mypy>=1.5"
rm -f target/wheels/weir-*.whl
(cd python && maturin build --quiet --profile dev --strip -o ../target/wheels)
python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels/weir-*.whl
