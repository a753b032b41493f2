"""The broker alone, for scripts/bench-kafka.sh: creates a topic, produces a JSON Lines file to
it keyed by device_id, then consumes it all back, and prints both rates. Uses confluent-kafka
(librdkafka, as Weir does), so the difference to Weir's figures is the engine's share.

Usage: python3 scripts/bench_kafka_broker.py BROKERS TOPIC PARTITIONS INPUT
"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

brokers, topic, partitions, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
admin = AdminClient({"bootstrap.servers": brokers})
for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
    f.result()
lines = open(path, "rb").read().splitlines()
p = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "batch.num.messages": 10000,
              "queue.buffering.max.messages": 1000000, "enable.idempotence": True,
              "partitioner": "murmur2_random"})
t0 = time.monotonic()
for line in lines:
    key = line[14:23]  # {"device_id":"dev-00035",... : the id's bytes
    while True:
        try:
            p.produce(topic, line, key)
            break
        except BufferError:
            p.poll(0.01)
p.flush()
produce_s = time.monotonic() - t0
c = Consumer({"bootstrap.servers": brokers, "group.id": f"{topic}-reader", "auto.offset.reset": "earliest",
              "enable.auto.commit": False})
c.subscribe([topic])
n = 0
t0 = None
while n < len(lines):
    batch = c.consume(10000, timeout=1.0)
    if batch and t0 is None:
        t0 = time.monotonic()
    n += sum(1 for m in batch if m.error() is None)
consume_s = time.monotonic() - t0
c.close()
print(json.dumps({"events": len(lines), "produce_s": round(produce_s, 2), "consume_s": round(consume_s, 2),
                  "produce_per_s": round(len(lines) / produce_s), "consume_per_s": round(len(lines) / consume_s)}))
