"""Factories of the built-in filters (declared as plugins in ``twisted/plugins/esp_filters.py``).

:class:`FilterFactory` is also the simplest way for a third party to declare a filter: an
instance of it in their own ``twisted/plugins/`` module is a complete plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from esp.filters import FilterServices, FilterSettings
from esp.filters.clamav import ClamAVFilter, ClamAVSettings
from esp.filters.llm import LLMFilter, LLMSettings
from esp.filters.ratelimit import RateLimitFilter, RateLimitSettings
from esp.filters.rspamd import RspamdFilter, RspamdSettings
from esp.interfaces import IMessageFilterFactory


@implementer(IPlugin, IMessageFilterFactory)
@dataclass(frozen=True)
class FilterFactory:
    name: str
    description: str
    settings: type[FilterSettings]
    filter_class: Any  # called as filter_class(settings, services)
    sends_mail_off_machine: bool = False

    def build(self, settings: FilterSettings, services: FilterServices) -> Any:
        return self.filter_class(settings, services)


rspamd = FilterFactory("rspamd", "Rspamd spam scanning over HTTP (/checkv2)", RspamdSettings,
                       RspamdFilter)
clamav = FilterFactory("clamav", "ClamAV virus scanning through clamd (INSTREAM)",
                       ClamAVSettings, ClamAVFilter)
ratelimit = FilterFactory("ratelimit", "Token-bucket rate limits per client address, sender, "
                          "user and recipient domain", RateLimitSettings, RateLimitFilter)
llm = FilterFactory("llm", "Sorts arriving mail into categories with an LLM (OpenAI-compatible "
                    "or Anthropic API); only for domains that turn it on", LLMSettings,
                    LLMFilter, sends_mail_off_machine=True)
