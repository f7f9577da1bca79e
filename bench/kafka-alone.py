"""Kafka alone, no relay and no Postgres: produce→ack latency at 1k msg/s, in
bursts of 10 (as the bench's latency writers commit 10 events per
transaction), 1 KB values, 6 partitions, the relay's producer settings
(linger.ms 0, acks=all, idempotent, lz4). The first 15 s are a warm-up. What
the broker and the host add to any relay's commit→ack on this machine.

Also prints the CPU the broker process (the one listening on the first
bootstrap address's port, when it runs on this host) used per message,
its idle use included: a burst is one relay batch, so BURST and PARTITIONS
show what a batch of that size costs the broker (each partition a burst
touches is a batch the broker appends on its own).

    $(scripts/py-env) bench/kafka-alone.py [SECS] [BURST] [BROKERS] [PARTITIONS]
    $(scripts/py-env) bench/kafka-alone.py 20 34 127.0.0.1:59092 24
"""
import os
import sys
import time

from confluent_kafka import Producer, admin

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 75
burst = int(sys.argv[2]) if len(sys.argv) > 2 else 10
brokers = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:59092"
partitions = int(sys.argv[4]) if len(sys.argv) > 4 else 6


def broker_pid(port):
    """The pid of the local process listening on `port`, if any (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add("socket:[%s]" % cols[9])
        except OSError:
            pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink("/proc/%s/fd/%s" % (pid, fd)) in inodes for fd in os.listdir("/proc/%s/fd" % pid)):
                return pid
        except OSError:
            continue
    return None


def cpu_s(pid):
    """utime + stime of `pid`, in seconds (None when it is not readable)."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError):
        return None


broker = broker_pid(int(brokers.split(",")[0].rsplit(":", 1)[1]))
p = Producer({"bootstrap.servers": brokers, "linger.ms": 0, "acks": "all", "enable.idempotence": True,
              "compression.type": "lz4", "batch.num.messages": 10000})
a = admin.AdminClient({"bootstrap.servers": brokers})
t = "kprod.lat.%d" % int(time.time())
a.create_topics([admin.NewTopic(t, partitions, 1)])[t].result()
lat = []


def cb(err, _msg, t0):
    if err is not None:
        sys.exit(f"kafka-alone: delivery failed: {err}")
    lat.append(time.perf_counter() - t0)


payload = b'{"pad":"' + b'x' * 900 + b'"}'
start = time.perf_counter()
cpu0 = cpu_s(broker)
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
cpu1 = cpu_s(broker)
w = int(len(lat) * 15 / secs)  # drop the first 15 s as warm-up
v = sorted(lat[w:])


def q(f):
    return v[int(len(v) * f)] * 1000


print("n=%d p50=%.1f p99=%.1f p99.9=%.1f max=%.1f ms" % (len(v), q(.5), q(.99), q(.999), v[-1] * 1000))
if cpu0 is not None and cpu1 is not None:
    print("burst %d, %d partitions: broker CPU %.1f µs per message (%d messages, its idle use included)"
          % (burst, partitions, (cpu1 - cpu0) * 1e6 / n, n))
a.delete_topics([t])
