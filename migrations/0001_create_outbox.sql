-- outbox-relay migration 0001: the outbox table.
--
-- Plain SQL for the default table public.outbox: copy it into Flyway, Liquibase,
-- sqlx, refinery, Rails, Alembic... as it is. For another table name, print the
-- rendered SQL with `outbox-relay migrate --print` (it renames public.outbox and
-- every outbox_* object below). Safe to run twice.

CREATE TABLE IF NOT EXISTS public.outbox (
    -- Event ID, sent as the Kafka header `event_id`: the consumers' dedup key.
    -- The application may set it (e.g. an idempotency key it already has).
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Relay order. Per key, the relay publishes in seq order.
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    -- Destination Kafka topic.
    topic        text        NOT NULL,
    -- Kafka message key (partitioning and per-key order). NULL: no key.
    key          text,
    -- Message value, sent as stored. NULL: tombstone (null-value message).
    -- May be changed to bytea or text for Avro/Protobuf/other encodings.
    payload      jsonb,
    -- Kafka headers, a JSON object of string -> string (e.g. traceparent).
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Permanent-failure bookkeeping, maintained by the relay.
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    -- State: pending (both NULL), published, or parked (failed permanently).
    published_at timestamptz,
    parked_at    timestamptz
);

-- High churn: let autovacuum keep up so the pending index stays small.
ALTER TABLE public.outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim query reads only this index: its size tracks the backlog, not the table.
CREATE INDEX IF NOT EXISTS outbox_pending_idx
    ON public.outbox (seq)
    WHERE published_at IS NULL AND parked_at IS NULL;

-- Retention clean-up and status over published rows.
CREATE INDEX IF NOT EXISTS outbox_published_idx
    ON public.outbox (published_at)
    WHERE published_at IS NOT NULL;

-- Operators list and replay parked rows.
CREATE INDEX IF NOT EXISTS outbox_parked_idx
    ON public.outbox (parked_at)
    WHERE parked_at IS NOT NULL;

-- Wake the relay at commit instead of waiting for its next poll. Statement-level:
-- one notification per INSERT statement, and Postgres folds duplicates within a
-- transaction, so a bulk insert costs one NOTIFY.
CREATE OR REPLACE FUNCTION public.outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('public.outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_notify ON public.outbox;
CREATE TRIGGER outbox_notify
    AFTER INSERT ON public.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_notify();
