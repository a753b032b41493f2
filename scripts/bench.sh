#!/usr/bin/env bash
# Reruns the benchmark workloads W1-W5 (shared/bench/WORKLOADS.md) on the standard input and
# prints a markdown table: median wall time of 3 runs after a warm-up, events/s, peak RSS, and
# whether the output equals the reference computation.
#
# Usage: scripts/bench.sh [N_EVENTS]   (default 2000000; input cached in /tmp)
#        ONLY="w4:1 w4:2" scripts/bench.sh     (some of the runs: workload:workers)
# W5 joins two streams of N events each (seeds 7 and 8); its events/s counts both.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
input=/tmp/weir-bench-sensors-$n.jsonl
gen=../shared/bench/gen_sensors.py
[ -s "$input" ] || python3 "$gen" "$n" > "$input"
input_b=/tmp/weir-bench-sensors-b-$n.jsonl
[ -s "$input_b" ] || python3 "$gen" "$n" --seed 8 > "$input_b"
devices=/tmp/weir-bench-devices.csv
[ -s "$devices" ] || python3 ../shared/bench/gen_devices.py > "$devices"
cargo build --release -p weir-cli >&2
bin=target/release/weir
out=$(mktemp -d)
cat "$input" "$input_b" > /dev/null   # page cache

echo "| workload | workers | median wall s | events/s | peak RSS MB | output |"
echo "|---|---|---|---|---|---|"
for spec in ${ONLY:-w1:1 w1:2 w2:1 w2:2 w3:1 w4:1 w4:2 w5:1 w5:2}; do
  w=${spec%:*}; workers=${spec#*:}
  case $w in
    w1) yaml=examples/w1-sensor-window.yaml ;;
    w2) yaml=examples/w2-filter-project.yaml ;;
    w3) yaml=examples/w3-ewma-anomaly.yaml ;;
    w4) yaml=examples/w4-enrich-window.yaml ;;
    w5) yaml=examples/w5-interval-join.yaml ;;
  esac
  ref=/tmp/weir-bench-$w-ref-$n.jsonl
  extra=()
  [ "$w" = w4 ] && extra=("$devices")
  [ "$w" = w5 ] && extra=("$input_b")
  events=$n
  [ "$w" = w5 ] && events=$((2 * n))
  [ -s "$ref" ] || python3 scripts/reference.py "$w" "$input" "${extra[@]}" > "$ref"
  times=(); mem=0
  for i in 0 1 2 3; do
    INPUT=$input INPUT_A=$input INPUT_B=$input_b DEVICES=$devices OUTPUT=$out/$w.jsonl DEAD_LETTERS=$out/dead.jsonl /usr/bin/time -f "%e %M" -o "$out/time" \
      "$bin" run "$yaml" --workers "$workers" --quiet --no-progress
    read -r t m < "$out/time"
    [ "$i" -gt 0 ] && times+=("$t")
    [ "$m" -gt "$mem" ] && mem=$m
  done
  med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 2p)
  ok=$(python3 scripts/compare.py "$ref" "$out/$w.jsonl" | tail -1)
  rate=$(python3 -c "print(f'{$events/$med/1e6:.2f}M')")
  echo "| $w | $workers | $med | $rate | $((mem/1024)) | $ok |"
done
rm -rf "$out"
