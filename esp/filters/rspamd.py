"""Rspamd: the message and its envelope to a normal worker's ``/checkv2`` (HTTP, treq), its
action turned into a verdict.

Rspamd's actions: ``reject`` → 554 in the session; ``add header`` and ``rewrite subject`` →
spam (quarantined to the user's Junk, or only tagged, per ``on_spam``); ``soft reject`` and
``greylist`` → 451; ``no action`` → accept.  Every scanned message gets ``X-Spamd-Result``
(score and symbols, as Rspamd's own milter writes it) and ``X-Spam-Score``; spam gets
``X-Spam: Yes`` and a ``spam.detected`` event.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import treq
from pydantic import Field
from zope.interface import implementer

from esp.events import SPAM_DETECTED, Event
from esp.filters import (
    Action,
    FilterContext,
    FilterServices,
    FilterSettings,
    Verdict,
    by_domain,
)
from esp.interfaces import IMessageFilter


class RspamdSettings(FilterSettings):
    url: str = Field("http://127.0.0.1:11333", pattern=r"^https?://[^\s]+$",
                     description="a normal worker (or the controller)")
    password: str | None = Field(None, description="the Password header, when the worker "
                                 "asks for one")
    max_size: int = Field(20 * 1024 * 1024, ge=1, description="larger messages are not sent")
    on_spam: Literal["quarantine", "tag"] = Field(
        "quarantine", description="what 'add header' and 'rewrite subject' do")
    timeout: float = Field(15.0, gt=0, le=600)


def _symbols(answer: dict[str, Any]) -> dict[str, float]:
    symbols = answer.get("symbols") or {}
    found: dict[str, float] = {}
    if isinstance(symbols, dict):
        for name, value in symbols.items():
            score = value.get("score", 0.0) if isinstance(value, dict) else 0.0
            found[str(name)] = float(score) if isinstance(score, int | float) else 0.0
    return found


def result_header(answer: dict[str, Any]) -> str:
    """``default: False [0.90 / 15.00]; SYMBOL(0.50), ...``: Rspamd's own rendering."""
    score = float(answer.get("score", 0.0))
    required = float(answer.get("required_score", 0.0))
    spam = answer.get("action") in ("reject", "add header", "rewrite subject")
    symbols = ", ".join(f"{name}({value:.2f})" for name, value in
                        sorted(_symbols(answer).items()))
    return f"default: {spam} [{score:.2f} / {required:.2f}]; {symbols}"


@implementer(IMessageFilter)
class RspamdFilter:
    name = "rspamd"

    def __init__(self, settings: RspamdSettings, services: FilterServices) -> None:
        self._settings = settings
        self._services = services
        self._url = settings.url.rstrip("/") + "/checkv2"

    def _headers(self, context: FilterContext) -> dict[bytes | str, list[bytes | str]]:
        def value(text: str) -> list[bytes | str]:
            return [text.encode("utf-8", "replace")]

        headers: dict[bytes | str, list[bytes | str]] = {
            b"IP": value(context.client_ip), b"Helo": value(context.helo),
            b"From": value(context.sender), b"Rcpt": [r.encode() for r in context.recipients],
            b"Queue-Id": value(context.queue_id), b"MTA-Name": value(self._services.hostname),
            b"Content-Type": [b"message/rfc822"],
        }
        if context.user:
            headers[b"User"] = value(context.user)
        if self._settings.password:
            headers[b"Password"] = value(self._settings.password)
        return headers

    async def check(self, context: FilterContext) -> Verdict:
        if len(context.message) > self._settings.max_size:
            return Verdict(headers=(("X-Spamd-Result", "skipped: message too large"),))
        response = await treq.post(
            self._url, data=context.message, headers=self._headers(context),
            timeout=self._settings.timeout, reactor=self._services.reactor)
        body = await response.content()
        if response.code != 200:
            raise RuntimeError(f"rspamd answered HTTP {response.code}: {body[:200]!r}")
        answer = json.loads(body)
        if not isinstance(answer, dict) or "action" not in answer:
            raise RuntimeError(f"rspamd's answer has no action: {body[:200]!r}")
        action = str(answer["action"])
        score = float(answer.get("score", 0.0))
        symbols = _symbols(answer)
        headers = [("X-Spamd-Result", result_header(answer)),
                   ("X-Spam-Score", f"{score:.2f}")]
        details = {"action": action, "score": score, "symbols": sorted(symbols)}
        # Rspamd may say what to answer (messages.smtp_message); printable ASCII only.
        said = str((answer.get("messages") or {}).get("smtp_message") or "")
        said = "".join(c for c in said if " " <= c <= "~")[:200]
        if action == "reject":
            self._announce(context, score, symbols, "reject")
            return Verdict.reject(said or "Spam message rejected", score=score,
                                  details=details)
        if action in ("soft reject", "greylist"):
            return Verdict.defer(said or "Try again later", status="4.7.1", details=details)
        if action in ("discard", "quarantine"):
            # Rspamd's own quarantine, and its discard (never dropped here: quarantined).
            self._announce(context, score, symbols, "quarantine")
            return Verdict("quarantine", headers=(*headers, ("X-Spam", "Yes")), score=score,
                           keywords=("$Junk",), details=details)
        if action in ("add header", "rewrite subject"):
            self._announce(context, score, symbols, self._settings.on_spam)
            headers.append(("X-Spam", "Yes"))
            kind: Action = "quarantine" if self._settings.on_spam == "quarantine" else "tag"
            return Verdict(kind, headers=tuple(headers), score=score, keywords=("$Junk",),
                           details=details)
        return Verdict("accept", headers=tuple(headers), score=score, details=details)

    def _announce(self, context: FilterContext, score: float, symbols: dict[str, float],
                  outcome: str) -> None:
        if self._services.events is None:
            return
        for domain, recipients in by_domain(context):
            self._services.events.publish(Event(
                SPAM_DETECTED,
                {"filter": self.name, "score": score, "symbols": sorted(symbols),
                 "outcome": outcome, "sender": context.sender, "recipients": recipients,
                 "client_ip": context.client_ip},
                domain=domain,
            ))
