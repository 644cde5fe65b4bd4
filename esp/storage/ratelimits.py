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

    One call of ``esp_take_tokens`` (sql/011) finds or makes every row and locks it, in the
    order of the keys as Python sorts them (the same on every node, so two messages never
    wait on each other in a circle); a row deleted meanwhile is made again, never missed."""
    ordered = sorted({b.key: b for b in buckets}.values(), key=lambda b: b.key)
    if not ordered:
        return None
    cur.execute("SELECT key, tokens FROM esp_take_tokens(%s, %s, %s)",
                ([b.key for b in ordered], [float(b.capacity) for b in ordered],
                 [b.rate for b in ordered]))
    state = dict(cur.fetchall())
    for bucket in ordered:
        if state[bucket.key] < 1.0:
            return Refusal(bucket.key, (1.0 - state[bucket.key]) / bucket.rate)
    return None


def forget_idle_txn(cur: Cursor, older_than_seconds: float, limit: int = 1000) -> int:
    """Drop buckets untouched for so long that they are full again anyway (rows a message
    holds right now are skipped, not waited for)."""
    cur.execute(
        "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets "
        "WHERE updated_at < now() - %s * interval '1 second' LIMIT %s FOR UPDATE SKIP LOCKED)",
        (older_than_seconds, limit))
    return int(cur.rowcount)
