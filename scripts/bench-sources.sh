#!/usr/bin/env bash
# The MQTT and Redis Streams sources next to a plain client of the same protocol on this
# machine, each draining the same N events queued for it while it was away:
#   MQTT:  mosquitto_sub (the C client; QoS 1, persistent MQTT 5 session) vs W1 from
#          examples/w1-mqtt.yaml (QoS 1, acknowledged after checkpoints every 200 ms); the
#          events are published by `weir gen --mqtt` (`mosquitto_pub -l` at full speed is
#          disconnected by Mosquitto 2.0 after some 30,000 messages);
#   Redis: a plain redis-rs XREADGROUP/XACK loop (crates/weir-bench/src/bin) vs W1 from
#          examples/w1-redis-streams.yaml (XACK after checkpoints every 200 ms);
#   NATS:  a plain async-nats durable pull consumer with AckAll (crates/weir-bench/src/bin) vs
#          W1 from examples/w1-nats.yaml (AckAll after checkpoints every 200 ms), each its own
#          durable consumer of the same JetStream stream, filled by `weir gen --nats`;
#   RabbitMQ: a plain lapin consumer (prefetch 10,000, a multiple ack per 5,000; crates/
#          weir-bench/src/bin) vs W1 from examples/w1-rabbitmq.yaml (acknowledged after
#          checkpoints every 200 ms), each draining a durable queue of its own filled by
#          `weir gen --amqp` (persistent, confirmed). The machine's RabbitMQ serves (its own
#          node starts in seconds but needs the `rabbitmq` user's folders).
# Both Weir runs end once nothing arrives for 1 s; that second is taken off their time.
# Brokers of the script's own on free ports: Mosquitto with an unlimited queue for offline
# sessions, Redis without persistence.
#
# Usage: scripts/bench-sources.sh [N_EVENTS]   (default 500000)
#        ONLY="nats rabbitmq" scripts/bench-sources.sh 2000000   (some of mqtt, redis, nats, rabbitmq)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-500000}
only=${ONLY:-mqtt redis nats rabbitmq}
# How often the Weir runs checkpoint, and so acknowledge to their server.
ck_interval=${CK_INTERVAL:-200ms}
runs() { [[ " $only " == *" $1 "* ]]; }
source scripts/services.sh
input=/tmp/weir-bench-sensors-$n.jsonl
[ -s "$input" ] || python3 ../shared/bench/gen_sensors.py "$n" > "$input"
cargo build --release -p weir-cli -p weir-bench --bins >&2
bin=$PWD/target/release/weir
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1 / ($3 - $2):,.0f}')"; }

mport=18883
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nuser root\n' $mport > "$dir/m.conf"
mosquitto -c "$dir/m.conf" > /dev/null 2>&1 &
rport=16390
redis-server --bind 127.0.0.1 --port $rport --save '' --appendonly no > /dev/null 2>&1 &
nport=14222
nats-server -js -a 127.0.0.1 -p $nport -sd "$dir/js" > /dev/null 2>&1 &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$mport && exec 3<>/dev/tcp/127.0.0.1/$rport && exec 3<>/dev/tcp/127.0.0.1/$nport) 2>/dev/null && break; sleep 0.1; done
# A JetStream request over the NATS text protocol: `nats_stream NAME SUBJECT` makes a stream.
nats_stream() {
  python3 - "$nport" "$1" "$2" <<'PY'
import socket, sys
port, name, subject = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = socket.create_connection(("127.0.0.1", port)); f = c.makefile("rb"); f.readline()
body = ('{"name":"%s","subjects":["%s"]}' % (name, subject)).encode()
c.sendall(b"CONNECT {}\r\nSUB _INBOX.b 1\r\nPUB $JS.API.STREAM.CREATE.%s _INBOX.b %d\r\n%s\r\n" % (name.encode(), len(body), body))
while not (line := f.readline()).startswith(b"MSG"):
    pass
reply = f.read(int(line.split()[-1]))
assert b'"error"' not in reply, reply
PY
}

bounded() { sed 's/^    format: json$/    format: json\n    end_when_idle: 1s/' "$1" > "$2"; }
bounded examples/w1-mqtt.yaml "$dir/w1-mqtt.yaml"
bounded examples/w1-redis-streams.yaml "$dir/w1-redis.yaml"
bounded examples/w1-nats.yaml "$dir/w1-nats.yaml"
bounded examples/w1-rabbitmq.yaml "$dir/w1-rabbitmq.yaml"

echo "| source | client | events | seconds | events/s |"
echo "|---|---|---|---|---|"
for i in 1 2 3; do
  if runs mqtt; then
  # MQTT, plain client: a persistent session of its own, on a topic of its own, gets every
  # event queued, then drains it.
  mosquitto_sub -p $mport -t "plain-$i" -q 1 -c -i "plain-$i" -V mqttv5 -x 600 -E > /dev/null
  "$bin" gen --mqtt mqtt://127.0.0.1:$mport --topic "plain-$i" -n "$n" 2> /dev/null
  t0=$(now); mosquitto_sub -p $mport -t "plain-$i" -q 1 -c -i "plain-$i" -V mqttv5 -x 600 -C "$n" > /dev/null; t1=$(now)
  echo "| mqtt | mosquitto_sub | $n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$n" "$t0" "$t1") |"
  # MQTT, Weir: its worker 0 is client weir-bench-$i-0; the run's summary says how many it read.
  mosquitto_sub -p $mport -t "weir-$i" -q 1 -c -i "weir-bench-$i-0" -V mqttv5 -x 600 -E > /dev/null
  "$bin" gen --mqtt mqtt://127.0.0.1:$mport --topic "weir-$i" -n "$n" 2> /dev/null
  t0=$(now)
  MQTT_URL=mqtt://127.0.0.1:$mport TOPIC="weir-$i" MQTT_CLIENT_ID="weir-bench-$i" OUTPUT="$dir/out-m$i" \
    CHECKPOINTS="$dir/ck-m$i" CHECKPOINT_INTERVAL=$ck_interval DEAD_LETTERS="$dir/dead.jsonl" \
    "$bin" run "$dir/w1-mqtt.yaml" --workers 2 --no-progress 2> "$dir/run.log"
  t1=$(python3 -c "print($(now) - 1.0)")
  read_n=$(grep -o '^[0-9]* events in' "$dir/run.log" | cut -d' ' -f1)
  echo "| mqtt | weir W1 | $read_n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$read_n" "$t0" "$t1") |"
  fi

  if runs redis; then
  # Redis Streams.
  redis-cli -p $rport DEL sensors > /dev/null
  python3 - "$input" <<'PY' | redis-cli -p $rport --pipe > /dev/null
import sys
out = sys.stdout.buffer
for line in open(sys.argv[1], "rb"):
    line = line.rstrip(b"\n")
    parts = [b"XADD", b"sensors", b"*", b"data", line]
    out.write(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
PY
  t0=$(now); target/release/redis_plain_consumer redis://127.0.0.1:$rport sensors plain "$n" > /dev/null; t1=$(now)
  echo "| redis streams | redis-rs loop | $n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$n" "$t0" "$t1") |"
  t0=$(now)
  REDIS_URL=redis://127.0.0.1:$rport GROUP=weir-$i OUTPUT="$dir/out-r$i" CHECKPOINTS="$dir/ck-r$i" \
    CHECKPOINT_INTERVAL=$ck_interval DEAD_LETTERS="$dir/dead.jsonl" "$bin" run "$dir/w1-redis.yaml" --workers 2 --no-progress 2> "$dir/run.log"
  t1=$(python3 -c "print($(now) - 1.0)")
  read_n=$(grep -o '^[0-9]* events in' "$dir/run.log" | cut -d' ' -f1)
  echo "| redis streams | weir W1 | $read_n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$read_n" "$t0" "$t1") |"
  fi

  if runs nats; then
  # NATS JetStream: one stream, read in full by each client's own durable consumer.
  nats_stream "B$i" "b$i.>"
  "$bin" gen --nats nats://127.0.0.1:$nport --topic "b$i.{device_id}" -n "$n" 2> /dev/null
  t0=$(now); target/release/nats_plain_consumer nats://127.0.0.1:$nport "B$i" plain "$n" > /dev/null; t1=$(now)
  echo "| nats jetstream | async-nats loop | $n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$n" "$t0" "$t1") |"
  t0=$(now)
  NATS_URL=nats://127.0.0.1:$nport STREAM="B$i" SUBJECTS="b$i.>" CONSUMER=weir OUTPUT="$dir/out-n$i" \
    CHECKPOINTS="$dir/ck-n$i" CHECKPOINT_INTERVAL=$ck_interval DEAD_LETTERS="$dir/dead.jsonl" \
    "$bin" run "$dir/w1-nats.yaml" --workers 2 --no-progress 2> "$dir/run.log"
  t1=$(python3 -c "print($(now) - 1.0)")
  read_n=$(grep -o '^[0-9]* events in' "$dir/run.log" | cut -d' ' -f1)
  echo "| nats jetstream | weir W1 | $read_n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$read_n" "$t0" "$t1") |"
  fi

  if runs rabbitmq; then
  # RabbitMQ: a queue each, filled while nobody consumes.
  amqp=amqp://guest:guest@127.0.0.1:5672/%2f
  "$bin" gen --amqp "$amqp" --topic "bench-plain-$$-$i" -n "$n" 2> /dev/null
  t0=$(now); target/release/rabbitmq_plain_consumer "$amqp" "bench-plain-$$-$i" "$n" > /dev/null; t1=$(now)
  echo "| rabbitmq | lapin loop | $n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$n" "$t0" "$t1") |"
  "$bin" gen --amqp "$amqp" --topic "bench-weir-$$-$i" -n "$n" 2> /dev/null
  t0=$(now)
  AMQP_URL="$amqp" QUEUE="bench-weir-$$-$i" OUTPUT="$dir/out-a$i" CHECKPOINTS="$dir/ck-a$i" \
    CHECKPOINT_INTERVAL=$ck_interval DEAD_LETTERS="$dir/dead.jsonl" "$bin" run "$dir/w1-rabbitmq.yaml" --workers 2 --no-progress 2> "$dir/run.log"
  t1=$(python3 -c "print($(now) - 1.0)")
  read_n=$(grep -o '^[0-9]* events in' "$dir/run.log" | cut -d' ' -f1)
  echo "| rabbitmq | weir W1 | $read_n | $(python3 -c "print(round($t1 - $t0, 2))") | $(rate "$read_n" "$t0" "$t1") |"
  fi
done
