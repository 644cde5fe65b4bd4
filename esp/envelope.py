"""What an SMTP session hands to mail logic, and the answers mail logic gives back.

The protocol layer builds :class:`Session` and :class:`Envelope`; mail logic answers with values
or raises :class:`Refusal`, which the protocol turns into a reply line, once, at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Listener(Enum):
    MX = "mx"                    # port 25: mail for our domains, no AUTH
    SUBMISSION = "submission"    # port 587: STARTTLS, then AUTH required
    SUBMISSIONS = "submissions"  # port 465: implicit TLS, AUTH required


@dataclass(frozen=True)
class Session:
    """Who is talking to us, as far as mail logic needs to know."""

    listener: Listener
    client_ip: str
    helo: str
    tls: bool
    user: str | None = None  # authenticated address
    session_id: str = ""


@dataclass(frozen=True)
class Envelope:
    sender: str  # '' is the null reverse-path <>
    recipients: tuple[str, ...]
    size_declared: int | None = None
    smtputf8: bool = False
    body: str = "7BIT"
    # What mail logic noted when it accepted the sender (e.g. the SPF result), handed back.
    sender_note: object = None


@dataclass(frozen=True)
class Accepted:
    """A recipient mail logic has agreed to take; ``resolution`` is mail logic's own note of
    where it goes, handed back unread by the protocol when the message arrives."""

    address: str
    resolution: object = None


class Refusal(Exception):
    """An SMTP answer other than success: ``code`` (4xx/5xx), enhanced status, text."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def temporary_failure(text: str = "Local error, please try again later") -> Refusal:
    return Refusal(451, "4.3.0", text)
