"""Token buckets in PostgreSQL (``sql/010_rate_buckets.sql``), so that every node counts
against the same limits.  All the buckets a message touches are taken in one transaction,
locked in key order (no deadlock between nodes); either every bucket gives a token or none
does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esp.storage.db import Cursor


@dataclass(frozen=True)
class Bucket:
    key: str
    capacity: float  # tokens when full (the limit's count)
    rate: float  # tokens added per second


@dataclass(frozen=True)
class Refusal:
    key: str
    retry_after: float  # seconds until the bucket has a token again


def refill(tokens: float, elapsed: float, bucket: Bucket) -> float:
    return min(bucket.capacity, tokens + max(0.0, elapsed) * bucket.rate)


def take_txn(cur: Cursor, buckets: Sequence[Bucket]) -> Refusal | None:
    """Take one token from each bucket, or from none: the first bucket that is empty.

    One statement finds or makes every row and locks it, in the order of the keys as Python
    sorts them (the same on every node, so two messages never wait on each other in a
    circle); a row another transaction deletes meanwhile is made again, never missed."""
    ordered = sorted({b.key: b for b in buckets}.values(), key=lambda b: b.key)
    if not ordered:
        return None
    rows = ", ".join(["(%s, %s::double precision)"] * len(ordered))
    cur.execute(
        f"INSERT INTO rate_buckets (key, tokens) VALUES {rows} "
        "ON CONFLICT (key) DO UPDATE SET key = excluded.key "
        "RETURNING key, tokens, extract(epoch FROM clock_timestamp() - updated_at)",
        [value for b in ordered for value in (b.key, b.capacity)],
    )
    found = {key: (tokens, float(elapsed)) for key, tokens, elapsed in cur.fetchall()}
    state = {b.key: refill(*found[b.key], b) for b in ordered}
    empty = [b for b in ordered if state[b.key] < 1.0]
    take = 0.0 if empty else 1.0
    cur.execute(
        "UPDATE rate_buckets AS r SET tokens = v.tokens, updated_at = clock_timestamp() "
        "FROM (SELECT unnest(%s::text[]) AS key, unnest(%s::double precision[]) AS tokens) v "
        "WHERE r.key = v.key",
        ([b.key for b in ordered], [state[b.key] - take for b in ordered]),
    )
    if empty:
        first = empty[0]
        return Refusal(first.key, (1.0 - state[first.key]) / first.rate)
    return None


def forget_idle_txn(cur: Cursor, older_than_seconds: float, limit: int = 1000) -> int:
    """Drop buckets untouched for so long that they are full again anyway (rows a message
    holds right now are skipped, not waited for)."""
    cur.execute(
        "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets "
        "WHERE updated_at < now() - %s * interval '1 second' LIMIT %s FOR UPDATE SKIP LOCKED)",
        (older_than_seconds, limit))
    return int(cur.rowcount)
