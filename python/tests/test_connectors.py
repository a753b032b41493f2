"""Connectors reached from Python: typed helpers and the generic one, against real servers."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pyarrow as pa
import pytest

import weir
import weir.testing as wt

SCHEMA = [{"name": "seq", "type": "int64"}, {"name": "temp", "type": "float64"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def mosquitto(tmp_path: Path):
    """A Mosquitto of the test's own (Debian package `mosquitto`; scripts/services.sh installs it)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nuser root\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.02)
    yield port
    proc.kill()
    proc.wait()


def test_an_mqtt_source_from_python_reads_what_was_published(mosquitto, tmp_path):
    port = mosquitto
    # The session the source resumes: the broker keeps what is published for it.
    subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "sensors/#", "-q", "1", "-c", "-i", "py-0",
                    "-V", "mqttv5", "-x", "600", "-E"], check=True)
    lines = "".join(f'{{"seq": {i}, "temp": {20 + i % 5}.5}}\n' for i in range(500))
    subprocess.run(["mosquitto_pub", "-p", str(port), "-t", "sensors/lab/d-1", "-q", "1", "-l", "-V", "mqttv5"],
                   input=lines.encode(), check=True)
    p = weir.Pipeline("py-mqtt", workers=1)
    p.source("in", weir.mqtt(f"mqtt://127.0.0.1:{port}", ["sensors/#"], client_id="py", end_when_idle="1s",
                             topic_fields="sensors/{room}/{device_id}"), schema=SCHEMA)
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert sorted(r["seq"] for r in out) == list(range(500))
    assert {(r["room"], r["device_id"]) for r in out} == {("lab", "d-1")}


def test_any_connector_is_reached_by_its_yaml_key():
    import datetime

    src = weir.connector("mqtt", url="mqtt://127.0.0.1:1883", topics=["a/#"], keep_alive=datetime.timedelta(seconds=5),
                         username=None)
    assert src == {"mqtt": {"url": "mqtt://127.0.0.1:1883", "topics": ["a/#"], "keep_alive": "5000ms"}}
    p = weir.Pipeline("c").source("in", src, schema=SCHEMA).sink("out", weir.connector("stdout", format="json"))
    p.validate()
    assert p.config()["source"]["mqtt"]["topics"] == ["a/#"]
    assert weir.http_ingest(token="t", respond="accepted") == {"http": {"token": "t", "respond": "accepted"}}
    weir.Pipeline("h").source("in", weir.http_ingest(token="t"), schema=SCHEMA).sink("out", weir.stdout()).validate()
    with pytest.raises(weir.errors.ConfigError, match="unknown source key `mqqt`"):
        weir.Pipeline("c").source("in", weir.connector("mqqt", url="x"), schema=SCHEMA).sink("o", weir.stdout()).validate()
    with pytest.raises(weir.errors.ConfigError, match="unknown field `topic`"):
        weir.Pipeline("c").source("in", weir.connector("mqtt", url="mqtt://h", topic="a"), schema=SCHEMA) \
            .sink("o", weir.stdout()).validate()


def _redis(url: str, *commands: list) -> str:
    """Runs commands through redis-cli (Debian's redis-tools), in its pipe mode when many."""
    def resp(args: list) -> bytes:
        parts = [str(a).encode() for a in args]
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    if len(commands) == 1:
        return subprocess.run(["redis-cli", "-u", url, *map(str, commands[0])], check=True, capture_output=True,
                              text=True).stdout
    data = b"".join(resp(c) for c in commands)
    return subprocess.run(["redis-cli", "-u", url, "--pipe"], input=data, check=True, capture_output=True).stdout.decode()


def test_a_redis_streams_source_from_python():
    url = os.environ.get("WEIR_TEST_REDIS", "redis://127.0.0.1:6379")
    stream = f"py-{os.getpid()}"
    _redis(url, ["DEL", stream])
    _redis(url, *[["XADD", stream, "*", "data", f'{{"seq": {i}, "temp": 20.5}}'] for i in range(300)])
    p = weir.Pipeline("py-redis", workers=1)
    p.source("in", weir.redis_streams(url, [stream], group="g", end_when_idle="1s", id_column="entry_id"), schema=SCHEMA)
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert sorted(r["seq"] for r in out) == list(range(300))
    assert all("-" in r["entry_id"] for r in out)
    assert _redis(url, ["XPENDING", stream, "g"]).splitlines()[0] == "0"
    _redis(url, ["DEL", stream])


def _nats_request(port: int, subject: str, payload: bytes) -> bytes:
    """One request over the NATS text protocol (no client library needed): the reply's payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        f = c.makefile("rb")
        f.readline()  # INFO
        c.sendall(b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.py 1\r\n")
        c.sendall(b"PUB %s _INBOX.py %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        while True:
            line = f.readline()
            if line.startswith(b"PING"):
                c.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG"):
                return f.read(int(line.split()[-1]) + 2)[:-2]


def test_a_nats_jetstream_source_from_python():
    port = int(os.environ.get("WEIR_TEST_NATS_PORT", "4222"))
    name = f"PY{os.getpid()}"
    _nats_request(port, f"$JS.API.STREAM.DELETE.{name}", b"")
    made = _nats_request(port, f"$JS.API.STREAM.CREATE.{name}", b'{"name":"%s","subjects":["%s.>"]}' % (name.encode(), name.encode()))
    assert b"error" not in made, made
    for i in range(300):
        acked = _nats_request(port, f"{name}.d{i % 3}", b'{"seq": %d, "temp": 20.5}' % i)
        assert b'"seq"' in acked, acked
    p = weir.Pipeline("py-nats", workers=1)
    source = weir.nats(f"nats://127.0.0.1:{port}", [f"{name}.>"], stream=name, consumer="py", end_when_idle="1s",
                       subject_fields=f"{name}.{{device}}")
    p.source("in", source, schema=SCHEMA)
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert sorted(r["seq"] for r in out) == list(range(300))
    assert {r["device"] for r in out} == {"d0", "d1", "d2"}
    _nats_request(port, f"$JS.API.STREAM.DELETE.{name}", b"")


def test_a_rabbitmq_source_from_python():
    import pika

    url = os.environ.get("WEIR_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = f"py-{os.getpid()}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    for i in range(300):
        ch.basic_publish("", queue, b'{"seq": %d, "temp": 20.5}' % i, pika.BasicProperties(headers={"site": f"s{i % 2}"}))
    p = weir.Pipeline("py-rabbitmq", workers=1)
    p.source("in", weir.rabbitmq(url, queue, end_when_idle="1s", headers_column="headers"), schema=SCHEMA)
    out = wt.run(p.sink("out", wt.collect())).to_pylist()
    assert sorted(r["seq"] for r in out) == list(range(300))
    assert {r["headers"] for r in out} == {'{"site":"s0"}', '{"site":"s1"}'}
    assert ch.queue_declare(queue, passive=True).method.message_count == 0
    ch.queue_delete(queue)
    conn.close()


PG = os.environ.get("WEIR_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")


def psql(sql: str) -> str:
    """Runs SQL on the machine's PostgreSQL (scripts/services.sh starts it)."""
    return subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", PG, "-c", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_postgres_sink_from_python_keeps_the_latest_row_per_key(tmp_path: Path) -> None:
    url = PG
    table = f"py_latest_{os.getpid()}"

    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"seq": %d, "temp": %d.5}\n' % (i % 7, i) for i in range(700)))
    p = weir.Pipeline("py-postgres", workers=1)
    p.source("in", weir.file(str(src)), schema=SCHEMA)
    p.sink("latest", weir.postgres_sink(url, table, mode="upsert", key=["seq"], create_table=True))
    p.run()
    try:
        assert psql(f"SELECT count(*), min(temp), max(temp) FROM {table}") == "7|693.5|699.5"
    finally:
        psql(f"DROP TABLE IF EXISTS {table}")


def test_a_sink_written_in_python_gets_batches_retries_and_dead_letters_what_it_refuses(tmp_path: Path) -> None:
    import json

    class Keep(weir.Sink):
        def __init__(self) -> None:
            self.rows: List[Dict[str, Any]] = []
            self.opened: List[Tuple[int, int]] = []
            self.closed = 0
            self.busy_once = True

        def open(self, worker: int, workers: int) -> None:
            self.opened.append((worker, workers))

        def write(self, batch: pa.RecordBatch) -> None:
            rows = batch.to_pylist()
            seqs = {r["seq"] for r in rows}
            if 13 in seqs:
                raise ValueError("13 is unlucky")
            if 50 in seqs and self.busy_once:
                self.busy_once = False
                raise weir.Retryable("the service is busy")
            self.rows.extend(rows)

        def close(self) -> None:
            self.closed += 1

    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"seq": %d, "temp": 1.5}\n' % i for i in range(100)))
    keep = Keep()
    p = weir.Pipeline("py-sink", workers=1)
    p.source("in", weir.file(str(src)), schema=SCHEMA, batch_size=10)
    p.sink("out", keep, retry={"initial_backoff": "10ms"}).dead_letters(str(tmp_path / "dead.jsonl"))
    p.run()
    assert sorted(r["seq"] for r in keep.rows) == [s for s in range(100) if not 10 <= s < 20]
    assert keep.opened == [(0, 1)] and keep.closed == 1
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(dead) == 10
    assert "ValueError" in dead[0]["reason"] and "13 is unlucky" in dead[0]["reason"], dead[0]["reason"]


def test_a_lookup_against_a_postgres_table_from_python() -> None:
    import time as _time

    table = f"weir_py_devices_{os.getpid()}_{int(_time.time() * 1000) % 1_000_000}"
    psql(f"CREATE TABLE {table} (device text PRIMARY KEY, site text); INSERT INTO {table} VALUES ('d1', 'north')")
    try:
        p = weir.Pipeline("pg-lookup", workers=1)
        p.source("in", wt.source([{"device": "d1"}, {"device": "d2"}]))
        p.lookup("device", "device", weir.postgres_table(PG, table, cache_ttl="1s"), join="left")
        rows = sorted(wt.run(p.sink("out", wt.collect())).to_pylist(), key=lambda r: r["device"])
        assert rows == [{"device": "d1", "site": "north"}, {"device": "d2", "site": None}]
    finally:
        psql(f"DROP TABLE IF EXISTS {table}")



def test_a_lookup_against_redis_hashes_from_python() -> None:
    prefix = f"weir-py-lookup-{os.getpid()}-{int(time.time() * 1000) % 1_000_000}:"
    subprocess.run(["redis-cli", "HSET", f"{prefix}d1", "site", "north", "limit", "20.5"], check=True, capture_output=True)
    try:
        p = weir.Pipeline("redis-lookup", workers=1)
        p.source("in", wt.source([{"device": "d1"}, {"device": "d2"}]))
        schema = [{"name": "site", "type": "string"}, {"name": "limit", "type": "float64"}]
        p.lookup("device", "device", weir.redis_table("redis://127.0.0.1:6379", prefix, schema=schema), join="left")
        rows = sorted(wt.run(p.sink("out", wt.collect())).to_pylist(), key=lambda r: r["device"])
        assert rows == [{"device": "d1", "site": "north", "limit": 20.5}, {"device": "d2", "site": None, "limit": None}]
    finally:
        subprocess.run(["redis-cli", "DEL", f"{prefix}d1"], check=True, capture_output=True)


def test_traces_from_python_reach_an_otlp_endpoint(tmp_path):
    """`Pipeline.traces` exports spans over OTLP/HTTP: the receiver here only reads the
    protobuf bodies' strings (span names are UTF-8 in them); the Rust tests decode them."""
    import http.server
    import threading

    bodies: List[Tuple[str, str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the handler's name is http.server's)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            bodies.append((self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = weir.Pipeline("py-traced", workers=1)
        p.source("gen", weir.generator(count=5_000, devices=10, seed=3))
        p.filter("hot", "readings.temp > 20")
        p.sink("out", weir.file_sink(tmp_path / "out.jsonl"))
        p.traces(f"http://127.0.0.1:{server.server_address[1]}", sample_ratio=1.0, service_name="py",
                 export_delay="50ms")
        p.run(workers=1)
        # The last spans are sent when the run ends, before `run` returns.
        assert bodies, "no export arrived"
        assert all(path == "/v1/traces" and kind == "application/x-protobuf" for path, kind, _ in bodies)
        sent = b"".join(b for _, _, b in bodies)
        for name in (b"batch gen", b"step hot", b"sink out", b"py"):
            assert name in sent, name
    finally:
        server.shutdown()
        server.server_close()
