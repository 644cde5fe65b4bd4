"""Delivery status notifications (RFC 3464, in a multipart/report of RFC 6522).

A bounce report goes to the envelope sender from the null reverse-path, so that it can never
bounce in turn; it is marked ``Auto-Submitted: auto-replied`` (RFC 3834) and carries the human
explanation, the machine-readable ``message/delivery-status`` part and the original header
(``text/rfc822-headers``: the body stays with the sender, who has it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from esp.message import split_header


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # RFC 3463, e.g. '5.1.1'
    diagnostic: str | None = None  # the remote's reply, e.g. '550 5.1.1 no such user'
    remote_mta: str | None = None
    reason: str = ""  # for people: why, when there is no diagnostic


def _ascii(text: str) -> str:
    """Header-safe: printable US-ASCII on one line (a remote's reply may carry anything)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text.replace("\r", " ")
                   .replace("\n", " "))


# Longest remote reply quoted, so that every line stays well inside RFC 5322's 998 octets.
MAX_DIAGNOSTIC = 900


def _address_field(address: str) -> str:
    """RFC 3464 address field; an internationalized address as RFC 6533's utf-8 type, in
    utf-8-addr-xtext (each non-ASCII character, '+', '=' and '\\' as \\x{HEX})."""
    if address.isascii():
        return f"rfc822; {_ascii(address)}"
    encoded = "".join(c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                      for c in address)
    return f"utf-8; {encoded}"


def delivery_status_notification(
    *,
    reporting_mta: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival: datetime | None = None,
    queue_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The bounce report for ``recipients`` of ``original``, to ``sender``, as CRLF bytes."""
    now = now or datetime.now(UTC)
    boundary = f"=_{uuid.uuid4().hex}"  # RFC 2046: at most 70 characters
    explanation = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    for r in recipients:
        why = (r.diagnostic or r.reason or f"status {r.status}")[:MAX_DIAGNOSTIC]
        host = f" (host {r.remote_mta} said: " if r.remote_mta else " ("
        explanation.append(f"<{_ascii(r.address)}>:{host}{_ascii(why)})")
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if queue_id:
        per_message.append(f"X-ESP-Queue-ID: {queue_id}")
    if arrival is not None:
        per_message.append(f"Arrival-Date: {format_datetime(arrival.astimezone(UTC))}")
    status_part = ["\r\n".join(per_message)]
    for r in recipients:
        fields = [
            f"Final-Recipient: {_address_field(r.address)}",
            f"Original-Recipient: {_address_field(r.address)}",
            "Action: failed",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        if r.diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {_ascii(r.diagnostic)[:MAX_DIAGNOSTIC]}")
        fields.append(f"Last-Attempt-Date: {format_datetime(now.astimezone(UTC))}")
        status_part.append("\r\n".join(fields))
    header, _ = split_header(original)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now.astimezone(UTC))}",
        f"Message-ID: <{uuid.uuid4().hex}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    parts = [
        "\r\n".join(headers).encode() + b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\n",
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        "\r\n".join(explanation).encode() + b"\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        "\r\n\r\n".join(status_part).encode() + b"\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n\r\n",
        _crlf(header).rstrip(b"\r\n") + b"\r\n\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def _crlf(data: bytes) -> bytes:
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
