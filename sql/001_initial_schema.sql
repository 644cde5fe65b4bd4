-- ESP initial schema.  Never edit this file once it has landed: add sql/002_*.sql instead.
-- Addresses and domain names are stored lower-cased (domains as IDNA A-labels); the code
-- normalises them before they reach SQL, and CHECK constraints keep that true.

CREATE TABLE domains (
    id                  bigserial PRIMARY KEY,
    name                text NOT NULL UNIQUE CHECK (name = lower(name) AND name <> ''),
    enabled             boolean NOT NULL DEFAULT true,
    -- Defaults for new users of the domain; NULL means unlimited.
    default_quota_bytes bigint CHECK (default_quota_bytes >= 0),
    max_users           integer CHECK (max_users >= 0),
    settings            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id              bigserial PRIMARY KEY,
    domain_id       bigint NOT NULL REFERENCES domains (id) ON DELETE RESTRICT,
    localpart       text NOT NULL CHECK (localpart = lower(localpart) AND localpart <> ''),
    password_hash   text NOT NULL,
    display_name    text NOT NULL DEFAULT '',
    role            text NOT NULL DEFAULT 'user'
                    CHECK (role IN ('user', 'domain_admin', 'superadmin')),
    enabled         boolean NOT NULL DEFAULT true,
    -- Maildir directory relative to the Maildir root, fixed when the user is created.
    maildir         text NOT NULL UNIQUE,
    -- RFC 9208 QUOTA: STORAGE (bytes) and MESSAGE resources; NULL means unlimited.
    quota_bytes     bigint CHECK (quota_bytes >= 0),
    quota_messages  bigint CHECK (quota_messages >= 0),
    used_bytes      bigint NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    used_messages   bigint NOT NULL DEFAULT 0 CHECK (used_messages >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_login_at   timestamptz,
    UNIQUE (domain_id, localpart)
);

-- localpart '' is the domain's catch-all (written @example.test), used only when the address
-- is neither a user nor an alias.  destination is a full address, local or external.
CREATE TABLE aliases (
    id          bigserial PRIMARY KEY,
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    localpart   text NOT NULL CHECK (localpart = lower(localpart)),
    destination text NOT NULL CHECK (destination = lower(destination) AND destination LIKE '%_@_%'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, localpart, destination)
);
CREATE INDEX aliases_destination ON aliases (destination);

-- RFC 3501 §2.3.1.1: a mailbox re-created under an old name must get a greater UIDVALIDITY,
-- so values come from one sequence that starts at the time the schema was made.
CREATE SEQUENCE uidvalidity_seq MAXVALUE 4294967295;
SELECT setval('uidvalidity_seq', extract(epoch FROM now())::bigint);

CREATE TABLE mailboxes (
    id              bigserial PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- IMAP name in UTF-8 with '/' as the hierarchy delimiter; INBOX is always 'INBOX'.
    name            text NOT NULL CHECK (name <> ''),
    -- RFC 6154 attribute, e.g. '\Sent'; at most one mailbox per user for each.
    special_use     text CHECK (special_use IN
                        ('\All', '\Archive', '\Drafts', '\Flagged', '\Junk', '\Sent', '\Trash')),
    -- Maildir++ folder directory below the user's Maildir ('' is INBOX), fixed at creation and
    -- never derived from a client's name at read time.
    folder          text NOT NULL,
    subscribed      boolean NOT NULL DEFAULT true,
    uidvalidity     bigint NOT NULL DEFAULT nextval('uidvalidity_seq')
                    CHECK (uidvalidity > 0 AND uidvalidity < 4294967296),
    uidnext         bigint NOT NULL DEFAULT 1 CHECK (uidnext > 0),
    -- RFC 7162 CONDSTORE: every change to the mailbox takes highestmodseq + 1.
    highestmodseq   bigint NOT NULL DEFAULT 1 CHECK (highestmodseq > 0),
    message_count   bigint NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    unseen_count    bigint NOT NULL DEFAULT 0 CHECK (unseen_count >= 0),
    total_bytes     bigint NOT NULL DEFAULT 0 CHECK (total_bytes >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name),
    UNIQUE (user_id, folder)
);
CREATE UNIQUE INDEX mailboxes_special_use ON mailboxes (user_id, special_use)
    WHERE special_use IS NOT NULL;

CREATE TABLE messages (
    id              bigserial PRIMARY KEY,
    mailbox_id      bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    uid             bigint NOT NULL CHECK (uid > 0 AND uid < 4294967296),
    modseq          bigint NOT NULL CHECK (modseq > 0),
    -- Maildir base name (without the ':2,' info suffix) inside the mailbox's folder.
    filename        text NOT NULL,
    size            bigint NOT NULL CHECK (size >= 0),
    internal_date   timestamptz NOT NULL DEFAULT now(),
    seen            boolean NOT NULL DEFAULT false,
    answered        boolean NOT NULL DEFAULT false,
    flagged         boolean NOT NULL DEFAULT false,
    deleted         boolean NOT NULL DEFAULT false,
    draft           boolean NOT NULL DEFAULT false,
    keywords        text[] NOT NULL DEFAULT '{}',
    -- Envelope as received (SMTP) and search columns taken from the header once, at delivery.
    envelope_from   text,
    envelope_to     text[] NOT NULL DEFAULT '{}',
    message_id      text,
    in_reply_to     text,
    subject         text,
    from_header     text,
    to_header       text,
    cc_header       text,
    bcc_header      text,
    sent_date       timestamptz,
    headers         text,
    -- Cached IMAP structures (ENVELOPE, BODYSTRUCTURE), filled when first computed.
    envelope        jsonb,
    bodystructure   jsonb,
    body_tsv        tsvector,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox_id, uid),
    -- One row per body file: re-indexing and concurrent nodes cannot record a file twice.
    UNIQUE (mailbox_id, filename)
);
CREATE INDEX messages_mailbox_modseq ON messages (mailbox_id, modseq);
CREATE INDEX messages_mailbox_internal_date ON messages (mailbox_id, internal_date);
CREATE INDEX messages_mailbox_sent_date ON messages (mailbox_id, sent_date);
CREATE INDEX messages_mailbox_unseen ON messages (mailbox_id, uid) WHERE NOT seen;
CREATE INDEX messages_body_tsv ON messages USING gin (body_tsv);

-- RFC 7162 QRESYNC / CONDSTORE: what was expunged, and at which modseq.
CREATE TABLE mailbox_expunges (
    mailbox_id  bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    uid         bigint NOT NULL,
    modseq      bigint NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
);
CREATE INDEX mailbox_expunges_modseq ON mailbox_expunges (mailbox_id, modseq);

-- Outbound: one spooled message, then one queue row per recipient domain, then its recipients.
-- The spool file is deleted when the message has no queue rows left.
CREATE TABLE outbound_messages (
    id          bigserial PRIMARY KEY,
    spool_name  text NOT NULL UNIQUE,
    sender      text NOT NULL,  -- '' is the null reverse-path
    size        bigint NOT NULL CHECK (size >= 0),
    user_id     bigint REFERENCES users (id) ON DELETE SET NULL,
    envid       text,           -- RFC 3461 ENVID
    ret         text CHECK (ret IN ('FULL', 'HDRS')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE queue (
    id                  bigserial PRIMARY KEY,
    message_id          bigint NOT NULL REFERENCES outbound_messages (id) ON DELETE CASCADE,
    recipient_domain    text NOT NULL,
    status              text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'delivering', 'sent', 'bounced', 'deleted')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    lease_owner         text,
    lease_expires_at    timestamptz,
    expires_at          timestamptz NOT NULL DEFAULT now() + interval '5 days',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_due ON queue (next_attempt_at) WHERE status = 'queued';
CREATE INDEX queue_leases ON queue (lease_expires_at) WHERE status = 'delivering';
CREATE INDEX queue_message ON queue (message_id);

CREATE TABLE queue_recipients (
    queue_id    bigint NOT NULL REFERENCES queue (id) ON DELETE CASCADE,
    address     text NOT NULL,
    status      text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'sent', 'deferred', 'bounced')),
    notify      text,           -- RFC 3461 NOTIFY
    orcpt       text,           -- RFC 3461 ORCPT
    last_code   integer,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, address)
);

-- Per-user rules and per-domain filter settings: exactly one of user_id / domain_id, or
-- neither for a server-wide rule.
CREATE TABLE filter_rules (
    id          bigserial PRIMARY KEY,
    domain_id   bigint REFERENCES domains (id) ON DELETE CASCADE,
    user_id     bigint REFERENCES users (id) ON DELETE CASCADE,
    name        text NOT NULL,
    priority    integer NOT NULL DEFAULT 0,
    enabled     boolean NOT NULL DEFAULT true,
    conditions  jsonb NOT NULL DEFAULT '[]'::jsonb,
    actions     jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (domain_id IS NULL OR user_id IS NULL)
);

CREATE TABLE webhooks (
    id                      bigserial PRIMARY KEY,
    url                     text NOT NULL,
    event_types             text[] NOT NULL DEFAULT '{}',
    domain_id               bigint REFERENCES domains (id) ON DELETE CASCADE,
    secret                  text NOT NULL,
    enabled                 boolean NOT NULL DEFAULT true,
    consecutive_failures    integer NOT NULL DEFAULT 0,
    disabled_reason         text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- One row per (webhook, event) to deliver: attempts, schedule and the last answer.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    webhook_id      bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id        uuid NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    lease_owner     text,
    lease_expires_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

-- Events that leave the process, written in the transaction of the change they describe.
CREATE TABLE event_outbox (
    id              uuid PRIMARY KEY,
    type            text NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    domain          text,
    actor           text,
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    dispatched_at   timestamptz
);
CREATE INDEX event_outbox_pending ON event_outbox (occurred_at) WHERE dispatched_at IS NULL;

-- Append-only record of security-relevant actions.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    actor_ip    inet,
    action      text NOT NULL,
    target      text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_occurred_at ON audit_log (occurred_at);
CREATE INDEX audit_log_actor ON audit_log (actor, occurred_at);
