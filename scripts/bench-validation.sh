#!/usr/bin/env bash
# What validation and dead-letter bookkeeping cost on clean input: W1 as shipped (required
# fields, clock sanity, quarantine on) against the same pipeline with all three relaxed
# (nullable fields, no clock check, quarantine off). Both parse into the same typed columns.
#
# Usage: scripts/bench-validation.sh [N_EVENTS] [RUNS]   (default 2000000 5)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}; runs=${2:-5}
input=/tmp/weir-bench-sensors-$n.jsonl
[ -s "$input" ] || python3 ../shared/bench/gen_sensors.py "$n" > "$input"
cargo build --release -p weir-cli >&2
bin=$PWD/target/release/weir
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
relaxed=$work/w1-relaxed.yaml
python3 - examples/w1-sensor-window.yaml "$relaxed" <<'PY'
import sys
text = open(sys.argv[1]).read()
text = text.replace("type: string }", "type: string, required: false }")
text = text.replace("type: int64 }", "type: int64, required: false }")
text = text.replace("type: float64 }", "type: float64, required: false }")
text = text.replace("event_time: { column: ts, format: ms }", "event_time: { column: ts, format: ms, max_future_skew: null }")
text += "\nquarantine: { enabled: false }\n"
open(sys.argv[2], "w").write(text)
PY
cat "$input" > /dev/null
time_of() { # $1 pipeline, $2 workers
  local t0 t1
  t0=$(date +%s.%N)
  INPUT=$input OUTPUT=$work/o.jsonl DEAD_LETTERS=$work/d.jsonl "$bin" run "$1" --workers "$2" --quiet --no-progress
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
echo "| workers | validated, s | relaxed, s | cost |"
echo "|---|---|---|---|"
for w in 1 2; do
  time_of examples/w1-sensor-window.yaml "$w" > /dev/null
  a=(); b=()
  for _ in $(seq "$runs"); do a+=("$(time_of examples/w1-sensor-window.yaml "$w")"); b+=("$(time_of "$relaxed" "$w")"); done
  ma=$(median "${a[@]}"); mb=$(median "${b[@]}")
  echo "| $w | $ma | $mb | $(python3 -c "print(f'{($ma-$mb)/$mb:+.1%}')") |"
done
