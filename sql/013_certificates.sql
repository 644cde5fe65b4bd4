-- TLS certificates served by every node (chosen by SNI), their ACME accounts and the HTTP-01
-- challenges any node answers.  Private keys are sealed (AES-256-GCM, the secret file that
-- seals DKIM keys); the chain is public.
CREATE TABLE certificates (
    id                  bigserial PRIMARY KEY,
    -- The names it is for (the first one names it); an ACME certificate is renewed for these.
    names               text[] NOT NULL CHECK (cardinality(names) > 0),
    domain_id           bigint REFERENCES domains (id) ON DELETE SET NULL,
    source              text NOT NULL CHECK (source IN ('acme', 'file')),
    provider            text,               -- the ACME provider's name in the configuration
    -- The certificate in service (NULL until the first issuance succeeds).
    chain_pem           text,
    key_sealed          bytea,
    not_before          timestamptz,
    not_after           timestamptz,
    issuer              text,
    serial              text,
    -- Renewal: when to try next, and what the last failure was.
    renew_at            timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    failures            integer NOT NULL DEFAULT 0,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX certificates_names ON certificates (names);
CREATE INDEX certificates_due ON certificates (next_attempt_at) WHERE source = 'acme';

CREATE TABLE acme_accounts (
    id                  bigserial PRIMARY KEY,
    directory_url       text NOT NULL UNIQUE,
    key_sealed          bytea NOT NULL,
    account_url         text NOT NULL,
    contact             text,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE acme_challenges (
    token               text PRIMARY KEY,
    key_authorization   text NOT NULL,
    name                text NOT NULL,
    expires_at          timestamptz NOT NULL
);
