"""The contracts between ESP's layers and for plugin authors (zope.interface)."""

from __future__ import annotations

from typing import Any

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

    def handle(event: Any) -> Any:
        """Handle one :class:`esp.events.Event`; may return an awaitable or a Deferred."""


class IMessageFilter(Interface):
    """One stage of the filter pipeline, built by its factory from its settings.

    ``check`` is called once per message, before ESP answers the end of DATA (so a reject is
    an SMTP reply, not a bounce), with an :class:`esp.filters.FilterContext`; it returns (or
    resolves to) an :class:`esp.filters.Verdict`.  Raising, or taking longer than the
    filter's ``timeout``, counts as a failure of the filter, handled by its ``on_failure``
    policy (``open``: log and pass; ``closed``: 451, try later).
    """

    name = Attribute("The filter's name, as in filters.chain.")

    def check(context: Any) -> Any:
        """Judge one message: an awaitable or Deferred of a Verdict (or a Verdict)."""


class IMessageFilterFactory(Interface):
    """A kind of filter, found with ``twisted.plugin.getPlugins(IMessageFilterFactory)``.

    Built-ins are declared in ESP's ``twisted/plugins/esp_filters.py``; a third-party package
    declares its own in its ``twisted/plugins/``, and the factory object must also provide
    ``twisted.plugin.IPlugin``.
    """

    name = Attribute("The name used in filters.chain, e.g. 'rspamd'.")
    description = Attribute("One line for `esp filters list`.")
    settings = Attribute(
        "A pydantic model class of the filter's settings (filters.settings.<name>); its JSON "
        "schema is what `esp filters list` shows and what the API validates against."
    )
    sends_mail_off_machine = Attribute(
        "True when the filter sends message content to another party (an LLM API): it then "
        "runs only for mail whose recipients' domains have all enabled it."
    )

    def build(settings: Any, services: Any) -> Any:
        """A filter with ``settings`` (an instance of ``settings``) and
        :class:`esp.filters.FilterServices`."""


class IDNSChallengeSolver(Interface):
    """Publishes ACME DNS-01 answers (RFC 8555 §8.4) in a DNS zone ESP does not serve: the
    only challenge a wildcard name can use.  Found through ``twisted.plugin`` (an object
    providing :class:`twisted.plugin.IPlugin` and this), chosen by ``name`` in
    ``security.tls.acme.dns_solver``.  Its methods are called from a thread (the ACME client
    is blocking): they may block, and must return only once the record is published (or
    removed) on every authoritative server."""

    name = Attribute("The name configuration chooses it by.")

    def configure(settings: dict[str, Any]) -> None:
        """Take ``security.tls.acme.dns_solver_settings``; raise ValueError if they are
        wrong (checked at start-up)."""

    def present(name: str, record: str, value: str) -> None:
        """Publish TXT ``value`` at ``record`` (``_acme-challenge.<name>``)."""

    def cleanup(name: str, record: str, value: str) -> None:
        """Remove what :meth:`present` published."""
