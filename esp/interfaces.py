"""The contracts between ESP's layers and for plugin authors (zope.interface)."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IEventSubscriber(Interface):
    """Something that reacts to events on the :class:`esp.events.EventBus`.

    Built-in subscribers (webhooks, audit log, metrics) and third-party ones implement this.
    A subscriber that raises is logged and never stops the others or the emitter.
    """

    name = Attribute("A short name for logs, e.g. 'audit'.")
    patterns = Attribute(
        "Event type patterns this subscriber wants: 'message.received', 'message.*' (one "
        "segment) or '#' (everything)."
    )

    def handle(event: object) -> object:
        """Handle one :class:`esp.events.Event`; may return an awaitable or a Deferred."""
