#!/usr/bin/env bash
# Kafka -> W1 and W2 -> Kafka throughput at 1 and 2 workers, next to what the broker alone
# does on this machine (a bare librdkafka producer and consumer: confluent-kafka from PyPI,
# and crates/weir-cli/examples/kafka_bare_consumer.rs, which Python does not hold back; and
# crates/weir-cli/examples/kafka_bare_pipe.rs, W2's reads and writes with no engine), against
# the Tansu broker that scripts/services.sh starts on 127.0.0.1:19092 (in memory).
#
# Usage: scripts/bench-kafka.sh [N_EVENTS]   (default 2000000; LATENCY=0 skips the latency runs)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
source scripts/services.sh
python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install --quiet confluent-kafka
input=/tmp/weir-bench-sensors-$n.jsonl
[ -s "$input" ] || python3 ../shared/bench/gen_sensors.py "$n" > "$input"
cargo build --release -p weir-cli >&2
bin=$PWD/target/release/weir
run=bench-$(date +%s)
echo "broker alone ($n events, 4 partitions):"
python3 scripts/bench_kafka_broker.py "$WEIR_TEST_KAFKA" "$run-in" 4 "$input"
# A bare consumer in Rust (librdkafka, as Weir's), reading the same topic: what the broker
# serves one client here, next to which the pipelines below are measured.
cargo build --release -p weir-cli --example kafka_bare_consumer >&2
echo "bare consumer (crates/weir-cli/examples/kafka_bare_consumer.rs), same topic:"
for i in 1 2 3; do
  target/release/examples/kafka_bare_consumer "$WEIR_TEST_KAFKA" "$run-in" "$n"
done

# Tansu does not create topics on first use.
create_topic() {
  python3 -c "from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({'bootstrap.servers': '$WEIR_TEST_KAFKA'})
for f in a.create_topics([NewTopic('$1', 4, 1)]).values(): f.result()"
}

# The broker doing W2's I/O with no engine: one thread reads, keeps the hot readings (a byte
# search) and produces them, with Weir's producer settings (linger 0), then with a 5 ms linger.
cargo build --release -p weir-cli --example kafka_bare_pipe >&2
echo "bare consume, filter, produce (crates/weir-cli/examples/kafka_bare_pipe.rs), same topic:"
for linger in 0 5; do
  for i in 1 2 3; do
    create_topic "$run-pipe-$linger-$i"
    LINGER_MS=$linger target/release/examples/kafka_bare_pipe "$WEIR_TEST_KAFKA" "$run-in" "$n" "$run-pipe-$linger-$i"
  done
done

# Kafka -> example -> Kafka, three runs at each worker count.
pipeline() {
  local example=$1
  echo "$example:"
  echo "| workers | wall s | events/s | output records |"
  echo "|---|---|---|---|"
  for workers in 1 2; do
    for i in 1 2 3; do
      out=$run-$(basename "$example" .yaml)-$workers-$i
      create_topic "$out"
      start=$(date +%s.%N)
      BROKERS=$WEIR_TEST_KAFKA IN=$run-in OUT=$out GROUP=$out STOP_AT_END=true DEAD_LETTERS=/tmp/$out-dead.jsonl \
        "$bin" run "$example" --workers "$workers" --no-progress 2> /tmp/$out.log
      end=$(date +%s.%N)
      rows=$(sed 's/\x1b\[[0-9;]*m//g' /tmp/$out.log | grep -o '[0-9]* rows written' | head -1 || true)
      python3 -c "s=$end-$start; print(f'| $workers | {s:.2f} | {$n/s/1e3:.0f}k | $rows |')"
    done
  done
}
pipeline examples/w1-kafka.yaml
pipeline examples/w2-kafka.yaml
# Steps that cost more than the broker's pace: how the work spreads over the workers.
pipeline examples/cpu-bound-kafka.yaml

[ "${LATENCY:-1}" = 0 ] && exit 0

# End-to-end latency at a steady rate: Tansu for at-least-once; librdkafka's mock cluster (in
# the measuring process) for both modes, since only it serves transactions here.
rate=${RATE:-50000}
echo
echo "latency at $rate events/s (ms):"
echo "| broker | pipeline | mode | workers | produced/s | results measured | p50 | p99 | max | in Weir p50 | p99 | max |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
cargo build --release -p weir-cli --example kafka_latency >&2
lat() { target/release/examples/kafka_latency --weir "$bin" --rate "$rate" "$@" 2>/dev/null; }
# `none`: no job, the brokers alone (production to readable through one topic).
echo -n "| Tansu "; lat --brokers "$WEIR_TEST_KAFKA" --pipeline none
echo -n "| mock "; lat --brokers mock --pipeline none
for pl in passthrough w1; do
  echo -n "| Tansu "; lat --brokers "$WEIR_TEST_KAFKA" --mode at_least_once --pipeline $pl
  for mode in at_least_once exactly_once; do
    for workers in 1 2; do
      echo -n "| mock "; lat --brokers mock --mode $mode --pipeline $pl --workers $workers
    done
  done
done
# Exactly once, a result waits for its checkpoint's commit: the interval bounds the latency.
for interval in 100ms 1s; do
  echo -n "| mock ($interval checkpoints) "; lat --brokers mock --mode exactly_once --pipeline passthrough --checkpoint-interval $interval
done
