-- A least-privilege login role for outbox-relay on the default table public.outbox.
-- Run as the table owner (or a superuser) after the migrations; set a real
-- password (or use certificate / IAM auth) and keep it out of version control.
--
-- The relay reads pending rows, marks or deletes them, and parks failures:
--   SELECT, UPDATE, DELETE on the outbox table; USAGE on its schema.
-- It never inserts (the application does), so it needs no INSERT and cannot
-- take sequence values. SELECT on the identity sequence lets it read the
-- sequence's last value: it then notices a setval() to a lower value at once
-- (without it, only the periodic sweep finds the rows below its floor; a
-- restarted sequence, a failover and a recovery are noticed either way). LISTEN
-- needs no grant. `outbox-relay migrate` needs
-- DDL rights: run it with your migration role, not with this one.
-- `outbox-relay check` reports any of these grants that is missing.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay LOGIN PASSWORD 'change-me' NOINHERIT;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT, UPDATE, DELETE ON public.outbox TO outbox_relay;
GRANT SELECT ON SEQUENCE public.outbox_seq_seq TO outbox_relay;

-- Applications that write events need only INSERT:
--   GRANT INSERT ON public.outbox TO app_role;
