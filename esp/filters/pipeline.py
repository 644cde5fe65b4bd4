"""The filter chain: finding the filters (``twisted.plugin``), building them from the
configuration, and running them on a message with their timeouts and failure policies.

Which filters run for a message: the configured chain, in order, minus those every local
recipient's domain has turned off; a filter that sends mail off the machine (the LLM
categoriser) runs only when every local recipient's domain has turned it on.  Domain choices
live in ``domains.settings -> 'filters'`` (``{"disabled": [...], "enabled": [...]}``), set
over the API, and are cached for ``filters.domain_cache_seconds``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ValidationError
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins

from esp.events import FILTER_MATCHED, Event, EventBus
from esp.filters import (
    Decision,
    FilterContext,
    FilterServices,
    FilterSettings,
    Verdict,
    by_domain,
    check_verdict,
    merge,
)
from esp.interfaces import IMessageFilter, IMessageFilterFactory
from esp.storage.manage import domain_filters_txn
from esp.ttlcache import TTLCache


class FilterConfigError(ValueError):
    """The chain names a filter that is not installed, or its settings are invalid."""


# The longest the whole chain may take (the sum of the filters' timeouts).
MAX_CHAIN_SECONDS = 300


@dataclass(frozen=True)
class DomainFilters:
    """A domain's choices: filters of the chain it turned off, opt-in filters it turned on."""

    disabled: frozenset[str] = frozenset()
    enabled: frozenset[str] = frozenset()


def installed_filters() -> dict[str, Any]:
    """Every filter factory ``twisted.plugin`` finds, by name (ESP's and third parties')."""
    import twisted.plugins

    found: dict[str, Any] = {}
    for factory in getPlugins(IMessageFilterFactory, twisted.plugins):
        if not IPlugin.providedBy(factory):
            continue
        name = str(factory.name)
        if name in found and found[name] is not factory:
            # Which one would win depends on the order of discovery: refuse both.
            raise FilterConfigError(f"two installed filters are named {name!r} "
                                    f"({found[name]!r} and {factory!r}); uninstall one")
        found[name] = factory
    return found


def validate_settings(factory: Any, raw: Mapping[str, Any]) -> FilterSettings:
    model: type[BaseModel] = factory.settings
    try:
        settings = model.model_validate(dict(raw))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(settings)'}: {err['msg']}"
            for err in e.errors())
        raise FilterConfigError(f"filters.settings.{factory.name}: {problems}") from None
    if not isinstance(settings, FilterSettings):
        raise FilterConfigError(f"filter {factory.name}: its settings model must extend "
                                "esp.filters.FilterSettings")
    return settings


@dataclass(frozen=True)
class Stage:
    name: str
    filter: Any  # IMessageFilter
    settings: FilterSettings
    off_machine: bool = False


def resolve_chain(
    chain: Sequence[str], settings: Mapping[str, Mapping[str, Any]],
    factories: Mapping[str, Any] | None = None,
) -> list[tuple[str, Any, FilterSettings]]:
    """(name, factory, settings) for each filter of the chain; FilterConfigError when one is
    not installed, is named twice, or its settings do not validate."""
    factories = installed_filters() if factories is None else factories
    unknown = [name for name in chain if name not in factories]
    if unknown:
        raise FilterConfigError(
            f"filters.chain names {', '.join(unknown)}, not installed (installed: "
            f"{', '.join(sorted(factories)) or 'none'})")
    if len(set(chain)) != len(chain):
        raise FilterConfigError("filters.chain names a filter twice")
    extra = [name for name in settings if name not in chain]
    if extra:
        raise FilterConfigError(f"filters.settings has {', '.join(extra)}, not in the chain")
    resolved = [(name, factories[name], validate_settings(factories[name],
                                                          settings.get(name, {})))
                for name in chain]
    total = sum(validated.timeout for _, _, validated in resolved)
    if total > MAX_CHAIN_SECONDS:
        raise FilterConfigError(
            f"the filters' timeouts add up to {total:g} seconds; keep them under "
            f"{MAX_CHAIN_SECONDS} (a client waits 10 minutes for the answer to DATA, RFC 5321 "
            "§4.5.3.2.6, and retries after: the message would arrive twice)")
    return resolved


def build_stages(
    chain: Sequence[str], settings: Mapping[str, Mapping[str, Any]], services: FilterServices,
    factories: Mapping[str, Any] | None = None,
) -> list[Stage]:
    stages = []
    for name, factory, validated in resolve_chain(chain, settings, factories):
        try:
            built = factory.build(validated, services)
        except Exception as e:
            raise FilterConfigError(f"filter {name} could not be set up: {e}") from e
        if not IMessageFilter.providedBy(built):
            raise FilterConfigError(f"filter {name}: build() did not give an IMessageFilter")
        stages.append(Stage(name, built, validated,
                            bool(getattr(factory, "sends_mail_off_machine", False))))
    return stages


class FilterPipeline:
    log = Logger()

    def __init__(
        self, stages: Sequence[Stage], events: EventBus, reactor: Any,
        domain_filters: Callable[[Sequence[str], bool],
                                 Awaitable[Mapping[str, DomainFilters]]] | None = None,
        metrics: Any = None,
    ) -> None:
        self._metrics = metrics  # esp.metrics.Metrics, when metrics are kept
        self.stages = list(stages)
        self._events = events
        self._reactor = reactor
        self._domain_filters = domain_filters
        self.failures: dict[str, int] = {stage.name: 0 for stage in stages}

    def __bool__(self) -> bool:
        return bool(self.stages)

    async def _stages_for(self, context: FilterContext) -> list[Stage]:
        domains = sorted(set(context.recipient_domains))
        choices: Mapping[str, DomainFilters] = {}
        if domains and self._domain_filters is not None:
            # A domain that turned an off-machine filter off must be obeyed at once, on
            # every node: read its choices afresh when such a filter is in the chain.
            fresh = any(stage.off_machine for stage in self.stages)
            choices = await self._domain_filters(domains, fresh)
        chosen = []
        for stage in self.stages:
            mine = [choices.get(d, DomainFilters()) for d in domains]
            if stage.off_machine:
                if domains and all(stage.name in c.enabled for c in mine):
                    chosen.append(stage)
            elif not mine or not all(stage.name in c.disabled for c in mine):
                chosen.append(stage)
        return chosen

    async def run(self, context: FilterContext) -> Decision:
        verdicts: list[Verdict] = []
        for stage in await self._stages_for(context):
            verdict = await self._check(stage, replace(context, earlier=tuple(verdicts)))
            if verdict is None:
                continue
            verdict = replace(verdict, filter=stage.name)
            verdicts.append(verdict)
            if verdict.action != "accept":
                self._announce(context, verdict)
            if verdict.action in ("reject", "defer"):
                break
        return merge(verdicts)

    async def _check(self, stage: Stage, context: FilterContext) -> Verdict | None:
        started = self._reactor.seconds()
        try:
            return await self._judge(stage, context)
        except Exception as e:
            if self._metrics is not None:
                self._metrics.filter_failures.labels(stage.name).inc()
            self.failures[stage.name] = self.failures.get(stage.name, 0) + 1
            self.log.warn(
                "filter {filter} failed ({policy}): {error}", filter=stage.name,
                policy="passing the message" if stage.settings.on_failure == "open"
                else "answering 451", error=str(e) or type(e).__name__)
            if stage.settings.on_failure == "closed":
                return Verdict.defer(f"Message filter {stage.name} is unavailable, try again "
                                     "later", status="4.3.0")
            return None
        finally:
            if self._metrics is not None:
                self._metrics.filter_seconds.labels(stage.name).observe(
                    max(0.0, self._reactor.seconds() - started))

    async def _judge(self, stage: Stage, context: FilterContext) -> Verdict:
        result = stage.filter.check(context)
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            result.addTimeout(stage.settings.timeout, self._reactor)
            result = await result
        return check_verdict(result)

    def _announce(self, context: FilterContext, verdict: Verdict) -> None:
        for domain, recipients in by_domain(context):
            self._events.publish(Event(
                FILTER_MATCHED,
                {"filter": verdict.filter, "action": verdict.action, "score": verdict.score,
                 "text": verdict.text, "details": dict(verdict.details),
                 "sender": context.sender, "recipients": recipients,
                 "client_ip": context.client_ip, "queue_id": context.queue_id},
                domain=domain,
            ))


class DomainFilterCache:
    """Each domain's filter choices, read from PostgreSQL and kept for ``ttl`` seconds."""

    def __init__(self, db: Any, reactor: Any, ttl: float) -> None:
        self._db = db
        self._cache: TTLCache[str, DomainFilters] = TTLCache(
            self._load, DomainFilters(), reactor, ttl)

    async def _load(self, domains: list[str]) -> dict[str, DomainFilters]:
        found = await self._db.run("domain_filters", domain_filters_txn, domains)
        return {domain: DomainFilters(frozenset(raw.get("disabled", ())),
                                      frozenset(raw.get("enabled", ())))
                for domain, raw in found.items()}

    async def __call__(self, domains: Sequence[str],
                       fresh: bool = False) -> Mapping[str, DomainFilters]:
        if fresh:
            for domain in domains:
                self._cache.forget(domain)
        return await self._cache.get_many(domains)

    def forget(self, domain: str) -> None:
        self._cache.forget(domain)
