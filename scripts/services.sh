#!/usr/bin/env bash
# Starts the servers the tests talk to, on loopback only, when they are not running yet, and
# exports where they are. Safe to run again. Sourced by scripts/test.sh; also usable alone:
#   source scripts/services.sh && cargo nextest run
# Logs go to ${WEIR_SERVICES_LOG:-/tmp/weir-services}/<name>.log.

logs=${WEIR_SERVICES_LOG:-/tmp/weir-services}
mkdir -p "$logs"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() { # Debian packages, refreshing the package lists only when needed
  echo "services: installing $* (Debian packages)" >&2
  apt-get install -y -qq "$@" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "$@" >&2; }
}

wait_port() { # $1 port, $2 name
  for _ in $(seq 1 150); do
    port_open "$1" && return 0
    sleep 0.2
  done
  echo "services: $2 did not start on 127.0.0.1:$1; see $logs/$2.log" >&2
  return 1
}

# S3-compatible object store (checkpoint store tests): moto's server, from PyPI.
export WEIR_TEST_S3_ENDPOINT=${WEIR_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}
if [ "$WEIR_TEST_S3_ENDPOINT" = http://127.0.0.1:5055 ] && ! port_open 5055; then
  if ! python3 -c 'import moto.server, flask, werkzeug' 2>/dev/null; then
    echo "services: installing moto[server] (S3 for the checkpoint store tests)" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1' >&2
  fi
  nohup python3 -m moto.server -H 127.0.0.1 -p 5055 > "$logs/moto.log" 2>&1 &
  wait_port 5055 moto
fi

# Kafka-protocol broker (consumer-group tests): Tansu from crates.io, in memory. Its build takes
# about ten minutes once; the binary is kept in ~/.cargo/bin.
export WEIR_TEST_KAFKA=${WEIR_TEST_KAFKA:-127.0.0.1:19092}
if [ "$WEIR_TEST_KAFKA" = 127.0.0.1:19092 ] && ! port_open 19092; then
  if ! command -v tansu >/dev/null 2>&1; then
    echo "services: building tansu 0.6 (Kafka-protocol broker for the tests; about 10 minutes)" >&2
    cargo install tansu --version 0.6.0 --features dynostore --locked --quiet >&2
  fi
  nohup tansu broker --listener-url tcp://127.0.0.1:19092 --advertised-listener-url tcp://127.0.0.1:19092 \
    --storage-engine memory://tansu/ > "$logs/tansu.log" 2>&1 &
  wait_port 19092 tansu
fi

# Redis (alert routes to pub/sub): the Debian package, in memory, loopback only.
export WEIR_TEST_REDIS=${WEIR_TEST_REDIS:-redis://127.0.0.1:6379}
if [ "$WEIR_TEST_REDIS" = redis://127.0.0.1:6379 ] && ! port_open 6379; then
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  nohup redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no > "$logs/redis.log" 2>&1 &
  wait_port 6379 redis
fi

# MQTT: Mosquitto and its clients. The tests start brokers of their own (on free ports, so they
# can restart them) from these binaries; the examples use the one on 1883.
if ! [ -x /usr/sbin/mosquitto ] && ! command -v mosquitto >/dev/null 2>&1; then
  apt_install mosquitto mosquitto-clients
fi
command -v mosquitto_pub >/dev/null 2>&1 || apt_install mosquitto-clients
if ! port_open 1883; then
  mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' > "$logs/mosquitto.conf"
  nohup "$mosquitto" -c "$logs/mosquitto.conf" > "$logs/mosquitto.log" 2>&1 &
  wait_port 1883 mosquitto
fi

# NATS with JetStream, loopback only.
if ! port_open 4222; then
  [ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null 2>&1 || apt_install nats-server
  nats=$(command -v nats-server || echo /usr/sbin/nats-server)
  mkdir -p "$logs/nats"
  nohup "$nats" -a 127.0.0.1 -p 4222 -js -sd "$logs/nats" > "$logs/nats.log" 2>&1 &
  wait_port 4222 nats
fi

# RabbitMQ (AMQP 0-9-1), guest/guest on loopback.
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 nohup rabbitmq-server > "$logs/rabbitmq.log" 2>&1 &
  wait_port 5672 rabbitmq
fi

# PostgreSQL (sink tests): the Debian package's cluster, loopback only, trust authentication
# for local connections, and a database `test`.
export WEIR_TEST_POSTGRES=${WEIR_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
if [ "$WEIR_TEST_POSTGRES" = postgres://postgres@127.0.0.1:5432/test ]; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  if ! port_open 5432; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if ! [ -d "/etc/postgresql/$version/main" ]; then
      pg_createcluster "$version" main >&2
    fi
    conf=/etc/postgresql/$version/main
    grep -q '^listen_addresses' "$conf/postgresql.conf" || echo "listen_addresses = '127.0.0.1'" >> "$conf/postgresql.conf"
    if ! grep -q 'weir-test' "$conf/pg_hba.conf"; then
      # Trust on loopback for the tests (weir-test); the rules come first so they win.
      { echo 'host all all 127.0.0.1/32 trust # weir-test'; echo 'local all all trust # weir-test'; cat "$conf/pg_hba.conf"; } > "$conf/pg_hba.conf.new"
      mv "$conf/pg_hba.conf.new" "$conf/pg_hba.conf"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start > "$logs/postgres.log" 2>&1 || cat "$logs/postgres.log" >&2
    wait_port 5432 postgres
  fi
  if [ "$(psql -X -A -t -d postgres://postgres@127.0.0.1:5432/postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null)" != 1 ]; then
    psql -X -q -d postgres://postgres@127.0.0.1:5432/postgres -c 'CREATE DATABASE test' >&2
  fi
fi
