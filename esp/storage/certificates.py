"""The certificate store (``certificates``), ACME accounts and HTTP-01 challenges.

A change to what is served notifies ``esp_certificates``: every node reloads its TLS contexts.
Keys are stored sealed by the caller; this module only moves bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from esp.storage.db import Cursor
from esp.storage.directory import record_audit_txn
from esp.storage.outbox import insert_events_txn

# What is served changed: every process reloads its TLS contexts.
CHANNEL = "esp_certificates"
# A certificate was requested or failed: the ordering node looks for due work (and
# `esp cert issue --wait` follows it).
DUE_CHANNEL = "esp_certificates_due"
# "Due now" for requests and manual renewals: a time every node's clock is past.
DUE_NOW = datetime(1970, 1, 1, tzinfo=UTC)


class CertificateConflict(Exception):
    """The change would replace a certificate of the other kind."""


@dataclass(frozen=True)
class CertificateRow:
    id: int
    names: tuple[str, ...]
    source: str
    provider: str | None
    chain_pem: str | None
    key_sealed: bytes | None
    not_before: datetime | None
    not_after: datetime | None
    issuer: str | None
    serial: str | None
    renew_at: datetime | None
    next_attempt_at: datetime
    failures: int
    last_error: str | None
    domain: str | None
    issued_at: datetime | None

    def next_attempt(self, now: datetime) -> datetime | None:
        """When the manager next orders it (ACME certificates): its renewal time or its
        retry time, whichever is later, and not before ``now``."""
        if self.source != "acme":
            return None
        return max(self.next_attempt_at, self.renew_at or self.next_attempt_at, now)


_COLUMNS = ("c.id, c.names, c.source, c.provider, c.chain_pem, c.key_sealed, c.not_before, "
            "c.not_after, c.issuer, c.serial, c.renew_at, c.next_attempt_at, c.failures, "
            "c.last_error, d.name, c.issued_at")


def _row(r: Sequence[Any]) -> CertificateRow:
    return CertificateRow(r[0], tuple(r[1]), r[2], r[3], r[4],
                          bytes(r[5]) if r[5] is not None else None, *r[6:])


def list_certificates_txn(cur: Cursor) -> list[CertificateRow]:
    cur.execute(f"SELECT {_COLUMNS} FROM certificates c LEFT JOIN domains d "
                "ON d.id = c.domain_id ORDER BY c.names[1], c.id")
    return [_row(r) for r in cur.fetchall()]


def get_certificate_txn(cur: Cursor, name_or_id: str | int) -> CertificateRow | None:
    """By id, or by any of its names."""
    if isinstance(name_or_id, int):
        cur.execute(f"SELECT {_COLUMNS} FROM certificates c LEFT JOIN domains d "
                    "ON d.id = c.domain_id WHERE c.id = %s", (name_or_id,))
    else:
        cur.execute(f"SELECT {_COLUMNS} FROM certificates c LEFT JOIN domains d "
                    "ON d.id = c.domain_id WHERE %s = ANY(c.names) ORDER BY c.id LIMIT 1",
                    (name_or_id.lower(),))
    row = cur.fetchone()
    return _row(row) if row else None


def hosted_domain_of_txn(cur: Cursor, name: str) -> int | None:
    """The hosted domain a name belongs to: itself, or the nearest parent that is hosted."""
    labels = name.lower().lstrip("*.").split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    if not candidates:
        return None
    cur.execute("SELECT id, name FROM domains WHERE name = ANY(%s)", (candidates,))
    found = {n: i for i, n in cur.fetchall()}
    for candidate in candidates:
        if candidate in found:
            return int(found[candidate])
    return None


def normal_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


def hosted_domains_of_txn(cur: Cursor, names: Sequence[str]) -> list[int | None]:
    """The hosted domain of each name (see :func:`hosted_domain_of_txn`)."""
    return [hosted_domain_of_txn(cur, name) for name in names]


def request_certificate_txn(cur: Cursor, names: Sequence[str], provider: str,
                            actor: str | None = None) -> tuple[CertificateRow, bool]:
    """Ask for an ACME certificate for ``names`` (ordered at the next check, at once when the
    ordering node is notified); (its row, whether it is new).  An existing row for exactly
    these names is returned as it is."""
    names = [normal_name(n) for n in names]
    cur.execute(
        "INSERT INTO certificates (names, domain_id, source, provider, next_attempt_at) "
        "VALUES (%s, %s, 'acme', %s, %s) ON CONFLICT (names) DO NOTHING RETURNING id",
        (names, hosted_domain_of_txn(cur, names[0]), provider, DUE_NOW))
    made = cur.fetchone()
    if made is None:
        cur.execute("SELECT id FROM certificates WHERE names = %s", (names,))
        made_before = cur.fetchone()
        assert made_before is not None
        certificate_id, new = int(made_before[0]), False
    else:
        certificate_id, new = int(made[0]), True
        if actor is not None:
            record_audit_txn(cur, actor, None, "certificate.request", names[0],
                             {"names": names, "provider": provider})
        cur.execute("SELECT pg_notify(%s, 'requested')", (DUE_CHANNEL,))
    row = get_certificate_txn(cur, certificate_id)
    assert row is not None
    return row, new


def next_due_txn(cur: Cursor) -> datetime | None:
    """When the next ACME certificate falls due (issuance, renewal or a retry)."""
    cur.execute("SELECT min(greatest(next_attempt_at, CASE WHEN chain_pem IS NULL "
                "THEN next_attempt_at ELSE renew_at END)) FROM certificates "
                "WHERE source = 'acme'")
    row = cur.fetchone()
    return row[0] if row else None


def due_certificates_txn(cur: Cursor, now: datetime) -> list[CertificateRow]:
    """ACME certificates to issue or renew by ``now`` (never issued, or past their renewal
    time) whose next attempt is due."""
    cur.execute(
        f"SELECT {_COLUMNS} FROM certificates c LEFT JOIN domains d ON d.id = c.domain_id "
        "WHERE c.source = 'acme' AND (c.chain_pem IS NULL OR c.renew_at <= %s) "
        "AND c.next_attempt_at <= %s ORDER BY c.not_after NULLS FIRST, c.id", (now, now))
    return [_row(r) for r in cur.fetchall()]


def renew_now_txn(cur: Cursor, name_or_id: str | int,
                  actor: str | None = None) -> CertificateRow | None:
    """Make an ACME certificate due now (None when there is no such ACME certificate)."""
    row = get_certificate_txn(cur, name_or_id)
    if row is None or row.source != "acme":
        return None
    cur.execute("UPDATE certificates SET renew_at = %s, next_attempt_at = %s, "
                "updated_at = now() WHERE id = %s", (DUE_NOW, DUE_NOW, row.id))
    if actor is not None:
        record_audit_txn(cur, actor, None, "certificate.renew", row.names[0], {})
    cur.execute("SELECT pg_notify(%s, 'renew')", (DUE_CHANNEL,))
    return get_certificate_txn(cur, row.id)


@dataclass(frozen=True)
class NewCertificate:
    chain_pem: str
    key_sealed: bytes
    not_before: datetime
    not_after: datetime
    issuer: str
    serial: str
    renew_at: datetime | None  # None for files: never renewed by us


def store_issued_txn(cur: Cursor, certificate_id: int, new: NewCertificate,
                     events: Sequence[Mapping[str, Any]], actor: str = "esp") -> None:
    """Put a newly issued certificate in service (every node reloads), with its events."""
    cur.execute(
        """
        UPDATE certificates SET chain_pem = %s, key_sealed = %s, not_before = %s,
               not_after = %s, issuer = %s, serial = %s, renew_at = %s, failures = 0,
               last_error = NULL, next_attempt_at = %s, issued_at = now(), updated_at = now()
        WHERE id = %s RETURNING names[1]
        """,
        (new.chain_pem, new.key_sealed, new.not_before, new.not_after, new.issuer, new.serial,
         new.renew_at, DUE_NOW, certificate_id))
    row = cur.fetchone()
    if row is None:
        return  # removed meanwhile
    record_audit_txn(cur, actor, None, "certificate.issued", row[0],
                     {"serial": new.serial, "not_after": new.not_after.isoformat()})
    insert_events_txn(cur, events)
    cur.execute("SELECT pg_notify(%s, 'served')", (CHANNEL,))


def import_certificate_txn(cur: Cursor, names: Sequence[str], new: NewCertificate,
                           seal: Callable[[int], bytes], actor: str) -> int:
    """Serve a certificate made elsewhere (certbot, a corporate CA) for its names; replaces
    one imported before for the same names.  ``seal`` seals the key for the row's id (keys
    are sealed under their row); ``new.key_sealed`` is not used."""
    names = [normal_name(n) for n in names]
    cur.execute("SELECT source FROM certificates WHERE names = %s", (names,))
    existing = cur.fetchone()
    if existing is not None and existing[0] == "acme":
        raise CertificateConflict(f"{names[0]} has an ACME certificate: remove it first (an "
                                  "imported one is not renewed)")
    cur.execute(
        """
        INSERT INTO certificates (names, domain_id, source, chain_pem, key_sealed, not_before,
                                  not_after, issuer, serial)
        VALUES (%s, %s, 'file', %s, '', %s, %s, %s, %s)
        ON CONFLICT (names) DO UPDATE SET source = 'file', provider = NULL,
               chain_pem = EXCLUDED.chain_pem, not_before = EXCLUDED.not_before,
               not_after = EXCLUDED.not_after, issuer = EXCLUDED.issuer,
               serial = EXCLUDED.serial, renew_at = NULL, failures = 0, last_error = NULL,
               updated_at = now()
        RETURNING id
        """,
        (names, hosted_domain_of_txn(cur, names[0]), new.chain_pem, new.not_before, new.not_after,
         new.issuer, new.serial))
    row = cur.fetchone()
    assert row is not None
    certificate_id = int(row[0])
    cur.execute("UPDATE certificates SET key_sealed = %s WHERE id = %s",
                (seal(certificate_id), certificate_id))
    record_audit_txn(cur, actor, None, "certificate.import", names[0],
                     {"names": names, "serial": new.serial,
                      "not_after": new.not_after.isoformat()})
    cur.execute("SELECT pg_notify(%s, 'served')", (CHANNEL,))
    return certificate_id


def remove_certificate_txn(cur: Cursor, name_or_id: str | int,
                           actor: str | None = None) -> bool:
    row = get_certificate_txn(cur, name_or_id)
    if row is None:
        return False
    cur.execute("DELETE FROM certificates WHERE id = %s", (row.id,))
    if actor is not None:
        record_audit_txn(cur, actor, None, "certificate.remove", row.names[0], {})
    cur.execute("SELECT pg_notify(%s, 'served')", (CHANNEL,))
    return True


def record_failure_txn(cur: Cursor, certificate_id: int, error: str, retry_at: datetime,
                       events: Sequence[Mapping[str, Any]]) -> int:
    """An attempt failed: the certificate in service stays; the next try waits until
    ``retry_at``.  The failures so far."""
    cur.execute(
        "UPDATE certificates SET failures = failures + 1, last_error = %s, "
        "next_attempt_at = %s, updated_at = now() WHERE id = %s RETURNING failures",
        (error[:2000], retry_at, certificate_id))
    row = cur.fetchone()
    insert_events_txn(cur, events)
    cur.execute("SELECT pg_notify(%s, 'failed')", (DUE_CHANNEL,))  # `esp cert issue --wait`
    return int(row[0]) if row else 0


def served_certificates_txn(cur: Cursor) -> list[tuple[int, tuple[str, ...], str, bytes]]:
    """(id, names, chain PEM, sealed key) of every certificate in service, the one that
    expires last last (where several cover a name, it wins)."""
    cur.execute("SELECT id, names, chain_pem, key_sealed FROM certificates "
                "WHERE chain_pem IS NOT NULL AND key_sealed IS NOT NULL "
                "ORDER BY not_after NULLS FIRST, id")
    return [(i, tuple(n), c, bytes(k)) for i, n, c, k in cur.fetchall()]


# -- ACME accounts and challenges ---------------------------------------------------------------


def get_account_txn(cur: Cursor, directory_url: str) -> tuple[bytes, str] | None:
    cur.execute("SELECT key_sealed, account_url FROM acme_accounts WHERE directory_url = %s",
                (directory_url,))
    row = cur.fetchone()
    return (bytes(row[0]), row[1]) if row else None


def put_account_txn(cur: Cursor, directory_url: str, key_sealed: bytes, account_url: str,
                    contact: str | None) -> None:
    cur.execute(
        "INSERT INTO acme_accounts (directory_url, key_sealed, account_url, contact) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (directory_url) DO UPDATE SET "
        "key_sealed = EXCLUDED.key_sealed, account_url = EXCLUDED.account_url, "
        "contact = EXCLUDED.contact",
        (directory_url, key_sealed, account_url, contact))


def publish_challenge_txn(cur: Cursor, token: str, key_authorization: str, name: str,
                          ttl_seconds: int = 3600) -> None:
    cur.execute(
        "INSERT INTO acme_challenges (token, key_authorization, name, expires_at) "
        "VALUES (%s, %s, %s, now() + %s * interval '1 second') ON CONFLICT (token) DO UPDATE "
        "SET key_authorization = EXCLUDED.key_authorization, expires_at = EXCLUDED.expires_at",
        (token, key_authorization, name, ttl_seconds))
    cur.execute("DELETE FROM acme_challenges WHERE expires_at < now()")


def withdraw_challenges_txn(cur: Cursor, tokens: Sequence[str]) -> None:
    cur.execute("DELETE FROM acme_challenges WHERE token = ANY(%s)", (list(tokens),))


def challenge_answer_txn(cur: Cursor, token: str) -> str | None:
    cur.execute("SELECT key_authorization FROM acme_challenges WHERE token = %s "
                "AND expires_at > now()", (token,))
    row = cur.fetchone()
    return str(row[0]) if row else None
