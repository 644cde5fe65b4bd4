"""API keys (``sql/009_api_keys.sql``): made with a secret shown once, found by its hash,
revoked by their owner or an administrator.

A key is ``esp_`` followed by 43 URL-safe characters (256 random bits).  Only the SHA-256 of
the whole key is stored; a high-entropy secret needs no slow hash, and lookup by hash is one
index probe.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from esp.storage.db import Cursor

# Scopes a key may hold.  "read" stands for every ":read" scope, "*" for all of them.
RESOURCES = ("domains", "users", "aliases", "mailboxes", "messages", "rules", "queue", "dkim",
             "webhooks", "audit", "keys", "certificates")
SCOPES = (*(f"{r}:{a}" for r in RESOURCES for a in ("read", "write")),
          "messages:send", "read", "*")
PREFIX = "esp_"
# Characters of the key kept in clear to tell keys apart ("esp_" and 8 of the secret).
SHOWN = 12


@dataclass(frozen=True)
class ApiKey:
    id: int
    user_id: int
    owner: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    domain: str | None
    domain_id: int | None
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX)


_COLUMNS = """
    k.id, k.user_id, u.localpart || '@' || ud.name, k.name, k.prefix, k.scopes, d.name,
    k.domain_id, k.expires_at, k.created_at, k.last_used_at, k.revoked_at
"""
_FROM = """
    FROM api_keys k JOIN users u ON u.id = k.user_id JOIN domains ud ON ud.id = u.domain_id
    LEFT JOIN domains d ON d.id = k.domain_id
"""


def _key(row: Sequence[object]) -> ApiKey:
    values = list(row)
    values[5] = tuple(values[5])  # type: ignore[arg-type]
    return ApiKey(*values)  # type: ignore[arg-type]


def create_key_txn(
    cur: Cursor, user_id: int, name: str, scopes: Sequence[str], domain_id: int | None,
    expires_at: datetime | None,
) -> tuple[ApiKey, str]:
    """Store a new key; (the key, its secret: the only time the secret exists outside the
    caller's hands)."""
    secret = new_secret()
    cur.execute(
        """
        INSERT INTO api_keys (user_id, name, prefix, secret_hash, scopes, domain_id, expires_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (user_id, name, secret[:SHOWN], secret_hash(secret), list(scopes), domain_id,
         expires_at),
    )
    row = cur.fetchone()
    assert row is not None
    key = get_key_txn(cur, row[0])
    assert key is not None
    return key, secret


def get_key_txn(cur: Cursor, key_id: int) -> ApiKey | None:
    cur.execute(f"SELECT {_COLUMNS} {_FROM} WHERE k.id = %s", (key_id,))
    row = cur.fetchone()
    return _key(row) if row else None


def list_keys_txn(
    cur: Cursor, user_id: int | None, domain_id: int | None, limit: int, offset: int,
) -> tuple[list[ApiKey], int]:
    """Keys of one user (or all), only those restricted to ``domain_id`` unless it is None;
    newest first."""
    cur.execute(
        f"""
        SELECT {_COLUMNS}, count(*) OVER () {_FROM}
        WHERE (%(user)s::bigint IS NULL OR k.user_id = %(user)s)
          AND (%(domain)s::bigint IS NULL OR k.domain_id = %(domain)s)
        ORDER BY k.id DESC LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"user": user_id, "domain": domain_id, "limit": limit, "offset": offset},
    )
    rows = cur.fetchall()
    return [_key(row[:-1]) for row in rows], (rows[0][-1] if rows else 0)


def revoke_key_txn(cur: Cursor, key_id: int) -> ApiKey | None:
    cur.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s", (key_id,)
    )
    return get_key_txn(cur, key_id)


def use_key_txn(cur: Cursor, secret: str) -> ApiKey | None:
    """The live key with this secret (not revoked, not expired), its last use noted (at most
    once a minute, so that busy keys do not write on every request)."""
    cur.execute(
        f"""
        SELECT {_COLUMNS} {_FROM}
        WHERE k.secret_hash = %s AND k.revoked_at IS NULL
          AND (k.expires_at IS NULL OR k.expires_at > now())
        """,
        (secret_hash(secret),),
    )
    row = cur.fetchone()
    if row is None:
        return None
    key = _key(row)
    cur.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE id = %s "
        "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        (key.id,),
    )
    return key
