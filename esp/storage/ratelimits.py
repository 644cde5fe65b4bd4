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
    """Take one token from each bucket, or from none: the first bucket that is empty."""
    # Locked in the database's order of the keys (ORDER BY key), whatever Python's is.
    ordered = list({b.key: b for b in buckets}.values())
    if not ordered:
        return None
    for bucket in ordered:
        cur.execute("INSERT INTO rate_buckets (key, tokens) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO NOTHING", (bucket.key, bucket.capacity))
    cur.execute(
        "SELECT key, tokens, extract(epoch FROM clock_timestamp() - updated_at) "
        "FROM rate_buckets WHERE key = ANY(%s) ORDER BY key FOR UPDATE",
        ([b.key for b in ordered],),
    )
    rows = {key: (tokens, float(elapsed)) for key, tokens, elapsed in cur.fetchall()}
    state = {b.key: refill(*rows[b.key], b) for b in ordered}
    empty = [b for b in ordered if state[b.key] < 1.0]
    take = 0.0 if empty else 1.0
    for bucket in ordered:
        cur.execute("UPDATE rate_buckets SET tokens = %s, updated_at = clock_timestamp() "
                    "WHERE key = %s", (state[bucket.key] - take, bucket.key))
    if empty:
        first = empty[0]
        return Refusal(first.key, (1.0 - state[first.key]) / first.rate)
    return None


def forget_idle_txn(cur: Cursor, older_than_seconds: float) -> int:
    """Drop buckets untouched for so long that they are full again anyway."""
    cur.execute("DELETE FROM rate_buckets WHERE updated_at < now() - %s * interval '1 second'",
                (older_than_seconds,))
    return int(cur.rowcount)
