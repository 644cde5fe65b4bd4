"""The outbound queue: a spooled body plus one row per message and recipient domain.

The body is durable in the spool before the rows are committed; delivery workers claim rows with
``FOR UPDATE SKIP LOCKED`` (the outbound issue builds them).
"""

from __future__ import annotations

from collections.abc import Sequence

from esp.storage.db import Cursor


def enqueue_txn(
    cur: Cursor,
    spool_name: str,
    sender: str,
    recipients: Sequence[str],
    size: int,
    user_id: int | None = None,
) -> list[int]:
    """Queue one message for remote recipients; return the queue ids (one per domain)."""
    by_domain: dict[str, list[str]] = {}
    for address in recipients:
        by_domain.setdefault(address.rpartition("@")[2].lower(), []).append(address)
    cur.execute(
        """
        INSERT INTO outbound_messages (spool_name, sender, size, user_id)
        VALUES (%s, %s, %s, %s) RETURNING id
        """,
        (spool_name, sender, size, user_id),
    )
    row = cur.fetchone()
    assert row is not None
    message_id = row[0]
    ids = []
    for domain, addresses in sorted(by_domain.items()):
        cur.execute(
            "INSERT INTO queue (message_id, recipient_domain) VALUES (%s, %s) RETURNING id",
            (message_id, domain),
        )
        row = cur.fetchone()
        assert row is not None
        queue_id = row[0]
        for address in dict.fromkeys(addresses):
            cur.execute(
                "INSERT INTO queue_recipients (queue_id, address) VALUES (%s, %s)",
                (queue_id, address),
            )
        ids.append(queue_id)
    return ids
