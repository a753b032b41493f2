#!/usr/bin/env bash
# The alerting benchmark (issue: anomaly detection and alerting), on this machine:
#  1. alert latency: the generator at 50,000 events/s over 10,000 devices with injected
#     anomalies, through examples/bench-alerts.yaml, posting each new alert to a webhook
#     receiver on loopback (scripts/bench_alert_receiver.py); latency is receipt time minus
#     the anomalous event's creation time; p50, p99, max;
#  2. throughput of the same pipeline as fast as it goes, at 1 and 2 workers;
#  3. ONNX scoring rate of models/sensor_anomaly.onnx at batch sizes 1, 64 and 1024.
#
# Usage: scripts/bench-alerts.sh [SECONDS]   (latency run length, default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
cargo build --release -p weir-cli --bin weir -p weir-ops --example onnx_rate >&2
bin=target/release/weir
port=18080
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

echo "## latency: ${secs}s at 50,000 events/s, 10,000 devices"
for workers in 1 2; do
  python3 scripts/bench_alert_receiver.py $port > "$tmp/lat.json" 2>/dev/null &
  rpid=$!
  sleep 0.5
  RATE=50000 DURATION=${secs}s OUTPUT=$tmp/alerts.jsonl "$bin" run examples/bench-alerts.yaml \
    --workers $workers --no-progress --quiet
  kill -TERM $rpid
  wait $rpid || true
  echo "workers=$workers $(cat "$tmp/lat.json")"
done

echo "## throughput: 5,000,000 events as fast as they go"
for workers in 1 2; do
  python3 scripts/bench_alert_receiver.py $port > "$tmp/lat.json" 2>/dev/null &
  rpid=$!
  sleep 0.5
  start=$(date +%s.%N)
  COUNT=5000000 "$bin" run examples/bench-alerts.yaml --workers $workers --no-progress --quiet
  end=$(date +%s.%N)
  kill -TERM $rpid
  wait $rpid || true
  python3 -c "import json; d=json.load(open('$tmp/lat.json')); print(f'workers=$workers {5e6/($end-$start)/1e6:.2f}M events/s, {d[\"alerts\"]} alerts posted')"
done

echo "## ONNX scoring rate"
target/release/examples/onnx_rate models/sensor_anomaly.onnx
