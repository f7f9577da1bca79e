-- outbox-relay migration 0002: back-off between attempts of a failing event.
--
-- An event Kafka rejects for good is retried after an exponentially growing
-- delay (relay.retry_backoff, doubling, at most 5 minutes) instead of at once;
-- retry_at says when. Until then later events of the same key wait too, so the
-- key keeps its order while the event is retried; other keys flow on. The index
-- holds only waiting rows, so it stays tiny.

ALTER TABLE public.outbox ADD COLUMN IF NOT EXISTS retry_at timestamptz;

CREATE INDEX IF NOT EXISTS outbox_retry_idx
    ON public.outbox (key, seq)
    WHERE retry_at IS NOT NULL AND published_at IS NULL AND parked_at IS NULL;
