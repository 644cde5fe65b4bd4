"""The JSON Schema (draft 2020-12) of each event type, as a webhook receives it: the Standard
Webhooks body ``{"type", "timestamp", "data"}`` whose ``data`` holds the envelope (``id``,
``domain``, ``actor``, ``node``) and the type's payload.

The schemas are the reference for receivers: ``docs/schemas/events/<type>.json`` are written
from here (``python -m esp.eventschemas docs/schemas/events``; a test keeps them equal) and the
test suite checks every event it sees against them.  Receivers should ignore fields they do not
know: new ones may be added, none is removed or changes type within a major version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from esp.events import (
    CERTIFICATE_FAILED,
    CERTIFICATE_RENEWED,
    EVENT_TYPES,
    FILTER_MATCHED,
    MAILBOX_CREATED,
    MESSAGE_BOUNCED,
    MESSAGE_DELETED,
    MESSAGE_RECEIVED,
    MESSAGE_SENT,
    SPAM_DETECTED,
    USER_LOGIN,
    VIRUS_DETECTED,
    WEBHOOK_DISABLED,
    Event,
    webhook_body,
)

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
OPTIONAL_STRING: Schema = {"type": ["string", "null"]}
INTEGER: Schema = {"type": "integer", "minimum": 0}
ADDRESS: Schema = {"type": "string", "description": "an email address (may be empty: the "
                   "null sender)"}
ADDRESSES: Schema = {"type": "array", "items": STRING}
PROTOCOL: Schema = {"enum": ["smtp", "imap", "api"]}


def _field(description: str, schema: Schema) -> Schema:
    return {**schema, "description": description}


# type: (description, {field: schema}, required fields)
PAYLOADS: dict[str, tuple[str, dict[str, Schema], tuple[str, ...]]] = {
    MESSAGE_RECEIVED: (
        "A copy of a message was stored in a local mailbox (SMTP, the send API, a bounce "
        "report, IMAP APPEND is not one). Written in the transaction that stores it.",
        {
            "user": _field("the mailbox owner", STRING),
            "mailbox": _field("the mailbox it went to", STRING),
            "mailbox_id": INTEGER,
            "uid": _field("its IMAP UID in that mailbox", INTEGER),
            "size": _field("octets", INTEGER),
            "sender": _field("the envelope sender", ADDRESS),
            "message_id": _field("the Message-ID header", OPTIONAL_STRING),
            "client_ip": _field("the SMTP client's address", OPTIONAL_STRING),
            "session": _field("the SMTP session id (as in the logs)", STRING),
            "protocol": _field("how it came in, when not SMTP", STRING),
            "tags": _field("the send API's tags", {"type": "array", "items": STRING}),
            "queue_id": _field("the queue entry that delivered it (bounce reports)", INTEGER),
        },
        ("user", "mailbox", "mailbox_id", "uid", "size", "sender", "message_id"),
    ),
    MESSAGE_SENT: (
        "Remote recipients accepted a message. Written with the queue update.",
        {
            "queue_id": INTEGER,
            "sender": ADDRESS,
            "recipients": _field("those accepted in this attempt", ADDRESSES),
            "remote_mta": _field("the host that accepted", STRING),
            "tls": _field("whether the connection was encrypted", {"type": "boolean"}),
            "attempts": _field("which attempt it was", INTEGER),
        },
        ("queue_id", "sender", "recipients", "remote_mta", "tls", "attempts"),
    ),
    MESSAGE_BOUNCED: (
        "A remote recipient failed for good (refused, or still deferred when the message "
        "expired). Written with the queue update.",
        {
            "queue_id": INTEGER,
            "sender": ADDRESS,
            "recipient": STRING,
            "status": _field("the enhanced status code", OPTIONAL_STRING),
            "diagnostic": _field("the remote's answer or ours", OPTIONAL_STRING),
            "remote_mta": OPTIONAL_STRING,
            "suppressed": _field("the address went on the domain's suppression list",
                                 {"type": "boolean"}),
        },
        ("queue_id", "sender", "recipient", "status", "diagnostic", "remote_mta",
         "suppressed"),
    ),
    MESSAGE_DELETED: (
        "A message was expunged. Written in the expunge's transaction.",
        {
            "user": STRING,
            "mailbox": STRING,
            "uid": INTEGER,
            "uidvalidity": INTEGER,
            "reason": {"enum": ["expunge", "close", "move", "api"]},
            "protocol": PROTOCOL,
        },
        ("user", "mailbox", "uid", "uidvalidity", "reason", "protocol"),
    ),
    USER_LOGIN: (
        "A login, successful or not. The actor is the user when it succeeded, null when not.",
        {
            "user": _field("the name given (cut to 320 characters)", STRING),
            "protocol": PROTOCOL,
            "client_ip": OPTIONAL_STRING,
            "success": {"type": "boolean"},
            "listener": _field("the SMTP listener (mx, submission, submissions)", STRING),
        },
        ("user", "protocol", "client_ip", "success"),
    ),
    MAILBOX_CREATED: (
        "A user made a mailbox (IMAP CREATE, the API; each missing parent too). Written in the "
        "transaction that makes it.",
        {"user": STRING, "mailbox": STRING, "protocol": PROTOCOL},
        ("user", "mailbox", "protocol"),
    ),
    FILTER_MATCHED: (
        "A filter's verdict other than accept, once per recipient domain.",
        {
            "filter": STRING,
            "action": {"enum": ["tag", "quarantine", "reject", "defer"]},
            "score": {"type": ["number", "null"]},
            "text": OPTIONAL_STRING,
            "details": {"type": "object"},
            "sender": ADDRESS,
            "recipients": _field("this domain's recipients", ADDRESSES),
            "client_ip": OPTIONAL_STRING,
            "queue_id": OPTIONAL_STRING,
        },
        ("filter", "action", "sender", "recipients"),
    ),
    SPAM_DETECTED: (
        "Rspamd judged a message spam (whatever was then done with it).",
        {
            "filter": STRING,
            "score": {"type": "number"},
            "symbols": {"type": "array", "items": STRING},
            "outcome": _field("what was done: reject, defer, quarantine, tag...", STRING),
            "sender": ADDRESS,
            "recipients": ADDRESSES,
            "client_ip": OPTIONAL_STRING,
        },
        ("filter", "score", "symbols", "outcome", "sender", "recipients"),
    ),
    VIRUS_DETECTED: (
        "clamd found a virus.",
        {
            "filter": STRING,
            "signature": STRING,
            "outcome": STRING,
            "sender": ADDRESS,
            "recipients": ADDRESSES,
            "client_ip": OPTIONAL_STRING,
        },
        ("filter", "signature", "outcome", "sender", "recipients"),
    ),
    CERTIFICATE_RENEWED: (
        "A certificate was issued or renewed and is being served (every node serves it to new "
        "connections). Written with the new certificate.",
        {
            "names": {"type": "array", "items": STRING},
            "not_before": {"type": "string", "format": "date-time"},
            "not_after": {"type": "string", "format": "date-time"},
            "issuer": STRING,
            "serial": STRING,
            "source": {"enum": ["acme", "file"]},
            "provider": OPTIONAL_STRING,
        },
        ("names", "not_after", "issuer", "source"),
    ),
    CERTIFICATE_FAILED: (
        "Issuing or renewing a certificate failed; the one in service (if any) stays, and the "
        "attempt is repeated at retry_at. Written with the failure's record.",
        {
            "names": {"type": "array", "items": STRING},
            "error": STRING,
            "failures": _field("attempts that failed in a row", INTEGER),
            "retry_at": {"type": "string", "format": "date-time"},
            "provider": OPTIONAL_STRING,
            "not_after": _field("when the certificate in service expires (null: none yet)",
                                {"type": ["string", "null"], "format": "date-time"}),
        },
        ("names", "error", "failures", "retry_at"),
    ),
    WEBHOOK_DISABLED: (
        "A webhook was disabled: it answered 410 Gone, or too many deliveries in a row failed. "
        "Written in the transaction that disables it.",
        {"webhook_id": INTEGER, "url": STRING, "reason": STRING},
        ("webhook_id", "url", "reason"),
    ),
}

ENVELOPE: dict[str, Schema] = {
    "id": _field("the event's id, a UUIDv7 (sorts by time); also the webhook-id header",
                 {"type": "string", "format": "uuid"}),
    "domain": _field("the hosted domain it concerns", OPTIONAL_STRING),
    "actor": _field("who did it, when someone did", OPTIONAL_STRING),
    "node": _field("the ESP process that saw it (host:pid)", STRING),
}


def schema_of(event_type: str) -> Schema:
    """The JSON Schema of a webhook body carrying an event of ``event_type``."""
    description, fields, required = PAYLOADS[event_type]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:esp:event:{event_type}",
        "title": event_type,
        "description": description,
        "type": "object",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "type": {"const": event_type},
            "timestamp": _field("when it happened (UTC)", {"type": "string",
                                                          "format": "date-time"}),
            "data": {
                "type": "object",
                "required": [*ENVELOPE, *required],
                "properties": {**ENVELOPE, **fields},
            },
        },
    }


def event_body(event: Event) -> dict[str, Any]:
    """An event in the form a webhook receives it (what the dispatcher sends of its outbox
    record)."""
    return webhook_body(event.type, event.occurred_at, str(event.id), event.domain,
                        event.actor, {**event.payload, "node": event.node})


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type in sorted(EVENT_TYPES):
        path = directory / f"{event_type}.json"
        path.write_text(json.dumps(schema_of(event_type), indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas/events")):
        print(path)
