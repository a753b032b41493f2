#!/usr/bin/env bash
# Python API benchmarks (docs/benchmarks.md, "Python"):
#  1. W1 built in Python (examples/python/workloads.py) against the same pipeline run by the
#     command, at 1 and 2 workers;
#  2. the cost per row of a Python step alone: a pipeline's time with the step minus its time
#     without it, for Weir's per-row `map`, Weir's `map_batches` doing the same work in numpy,
#     and Bytewax's per-row `map` (installed from PyPI for this comparison only);
#  3. the same three steps in instructions per row, counted by callgrind (valgrind, a Debian
#     package), which unlike time does not drift with the machine's speed.
#
# Usage: scripts/bench-python.sh [N_EVENTS] [RUNS]   (default 2000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}; runs=${2:-3}
input=/tmp/weir-bench-sensors-$n.jsonl
[ -s "$input" ] || python3 ../shared/bench/gen_sensors.py "$n" > "$input"
cargo build --release -p weir-cli >&2
python3 -m pip install --quiet --disable-pip-version-check "maturin>=1.9.4,<2" pyarrow numpy "bytewax==0.21.1" orjson 2>&1 | grep -v "Running pip as" >&2 || true
rm -f target/wheels-release/weir-*.whl
(cd python && maturin build --quiet --release --strip -o ../target/wheels-release) >&2
python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels-release/weir-*.whl 2>&1 | grep -v "Running pip as" >&2 || true
bin=$PWD/target/release/weir
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat "$input" > /dev/null
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >&2
python3 scripts/bench_python.py --input "$input" --weir "$bin" --work "$work" --runs "$runs"
echo "(scripts/test.sh reinstalls the debug build of the package for the tests.)" >&2
