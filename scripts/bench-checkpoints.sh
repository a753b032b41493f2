#!/usr/bin/env bash
# Checkpoint costs on W1 (shared/bench/WORKLOADS.md): throughput with a checkpoint every
# second against none, the size and duration of checkpoints holding 10,000 keys, and the time
# a run takes to recover from one.
#
# Usage: scripts/bench-checkpoints.sh [N_EVENTS] [DEVICES]   (default 20000000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000000}
devices=${2:-10000}
input=/tmp/weir-bench-sensors-$n-d$devices.jsonl
[ -s "$input" ] || python3 ../shared/bench/gen_sensors.py --devices "$devices" "$n" > "$input"
cargo build --release -p weir-cli >&2
bin=$PWD/target/release/weir
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat "$input" > /dev/null   # page cache
yaml=examples/w1-checkpointed.yaml
run() { # $1 workers, $2 interval ("" for no checkpoints); prints wall seconds
  rm -rf "$work/ck" "$work/out" "$work/out.jsonl"
  if [ -z "$2" ]; then
    INPUT=$input OUTPUT=$work/out.jsonl DEAD_LETTERS=$work/d.jsonl /usr/bin/time -f %e -o "$work/t" \
      "$bin" run examples/w1-sensor-window.yaml --workers "$1" --quiet --no-progress
  else
    INPUT=$input OUTPUT=$work/out CHECKPOINTS=$work/ck CHECKPOINT_INTERVAL=$2 DEAD_LETTERS=$work/d.jsonl \
      WEIR_LOG=weir_core::checkpointing=info /usr/bin/time -f %e -o "$work/t" \
      "$bin" run "$yaml" --workers "$1" --quiet --no-progress 2> "$work/log"
  fi
  cat "$work/t"
}
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
echo "| workers | no checkpoints, s | every 1s, s | kept | checkpoints | state per checkpoint | duration p50 / max ms | alignment max ms |"
echo "|---|---|---|---|---|---|---|---|"
for workers in 1 2; do
  run "$workers" "" > /dev/null; a=(); b=()
  for i in 1 2 3; do a+=("$(run "$workers" "")"); b+=("$(run "$workers" 1s)"); done
  ma=$(median "${a[@]}"); mb=$(median "${b[@]}")
  stats=$(sed 's/\x1b\[[0-9;]*m//g' "$work/log" | python3 -c '
import re, sys, statistics
rows = [dict(re.findall(r"(\w+)=(\d+)", l)) for l in sys.stdin if "Checkpoint complete" in l]
periodic = rows[:-1] or rows   # the last is the final checkpoint, taken after the input ends
d = sorted(int(r["duration_ms"]) for r in periodic)
size = statistics.median(int(r["bytes"]) for r in periodic) / 2**20
align = max(int(r["alignment_ms"]) for r in periodic)
print(f"{len(rows)} | {size:.2f} MiB | {d[len(d)//2]} / {d[-1]} | {align}")')
  echo "| $workers | $ma | $mb | $(python3 -c "print(f'{$ma/$mb:.0%}')") | $stats |"
done
# Recovery: kill a run half-way, then time the restart up to its first read (log line
# "Job started", which comes after the checkpoint is loaded and state restored).
rm -rf "$work/ck" "$work/out"
INPUT=$input OUTPUT=$work/out CHECKPOINTS=$work/ck CHECKPOINT_INTERVAL=1s DEAD_LETTERS=$work/d.jsonl \
  "$bin" run "$yaml" --workers 2 --quiet --no-progress & pid=$!
sleep 1.5; kill -9 $pid; wait $pid 2>/dev/null || true
state=$("$bin" checkpoints list "$work/ck" | sed -n 3p)
start=$(date +%s.%N)
INPUT=$input OUTPUT=$work/out CHECKPOINTS=$work/ck DEAD_LETTERS=$work/d.jsonl WEIR_LOG=info \
  "$bin" run "$yaml" --workers 2 --quiet --no-progress --log-format json 2> "$work/log2"
python3 - "$start" "$work/log2" "$state" <<'PY'
import json, sys, datetime
start = float(sys.argv[1]); resumed = started = None
for line in open(sys.argv[2]):
    try: j = json.loads(line)
    except ValueError: continue
    t = datetime.datetime.fromisoformat(j["timestamp"].replace("Z", "+00:00")).timestamp()
    msg = j.get("fields", {}).get("message", "")
    if msg == "Resuming from checkpoint." and resumed is None: resumed = t
    if msg == "Job started." and started is None: started = t
print(f"\nrecovery from `{sys.argv[3].split()[0]}` ({' '.join(sys.argv[3].split()[-2:])} of state): "
      f"process start to resumed reading {1000*(started-start):.0f} ms "
      f"(of which loading the checkpoint and settling the sink {1000*(resumed-start):.0f} ms)")
PY
