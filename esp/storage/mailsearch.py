"""Message search as SQL: a criteria tree (built by a protocol) becomes one WHERE clause over
the indexed columns of ``messages``.

A criterion is a tuple:

- ``("all",)``; ``("flag", column, present)`` with column one of seen, answered, flagged,
  deleted, draft; ``("keyword", name, present)``;
- ``("uids", [(low, high), ...])``;
- ``("date", op, date)`` on the internal date and ``("sent", op, date)`` on the Date header, op
  one of ``<``, ``=``, ``>=`` (RFC 3501: dates, disregarding time and time zone);
- ``("size", op, n)`` with op ``>`` or ``<``; ``("modseq", n)``: changed at or after MODSEQ n;
- ``("header", field, text)``: case-insensitive substring of a header field;
- ``("body", text)``: the words of ``text``, in order, each as a word or the start of one, in
  the body's full-text index (:mod:`esp.storage.bodyindex`); ``("text", text)``: that, or
  ``text`` inside the header block;
- ``("not", c)``, ``("or", a, b)``, ``("and", [c, ...])``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

from esp.storage.db import Cursor

_FLAG_COLUMNS = frozenset({"seen", "answered", "flagged", "deleted", "draft"})
_HEADER_COLUMNS = {"subject": "subject", "from": "from_header", "to": "to_header",
                   "cc": "cc_header", "bcc": "bcc_header", "message-id": "message_id",
                   "in-reply-to": "in_reply_to"}

Criterion = tuple[Any, ...]


def like_pattern(text: str) -> str:
    """A LIKE/ILIKE pattern matching ``text`` anywhere, its wildcards escaped."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _sql(node: Criterion, params: list[object]) -> str:
    kind = node[0]
    if kind == "all":
        return "TRUE"
    if kind == "flag":
        column = node[1]
        if column not in _FLAG_COLUMNS:
            raise ValueError(f"unknown flag column {column}")
        return column if node[2] else f"NOT {column}"
    if kind == "keyword":
        params.append(node[1])
        return ("" if node[2] else "NOT ") + "(%s = ANY(keywords))"
    if kind == "uids":
        ranges: Sequence[tuple[int, int]] = node[1]
        if not ranges:
            return "FALSE"
        parts = []
        for low, high in ranges:
            params.extend((low, high))
            parts.append("uid BETWEEN %s AND %s")
        return "(" + " OR ".join(parts) + ")"
    if kind in ("date", "sent"):
        column = "internal_date" if kind == "date" else "sent_date"
        op = node[1]
        if op not in ("<", "=", ">="):
            raise ValueError(f"unknown date comparison {op}")
        day: date = node[2]
        params.append(day)
        return f"({column} AT TIME ZONE 'UTC')::date {op} %s"
    if kind == "modseq":
        params.append(int(node[1]))
        return "modseq >= %s"
    if kind == "size":
        op = node[1]
        if op not in ("<", ">"):
            raise ValueError(f"unknown size comparison {op}")
        params.append(int(node[2]))
        return f"size {op} %s"
    if kind == "header":
        field = node[1].lower()
        params.append(like_pattern(node[2]))
        column = _HEADER_COLUMNS.get(field)
        if column is not None:
            return f"coalesce({column}, '') ILIKE %s"
        # Any other field: a line of the stored header block that starts with its name.
        params[-1] = node[1].replace("\\", "\\\\").replace("%", "\\%").replace(
            "_", "\\_") + ":" + like_pattern(node[2])
        return "(E'\\n' || coalesce(headers, '')) ILIKE E'%%\\n' || %s"
    if kind in ("body", "text"):
        text: str = node[1]
        if not text.strip():
            return "TRUE"  # every message contains the empty string
        params.append(text)
        # A sub-select: the query is made once, not once per row.
        match = "coalesce(body_tsv @@ (SELECT esp_body_query(%s)), FALSE)"
        if kind == "body":
            return match
        params.append(like_pattern(text))
        return f"({match} OR coalesce(headers, '') ILIKE %s)"
    if kind == "not":
        return f"NOT ({_sql(node[1], params)})"
    if kind == "or":
        return f"(({_sql(node[1], params)}) OR ({_sql(node[2], params)}))"
    if kind == "and":
        children: Sequence[Criterion] = node[1]
        if not children:
            return "TRUE"
        return "(" + " AND ".join(f"({_sql(c, params)})" for c in children) + ")"
    raise ValueError(f"unknown search criterion {kind}")


def search_txn(cur: Cursor, mailbox_id: int, criterion: Criterion) -> list[int]:
    """The UIDs of the messages matching ``criterion``, ascending."""
    params: list[object] = [mailbox_id]
    where = _sql(criterion, params)
    cur.execute(
        f"SELECT uid FROM messages WHERE mailbox_id = %s AND ({where}) ORDER BY uid",
        params,
    )
    return [row[0] for row in cur.fetchall()]


# RFC 5256 sort keys as SQL expressions; ties are broken by UID (the sequence order).
SORT_KEYS = {
    "ARRIVAL": "internal_date",
    "DATE": "coalesce(sent_date, internal_date)",
    "SIZE": "size",
    # The local part of the first address, case-insensitively.
    "FROM": "lower(coalesce(substring(from_header from '<([^@>]*)'), "
            "split_part(coalesce(from_header, ''), '@', 1)))",
    "TO": "lower(coalesce(substring(to_header from '<([^@>]*)'), "
          "split_part(coalesce(to_header, ''), '@', 1)))",
    "CC": "lower(coalesce(substring(cc_header from '<([^@>]*)'), "
          "split_part(coalesce(cc_header, ''), '@', 1)))",
    # The base subject (RFC 5256 §2.1), near enough: reply and forward prefixes and leading
    # [blobs] removed, then trailing (fwd).
    "SUBJECT": "regexp_replace(regexp_replace(lower(coalesce(subject, '')), "
               "'^(\\s*((re|fwd?|fw)(\\[[0-9]+\\])?:|\\[[^]]*\\]))+\\s*', ''), "
               "'(\\s*\\(fwd\\))+$', '')",
}


def sort_txn(
    cur: Cursor, mailbox_id: int, keys: Sequence[tuple[str, bool]], criterion: Criterion
) -> list[int]:
    """UIDs of the matching messages in the order of ``keys`` ((name, reverse) pairs)."""
    params: list[object] = [mailbox_id]
    where = _sql(criterion, params)
    order = ", ".join(f"{SORT_KEYS[name]} {'DESC' if reverse else 'ASC'}"
                      for name, reverse in keys)
    cur.execute(
        f"SELECT uid FROM messages WHERE mailbox_id = %s AND ({where}) ORDER BY {order}, uid",
        params,
    )
    return [row[0] for row in cur.fetchall()]


def body_criteria(node: Criterion) -> Iterator[Criterion]:
    """The BODY and TEXT criteria inside ``node`` (they need the body index up to date)."""
    kind = node[0]
    if kind in ("body", "text"):
        yield node
    elif kind == "not":
        yield from body_criteria(node[1])
    elif kind == "or":
        yield from body_criteria(node[1])
        yield from body_criteria(node[2])
    elif kind == "and":
        for child in node[1]:
            yield from body_criteria(child)
