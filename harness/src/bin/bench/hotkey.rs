//! `hotkey`: 3 relays, one key with a large backlog, other keys at 1k ev/s.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct HotKey {
    pub(crate) relays: usize,
    pub(crate) backlog: i64,
    pub(crate) other_rate: u64,
    pub(crate) other_keys_commit_to_ack_ms: Quantiles,
    pub(crate) hot_key_drained_s: f64,
}

pub(crate) async fn hotkey(env: &Env, args: &Args) -> HotKey {
    let backlog = 10_000;
    let table = env.new_table("hot");
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    db.execute(
        &format!(
            "INSERT INTO public.{table} (topic, key, payload)
             SELECT $1, 'hot-key', jsonb_build_object('ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8, 'pad', repeat('x', {PAD}))
             FROM generate_series(1, $2::int)"
        ),
        &[&topics[0], &(backlog as i32)],
    )
    .await
    .expect("hot backlog");
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let writers = env.writers(&table, topics, 4, 1000);
    let t0 = Instant::now();
    let relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            let mut s = args.relay_settings("mark", "at-least-once", &table);
            s.push(("OUTBOX_RELAY__RELAY__ID".into(), format!("{table}-{i}")));
            s.push(("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), "500".into()));
            spawn_relay(env, &table, &s)
        })
        .collect();
    let mut hot_done = None;
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if hot_done.is_none() {
            let left: i64 = db
                .query_one(
                    &format!("SELECT count(*) FROM public.{table} WHERE key = 'hot-key' AND published_at IS NULL"),
                    &[],
                )
                .await
                .expect("hot left")
                .get(0);
            if left == 0 {
                hot_done = Some(t0.elapsed().as_secs_f64());
            }
        }
    }
    let written = writers.finish().await;
    consumer.wait_for(written as usize + backlog as usize, Duration::from_secs(30));
    let seen = consumer.finish();
    for r in relays {
        r.stop(Duration::from_secs(30));
    }
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let others: Vec<Timed> = seen.into_iter().filter(|s| !s.hot).collect();
    HotKey {
        relays: 3,
        backlog,
        other_rate: 1000,
        other_keys_commit_to_ack_ms: quantiles(insert_to_ack_ms(&others)),
        hot_key_drained_s: hot_done.unwrap_or(f64::NAN),
    }
}
