#!/usr/bin/env bash
# Runs the peer engine's versions of W4 and W5 (shared/bench/WORKLOADS.md): Apache Flink SQL
# through PyFlink (scripts/peer_flink.py), on the same input files as scripts/bench.sh, and
# prints a markdown table: median of 3 runs after a warm-up of the whole-process wall time and
# of Flink's own job time (net runtime, no JVM start or planning), events/s from each, rows,
# peak RSS (Python + the JVM it starts) and whether the output equals the reference computation.
#
# Usage: scripts/bench-peers.sh [N_EVENTS]   (default 2000000; input cached in /tmp as bench.sh does)
#        ONLY="w5" MODE=batch PARALLELISM=2 scripts/bench-peers.sh 100000
# Needs: pip install apache-flink==2.3.0 (and Java 11+). W5 joins two streams of N events each
# (seeds 7 and 8); its events/s counts both.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
mode=${MODE:-streaming}
par=${PARALLELISM:-1}
gen=../shared/bench/gen_sensors.py
cached() {  # cached FILE COMMAND...: runs COMMAND > FILE unless FILE is there (never half-written)
  local f=$1; shift
  [ -s "$f" ] || { "$@" > "$f.tmp.$$" && mv "$f.tmp.$$" "$f"; }
}
input=/tmp/weir-bench-sensors-$n.jsonl
input_b=/tmp/weir-bench-sensors-b-$n.jsonl
devices=/tmp/weir-bench-devices.csv
cached "$input" python3 "$gen" "$n"
cached "$input_b" python3 "$gen" "$n" --seed 8
cached "$devices" python3 ../shared/bench/gen_devices.py
python3 -c "import pyflink" 2>/dev/null || { echo "PyFlink missing: pip install apache-flink==2.3.0" >&2; exit 1; }
engine="Flink $(python3 -c 'import importlib.metadata as m; print(m.version("apache-flink"))') SQL (PyFlink)"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat "$input" "$input_b" > /dev/null   # page cache

field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"; }
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
rate() { python3 -c "import sys; r = $1 / $2; print(f'{r/1e6:.2f}M' if r >= 1e6 else f'{r/1e3:.0f}k')"; }

echo "| workload | engine | mode | parallelism | median wall s | median job s | events/s (whole / job) | rows | peak RSS MB | output |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for w in ${ONLY:-w4 w5}; do
  case $w in
    w4) extra=("$devices"); args=(--events "$input" --devices "$devices"); events=$n ;;
    w5) extra=("$input_b"); args=(--events "$input" --events-b "$input_b"); events=$((2 * n)) ;;
    *) echo "unknown workload $w" >&2; exit 2 ;;
  esac
  ref=/tmp/weir-bench-$w-ref-$n.jsonl
  cached "$ref" python3 scripts/reference.py "$w" "$input" "${extra[@]}"
  walls=(); jobs=(); mem=0
  for i in 0 1 2 3; do
    rm -rf "$out/$w"
    /usr/bin/time -f "%e" -o "$out/time" \
      python3 scripts/peer_flink.py "$w" "${args[@]}" --output "$out/$w" --mode "$mode" \
      --parallelism "$par" > "$out/line" 2> "$out/stderr" || { cat "$out/stderr" >&2; exit 1; }
    read -r t < "$out/time"; m=$(field peak_rss_mb < "$out/line")
    if [ "$i" -gt 0 ]; then walls+=("$t"); jobs+=("$(field job_s < "$out/line")"); fi
    [ "$m" -gt "$mem" ] && mem=$m
  done
  rows=$(field rows < "$out/line")
  wall=$(median "${walls[@]}"); job=$(median "${jobs[@]}")
  ok=$(python3 scripts/compare.py "$ref" "$out/$w/result.jsonl" | tail -1 || true)
  echo "| $w | $engine | $mode | $par | $wall | $job | $(rate "$events" "$wall") / $(rate "$events" "$job") | $rows | $mem | $ok |"
done
