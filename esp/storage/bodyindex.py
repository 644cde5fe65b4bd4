"""The full-text index of message bodies (``messages.body_tsv``), for IMAP ``SEARCH BODY``
and ``SEARCH TEXT``.

Delivery does not wait for it: a message's row is written without its index entry, and
:func:`index_pending` fills it later (the background indexer, :mod:`esp.indexer`, and the
first body search of a mailbox, so that a search never misses a message because the indexer
had not come to it yet).  The text is :func:`esp.bodytext.body_text` of the Maildir file; the
dictionary is PostgreSQL's ``simple`` one (lower-cased words, no stemming and no stop words:
mail is written in every language).

Blocking functions: run them in a pool thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from esp.bodytext import body_text
from esp.storage.db import Cursor
from esp.storage.maildir import Maildir

# Rows indexed per transaction.
BATCH = 200
DICTIONARY = "simple"

Pending = tuple[int, str, str, str]  # message id, the user's Maildir, the folder, the file name


def pending_txn(cur: Cursor, mailbox_id: int | None, limit: int = BATCH) -> list[Pending]:
    """Messages not indexed yet (of one mailbox, or of any), oldest first; locked for this
    transaction, and rows another indexer holds are skipped."""
    where = "m.body_tsv IS NULL" + (" AND m.mailbox_id = %s" if mailbox_id is not None else "")
    params: list[object] = [mailbox_id] if mailbox_id is not None else []
    cur.execute(
        f"""
        SELECT m.id, u.maildir, b.folder, m.filename
        FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id
        WHERE {where}
        ORDER BY m.mailbox_id, m.id LIMIT %s
        FOR UPDATE OF m SKIP LOCKED
        """,
        [*params, limit],
    )
    return [(row[0], row[1], row[2], row[3]) for row in cur.fetchall()]


def store_txn(cur: Cursor, texts: Sequence[tuple[int, str]]) -> None:
    if not texts:
        return
    cur.execute(
        f"""
        UPDATE messages m SET body_tsv = to_tsvector('{DICTIONARY}', t.body)
        FROM unnest(%s::bigint[], %s::text[]) AS t (id, body)
        WHERE m.id = t.id
        """,
        ([i for i, _ in texts], [text for _, text in texts]),
    )


def read_text(root: Path, pending: Pending) -> str:
    """The searchable text of a pending message; empty if its file cannot be read (it is
    then indexed as having no text rather than tried again on every pass)."""
    _, maildir, folder, filename = pending
    try:
        data = Maildir(root / maildir).folder(folder).read(filename)
    except (OSError, ValueError):
        return ""
    # NUL cannot be stored in a PostgreSQL text value.
    return body_text(data).replace("\x00", " ")


def index_batch_txn(cur: Cursor, root: Path, mailbox_id: int | None, limit: int = BATCH) -> int:
    """Index up to ``limit`` pending messages in this transaction; how many were found."""
    pending = pending_txn(cur, mailbox_id, limit)
    store_txn(cur, [(item[0], read_text(root, item)) for item in pending])
    return len(pending)
