"""Group commit: work that arrives while a batch is in progress waits and goes in the next one.

Durable storage pays per flush, not per byte: one fsync of a directory or one PostgreSQL commit
covers every message of a batch as cheaply as one.  Under load, batches grow by themselves (the
more sessions wait, the more each flush carries); when idle, a lone item starts at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``process`` on batches of submitted items, at most ``concurrency`` batches at a
    time, in order of submission.

    ``process`` returns one result per item, an exception instance for an item that failed
    on its own; an exception raised by ``process`` fails every item of the batch.
    """

    log = Logger()

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        limit: int = 32,
        concurrency: int = 1,
    ) -> None:
        self._process = process
        self._limit = limit
        self._concurrency = concurrency
        self._queue: deque[tuple[T, Deferred[R]]] = deque()
        self._running = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, item: T) -> Deferred[R]:
        """The item's result, once the batch that carried it is done."""
        waiter: Deferred[R] = Deferred()
        self._queue.append((item, waiter))
        if self._running < self._concurrency:
            self._running += 1
            Deferred.fromCoroutine(self._drain())
        return waiter

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(self._limit, len(self._queue)))]
                items = [item for item, _ in batch]
                results: Sequence[R | BaseException]
                try:
                    results = await self._process(items)
                    if len(results) != len(items):
                        raise RuntimeError(
                            f"a batch of {len(items)} gave {len(results)} results"
                        )
                except Exception as e:
                    results = [e] * len(items)
                for (_, waiter), result in zip(batch, results, strict=True):
                    # Each waiter resumes here, and may submit again: the loop picks it up.
                    if isinstance(result, BaseException):
                        waiter.errback(Failure(result))
                    else:
                        waiter.callback(result)
        finally:
            self._running -= 1
