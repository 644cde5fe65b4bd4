-- Webhook delivery: every attempt recorded (listed over the API), the secret of a rotation
-- kept for its overlap, and a lease on each delivery so that several dispatchers share them.
CREATE TABLE webhook_attempts (
    id              bigserial PRIMARY KEY,
    delivery_id     bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    status          integer,            -- the HTTP status; NULL when there was no answer
    error           text,
    latency_ms      integer NOT NULL,
    response        text                -- the start of the answer's body
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

ALTER TABLE webhooks
    ADD COLUMN previous_secret text,
    ADD COLUMN previous_secret_expires_at timestamptz;

CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
CREATE INDEX webhook_deliveries_leases ON webhook_deliveries (lease_expires_at)
    WHERE status = 'delivering';
