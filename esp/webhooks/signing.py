"""Standard Webhooks signatures (https://www.standardwebhooks.com): ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``
with the secret's bytes (``whsec_`` + base64).  During a rotation both secrets sign, space
separated, so a receiver with either verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secrets: Sequence[str], message_id: str, timestamp: int,
            body: bytes) -> dict[bytes | str, list[bytes | str]]:
    return {
        b"webhook-id": [message_id.encode()],
        b"webhook-timestamp": [str(timestamp).encode()],
        b"webhook-signature": [" ".join(signature(s, message_id, timestamp, body)
                                        for s in secrets).encode()],
        b"content-type": [b"application/json"],
        b"user-agent": [b"ESP-Webhooks/1"],
    }
