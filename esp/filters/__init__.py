"""The filter pipeline's vocabulary: what a filter is shown (:class:`FilterContext`), what it
answers (:class:`Verdict`), what it may use (:class:`FilterServices`), and how the answers of
a chain become one :class:`Decision`.

A verdict is one of:

- ``accept``: nothing to say (headers may still be added, e.g. a scan result);
- ``tag``: add header fields, a score, IMAP keywords, perhaps a folder to file into;
- ``quarantine``: deliver to a quarantine folder (the user's \\Junk by default);
- ``reject``: refuse with a permanent SMTP reply (5xx) in the session, so no bounce is made;
- ``defer``: refuse for now (4xx), the sender tries again.

The chain runs in order and stops at the first reject or defer.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["accept", "tag", "quarantine", "reject", "defer"]
ACTIONS = ("accept", "tag", "quarantine", "reject", "defer")
JUNK = "\\Junk"  # RFC 6154: a quarantine folder given by special use, not by name
# Header fields the built-in filters write: removed from arriving mail before the chain runs,
# so that a sender cannot forge them.
FILTER_FIELDS = frozenset({"x-spam", "x-spam-score", "x-spamd-result", "x-spam-status",
                           "x-virus", "x-virus-scanned"})
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 §3.6.8 ftext


class FilterSettings(BaseModel):
    """Settings every filter has; a filter's own settings model extends this."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(30.0, gt=0, le=600, description="seconds before the filter counts "
                           "as failed")
    on_failure: Literal["open", "closed"] = Field(
        "open", description="open: log, count and pass the message; closed: answer 451 so "
        "the sender tries again later")


@dataclass(frozen=True)
class FilterContext:
    """One message as the filters see it."""

    sender: str  # '' is the null reverse-path
    recipients: tuple[str, ...]
    message: bytes
    client_ip: str
    helo: str
    user: str | None = None  # the authenticated submitter
    listener: str = "mx"  # mx, submission, submissions, api
    queue_id: str = ""
    auth_results: str = ""  # the Authentication-Results ESP added (MX)
    # Domains of the local recipients (for per-domain settings).
    recipient_domains: tuple[str, ...] = ()
    # What the filters before this one said, in order.
    earlier: tuple[Verdict, ...] = ()
    _parsed: list[email.message.EmailMessage] = field(default_factory=list, repr=False,
                                                      compare=False)

    @property
    def parsed(self) -> email.message.EmailMessage:
        """The message parsed (once, on first use); broken MIME parses as far as it can."""
        if not self._parsed:
            parsed = email.message_from_bytes(self.message, policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            self._parsed.append(parsed)
        return self._parsed[0]

    @property
    def inbound(self) -> bool:
        return self.user is None


@dataclass(frozen=True)
class Verdict:
    action: Action = "accept"
    headers: tuple[tuple[str, str], ...] = ()
    score: float | None = None
    keywords: tuple[str, ...] = ()
    folder: str | None = None  # quarantine or file-into folder (a name, or JUNK)
    code: int | None = None  # reject / defer
    status: str | None = None  # enhanced status code
    text: str = ""
    # For events and logs: the filter's own findings (symbols, signature name...).
    details: Mapping[str, Any] = field(default_factory=dict)
    filter: str = ""  # set by the pipeline

    @classmethod
    def reject(cls, text: str, code: int = 554, status: str = "5.7.1",
               details: Mapping[str, Any] | None = None, score: float | None = None,
               ) -> Verdict:
        return cls("reject", code=code, status=status, text=text, details=details or {},
                   score=score)

    @classmethod
    def defer(cls, text: str, code: int = 451, status: str = "4.7.1",
              details: Mapping[str, Any] | None = None) -> Verdict:
        return cls("defer", code=code, status=status, text=text, details=details or {})


@dataclass(frozen=True)
class Decision:
    """The chain's verdicts merged: what happens to the message."""

    action: Literal["accept", "quarantine", "reject", "defer"]
    headers: tuple[tuple[str, str], ...] = ()
    keywords: tuple[str, ...] = ()
    folder: str | None = None
    code: int | None = None
    status: str | None = None
    text: str = ""
    verdicts: tuple[Verdict, ...] = ()

    @property
    def refused(self) -> bool:
        return self.action in ("reject", "defer")


def merge(verdicts: Sequence[Verdict]) -> Decision:
    """Verdicts in chain order → one decision: the first reject or defer ends it; headers and
    keywords add up; the first quarantine folder wins over any filing folder."""
    headers: list[tuple[str, str]] = []
    keywords: list[str] = []
    quarantine: str | None = None
    folder: str | None = None
    for verdict in verdicts:
        if verdict.action in ("reject", "defer"):
            return Decision(verdict.action, code=verdict.code, status=verdict.status,
                            text=verdict.text, verdicts=tuple(verdicts))
        headers.extend(verdict.headers)
        keywords.extend(k for k in verdict.keywords if k not in keywords)
        if verdict.action == "quarantine" and quarantine is None:
            quarantine = verdict.folder or JUNK
        elif verdict.folder and folder is None:
            folder = verdict.folder
    return Decision("quarantine" if quarantine else "accept", tuple(headers), tuple(keywords),
                    quarantine or folder, verdicts=tuple(verdicts))


@dataclass(frozen=True)
class FilterServices:
    """What a filter may use from ESP."""

    reactor: Any
    db: Any = None  # esp.storage.db.Database
    threadpool: Any = None  # for blocking work
    events: Any = None  # esp.events.EventBus
    hostname: str = "localhost"
    node: str = ""


def _fold(name: str, value: str) -> str:
    """One header field, folded at spaces to lines of at most 78 characters where it can be
    (RFC 5322 §2.2.3) and never past 998; anything but printable ASCII becomes '?'."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in value[:8000])
    words = []
    for word in clean.split(" "):
        words += [word[i:i + 900] for i in range(0, len(word), 900)] if word else []
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line.strip():
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def filter_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header fields to put at the top of the message, as filters added them (a field with a
    name that is not one is left out)."""
    return "".join(_fold(name, value) for name, value in headers
                   if _FIELD_NAME.match(name)).encode("ascii")


def check_verdict(verdict: object) -> Verdict:
    """``verdict`` when it is a well-formed Verdict; ValueError otherwise (a reject must be
    5xx, a defer 4xx: a filter cannot make ESP answer 250 and drop the message, or turn a
    temporary failure into a permanent one)."""
    if not isinstance(verdict, Verdict):
        raise ValueError(f"check() gave {type(verdict).__name__}, not a Verdict")
    if verdict.action not in ACTIONS:
        raise ValueError(f"unknown verdict action {verdict.action!r}")
    if verdict.action in ("reject", "defer"):
        first = "5" if verdict.action == "reject" else "4"
        if (verdict.code is None or not str(verdict.code).startswith(first)
                or not 400 <= verdict.code < 600 or not (verdict.status or "").startswith(
                    first + ".")):
            raise ValueError(f"a {verdict.action} needs a {first}xx code and a {first}.x.x "
                             f"status, not {verdict.code} {verdict.status}")
    return verdict


def by_domain(context: FilterContext) -> list[tuple[str | None, list[str]]]:
    """The recipients grouped by hosted domain, for events (each domain's subscribers see
    only their own recipients); (None, all) when the mail is for no hosted domain."""
    groups = [(domain, [r for r in context.recipients
                        if r.rpartition("@")[2].lower() == domain])
              for domain in context.recipient_domains]
    groups = [(d, rs) for d, rs in groups if rs]
    return list(groups) if groups else [(None, list(context.recipients))]
