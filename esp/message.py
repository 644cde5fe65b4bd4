"""What ESP reads from a message once, at delivery: the header fields it indexes for search.

Pure functions, no I/O.  Broken headers never raise: a field that cannot be decoded is kept as
raw text, a date that cannot be parsed is left out.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

_MAX_FIELD = 4096


@dataclass(frozen=True)
class MessageSummary:
    header_block: bytes
    message_id: str | None
    in_reply_to: str | None
    subject: str | None
    from_header: str | None
    to_header: str | None
    cc_header: str | None
    bcc_header: str | None
    sent_date: datetime | None

    @property
    def header_text(self) -> str:
        return self.header_block.decode("utf-8", "replace")


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """(header block including the blank line, body); a message without a blank line is all
    header."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = message.find(separator)
        if index >= 0:
            end = index + len(separator)
            return message[:end], message[end:]
    return message, b""


def complete_submission(message: bytes, hostname: str, now: datetime | None = None) -> bytes:
    """A submitted message with the Date and Message-ID an MSA adds when they are missing
    (RFC 6409 §8.2-8.3; RFC 5322 §3.6 requires Date, and verifiers such as OpenDKIM refuse a
    message without it).  Added at the end of the header, as Postfix does."""
    header, body = split_header(message)
    names = {name for name, _ in header_fields(header)}
    added = b""
    if "date" not in names:
        stamp = email.utils.format_datetime(now or datetime.now(UTC))
        added += f"Date: {stamp}\r\n".encode()
    if "message-id" not in names:
        added += f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\r\n".encode()
    if not added:
        return message
    for ending in (b"\r\n\r\n", b"\n\n"):
        if header.endswith(ending):
            return header[: -len(ending) // 2] + added + header[-len(ending) // 2 :] + body
    # No blank line: all header (or an empty message).
    if header and not header.endswith(b"\n"):
        header += b"\r\n"
    return header + added + b"\r\n" + body


def remove_fields(message: bytes, names: frozenset[str]) -> bytes:
    """The message without the header fields named (lower-case ``names``), folded lines
    included; the body untouched."""
    header, body = split_header(message)
    kept: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and line.strip():
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        dropping = b":" in line and name in names
        if not dropping:
            kept.append(line)
    if len(kept) == len(header.splitlines(keepends=True)):
        return message
    return b"".join(kept) + body


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """The fields of a header block, unfolded: (lower-cased name, value), in order."""
    fields: list[tuple[str, str]] = []
    for raw in block.replace(b"\r\n", b"\n").split(b"\n"):
        if not raw:
            continue
        line = raw.decode("utf-8", "surrogateescape")
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name:
            continue
        fields.append((name.strip().lower(), value.strip()))
    return fields


def decode_field(value: str) -> str:
    """RFC 2047 encoded words decoded; anything undecodable left as it came."""
    if "=?" not in value and value.isascii():
        # No encoded word (the common case): nothing to decode, and nothing to replace.
        return value.replace("\x00", "")[:_MAX_FIELD]
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        decoded = value
    decoded = decoded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return decoded.replace("\x00", "")[:_MAX_FIELD]


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def summarize(message: bytes) -> MessageSummary:
    block, _body = split_header(message)
    first: dict[str, str] = {}
    for name, value in header_fields(block):
        first.setdefault(name, value)

    def get(name: str) -> str | None:
        value = first.get(name)
        return decode_field(value) if value is not None else None

    return MessageSummary(
        header_block=block,
        message_id=get("message-id"),
        in_reply_to=get("in-reply-to"),
        subject=get("subject"),
        from_header=get("from"),
        to_header=get("to"),
        cc_header=get("cc"),
        bcc_header=get("bcc"),
        sent_date=_parse_date(first.get("date")),
    )
