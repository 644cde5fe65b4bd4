"""Per-IP limits shared by all sessions of a listener (SMTP, IMAP): concurrent connections,
connection rate, failed authentications; and sessions per user.  Counters live in memory per
process (one node's view)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable


class SlidingCounter:
    """How many events per key happened in the last ``window`` seconds."""

    def __init__(self, window: float, now: Callable[[], float]) -> None:
        self._window = window
        self._now = now
        self._events: dict[str, deque[float]] = {}
        self._adds = 0

    def add(self, key: str) -> int:
        events = self._trim(key)
        events.append(self._now())
        self._events[key] = events
        self._adds += 1
        if self._adds % 1024 == 0:
            self.sweep()
        return len(events)

    def count(self, key: str) -> int:
        return len(self._trim(key))

    def _trim(self, key: str) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            return deque()
        cutoff = self._now() - self._window
        while events and events[0] <= cutoff:
            events.popleft()
        if not events:
            # Forget idle keys so the table does not grow with every address ever seen.
            del self._events[key]
        return events

    def sweep(self) -> None:
        """Drop every key whose events have all left the window."""
        for key in list(self._events):
            self._trim(key)

    def __len__(self) -> int:
        return len(self._events)


class ConnectionLimits:
    def __init__(
        self,
        now: Callable[[], float],
        max_per_ip: int,
        rate_per_minute: int,
        auth_failures_per_ip: int,
    ) -> None:
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.auth_failures_per_ip = auth_failures_per_ip
        self._open: dict[str, int] = defaultdict(int)
        self.open = 0  # connections admitted and not yet closed, from every address
        # Told of each change of ``open`` (+1, -1): the sessions metric.
        self.on_change: Callable[[int], None] | None = None
        self._rate = SlidingCounter(60.0, now)
        self.auth_failures = SlidingCounter(600.0, now)

    def admit(self, ip: str) -> str | None:
        """Count a new connection; return why it is refused, or None."""
        if self.max_per_ip and self._open[ip] >= self.max_per_ip:
            return "Too many connections from your address"
        if self.rate_per_minute and self._rate.add(ip) > self.rate_per_minute:
            return "Too many connections from your address, slow down"
        if self.auth_failures_per_ip and (
            self.auth_failures.count(ip) >= self.auth_failures_per_ip
        ):
            return "Too many failed authentications from your address"
        self._open[ip] += 1
        self.open += 1
        if self.on_change is not None:
            self.on_change(1)
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        if self.on_change is not None:
            self.on_change(-1)
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]


class SessionCounter:
    """Open sessions per key (a user), with a limit (0: none)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = defaultdict(int)

    def acquire(self, key: str) -> bool:
        if self.limit and self._open[key] >= self.limit:
            return False
        self._open[key] += 1
        return True

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
