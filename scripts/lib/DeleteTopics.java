// Deletes the topics that tests, benchmarks and chaos runs left on the local
// broker (scripts/infra clean). Keeps Kafka's own (__*) and the names given.
//   java -cp "$KAFKA_LIBS/*" DeleteTopics.java <bootstrap> [keep...]
import org.apache.kafka.clients.admin.Admin;
import java.util.*;

public class DeleteTopics {
  public static void main(String[] args) throws Exception {
    Properties p = new Properties();
    p.put("bootstrap.servers", args[0]);
    Set<String> keep = new HashSet<>(Arrays.asList(args).subList(1, args.length));
    try (Admin admin = Admin.create(p)) {
      List<String> gone = new ArrayList<>();
      for (String t : admin.listTopics().names().get()) {
        if (!t.startsWith("__") && !keep.contains(t)) gone.add(t);
      }
      if (!gone.isEmpty()) admin.deleteTopics(gone).all().get();
      System.out.println(gone.size());
    }
  }
}
