#!/usr/bin/env python3
"""A webhook receiver for the alert-latency benchmark (scripts/bench-alerts.sh).

Listens on 127.0.0.1:PORT, answers 200 to every POST, and for each alert event records
receipt time minus the event time of the anomaly that caused it (`last_seen`, ms; with the
generator at a fixed rate and no disorder, an event's time is its creation time). On SIGTERM
it prints count, p50, p99 and max in ms, as JSON, to stdout.
"""
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

latencies = []


class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        now_ms = time.time() * 1000.0
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            ev = json.loads(body)
            if ev.get("event") == "fired":
                latencies.append(now_ms - ev["last_seen"])
        except (ValueError, KeyError):
            pass
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def report(*_):
    xs = sorted(latencies)
    q = lambda p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 2) if xs else None
    print(json.dumps({"alerts": len(xs), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(xs[-1], 2) if xs else None}))
    sys.stdout.flush()
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, report)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
