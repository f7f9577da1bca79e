-- outbox-relay: no-transaction
-- outbox-relay migration 0003: the application's commits no longer NOTIFY, and
-- retries due now are found without touching the pending index.
--
-- Run it OUTSIDE a transaction (it builds an index CONCURRENTLY, so inserts
-- are never blocked): Flyway executeInTransaction=false, Liquibase
-- runInTransaction:false, sqlx/refinery "no transaction"; `outbox-relay
-- migrate` does it by itself. Safe to run twice.
--
-- 1. Migration 0001 installed a statement-level trigger that ran pg_notify() in
-- every transaction that wrote an event. PostgreSQL serialises the commits of
-- all transactions that notified: each takes the database-wide notification
-- queue lock at commit and holds it until its commit record is flushed, so group
-- commit stops working. Measured with pgbench, 16 clients, synchronous_commit =
-- on, one business row plus one event per transaction: ~330 tps with the trigger
-- against ~1330 tps without it. Relays from 0.2 on find new events with a cheap
-- look at the pending index from their floor instead, at an interval that adapts
-- to how long the outbox has been empty (relay.poll_interval bounds it); a busy
-- relay never waits. Relays of an earlier version keep working after this
-- migration: they fall back to polling every relay.poll_interval (1 s there).
DROP TRIGGER IF EXISTS outbox_notify ON public.outbox;
DROP FUNCTION IF EXISTS public.outbox_notify();

-- 2. Events waiting for a retry, ordered by when they are due: a claim reads the
-- ones due now through this small index and never the pending index below its
-- floor (where dead entries of published events wait for vacuum). Its condition
-- is written with coalesce() on purpose: the relay's lookups of waiting events
-- use the same words, which the pending index's condition does not match, so
-- the planner cannot read the whole pending index for them when its statistics
-- are stale (analyzed while nothing was pending, as in a table of retained
-- published rows).
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_retry_due_idx
    ON public.outbox (retry_at)
    WHERE retry_at IS NOT NULL AND coalesce(published_at, parked_at) IS NULL;
