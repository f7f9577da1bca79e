//! What the relay's statements cost per batch, on the real PostgreSQL: the
//! buffers one claim and finish touch must follow the batch, not the table,
//! whatever sits in front of the backlog (100k dead rows) and whatever the
//! planner believes about it (no statistics, stale ones, plans made while the
//! table held ten rows). Measured with pg_stat_statements, which
//! `scripts/infra up` loads.

use outbox_relay::config::Settings;
use outbox_relay::store::{Outcome, Store};
use outbox_relay_support::*;

fn store_for(table: &str, mode: &str) -> Store {
    let env = [
        ("OUTBOX_RELAY__POSTGRES__URL", pg_url()),
        ("OUTBOX_RELAY__KAFKA__BROKERS", brokers()),
        ("OUTBOX_RELAY__OUTBOX__TABLE", table.to_string()),
        ("OUTBOX_RELAY__RELAY__ON_PUBLISH", mode.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    Store::new(&Settings::load_from(None, env).expect("settings")).expect("store")
}

/// Shared buffers (hit + read) of every statement on `table` so far, and their calls.
async fn buffers(db: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT coalesce(sum(shared_blks_hit + shared_blks_read), 0)::int8, coalesce(sum(calls), 0)::int8
             FROM pg_stat_statements WHERE query LIKE '%\"public\".\"' || $1 || '\"%'",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_stat_statements is needed (scripts/infra up loads it): {e}"));
    (row.get(0), row.get(1))
}

/// Claims and finishes batches of 100 until the outbox is empty; returns the
/// shared buffers per batch of all per-batch statements, after the first three
/// batches (start-up scans from the beginning of the index once).
async fn buffers_per_batch(mode: &str, dead_in_front: bool) -> f64 {
    let ob = Outbox::new("deadfront").await;
    let db = pg().await;
    // A snapshot older than the deletes: vacuum and index clean-up may not
    // remove what it can still see, as with a long report on a real database.
    let holder = pg().await;
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class").await.unwrap();
    let t = ob.qualified();
    if dead_in_front {
        db.batch_execute(&format!(
            "INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || (i % 100), '{{}}' FROM generate_series(1, 100000) i"
        ))
        .await
        .unwrap();
        let gone =
            if mode == "delete" { format!("DELETE FROM {t}") } else { format!("UPDATE {t} SET published_at = now()") };
        db.batch_execute(&gone).await.unwrap();
    }
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || (i % 100), '{{}}' FROM generate_series(1, 3000) i"
    ))
    .await
    .unwrap();
    let store = store_for(&ob.table, mode);
    let (mut before, mut batches) = ((0, 0), 0);
    loop {
        if batches == 3 {
            before = buffers(&db, &ob.table).await;
        }
        let Some(c) = store.claim(100, &[]).await.expect("claim") else { break };
        let outcomes = vec![Outcome::Delivered; c.events.len()];
        c.finish(&outcomes, 10).await.expect("finish");
        batches += 1;
    }
    let after = buffers(&db, &ob.table).await;
    assert_eq!(batches, 30, "3000 rows in batches of 100");
    drop(holder);
    (after.0 - before.0) as f64 / (batches - 3) as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn per_batch_queries_touch_no_more_buffers_with_100k_dead_rows_in_front() {
    for mode in ["delete", "mark"] {
        let clean = buffers_per_batch(mode, false).await;
        let dirty = buffers_per_batch(mode, true).await;
        eprintln!(
            "{mode}: shared buffers per batch of 100: {clean:.0} on a clean table, {dirty:.0} behind 100k dead rows"
        );
        // Walking the dead rows would cost ~1 buffer per dead entry, per batch.
        assert!(
            dirty <= clean * 1.5 + 50.0,
            "{mode}: per-batch cost grows with dead rows in front: {dirty:.0} vs {clean:.0} buffers per batch"
        );
    }
}

/// Claims and finishes 8 batches of 100 (the backlog must hold them); returns
/// the shared buffers per batch of all statements on `table` over the last 5
/// (the first ones may read from the start of the index once).
async fn buffers_per_batch_of_100(store: &Store, db: &tokio_postgres::Client, table: &str) -> f64 {
    let mut before = (0, 0);
    for batch in 0..8 {
        if batch == 3 {
            before = buffers(db, table).await;
        }
        let c = store.claim(100, &[]).await.expect("claim").expect("a batch");
        let outcomes = vec![Outcome::Delivered; c.events.len()];
        c.finish(&outcomes, 10).await.expect("finish");
    }
    let after = buffers(db, table).await;
    (after.0 - before.0) as f64 / 5.0
}

/// A table nobody has analyzed yet (a fresh outbox, a restored one, autovacuum
/// behind): without statistics the planner's choice for the claim was a bitmap
/// scan of the whole pending index and a sort of every pending row, on every
/// batch (one 500-row claim read 29k buffers behind a 200k backlog and took
/// 350 ms). The relay's sessions keep it on the pending index.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_on_a_never_analyzed_table_reads_only_the_head_of_the_backlog() {
    for mode in ["delete", "mark"] {
        let ob = Outbox::new("noanalyze").await;
        let db = pg().await;
        let t = ob.qualified();
        db.batch_execute(&format!(
            "ALTER TABLE {t} SET (autovacuum_enabled = off);
             INSERT INTO {t} (topic, key, payload)
             SELECT 't', 'key-' || (i % 1000), jsonb_build_object('i', i, 'pad', repeat('x', 1000))
             FROM generate_series(1, 200000) i"
        ))
        .await
        .unwrap();
        let never: (Option<std::time::SystemTime>, i64) = {
            let r = db
                .query_one(
                    "SELECT coalesce(last_analyze, last_autoanalyze),
                            (SELECT count(*) FROM pg_stats WHERE schemaname || '.' || tablename = $1::text)
                     FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
                    &[&t.replace('"', "")],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(never, (None, 0), "the table must have no statistics for this test");
        let pages: i64 = db.query_one(&format!("SELECT pg_relation_size('{t}') / 8192"), &[]).await.unwrap().get(0);
        let per_batch = buffers_per_batch_of_100(&store_for(&ob.table, mode), &db, &ob.table).await;
        eprintln!(
            "{mode}: {per_batch:.0} shared buffers per batch of 100 in front of a {pages}-page never analyzed backlog"
        );
        assert!(
            per_batch < 2000.0 && per_batch < pages as f64 / 4.0,
            "{mode}: a claim reads the whole backlog on a table without statistics: {per_batch:.0} buffers per batch of 100, table {pages} pages"
        );
    }
}

/// A table whose statistics say nothing is pending (analyzed while it held only
/// published rows, as a table keeping `relay.retention` of them is), then a
/// backlog arrives: the lookups of events waiting for a retry must not read the
/// pending index (they did, every row of it, twice per claim: mark-mode drains
/// next to 1.1M retained rows ran at a third of the rate of an empty table).
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_next_to_retained_rows_with_stale_statistics_reads_only_the_head_of_the_backlog() {
    let ob = Outbox::new("stalestats").await;
    let db = pg().await;
    let t = ob.qualified();
    db.batch_execute(&format!(
        "ALTER TABLE {t} SET (autovacuum_enabled = off);
         INSERT INTO {t} (topic, key, payload, published_at)
         SELECT 't', 'key-' || (i % 1000), '{{}}', now() - i * interval '1 second' FROM generate_series(1, 100000) i"
    ))
    .await
    .unwrap();
    db.batch_execute(&format!("VACUUM ANALYZE {t}")).await.unwrap();
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload)
         SELECT 't', 'key-' || (i % 1000), jsonb_build_object('pad', repeat('x', 1000)) FROM generate_series(1, 30000) i"
    ))
    .await
    .unwrap();
    let per_batch = buffers_per_batch_of_100(&store_for(&ob.table, "mark"), &db, &ob.table).await;
    eprintln!("{per_batch:.0} shared buffers per batch of 100 in front of a 30k backlog, 100k retained rows, stale statistics");
    assert!(
        per_batch < 3000.0,
        "a claim reads the whole backlog when statistics are stale: {per_batch:.0} buffers per batch of 100 (30k pending)"
    );
}

/// Plans made while the table was small must hold when a backlog arrives.
/// The relay's statements are prepared once per connection, and their generic
/// plan is made at the first run: here on a table of ten rows whose ready index
/// is bloated (as steady delete-mode churn leaves it) and whose pending key and
/// primary key indexes are not (rebuilt, as a fresh table's). Made there, the
/// claim and its probe read the key index whole and sorted every pending row,
/// and the delete (or mark) hashed the batch against a full scan of the primary
/// key index, on every batch once 30k events were waiting (the sustained
/// bench's delete-mode collapse, 2026-12-01).
#[tokio::test(flavor = "multi_thread")]
async fn plans_made_on_a_small_table_read_only_the_batch_when_a_backlog_arrives() {
    for mode in ["delete", "mark"] {
        let ob = Outbox::new("smallplans").await;
        let db = pg().await;
        let t = ob.qualified();
        for step in [
            format!("ALTER TABLE {t} SET (autovacuum_enabled = off)"),
            format!("INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || (i % 1000), '{{}}' FROM generate_series(1, 50000) i"),
            format!("DELETE FROM {t}"),
            format!("VACUUM {t}"),
            format!("REINDEX INDEX public.{}_pending_key_idx", ob.table),
            format!("REINDEX INDEX public.{}_pkey", ob.table),
            format!("INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || i, '{{}}' FROM generate_series(1, 10) i"),
            format!("ANALYZE {t}"),
        ] {
            db.batch_execute(&step).await.unwrap();
        }
        let store = store_for(&ob.table, mode);
        // The first batch makes the plans, on the small table.
        let c = store.claim(100, &[]).await.expect("claim").expect("the ten rows");
        let outcomes = vec![Outcome::Delivered; c.events.len()];
        c.finish(&outcomes, 10).await.expect("finish");
        db.batch_execute(&format!(
            "INSERT INTO {t} (topic, key, payload)
             SELECT 't', 'key-' || (i % 1000), jsonb_build_object('pad', repeat('x', 1000)) FROM generate_series(1, 30000) i"
        ))
        .await
        .unwrap();
        let per_batch = buffers_per_batch_of_100(&store, &db, &ob.table).await;
        eprintln!(
            "{mode}: {per_batch:.0} shared buffers per batch of 100 in front of a 30k backlog, plans made at 10 rows"
        );
        assert!(
            per_batch < 3000.0,
            "{mode}: plans made on a small table read the backlog: {per_batch:.0} buffers per batch of 100 (30k pending)"
        );
    }
}

/// Pipelining: the next claim, made while this relay's previous batch is in
/// flight (`own`), starts its main scan after that batch instead of stepping
/// over each of its locked rows (a heap fetch and a lock test per row, a
/// quarter of a 500-row claim). The order check still reads from the floor.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_beside_its_own_batch_in_flight_does_not_scan_that_batch_again() {
    let ob = Outbox::new("pipelined").await;
    let db = pg().await;
    let t = ob.qualified();
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || (i % 1000), '{{}}' FROM generate_series(1, 3000) i"
    ))
    .await
    .unwrap();
    let store = store_for(&ob.table, "delete");
    // Warm up the statement and its plan.
    let c = store.claim(500, &[]).await.unwrap().expect("a batch");
    let n = c.events.len();
    c.finish(&vec![Outcome::Delivered; n], 10).await.unwrap();
    let (b0, _) = claim_stats(&db, &ob.table).await;
    let first = store.claim(500, &[]).await.unwrap().expect("a batch");
    let (b1, _) = claim_stats(&db, &ob.table).await;
    let own: Vec<uuid::Uuid> = first.events.iter().map(|e| e.id).collect();
    let second = store.claim(500, &own).await.unwrap().expect("a second batch beside the first");
    let (b2, _) = claim_stats(&db, &ob.table).await;
    assert_eq!(second.events.len(), 500);
    assert!(second.events[0].seq > first.events[499].seq, "the second batch follows the first");
    let (alone, beside) = (b1 - b0, b2 - b1);
    eprintln!("claim buffers: {alone} alone, {beside} beside the batch in flight");
    // Beside the batch the fence reads its 500 rows once more (they lie
    // between the floor and the new batch); the main scan must not as well.
    assert!(
        (beside as f64) < 1.5 * alone as f64,
        "the claim beside its own batch in flight read {beside} buffers, against {alone} alone"
    );
    first.finish(&vec![Outcome::Delivered; 500], 10).await.unwrap();
    second.finish(&vec![Outcome::Delivered; 500], 10).await.unwrap();
}

/// A row the jump above passes (another session held it during the first
/// claim, then let go) is taken by the claim after, and no later row of its
/// key goes before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_let_go_inside_the_batch_in_flight_is_claimed_next_in_key_order() {
    let ob = Outbox::new("letgo").await;
    let db = pg().await;
    let t = ob.qualified();
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload) SELECT 't', 'key-' || (i % 50), '{{}}' FROM generate_series(1, 1000) i"
    ))
    .await
    .unwrap();
    let (min, key): (i64, String) = {
        let r = db.query_one(&format!("SELECT seq, key FROM {t} ORDER BY seq OFFSET 100 LIMIT 1"), &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    let store = store_for(&ob.table, "delete");
    let other = pg().await;
    other.batch_execute(&format!("BEGIN; SELECT 1 FROM {t} WHERE seq = {min} FOR UPDATE")).await.unwrap();
    let first = store.claim(200, &[]).await.unwrap().expect("a batch");
    assert!(first.events.iter().all(|e| e.seq != min), "another session holds it");
    other.batch_execute("ROLLBACK").await.unwrap();
    // The first claim deferred the key's later rows and left the key out of
    // claims for 500 ms (skip.rs); past that, it may be claimed again.
    let left_out = std::time::Duration::from_millis(600);
    tokio::time::sleep(left_out).await;
    let own: Vec<uuid::Uuid> = first.events.iter().map(|e| e.id).collect();
    let second = store.claim(200, &own).await.unwrap().expect("a second batch");
    let n = first.events.len();
    first.finish(&vec![Outcome::Delivered; n], 10).await.unwrap();
    tokio::time::sleep(left_out).await;
    let own: Vec<uuid::Uuid> = second.events.iter().map(|e| e.id).collect();
    let third = store.claim(200, &own).await.unwrap().expect("a third batch");
    // In claim order, the key's events from the let-go row on: it comes first.
    let of_key: Vec<i64> = second
        .events
        .iter()
        .chain(&third.events)
        .filter(|e| e.key.as_deref() == Some(key.as_str()) && e.seq >= min)
        .map(|e| e.seq)
        .collect();
    assert_eq!(of_key.first(), Some(&min), "the let-go row is not the next of its key claimed: {of_key:?}");
    let n = second.events.len();
    second.finish(&vec![Outcome::Delivered; n], 10).await.unwrap();
    let n = third.events.len();
    third.finish(&vec![Outcome::Delivered; n], 10).await.unwrap();
}
