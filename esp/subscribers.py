"""Event subscribers from plugins: objects that provide ``IPlugin`` and ``IEventSubscriber``,
found by ``twisted.plugin.getPlugins`` in any package's ``twisted/plugins/`` and run when
``events.subscribers`` names them.  A failing subscriber is logged and never holds up mail
(the event bus calls each on its own)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.plugin import IPlugin, getPlugins

from esp.interfaces import IEventSubscriber


class SubscriberConfigError(ValueError):
    pass


def installed_subscribers() -> dict[str, Any]:
    import twisted.plugins

    found: dict[str, Any] = {}
    for plugin in getPlugins(IEventSubscriber, twisted.plugins):
        if IPlugin.providedBy(plugin):
            found.setdefault(str(plugin.name), plugin)
    return found


def chosen_subscribers(names: Sequence[str]) -> list[Any]:
    """The plugins ``events.subscribers`` names; SubscriberConfigError for one not installed."""
    if not names:
        return []
    found = installed_subscribers()
    missing = [n for n in names if n not in found]
    if missing:
        raise SubscriberConfigError(
            f"events.subscribers names {', '.join(missing)}, not installed (installed: "
            f"{', '.join(sorted(found)) or 'none'})")
    return [found[n] for n in names]
