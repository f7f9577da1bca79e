-- outbox-relay: no-transaction
-- outbox-relay migration 0005: two optional columns the application may set,
-- `partition` and `deliver_after`, and the indexes that keep delayed events off
-- the claim's path.
--
-- Run it OUTSIDE a transaction (it builds indexes CONCURRENTLY, so inserts are
-- never blocked): Flyway executeInTransaction=false, Liquibase
-- runInTransaction:false, sqlx/refinery "no transaction"; `outbox-relay
-- migrate` does it by itself. Safe to run twice. Adding the columns is a
-- catalog change only (no default, no rewrite); it waits for a brief table
-- lock, which `outbox-relay migrate` bounds to 2 s and retries.
--
-- partition: the Kafka partition to write the event to. NULL (the default):
-- the message key decides, as before. Per-key order holds per partition: the
-- events of one key that name the same partition reach it in seq order. A
-- partition the topic does not have is a permanent rejection: the event is
-- retried relay.max_attempts times, then parked with the broker's error.
--
-- deliver_after: do not publish the event before this time. NULL (the
-- default): publish at once. Per-key order still holds: a later event of the
-- same key waits behind a delayed one, however long.
--
-- Upgrading: apply this migration, upgrade every relay to 0.3 or later, and
-- only then write deliver_after or partition. A relay before 0.3 ignores both
-- columns: it would publish a delayed event at once.
--
-- The relay's message timestamp comes from created_at by default
-- (relay.message_timestamp = "created_at"; "send_time" leaves it to the
-- producer's clock, and a topic with message.timestamp.type=LogAppendTime uses
-- the broker's either way).
ALTER TABLE public.outbox
    ADD COLUMN IF NOT EXISTS deliver_after timestamptz,
    ADD COLUMN IF NOT EXISTS "partition" integer;

-- Events ready to go (pending, not waiting for a retry or for deliver_after),
-- in seq order: what the claim scans from its floor. Delayed events stay out
-- of it, so a million events waiting in the future cost the claim nothing.
-- The condition is worded like 0004's on purpose (the relay's lookups use the
-- same words, and only this index's condition matches them). It costs one
-- more index entry per inserted event, like 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_ready_idx
    ON public.outbox (seq)
    WHERE deliver_after IS NULL AND retry_at IS NULL AND coalesce(published_at, parked_at) IS NULL;

-- Delayed events only (no entry for an event without deliver_after): by key,
-- for the per-key order check (a delayed event holds back its key's later
-- events), and by time, to claim those whose time has come.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_delayed_key_idx
    ON public.outbox (key, seq)
    WHERE deliver_after IS NOT NULL AND retry_at IS NULL AND coalesce(published_at, parked_at) IS NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_delayed_due_idx
    ON public.outbox (deliver_after)
    WHERE deliver_after IS NOT NULL AND retry_at IS NULL AND coalesce(published_at, parked_at) IS NULL;
