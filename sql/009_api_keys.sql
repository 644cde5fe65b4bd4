-- API keys for the management API: a long random secret shown once at creation, stored only as
-- its SHA-256 (the secret has 256 bits of entropy, so a slow hash would add nothing), with the
-- scopes it may use and optionally the one domain it is restricted to.  A key acts for its user
-- and never beyond that user's role.
CREATE TABLE api_keys (
    id              bigserial PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (name <> ''),
    -- The first characters of the secret, to recognise a key in lists and logs.
    prefix          text NOT NULL,
    secret_hash     bytea NOT NULL UNIQUE,
    scopes          text[] NOT NULL CHECK (cardinality(scopes) > 0),
    domain_id       bigint REFERENCES domains (id) ON DELETE CASCADE,
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);
