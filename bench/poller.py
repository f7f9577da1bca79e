"""The poller a team writes by hand, as issue #25 describes it: the yardstick for
the relay's drain (scripts/bench, `drain` and `poller` sections).

One loop: claim the next batch in seq order with FOR UPDATE SKIP LOCKED,
publish it, wait for every ack, delete it with one statement, commit. No per-key
fence (several of these lose per-key order), no retries, no floor. Its producer
has the relay's delivery settings (idempotent, acks=all, lz4), so the ratio
measures the design, not the compression.

    python bench/poller.py POSTGRES_URL BROKERS TABLE BATCH
Prints one JSON line: {"events": N, "seconds": S, "events_per_s": R}.
"""
import json
import sys
import time

import psycopg
from confluent_kafka import Producer

url, brokers, table, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True,
                     "acks": "all", "compression.type": "lz4"})
failed = []


def acked(err, _msg):
    if err is not None:
        failed.append(err)


claim = (f"SELECT id, topic, key, payload::text FROM {table} "
         "WHERE published_at IS NULL AND parked_at IS NULL "
         "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED")
done, started, deadline = 0, None, time.monotonic() + 900
with psycopg.connect(url, autocommit=True) as db:
    while time.monotonic() < deadline:
        with db.transaction():
            rows = db.execute(claim, (batch,)).fetchall()
            for id_, topic, key, payload in rows:
                producer.produce(topic, key=key, value=payload.encode(), headers={"id": str(id_)},
                                 on_delivery=acked)
            producer.flush()
            if failed:
                sys.exit(f"poller: {len(failed)} messages refused, first: {failed[0]}")
            db.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", ([r[0] for r in rows],))
        if not rows:
            break
        done += len(rows)
        started = started or (time.monotonic(), done)
    else:
        sys.exit(f"poller: not drained in 900 s ({done} events)")
secs = time.monotonic() - started[0]
print(json.dumps({"events": done - started[1], "seconds": secs, "events_per_s": (done - started[1]) / secs}))
