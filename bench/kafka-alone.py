"""Kafka alone, no relay and no Postgres: produce→ack latency at 1k msg/s, in
bursts of 10 (as the bench's latency writers commit 10 events per
transaction), 1 KB values, 6 partitions, the relay's producer settings
(linger.ms 0, acks=all, idempotent, lz4). The first 15 s are a warm-up. What
the broker and the host add to any relay's commit→ack on this machine.

    $(scripts/py-env) bench/kafka-alone.py [SECS] [BURST] [BROKERS]
"""
import sys
import time

from confluent_kafka import Producer, admin

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 75
burst = int(sys.argv[2]) if len(sys.argv) > 2 else 10
brokers = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:59092"
p = Producer({"bootstrap.servers": brokers, "linger.ms": 0, "acks": "all", "enable.idempotence": True,
              "compression.type": "lz4", "batch.num.messages": 10000})
a = admin.AdminClient({"bootstrap.servers": brokers})
t = "kprod.lat.%d" % int(time.time())
a.create_topics([admin.NewTopic(t, 6, 1)])[t].result()
lat = []


def cb(err, _msg, t0):
    if err is not None:
        sys.exit(f"kafka-alone: delivery failed: {err}")
    lat.append(time.perf_counter() - t0)


payload = b'{"pad":"' + b'x' * 900 + b'"}'
start = time.perf_counter()
n = 0
while time.perf_counter() - start < secs:
    t0 = time.perf_counter()
    for _ in range(burst):
        n += 1
        p.produce(t, key=("order-%d" % n).encode(), value=payload,
                  on_delivery=lambda e, m, t0=t0: cb(e, m, t0))
    p.poll(0)
    nxt = start + n / 1000.0
    while time.perf_counter() < nxt:
        p.poll(0.001)
p.flush()
w = int(len(lat) * 15 / secs)  # drop the first 15 s as warm-up
v = sorted(lat[w:])


def q(f):
    return v[int(len(v) * f)] * 1000


print("n=%d p50=%.1f p99=%.1f p99.9=%.1f max=%.1f ms" % (len(v), q(.5), q(.99), q(.999), v[-1] * 1000))
a.delete_topics([t])
