#!/usr/bin/env bash
# The PostgreSQL sink next to psql's own COPY of the same rows, on the machine's server:
#   copy:          the rows W2 keeps, as CSV, through `psql -c "\copy ... FROM ..."` (the baseline)
#   same rows:     Weir reading those rows (JSON Lines) into a table, at least once
#   append, at least once:   W2 (filter + projection) into a table, a transaction per batch
#   append, exactly once:    the same with checkpoints every second (a transaction per checkpoint)
#   upsert, exactly once:    the latest row per device (`ON CONFLICT (device_id) DO UPDATE`)
# Each Weir run reads the whole file; time is the whole command, start to exit.
#
# Usage: scripts/bench-postgres.sh [N_EVENTS]   (default 2000000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
source scripts/services.sh
cargo build --release -p weir-cli >&2
bin=$PWD/target/release/weir
url=${WEIR_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
now() { date +%s.%N; }
sql() { psql -X -q -A -t -d "$url" -c "$1"; }
input=$dir/events.jsonl
"$bin" gen -n "$n" --output "$input" 2> /dev/null

pipeline() { # $1 file, $2 sink settings (YAML lines), $3 checkpoints section or ""
  sed '/^sink:/,$d' examples/w2-filter-project.yaml > "$1"
  printf 'sink:\n  id: out\n  postgres:\n%s\ndead_letters: { path: %s }\n%s\n' "$2" "$dir/dead.jsonl" "$3" >> "$1"
}

# The rows W2 keeps, as CSV, for psql's COPY.
kept=$dir/kept.jsonl
INPUT=$input OUTPUT=$kept DEAD_LETTERS=$dir/dead.jsonl "$bin" run examples/w2-filter-project.yaml --quiet
rows=$(wc -l < "$kept")
python3 - "$kept" > "$dir/kept.csv" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f'{r["device_id"]},{r["ts"]},{r["temp"]!r}')
PY

echo "| run | rows in the table | seconds | rows/s (of the rows W2 keeps) |"
echo "|---|---|---|---|"
for i in 1 2 3; do
  t=bench_pg_$$_$i
  sql "DROP TABLE IF EXISTS ${t}_copy; CREATE TABLE ${t}_copy (device_id text, ts bigint, temp double precision)"
  t0=$(now); sql "\\copy ${t}_copy FROM '$dir/kept.csv' WITH (FORMAT csv)"; t1=$(now)
  echo "| psql \\copy (CSV) | $rows | $(python3 -c "print(round($t1 - $t0, 2))") | $(python3 -c "print(f'{$rows / ($t1 - $t0):,.0f}')") |"
  sql "DROP TABLE ${t}_copy"

  # The same rows as psql's, read by Weir from their file (JSON) into a table.
  p=$dir/same-rows.yaml
  printf 'name: same-rows\nsource:\n  id: kept\n  file: { path: %s, format: json }\n  schema:\n    fields:\n      - { name: device_id, type: string }\n      - { name: ts, type: int64 }\n      - { name: temp, type: float64 }\nsink:\n  id: out\n  postgres:\n    url: %s\n    table: %s\n    create_table: true\ndead_letters: { path: %s }\n' \
    "$kept" "$url" "${t}_same" "$dir/dead.jsonl" > "$p"
  t0=$(now); "$bin" run "$p" --workers 2 --quiet; t1=$(now)
  got=$(sql "SELECT count(*) FROM ${t}_same")
  echo "| weir, the same rows (JSON file) -> postgres, at least once | $got | $(python3 -c "print(round($t1 - $t0, 2))") | $(python3 -c "print(f'{$rows / ($t1 - $t0):,.0f}')") |"
  sql "DROP TABLE ${t}_same"

  # The same pipeline into a file: what W2 itself costs, without PostgreSQL.
  t0=$(now); INPUT=$input OUTPUT=$dir/w2-$i.jsonl DEAD_LETTERS=$dir/dead.jsonl "$bin" run examples/w2-filter-project.yaml --workers 2 --quiet; t1=$(now)
  echo "| weir W2 -> file | $rows | $(python3 -c "print(round($t1 - $t0, 2))") | $(python3 -c "print(f'{$rows / ($t1 - $t0):,.0f}')") |"
  for mode in at_least_once exactly_once upsert; do
    p=$dir/$mode.yaml
    ck=""
    [ "$mode" = at_least_once ] || ck="checkpoints: { dir: $dir/ck-$mode-$i, interval: 1s }"
    settings="    url: $url\n    table: ${t}_$mode\n    create_table: true"
    [ "$mode" = upsert ] && settings="$settings\n    mode: upsert\n    key: [device_id]\n    progress_key: bench-$$-$i-upsert"
    [ "$mode" = exactly_once ] && settings="$settings\n    progress_key: bench-$$-$i-eo"
    pipeline "$p" "$(printf "$settings")" "$ck"
    t0=$(now); INPUT=$input "$bin" run "$p" --workers 2 --quiet; t1=$(now)
    got=$(sql "SELECT count(*) FROM ${t}_$mode")
    echo "| weir W2 -> postgres, $mode | $got | $(python3 -c "print(round($t1 - $t0, 2))") | $(python3 -c "print(f'{$rows / ($t1 - $t0):,.0f}')") |"
    sql "DROP TABLE ${t}_$mode"
  done
done
sql "DELETE FROM weir_sink_progress WHERE sink LIKE 'bench-$$-%'" 2> /dev/null || true
