"""Work handed over by several threads and taken by one, in groups: everything waiting when
that thread is free, up to a limit.

The Maildir writer's delivery thread (:mod:`esp.storage.diskwriter`) works this way: one
group commit for whatever arrived while the previous one was under way.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupQueue(Generic[T]):
    """Items put by any thread; :meth:`take` hands the taking thread every item waiting, in
    order, as long as their ``size`` adds up to at most ``limit`` (always at least one)."""

    def __init__(self, limit: int, size: Callable[[T], int]) -> None:
        self._limit = limit
        self._size = size
        self._waiting: deque[T] = deque()
        self._condition = threading.Condition()
        self._closed = False

    def put(self, item: T) -> bool:
        """Queue ``item``; False (and not queued) once the queue is closed."""
        with self._condition:
            if self._closed:
                return False
            self._waiting.append(item)
            self._condition.notify()
            return True

    def close(self) -> None:
        """Take no more items; :meth:`take` returns what is still waiting, then None."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def take(self) -> list[T] | None:
        """The next group, waiting for one if need be; None once closed and empty."""
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if not self._waiting:
                return None
            group = [self._waiting.popleft()]
            count = self._size(group[0])
            while self._waiting and count + self._size(self._waiting[0]) <= self._limit:
                count += self._size(self._waiting[0])
                group.append(self._waiting.popleft())
            return group
