-- outbox-relay migration 0003: the application's commits no longer NOTIFY.
--
-- Migration 0001 installed a statement-level trigger that ran pg_notify() in
-- every transaction that wrote an event. PostgreSQL serialises the commits of
-- all transactions that notified: each takes the database-wide notification
-- queue lock at commit and holds it until its commit record is flushed, so group
-- commit stops working. Measured with pgbench, 16 clients, synchronous_commit =
-- on, one business row plus one event per transaction: ~330 tps with the trigger
-- against ~1330 tps without it.
--
-- Relays from 0.2 on find new events with a cheap look at the pending index's
-- head instead, at an interval that adapts to how long the outbox has been
-- empty (relay.poll_interval bounds it); a busy relay never waits. Relays of an
-- earlier version keep working after this migration: they fall back to polling
-- every relay.poll_interval (1 s by default there). Safe to run twice.

DROP TRIGGER IF EXISTS outbox_notify ON public.outbox;
DROP FUNCTION IF EXISTS public.outbox_notify();
