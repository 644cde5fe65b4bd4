"""ESP's built-in message filters, declared the way a third party declares its own: each is an
``IPlugin`` and ``IMessageFilterFactory`` found by ``twisted.plugin.getPlugins``."""

from esp.filters.builtin import clamav, llm, ratelimit, rspamd

__all__ = ["clamav", "llm", "ratelimit", "rspamd"]
