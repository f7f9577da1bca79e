//! `ceilings`: the SQL-only and store-path drain ceilings (no Kafka).

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Ceilings {
    pub(crate) mode: String,
    pub(crate) sql_only_events_per_s: f64,
    pub(crate) store_path_events_per_s: f64,
    pub(crate) store_path_fraction: f64,
}

/// SQL-only: a stored procedure claims the same rows with the same query
/// shape and deletes/marks them, committing per batch; no rows leave the server.
pub(crate) async fn sql_only(env: &Env, args: &Args, mode: &str) -> f64 {
    let n = args.events;
    let table = env.new_table("sql");
    preload(env, &table, "sql", n).await;
    let db = env.db().await;
    db.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    let action = if mode == "delete" {
        format!("DELETE FROM public.{table} o USING c WHERE o.id = c.id")
    } else {
        format!("UPDATE public.{table} o SET published_at = now() FROM c WHERE o.id = c.id")
    };
    db.batch_execute(&format!(
        "CREATE OR REPLACE PROCEDURE public.{table}_drain(batch int) LANGUAGE plpgsql AS $$
         DECLARE n int;
         BEGIN
           LOOP
             WITH c AS (
               SELECT id FROM public.{table}
               WHERE published_at IS NULL AND parked_at IS NULL AND retry_at IS NULL
               ORDER BY seq LIMIT batch FOR UPDATE SKIP LOCKED)
             {action};
             GET DIAGNOSTICS n = ROW_COUNT;
             COMMIT;
             EXIT WHEN n = 0;
           END LOOP;
         END $$;"
    ))
    .await
    .expect("procedure");
    let t = Instant::now();
    db.execute(&format!("CALL public.{table}_drain($1)"), &[&(args.batch_size as i32)]).await.expect("call");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    db.batch_execute(&format!("DROP TABLE public.{table}; DROP PROCEDURE public.{table}_drain")).await.ok();
    rate
}

/// The relay's own Postgres work with no Kafka: `Store::claim` (row locks, the
/// per-key fence, the floor probe) and `Claimed::finish`, pipelined on two
/// connections like the relay, rows shipped to this client.
pub(crate) async fn store_path(env: &Env, args: &Args, mode: &str) -> f64 {
    use outbox_relay::store::{Claimed, Outcome, Store};
    let n = args.events;
    let table = env.new_table("store");
    preload(env, &table, "store", n).await;
    env.db().await.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    let s = outbox_relay::config::Settings::load_from(
        None,
        [
            ("OUTBOX_RELAY__POSTGRES__URL", env.pg_url.as_str()),
            ("OUTBOX_RELAY__KAFKA__BROKERS", env.brokers.as_str()),
            ("OUTBOX_RELAY__OUTBOX__TABLE", table.as_str()),
            ("OUTBOX_RELAY__RELAY__ON_PUBLISH", mode),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("settings");
    let store = Store::new(&s).expect("store");
    let finish = |c: Option<Claimed>| async move {
        if let Some(c) = c {
            let outcomes: Vec<Outcome> = c.events.iter().map(|_| Outcome::Delivered).collect();
            c.finish(&outcomes, 10).await.expect("finish");
        }
    };
    let t = Instant::now();
    let mut in_flight: Option<Claimed> = None;
    loop {
        let own: Vec<uuid::Uuid> = in_flight.iter().flat_map(|c| c.events.iter().map(|e| e.id)).collect();
        let (next, ()) = tokio::join!(store.claim(args.batch_size, &own), finish(in_flight.take()));
        match next.expect("claim") {
            Some(c) => in_flight = Some(c),
            None => break,
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    rate
}

pub(crate) fn print_ceilings(ceilings: &[Ceilings], batch_size: usize) {
    println!();
    println!("ceilings on a vacuumed table (batch {batch_size}): SQL-only = a stored procedure doing the same claims and deletes/marks, no rows leave the server; store path = the relay's own Postgres work (claim with fence and floor probe, finish), pipelined, no Kafka");
    println!("  mode   │ SQL-only ev/s │ store path ev/s │ store path / SQL-only");
    for c in ceilings {
        println!(
            "  {:<6} │ {:>13.0} │ {:>15.0} │ {:>20.0}%",
            c.mode,
            c.sql_only_events_per_s,
            c.store_path_events_per_s,
            c.store_path_fraction * 100.0
        );
    }
}
