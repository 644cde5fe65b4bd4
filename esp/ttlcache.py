"""A small cache of values loaded in batches and kept for a number of seconds (per-domain
filter choices, per-user rules): one query for every key a message needs that is not fresh."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Past this many entries the cache starts afresh (a bound on memory, not an LRU).
MAX_ENTRIES = 100_000


class TTLCache(Generic[K, V]):
    def __init__(
        self, load: Callable[[list[K]], Awaitable[Mapping[K, V]]], missing: V, reactor: Any,
        ttl: float,
    ) -> None:
        self._load = load
        self._missing = missing  # the value of a key the loader does not return
        self._reactor = reactor
        self._ttl = ttl
        self._entries: dict[K, tuple[float, V]] = {}

    async def get_many(self, keys: Sequence[K]) -> dict[K, V]:
        now = self._reactor.seconds()
        stale = [k for k in dict.fromkeys(keys)
                 if k not in self._entries or self._entries[k][0] <= now]
        if stale:
            loaded = await self._load(stale)
            if len(self._entries) + len(stale) > MAX_ENTRIES:
                self._entries.clear()
            for key in stale:
                self._entries[key] = (now + self._ttl, loaded.get(key, self._missing))
        return {k: self._entries[k][1] for k in keys}

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
