-- Outbound delivery: what a delivery attempt learnt per recipient, and the suppression list of
-- addresses that bounced hard (a hosted domain's mail to them is refused at submission).

ALTER TABLE queue_recipients
    ADD COLUMN status_code text,   -- RFC 3463 enhanced status of the last attempt, e.g. 5.1.1
    ADD COLUMN remote_mta  text;   -- the host that answered last

CREATE TABLE suppressions (
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    address     text NOT NULL CHECK (address = lower(address) AND address LIKE '%_@_%'),
    reason      text NOT NULL,     -- the remote's reply, e.g. '550 5.1.1 no such user'
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain_id, address)
);

-- queue.expires_at is not used: how long a message may stay queued is server.outbound's
-- max_queue_time, counted from the row's created_at.
