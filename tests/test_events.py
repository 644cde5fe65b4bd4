"""The in-process event bus: patterns, isolation of failing subscribers, asynchronous handlers."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import LogEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esp.events import (
    EVENT_TYPES,
    MESSAGE_BOUNCED,
    MESSAGE_RECEIVED,
    USER_LOGIN,
    Event,
    EventBus,
    pattern_matches,
    uuid7,
)
from esp.interfaces import IEventSubscriber


def test_the_design_event_types_are_all_known() -> None:
    assert EVENT_TYPES == {
        "message.received", "message.sent", "message.bounced", "message.deleted",
        "user.login", "mailbox.created", "filter.matched", "spam.detected",
        "virus.detected", "certificate.renewed", "webhook.disabled",
        "certificate.failed",
    }


@pytest.mark.parametrize(
    "pattern, event_type, expected",
    [
        ("message.received", "message.received", True),
        ("message.received", "message.sent", False),
        ("message.*", "message.sent", True),
        ("message.*", "user.login", False),
        ("*.detected", "spam.detected", True),
        ("*", "spam.detected", False),
        ("#", "spam.detected", True),
        ("message.#", "message.received", True),
        ("message", "message.received", False),
    ],
)
def test_patterns(pattern: str, event_type: str, expected: bool) -> None:
    assert pattern_matches(pattern, event_type) is expected


def test_event_ids_sort_by_time_and_are_version_7() -> None:
    ids = [uuid7() for _ in range(200)]
    assert all(i.version == 7 for i in ids)
    assert len(set(ids)) == 200
    millis = [i.int >> 80 for i in ids]
    assert millis == sorted(millis)


def test_subscribers_get_matching_events_only() -> None:
    bus = EventBus()
    got: list[tuple[str, str]] = []
    bus.subscribe("message.*", lambda e: got.append(("message", e.type)))
    bus.subscribe(USER_LOGIN, lambda e: got.append(("login", e.type)))
    bus.subscribe("#", lambda e: got.append(("all", e.type)))
    bus.publish(Event(MESSAGE_RECEIVED, {"size": 10}))
    bus.publish(Event(USER_LOGIN, {"user": "alice@example.test"}))
    assert got == [
        ("message", "message.received"), ("all", "message.received"),
        ("login", "user.login"), ("all", "user.login"),
    ]


def test_a_failing_subscriber_is_logged_and_does_not_stop_others() -> None:
    bus = EventBus()
    got: list[str] = []
    logged: list[LogEvent] = []

    def boom(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe("#", boom, name="broken")
    bus.subscribe("#", lambda e: got.append(e.type))
    globalLogPublisher.addObserver(logged.append)
    try:
        done = bus.publish(Event(MESSAGE_BOUNCED))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert got == ["message.bounced"]
    assert done.called and done.result is None  # publish itself never fails
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["subscriber"] == "broken"
    assert "subscriber bug" in str(failures[0]["log_failure"].value)


def test_unknown_event_types_and_bad_patterns_are_refused() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="unknown event type"):
        bus.publish(Event("message.recieved"))
    with pytest.raises(ValueError, match="not an event pattern"):
        bus.subscribe("message..x", lambda e: None)


def test_cancelled_subscription_gets_nothing() -> None:
    bus = EventBus()
    got: list[Event] = []
    subscription = bus.subscribe("#", got.append)
    subscription.cancel()
    bus.publish(Event(USER_LOGIN))
    assert got == []


def test_subscriptions_made_or_cancelled_after_a_publish_count_for_the_next() -> None:
    bus = EventBus()
    got: list[str] = []
    first = bus.subscribe("user.*", lambda e: got.append("first"))
    bus.publish(Event(USER_LOGIN))
    bus.subscribe(USER_LOGIN, lambda e: got.append("second"))
    bus.publish(Event(USER_LOGIN))
    first.cancel()
    bus.publish(Event(USER_LOGIN))
    assert got == ["first", "first", "second", "second"]


def test_publish_waits_for_asynchronous_handlers() -> None:
    bus = EventBus()
    clock = task.Clock()
    finished: list[str] = []

    async def slow(event: Event) -> None:
        await task.deferLater(clock, 5, lambda: None)
        finished.append(event.type)

    bus.subscribe("#", slow)
    done = bus.publish(Event(USER_LOGIN))
    assert not done.called
    clock.advance(5)
    assert done.called
    assert finished == ["user.login"]


@implementer(IEventSubscriber)
class Recorder:
    name = "recorder"
    patterns = ("user.login", "message.*")

    def __init__(self) -> None:
        self.seen: list[str] = []

    def handle(self, event: Event) -> defer.Deferred[None]:
        self.seen.append(event.type)
        return defer.succeed(None)


def test_interface_subscribers_are_subscribed_to_each_pattern() -> None:
    recorder = Recorder()
    verifyObject(IEventSubscriber, recorder)
    bus = EventBus()
    bus.add_subscriber(recorder)
    for event_type in ("user.login", "message.sent", "spam.detected"):
        bus.publish(Event(event_type))
    assert recorder.seen == ["user.login", "message.sent"]


@pytest_twisted.ensureDeferred
async def test_publish_runs_under_the_real_reactor() -> None:
    bus = EventBus()
    seen: list[str] = []

    async def handler(event: Event) -> None:
        await task.deferLater(reactor, 0, lambda: None)
        seen.append(event.type)

    bus.subscribe("#", handler)
    await bus.publish(Event(MESSAGE_RECEIVED))
    assert seen == ["message.received"]
