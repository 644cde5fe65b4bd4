"""An LLM sorts arriving mail into categories (primary, social, promotions, updates, forums,
spam by default) through an OpenAI-compatible chat completions API or Anthropic's messages
API; the category becomes an IMAP keyword (``$Category/Promotions``) and, if configured, the
folder the message is filed into.

It sends mail to another party, so it runs only for mail whose recipients' domains have all
turned it on (``PUT /api/v1/domains/{name}/filters``), and only for mail that arrives (never
what users submit).  What is sent is bounded: a few header fields and the first
``max_text`` bytes of the text.  The answer must be strict JSON naming one of the categories;
anything else, a timeout, or an HTTP error is a failure of the filter, which passes the
message on (``on_failure: open``, the default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import treq
from pydantic import Field
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from esp.bodytext import body_text
from esp.filters import JUNK, FilterContext, FilterServices, FilterSettings, Verdict
from esp.interfaces import IMessageFilter

CATEGORIES = ("primary", "social", "promotions", "updates", "forums", "spam")
HEADERS = ("From", "To", "Subject", "Date", "List-Id", "List-Unsubscribe", "Precedence",
           "Auto-Submitted")


class LLMSettings(FilterSettings):
    api: Literal["openai", "anthropic"] = "openai"
    base_url: str = Field("https://api.openai.com/v1", pattern=r"^https?://[^\s]+$",
                          description="the API's base URL (for Anthropic: "
                          "https://api.anthropic.com)")
    model: str = Field("gpt-4o-mini", min_length=1)
    api_key_file: Path | None = Field(None, description="a file holding the API key")
    api_key: str | None = Field(None, description="the API key (api_key_file is better)")
    categories: tuple[Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,40}$")], ...] = Field(
        CATEGORIES, min_length=2)
    max_text: int = Field(8192, ge=256, le=200_000, description="bytes of text sent at most")
    # IMAP atom characters (RFC 3501 §9): no ( ) { space % * " \\ ] or controls.
    keyword_prefix: str = Field("$Category/", pattern=r"^[!#$&'+-/0-9:-Z\[^-z|}~]{1,40}$")
    folders: dict[str, str] = Field(default_factory=dict, description="category → mailbox "
                                    "to file into (the keyword is set either way)")
    spam_to_junk: bool = Field(True, description="the spam category goes to the Junk mailbox")
    timeout: float = Field(20.0, gt=0, le=600)


def prompt(context: FilterContext, settings: LLMSettings) -> tuple[str, str]:
    """(system, user) texts of the request."""
    system = (
        "You sort email into exactly one category. The categories are: "
        + ", ".join(settings.categories)
        + '. Answer with one JSON object and nothing else: {"category": "<category>"}.'
    )
    parsed = context.parsed
    lines = [f"{name}: {parsed.get(name, '')}"[:300] for name in HEADERS if parsed.get(name)]
    text = body_text(context.message)
    sample = text.encode("utf-8")[:settings.max_text].decode("utf-8", "ignore")
    return system, "\n".join(lines) + "\n\n" + sample


def category_of(answer: str, settings: LLMSettings) -> str:
    """The category named by the model's JSON answer; ValueError when it names none."""
    text = answer.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    value = json.loads(text)
    if not isinstance(value, dict) or not isinstance(value.get("category"), str):
        raise ValueError(f"not a category object: {answer[:200]!r}")
    category = str(value["category"]).strip().lower()
    if category not in settings.categories:
        raise ValueError(f"unknown category {category!r}")
    return category


@implementer(IMessageFilter)
class LLMFilter:
    name = "llm"

    def __init__(self, settings: LLMSettings, services: FilterServices) -> None:
        self._settings = settings
        self._services = services
        key = settings.api_key
        if settings.api_key_file is not None:
            key = settings.api_key_file.read_text().strip()
        self._key = key or ""

    def _request(
        self, system: str, user: str,
    ) -> tuple[str, dict[str, Any], dict[bytes | str, bytes | str]]:
        s = self._settings
        base = s.base_url.rstrip("/")
        if s.api == "anthropic":
            return (f"{base}/v1/messages",
                    {"model": s.model, "max_tokens": 50, "system": system,
                     "messages": [{"role": "user", "content": user}]},
                    {"x-api-key": self._key, "anthropic-version": "2023-06-01"})
        return (f"{base}/chat/completions",
                {"model": s.model, "temperature": 0, "max_tokens": 50,
                 "response_format": {"type": "json_object"},
                 "messages": [{"role": "system", "content": system},
                              {"role": "user", "content": user}]},
                {"authorization": f"Bearer {self._key}"})

    @staticmethod
    def _answer(api: str, reply: Any) -> str:
        if api == "anthropic":
            return str(reply["content"][0]["text"])
        return str(reply["choices"][0]["message"]["content"])

    async def check(self, context: FilterContext) -> Verdict:
        if not context.inbound or not context.recipient_domains:
            return Verdict()
        # Parsing and decoding a large message is CPU work: not on the reactor thread.
        system, user = await deferToThreadPool(self._services.reactor,
                                               self._services.threadpool, prompt, context,
                                               self._settings)
        url, body, headers = self._request(system, user)
        response = await treq.post(
            url, json=body, headers=dict(headers.items()),
            timeout=self._settings.timeout, reactor=self._services.reactor)
        content = await response.content()
        if response.code != 200:
            raise RuntimeError(f"the LLM API answered HTTP {response.code}: {content[:200]!r}")
        try:
            category = category_of(self._answer(self._settings.api, json.loads(content)),
                                   self._settings)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RuntimeError(f"the LLM's answer is not usable: {e}") from None
        keyword = self._settings.keyword_prefix + category.capitalize()
        folder = self._settings.folders.get(category)
        if category == "spam" and self._settings.spam_to_junk:
            return Verdict("quarantine", keywords=(keyword,), folder=JUNK,
                           details={"category": category})
        return Verdict("tag", keywords=(keyword,), folder=folder,
                       details={"category": category})
