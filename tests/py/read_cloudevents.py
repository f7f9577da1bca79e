"""Reads a topic from the start as an application using the CloudEvents SDK
would (confluent-kafka, binary content mode), and prints each event as one
JSON line: its attributes, extensions and data. Exits 1 on the first message
the SDK cannot read. Usage: read_cloudevents.py BOOTSTRAP TOPIC COUNT"""

import json
import sys
import time

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event
from confluent_kafka import Consumer, TopicPartition


def main() -> int:
    bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ce-{time.time_ns()}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen, deadline = 0, time.time() + 60
    while seen < count:
        if time.time() > deadline:
            print(f"only {seen} of {count} messages within 60 s", file=sys.stderr)
            return 1
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            print(f"consumer error: {msg.error()}", file=sys.stderr)
            return 1
        headers = {k: (v or b"") for k, v in (msg.headers() or [])}
        try:
            event = from_binary_event(KafkaMessage(headers=headers, key=msg.key(), value=msg.value() or b""))
        except Exception as e:  # the SDK's own validation: the test's point
            print(f"the CloudEvents SDK rejected a message ({type(e).__name__}: {e}); headers: {headers}",
                  file=sys.stderr)
            return 1
        print(json.dumps({
            "attributes": {k: (v.isoformat() if hasattr(v, "isoformat") else v)
                           for k, v in event.get_attributes().items()},
            "data": event.get_data(),
        }), flush=True)
        seen += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
