-- Token buckets of the ratelimit filter, shared by every node: one row per key (client
-- address, sender, user or recipient domain with its kind as prefix).  A bucket holds up to
-- its limit's count of tokens and refills at count/seconds per second; a message takes one.
CREATE TABLE rate_buckets (
    key         text PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rate_buckets_updated_at ON rate_buckets (updated_at);
