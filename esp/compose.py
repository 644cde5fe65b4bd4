"""Build an RFC 5322 message from structured parts (the send API): text and/or HTML, files,
extra header fields.  Pure: no I/O.

The message is made with the standard library's ``email.message.EmailMessage`` (SMTP policy:
CRLF, folded lines, RFC 2047 encoded words for non-ASCII names and subjects, quoted-printable
or base64 bodies as the content needs).  Header fields a caller adds are checked: no line
breaks, no field that would change the structure (MIME fields) or the addressing (From, To,
...), which come from the request's own fields.
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage

from esp.addresses import InvalidAddress, normalize_domain

# Fields a caller may not set through ``headers``: the request has its own field for each, or
# the field describes the MIME structure ESP builds.
RESERVED = frozenset({
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "sender",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "return-path", "received", "dkim-signature", "authentication-results",
})
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 §3.6.8 ftext


class ComposeError(ValueError):
    """A part of the request cannot go into a message; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Mailbox:
    address: str
    name: str = ""


@dataclass(frozen=True)
class FilePart:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True)
class Draft:
    sender: Mailbox
    to: Sequence[Mailbox] = ()
    cc: Sequence[Mailbox] = ()
    reply_to: str | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: Sequence[FilePart] = ()
    headers: Mapping[str, str] = field(default_factory=dict)


# Characters that end a line for some reader (str.splitlines) or are control characters:
# never in a header field.
_BREAKS = frozenset({*map(chr, range(0x20)), "\x7f", "\x85", "\u2028", "\u2029"})


def _one_line(where: str, text: str, tab: bool = False) -> str:
    if any(c in _BREAKS and not (tab and c == "\t") for c in text):
        raise ComposeError(where, "may not contain line breaks or control characters")
    return text


def _header_address(where: str, mailbox: Mailbox) -> HeaderAddress:
    _one_line(where, mailbox.name)
    local, _, domain = mailbox.address.rpartition("@")
    try:
        # The domain as IDNA A-labels: what every receiver understands.
        return HeaderAddress(display_name=mailbox.name, username=local,
                             domain=normalize_domain(domain))
    except (ValueError, IndexError, InvalidAddress) as e:
        raise ComposeError(where, str(e)) from None


def compose(draft: Draft, hostname: str, now: datetime | None = None) -> tuple[bytes, str]:
    """(the message, its Message-ID); ComposeError naming the field that cannot go in."""
    try:
        return _compose(draft, hostname, now)
    except ComposeError:
        raise
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as e:
        # What the email package refuses that the checks below did not foresee.
        raise ComposeError("", f"cannot make a message of this: {e}") from None


def _compose(draft: Draft, hostname: str, now: datetime | None) -> tuple[bytes, str]:
    if draft.text is None and draft.html is None and not draft.attachments:
        raise ComposeError("text", "give text, html or attachments")
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = _header_address("from", draft.sender)
    if draft.to:
        message["To"] = [_header_address(f"to.{i}", m) for i, m in enumerate(draft.to)]
    if draft.cc:
        message["Cc"] = [_header_address(f"cc.{i}", m) for i, m in enumerate(draft.cc)]
    if draft.reply_to:
        message["Reply-To"] = _header_address("reply_to", Mailbox(draft.reply_to))
    message["Subject"] = _one_line("subject", draft.subject)
    message["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    message_id = f"<{uuid.uuid4().hex}@{hostname}>"
    message["Message-ID"] = message_id
    for name, value in draft.headers.items():
        where = f"headers.{name}"
        if not _FIELD_NAME.match(name):
            raise ComposeError(where, "not a header field name")
        if name.lower() in RESERVED:
            raise ComposeError(where, "set by ESP or by another field of the request")
        message[name] = _one_line(where, value, tab=True)
    if draft.text is not None:
        message.set_content(draft.text, subtype="plain", cte=None)
    if draft.html is not None:
        if draft.text is not None:
            message.add_alternative(draft.html, subtype="html")
        else:
            message.set_content(draft.html, subtype="html")
    for index, part in enumerate(draft.attachments):
        maintype, _, subtype = part.content_type.lower().partition("/")
        if maintype in ("multipart", "message"):
            raise ComposeError(f"attachments.{index}.content_type",
                               "send the parts or the message as a file of another type")
        _one_line(f"attachments.{index}.filename", part.filename)
        if any(c in part.filename for c in "/\\") or part.filename in (".", ".."):
            raise ComposeError(f"attachments.{index}.filename", "not a file name")
        message.add_attachment(part.content, maintype=maintype, subtype=subtype,
                               filename=part.filename)
    return message.as_bytes(), message_id
