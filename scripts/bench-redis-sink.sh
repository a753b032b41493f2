#!/usr/bin/env bash
# The Redis sink next to redis-benchmark on the machine's server:
#   redis-benchmark XADD:  the server's own limit for the same entries (one W2 row as JSON),
#                          pipelined 64 deep, 1 and 50 connections
#   weir W2 -> file:       what W2 itself costs (read, parse, filter, project)
#   weir W2 -> redis xadd: the rows W2 keeps, each an entry of one stream (MAXLEN ~ 1,000,000)
#   weir W2 -> redis hset: the latest row per device (1,000 hashes)
# Each Weir run reads the whole file; time is the whole command, start to exit.
#
# Usage: scripts/bench-redis-sink.sh [N_EVENTS]   (default 2000000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
source scripts/services.sh
cargo build --release -p weir-cli >&2
bin=$PWD/target/release/weir
url=${WEIR_TEST_REDIS:-redis://127.0.0.1:6379}
port=${url##*:}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1 / ($3 - $2):,.0f}')"; }
secs() { python3 -c "print(round($2 - $1, 2))"; }
input=$dir/events.jsonl
"$bin" gen -n "$n" --output "$input" 2> /dev/null
kept=$dir/kept.jsonl
INPUT=$input OUTPUT=$kept DEAD_LETTERS=$dir/dead.jsonl "$bin" run examples/w2-filter-project.yaml --quiet
rows=$(wc -l < "$kept")
row=$(head -1 "$kept")

pipeline() { # $1 file, $2 sink settings (YAML lines)
  sed '/^sink:/,$d' examples/w2-filter-project.yaml > "$1"
  printf 'sink:\n  id: out\n  redis:\n%s\ndead_letters: { path: %s }\n' "$2" "$dir/dead.jsonl" >> "$1"
}
key=bench-redis-sink-$$

echo "W2 keeps $rows of $n events; a row: $row"
echo "| run | seconds | rows/s |"
echo "|---|---|---|"
for i in 1 2 3; do
  for c in 1 50; do
    out=$(redis-benchmark -p "$port" -q -n "$rows" -c "$c" -P 64 XADD "$key-rb" MAXLEN '~' 1000000 '*' row "$row" | tr '\r' '\n' | grep -v '^$' | tail -1)
    per_s=$(grep -oE '[0-9.]+ requests per second' <<<"$out" | cut -d' ' -f1)
    echo "| redis-benchmark XADD, -P 64, $c connection(s) | $(python3 -c "print(round($rows / $per_s, 2))") | $(python3 -c "print(f'{$per_s:,.0f}')") |"
    redis-cli -p "$port" DEL "$key-rb" > /dev/null
  done
  t0=$(now); INPUT=$input OUTPUT=$dir/w2-$i.jsonl DEAD_LETTERS=$dir/dead.jsonl "$bin" run examples/w2-filter-project.yaml --workers 2 --quiet; t1=$(now)
  echo "| weir W2 -> file | $(secs "$t0" "$t1") | $(rate "$rows" "$t0" "$t1") |"
  pipeline "$dir/xadd.yaml" "    url: $url
    command: xadd
    key: $key
    field: row
    maxlen: 1000000"
  t0=$(now); INPUT=$input "$bin" run "$dir/xadd.yaml" --workers 2 --quiet; t1=$(now)
  got=$(redis-cli -p "$port" XLEN "$key")
  echo "| weir W2 -> redis xadd ($got entries) | $(secs "$t0" "$t1") | $(rate "$rows" "$t0" "$t1") |"
  redis-cli -p "$port" DEL "$key" > /dev/null
  pipeline "$dir/hset.yaml" "    url: $url
    command: hset
    key: \"$key:{device_id}\""
  t0=$(now); INPUT=$input "$bin" run "$dir/hset.yaml" --workers 2 --quiet; t1=$(now)
  got=$(redis-cli -p "$port" --scan --pattern "$key:*" | wc -l)
  echo "| weir W2 -> redis hset ($got hashes) | $(secs "$t0" "$t1") | $(rate "$rows" "$t0" "$t1") |"
  redis-cli -p "$port" --scan --pattern "$key:*" | xargs -r -n 500 redis-cli -p "$port" DEL > /dev/null
done
