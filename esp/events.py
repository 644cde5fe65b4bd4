"""The in-process event bus: publish events by type, subscribe by name or pattern.

Patterns use dotted segments as Buildbot's message queue does: ``message.received`` matches
itself, ``message.*`` matches one segment after ``message.``, ``#`` matches any number of
segments (so ``#`` alone is everything).  Handlers run concurrently; one that fails is logged and
does not stop the others, and :meth:`EventBus.publish` never fails because of a subscriber.
"""

from __future__ import annotations

import inspect
import os
import random as _random_module
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esp.interfaces import IEventSubscriber

MESSAGE_RECEIVED = "message.received"
MESSAGE_SENT = "message.sent"
MESSAGE_BOUNCED = "message.bounced"
MESSAGE_DELETED = "message.deleted"
USER_LOGIN = "user.login"
MAILBOX_CREATED = "mailbox.created"
FILTER_MATCHED = "filter.matched"
SPAM_DETECTED = "spam.detected"
VIRUS_DETECTED = "virus.detected"
CERTIFICATE_RENEWED = "certificate.renewed"
CERTIFICATE_FAILED = "certificate.failed"
WEBHOOK_DISABLED = "webhook.disabled"

EVENT_TYPES = frozenset(
    {
        MESSAGE_RECEIVED, MESSAGE_SENT, MESSAGE_BOUNCED, MESSAGE_DELETED, USER_LOGIN,
        MAILBOX_CREATED, FILTER_MATCHED, SPAM_DETECTED, VIRUS_DETECTED, CERTIFICATE_RENEWED,
        WEBHOOK_DISABLED, CERTIFICATE_FAILED,
    }
)

# Events that describe a database change are written to the outbox in the transaction of that
# change, by whoever makes it (the message row, the queue update, the expunge, the new
# mailbox); the others (logins, verdicts) are written as they are published.
RECORDED_WITH_CHANGE = frozenset(
    {MESSAGE_RECEIVED, MESSAGE_SENT, MESSAGE_BOUNCED, MESSAGE_DELETED, MAILBOX_CREATED,
     CERTIFICATE_RENEWED, CERTIFICATE_FAILED}
)

T = TypeVar("T")

# Whether an event of a type, for a domain, leaves the process (some webhook wants it).
Wants = Callable[[str, str | None], bool]


def _nothing_leaves(event_type: str, domain: str | None) -> bool:
    return False


class _Node:
    """This process's name for events, and a fast random source for their ids, both made
    again after a fork."""

    pid = -1
    name = ""
    random = _random_module.Random()  # noqa: S311 (ids, not secrets)

    @classmethod
    def current(cls) -> type[_Node]:
        pid = os.getpid()
        if pid != cls.pid:
            cls.pid = pid
            cls.name = f"{socket.gethostname()}:{pid}"
            cls.random = _random_module.Random(os.urandom(32))  # noqa: S311
        return cls


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): sorts by creation time, unique across nodes.
    The 74 random bits come from a generator seeded from the OS once per process: ids must be
    unique, not secret, and os.urandom per event costs a system call."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | _Node.current().random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant
    return uuid.UUID(int=value)


@dataclass(frozen=True)
class Event:
    """One thing that happened, in the envelope every consumer sees."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    domain: str | None = None
    actor: str | None = None
    id: uuid.UUID = field(default_factory=uuid7)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    node: str = field(default_factory=lambda: _Node.current().name)


def event_record(event: Event) -> dict[str, Any]:
    """An event as JSON, the form the outbox stores."""
    return {"id": str(event.id), "type": event.type, "occurred_at": event.occurred_at.isoformat(),
            "domain": event.domain, "actor": event.actor, "node": event.node,
            "payload": dict(event.payload)}


def webhook_body(event_type: str, occurred_at: datetime, event_id: str, domain: str | None,
                 actor: str | None, payload: Mapping[str, Any]) -> dict[str, Any]:
    """An event as a webhook receives it: the Standard Webhooks shape, the envelope and the
    payload (the node included) in ``data`` (docs/schemas/events)."""
    return {"type": event_type, "timestamp": occurred_at.isoformat(),
            "data": {"id": event_id, "domain": domain, "actor": actor, **payload}}


def leaving_records(events: Iterable[Event], wants: Wants) -> list[dict[str, Any]]:
    """The outbox records of those of ``events`` that leave the process."""
    return [event_record(e) for e in events if wants(e.type, e.domain)]


class Announcement(Generic[T]):
    """Events that describe a change whose details only its transaction knows (the UIDs an
    expunge removed, the mailboxes a CREATE made).  :meth:`records` runs in that transaction:
    it makes the events and returns the outbox records of those that leave the process;
    :meth:`publish` hands the same events (same ids) to the bus after the commit."""

    def __init__(self, make: Callable[[T], Iterable[Event]], wants: Wants) -> None:
        self._make = make
        self._wants = wants
        self.events: list[Event] = []

    def records(self, what: T) -> list[dict[str, Any]]:
        self.events = list(self._make(what))  # made again should the transaction be retried
        return leaving_records(self.events, self._wants)

    def publish(self, bus: EventBus) -> None:
        for event in self.events:
            bus.publish(event)


def deleted_messages(user: str, mailbox: str, uidvalidity: int, reason: str, protocol: str,
                     actor: str | None) -> Callable[[list[int]], list[Event]]:
    """The message.deleted events of the UIDs an expunge removed (for an Announcement)."""

    def make(uids: list[int]) -> list[Event]:
        return [Event(MESSAGE_DELETED,
                      {"user": user, "mailbox": mailbox, "uid": uid, "uidvalidity": uidvalidity,
                       "reason": reason, "protocol": protocol},
                      domain=user.rpartition("@")[2], actor=actor)
                for uid in uids]

    return make


def created_mailboxes(user: str, protocol: str,
                      actor: str | None) -> Callable[[list[str]], list[Event]]:
    """The mailbox.created events of the mailboxes a CREATE made (for an Announcement)."""

    def make(names: list[str]) -> list[Event]:
        return [Event(MAILBOX_CREATED, {"user": user, "mailbox": name, "protocol": protocol},
                      domain=user.rpartition("@")[2], actor=actor)
                for name in names]

    return make


Handler = Callable[[Event], Coroutine[Any, Any, None] | Deferred[None] | None]


def pattern_matches(pattern: str, event_type: str) -> bool:
    """Dotted-segment match: '*' is exactly one segment, '#' is zero or more."""

    def match(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        head, rest = p[0], p[1:]
        if head == "#":
            return any(match(rest, t[i:]) for i in range(len(t) + 1))
        if not t:
            return False
        return (head == "*" or head == t[0]) and match(rest, t[1:])

    return match(pattern.split("."), event_type.split("."))


class Subscription:
    def __init__(self, bus: EventBus, pattern: str, handler: Handler, name: str) -> None:
        self.pattern = pattern
        self.handler = handler
        self.name = name
        self._bus = bus

    def cancel(self) -> None:
        self._bus._remove(self)


class EventBus:
    """Publish/subscribe inside one process."""

    log = Logger()

    def __init__(self, known_types: Iterable[str] = EVENT_TYPES) -> None:
        self._known = frozenset(known_types)
        self._subscriptions: list[Subscription] = []
        # The subscriptions matching each event type, worked out on its first publish (every
        # delivery publishes; subscriptions change only at start-up and shutdown).
        self._matching: dict[str, tuple[Subscription, ...]] = {}
        # Set when events can leave the process (see :meth:`leaving`).
        self.outbox_filter: Callable[[], Awaitable[Wants]] | None = None

    async def leaving(self) -> Wants:
        """Which events leave the process: those of :data:`RECORDED_WITH_CHANGE` that it
        accepts are for the emitter to write to the outbox in its transaction."""
        if self.outbox_filter is None:
            return _nothing_leaves
        return await self.outbox_filter()

    def subscribe(self, pattern: str, handler: Handler, name: str | None = None) -> Subscription:
        if not pattern or any(not part for part in pattern.split(".")):
            raise ValueError(f"{pattern!r} is not an event pattern")
        label = name or str(getattr(handler, "__qualname__", repr(handler)))
        subscription = Subscription(self, pattern, handler, label)
        self._subscriptions.append(subscription)
        self._matching.clear()
        return subscription

    def add_subscriber(self, subscriber: IEventSubscriber) -> list[Subscription]:
        """Subscribe an :class:`IEventSubscriber` to each of its patterns."""
        handler: Handler = subscriber.handle
        return [
            self.subscribe(pattern, handler, name=str(subscriber.name))
            for pattern in subscriber.patterns
        ]

    def _remove(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            self._matching.clear()

    def publish(self, event: Event) -> Deferred[None]:
        """Deliver ``event`` to every matching subscriber; fires when all have finished."""
        matching = self._matching.get(event.type)
        if matching is None:
            if event.type not in self._known:
                raise ValueError(f"unknown event type {event.type!r}")
            matching = self._matching[event.type] = tuple(
                s for s in self._subscriptions if pattern_matches(s.pattern, event.type)
            )
        # Subscribers that finish at once (most of them: counters, the outbox filter) cost a
        # call each; only those that return a Deferred or a coroutine are waited for.
        pending: list[Deferred[None]] = []
        for subscription in matching:
            try:
                result = subscription.handler(event)
            except Exception:
                self._failed(Failure(), subscription, event)
                continue
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                pending.append(result.addErrback(self._failed, subscription, event))
        if not pending:
            return succeed(None)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    def _failed(self, failure: Failure, subscription: Subscription, event: Event) -> None:
        self.log.failure(
            "event subscriber {subscriber} failed on {type} {id}",
            failure,
            subscriber=subscription.name,
            type=event.type,
            id=str(event.id),
        )
