// Does a single Kafka broker keep a transaction it acknowledged as committed
// when it is stopped? Kafka's own Java client, no outbox-relay involved.
//
// Commits transactions (one record to each of 6 partitions of a new topic) in a
// loop for the given seconds while you stop and start the broker (see ./run),
// then reads the topic with read_committed and lists every transaction whose
// commitTransaction() returned normally but whose records are not all visible.
//
//   java -cp "$KAFKA_LIBS/*" TxnLoss.java <bootstrap> <seconds>
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.TopicPartition;
import java.time.Duration;
import java.util.*;

public class TxnLoss {
  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    long seconds = Long.parseLong(args[1]);
    String topic = "txnloss_" + Long.toHexString(System.nanoTime());
    Properties base = new Properties();
    base.put("bootstrap.servers", bootstrap);
    try (Admin admin = Admin.create(base)) {
      admin.createTopics(List.of(new NewTopic(topic, 6, (short) 1))).all().get();
    }
    Properties p = (Properties) base.clone();
    p.put("transactional.id", topic);
    p.put("key.serializer", "org.apache.kafka.common.serialization.StringSerializer");
    p.put("value.serializer", "org.apache.kafka.common.serialization.StringSerializer");
    p.put("max.block.ms", "5000");
    p.put("delivery.timeout.ms", "10000");
    p.put("request.timeout.ms", "3000");
    List<String> acked = new ArrayList<>();
    long end = System.currentTimeMillis() + seconds * 1000;
    int n = 0;
    while (System.currentTimeMillis() < end) {
      try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
        producer.initTransactions();
        while (System.currentTimeMillis() < end) {
          String id = "t" + (n++);
          producer.beginTransaction();
          for (int i = 0; i < 6; i++) producer.send(new ProducerRecord<>(topic, i, id, id));
          producer.commitTransaction();
          acked.add(id);
        }
      } catch (Exception e) {
        System.err.println("transaction failed (outcome unknown, not counted): " + e.getMessage());
        Thread.sleep(1000);
      }
    }
    Thread.sleep(20_000); // > transaction.timeout.ms of a transaction left open
    Properties c = (Properties) base.clone();
    c.put("isolation.level", "read_committed");
    c.put("key.deserializer", "org.apache.kafka.common.serialization.StringDeserializer");
    c.put("value.deserializer", "org.apache.kafka.common.serialization.StringDeserializer");
    Map<String, Integer> seen = new HashMap<>();
    try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(c)) {
      List<TopicPartition> tps = new ArrayList<>();
      for (int i = 0; i < 6; i++) tps.add(new TopicPartition(topic, i));
      consumer.assign(tps);
      consumer.seekToBeginning(tps);
      Map<TopicPartition, Long> ends = consumer.endOffsets(tps); // read_committed: the last stable offsets
      long deadline = System.currentTimeMillis() + 60_000;
      while (System.currentTimeMillis() < deadline) {
        for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) seen.merge(r.key(), 1, Integer::sum);
        boolean done = true;
        for (TopicPartition tp : tps) done &= consumer.position(tp) >= ends.get(tp);
        if (done) break;
      }
    }
    int lost = 0;
    for (String id : acked) {
      int copies = seen.getOrDefault(id, 0);
      if (copies != 6) {
        lost++;
        System.out.println("LOST: transaction " + id + " was acknowledged as committed; " + copies + " of its 6 records are visible");
      }
    }
    System.out.println(topic + ": " + acked.size() + " commits acknowledged, " + lost + " not visible to read_committed");
    System.exit(lost == 0 ? 0 : 1);
  }
}
