"""DKIM signing of outgoing mail (RFC 6376, Ed25519 per RFC 8463) with the keys of the author's
domain (``esp.storage.dkimkeys``).

Signed: relaxed/relaxed canonicalization, the usual header set, and From oversigned (listed once
more than it appears, so that no From can be added after signing).  Keys are read once a minute
per domain.  Signing blocks (RSA is ~1 ms of CPU): it runs in a thread pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import getaddresses
from typing import Any

import dkim
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esp.message import header_fields, split_header
from esp.storage.db import Database
from esp.storage.dkimkeys import ED25519, SecretBox, SigningKey, signing_keys_txn

# RFC 6376 §5.4.1's recommended set, those present are signed.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"resent-date", b"resent-from",
    b"resent-to", b"resent-cc", b"in-reply-to", b"references", b"list-id", b"list-help",
    b"list-unsubscribe", b"list-subscribe", b"list-post", b"list-owner", b"list-archive",
    b"message-id", b"mime-version", b"content-type", b"content-transfer-encoding",
)
KEY_CACHE_SECONDS = 60.0


def author_domain(message: bytes) -> str | None:
    """The domain of the (single) From address, lower-cased: the DMARC-aligned domain."""
    values = [value for name, value in header_fields(split_header(message)[0]) if name == "from"]
    addresses = [a for _, a in getaddresses(values) if "@" in a]
    if len(addresses) != 1:
        return None
    return addresses[0].rpartition("@")[2].strip().lower() or None


def sign_message(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """``message`` with one DKIM-Signature per key prepended."""
    signed = message
    headers = _present_headers(message)
    for key in keys:
        signature = dkim.sign(
            message,  # each signs the message as written, not the other signatures
            key.selector.encode(), key.domain.encode(), key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[*headers, b"from"],  # From once more: oversigned
            signature_algorithm=b"ed25519-sha256" if key.algorithm == ED25519
            else b"rsa-sha256",
            linesep=b"\r\n",
        )
        signed = signature + signed
    return signed


def _present_headers(message: bytes) -> list[bytes]:
    names = {name.encode("utf-8", "surrogateescape")
             for name, _ in header_fields(split_header(message)[0])}
    return [name for name in SIGNED_HEADERS if name in names]


class DKIMSigner:
    log = Logger()

    def __init__(self, db: Database, box: SecretBox, pool: ThreadPool, reactor: Any) -> None:
        self._db = db
        self._box = box
        self._pool = pool
        self._reactor = reactor
        self._keys: dict[str, tuple[float, list[SigningKey]]] = {}

    async def sign(self, message: bytes, domain: str) -> bytes:
        """``message`` signed with the active keys of ``domain`` (unchanged if it has none)."""
        keys = await self._keys_of(domain)
        if not keys:
            return message
        return await deferToThreadPool(self._reactor, self._pool, sign_message, message, keys)

    async def _keys_of(self, domain: str) -> list[SigningKey]:
        now = self._reactor.seconds()
        cached = self._keys.get(domain)
        if cached is not None and now - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        keys = await self._db.run("dkim_signing_keys", signing_keys_txn, self._box, domain)
        self._keys[domain] = (now, keys)
        return keys
