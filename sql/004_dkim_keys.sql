-- DKIM signing keys per hosted domain (RFC 6376; Ed25519 per RFC 8463).  The private key is
-- stored encrypted (AES-256-GCM, key from security.dkim.secret_file); the public key is what
-- the domain publishes at <selector>._domainkey.<domain>.
CREATE TABLE dkim_keys (
    id              bigserial PRIMARY KEY,
    domain_id       bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    selector        text NOT NULL CHECK (selector ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$'),
    algorithm       text NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    private_key     bytea NOT NULL,   -- nonce || AES-GCM ciphertext of the key
    public_key      text NOT NULL,    -- the p= value, base64
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, selector)
);
