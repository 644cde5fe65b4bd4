"""Rate limits as a filter: token buckets per client address (IPv6 by /64), per envelope
sender, per authenticated user and per recipient domain.  Past a limit the message gets
451 4.7.1 with the seconds to wait.

``shared: true`` (the default) keeps the buckets in PostgreSQL, so that the limits hold for
the cluster as a whole; ``shared: false`` keeps them in each process (each node, and each
worker process, then allows the full limit on its own).
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from esp.filters import FilterContext, FilterServices, FilterSettings, Verdict
from esp.interfaces import IMessageFilter
from esp.storage.ratelimits import Bucket, Refusal, forget_idle_txn, refill, take_txn


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=1, description="messages allowed at once (the bucket's size)")
    seconds: float = Field(gt=0, description="...and again after this many seconds")


class RateLimitSettings(FilterSettings):
    per_ip: Limit | None = Limit(count=100, seconds=60)
    per_sender: Limit | None = None
    per_user: Limit | None = Limit(count=500, seconds=3600)
    per_recipient_domain: Limit | None = None
    shared: bool = Field(True, description="count in PostgreSQL for every node together")
    timeout: float = Field(5.0, gt=0, le=600)


def client_key(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@implementer(IMessageFilter)
class RateLimitFilter:
    name = "ratelimit"
    log = Logger()

    def __init__(self, settings: RateLimitSettings, services: FilterServices) -> None:
        self._settings = settings
        self._services = services
        self._local: dict[str, tuple[float, float]] = {}  # key → (tokens, when)

    def buckets(self, context: FilterContext) -> list[Bucket]:
        s = self._settings
        wanted: list[tuple[Limit | None, str]] = [
            (s.per_ip, f"ip:{client_key(context.client_ip)}"),
            (s.per_sender, f"sender:{context.sender.lower()}" if context.sender else ""),
            (s.per_user, f"user:{context.user}" if context.user else ""),
        ]
        domains = sorted({r.rpartition("@")[2].lower() for r in context.recipients})
        wanted += [(s.per_recipient_domain, f"rcpt-domain:{d}") for d in domains]
        return [Bucket(key, limit.count, limit.count / limit.seconds)
                for limit, key in wanted if limit is not None and key]

    async def check(self, context: FilterContext) -> Verdict:
        buckets = self.buckets(context)
        if self._settings.shared:
            refusal = await self._services.db.run("take_rate_tokens", take_txn, buckets)
            if random.random() < 0.001:  # noqa: S311 (housekeeping, not security)
                # Off the message's path: nobody waits for it, and a failure only logs.
                Deferred.fromCoroutine(self._services.db.run(
                    "forget_rate_buckets", forget_idle_txn, max(86400.0, self._longest()),
                )).addErrback(lambda f: self.log.failure("rate bucket clean-up", f))
        else:
            refusal = self._take_locally(buckets)
        if refusal is None:
            return Verdict()
        wait = max(1, math.ceil(refusal.retry_after))
        kind = refusal.key.split(":", 1)[0]
        return Verdict.defer(f"Rate limit exceeded ({kind}), try again in {wait} seconds",
                             status="4.7.1", details={"key": refusal.key, "retry_after": wait})

    def _longest(self) -> float:
        limits = (self._settings.per_ip, self._settings.per_sender, self._settings.per_user,
                  self._settings.per_recipient_domain)
        return max((limit.seconds for limit in limits if limit is not None), default=0.0)

    def _take_locally(self, buckets: Sequence[Bucket]) -> Refusal | None:
        now = self._services.reactor.seconds()
        state = {}
        for bucket in buckets:
            tokens, when = self._local.get(bucket.key, (bucket.capacity, now))
            state[bucket.key] = refill(tokens, now - when, bucket)
        empty = [b for b in buckets if state[b.key] < 1.0]
        take = 0.0 if empty else 1.0
        for bucket in buckets:
            self._local[bucket.key] = (state[bucket.key] - take, now)
        if len(self._local) > 100_000:
            self._local = {k: v for k, v in self._local.items() if now - v[1] < self._longest()}
        if empty:
            return Refusal(empty[0].key, (1.0 - state[empty[0].key]) / empty[0].rate)
        return None
