#!/usr/bin/env bash
# The WebSocket live feed's fan-out: the generator at RATE rows/s into a `websocket` sink, and
# CLIENTS WebSocket clients (crates/weir-bench/src/bin/ws_clients.rs, a thread each, on this
# same machine) reading every row for SECONDS. A row's delivery latency is the client's clock
# when the message arrives minus the row's creation stamp (`created_us`, the wall-clock time
# the generator made it): source batching, the pipeline, the feed's queues and the socket.
#
# Usage: [LINGER=1ms] scripts/bench-live-feed.sh [CLIENTS] [RATE] [SECONDS] [WORKERS]   (100 10000 20 1)
# LINGER is the source's max_linger: how long a batch waits to fill (fewer, bigger batches).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-100}
rate=${2:-10000}
secs=${3:-20}
workers=${4:-1}
cargo build --release -p weir-cli -p weir-bench --bin weir --bin ws_clients >&2
dir=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# A dashboard's row: the device, its time and reading, and the creation stamp.
cat > "$dir/feed.yaml" <<EOF
name: feed-bench
source:
  id: sensors
  generator: { devices: 1000, rate: $rate, stamp_created: true }
  max_linger: ${LINGER:-1ms}
steps:
  - select: { id: row, columns: [device_id, ts, created_us, readings.temp AS temp] }
sink:
  id: live
  websocket: { queue: 256 }
api: { addr: "127.0.0.1:$port" }
EOF
target/release/weir run "$dir/feed.yaml" --workers "$workers" --quiet &
pid=$!
for _ in $(seq 1 100); do
  (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break
  sleep 0.1
done
echo "rate $rate rows/s, $workers worker(s), $clients clients, ${secs}s:"
target/release/ws_clients "ws://127.0.0.1:$port/ws/live" "$clients" "$secs"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^weir_feed_clients_dropped_total' || true
