-- outbox-relay: no-transaction
-- outbox-relay migration 0004: the per-key order check reads only the keys of
-- the batch, so a hot key's backlog costs nothing to the claims of other keys.
--
-- Run it OUTSIDE a transaction (it builds an index CONCURRENTLY, so inserts
-- are never blocked): Flyway executeInTransaction=false, Liquibase
-- runInTransaction:false, sqlx/refinery "no transaction"; `outbox-relay
-- migrate` does it by itself. Safe to run twice.
--
-- With several relays, a claim checks for each key of its batch whether an
-- earlier event of that key is pending elsewhere (another relay holds it, or it
-- waits for a retry). Without this index that check read the pending index in
-- seq order from the relay's floor to the end of its batch: every event of a
-- hot key whose head another relay holds sat in that range, so each claim of
-- every other relay grew with the hot key's backlog (100k events: a walk of
-- 100k entries per claim). With it the check is one short range per key.
--
-- It costs one more index entry per inserted event (the key and a bigint). It
-- holds pending rows only: published and parked rows leave it, so it stays as
-- small as the backlog (plus dead entries until vacuum). Relays of an earlier
-- version ignore it; later relays work without it (`check` warns), with
-- the cost above.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_pending_key_idx
    ON public.outbox (key, seq)
    WHERE published_at IS NULL AND parked_at IS NULL;
