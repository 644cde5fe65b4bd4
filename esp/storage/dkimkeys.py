"""DKIM signing keys per domain (``sql/004_dkim_keys.sql``): generation, encryption at rest, and
the DNS record each needs.

RSA keys are 2048 bits (RFC 8301 wants at least 1024, and 2048 fits one TXT record in 255-byte
strings); Ed25519 keys follow RFC 8463.  Private keys are stored encrypted with AES-256-GCM under
a 32-byte secret kept outside the database (``security.dkim.secret_file``): a copy of the
database alone cannot sign mail.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from esp.storage.db import Cursor

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
ALGORITHMS = {"rsa": RSA, "ed25519": ED25519}
_NONCE = 12


class DKIMKeyError(Exception):
    pass


class SecretBox:
    """Encrypts private keys with the secret in ``path``.

    Only the CLI that makes keys creates the file (``create``): a server that finds it missing
    must not invent another secret, under which the stored keys would never decrypt again.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        self._path = path
        self._create = create
        self._aead: AESGCM | None = None

    def _cipher(self, sealing: bool = False) -> AESGCM:
        if self._aead is None:
            try:
                # Made only to seal something new: what was sealed under a secret that is
                # missing here (another node's) must fail, not meet a fresh secret.
                if sealing and self._create and not self._path.exists():
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(secrets.token_bytes(32))
                        f.flush()
                        os.fsync(f.fileno())
                secret = self._path.read_bytes()
            except OSError as e:
                raise DKIMKeyError(f"cannot read the secret {self._path} (it seals DKIM and "
                                   f"TLS keys; every node needs the same): {e}") from e
            if len(secret) != 32:
                raise DKIMKeyError(f"{self._path} must hold exactly 32 bytes")
            self._aead = AESGCM(secret)
        return self._aead

    def seal(self, plain: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._cipher(sealing=True).encrypt(nonce, plain, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        try:
            return self._cipher().decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
        except Exception as e:  # InvalidTag: another secret, or the row was altered
            raise DKIMKeyError("cannot decrypt a stored key: wrong secret file?") from e


def generate(algorithm: str) -> tuple[bytes, str]:
    """A new key: (private key as dkimpy takes it, public key as the DNS p= value)."""
    if algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public).decode()
    if algorithm == ED25519:
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        public = ed.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
        # dkimpy takes an Ed25519 private key as the base64 of its 32-byte seed.
        return base64.b64encode(seed), base64.b64encode(public).decode()
    raise DKIMKeyError(f"unknown DKIM algorithm {algorithm!r}")


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str
    public_key: str
    active: bool

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_value(self) -> str:
        kind = "rsa" if self.algorithm == RSA else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public_key}"


def _context(domain: str, selector: str) -> bytes:
    # Binds a sealed key to its row: swapping keys between domains fails to decrypt.
    return f"{domain}:{selector}".encode()


def add_key_txn(
    cur: Cursor, box: SecretBox, domain: str, selector: str, algorithm: str
) -> DKIMKey:
    """Generate and store a key for hosted ``domain``; the selector must be new for it."""
    private, public = generate(algorithm)
    cur.execute("SELECT id FROM domains WHERE name = %s", (domain,))
    row = cur.fetchone()
    if row is None:
        raise DKIMKeyError(f"{domain} is not a hosted domain")
    cur.execute("SELECT 1 FROM dkim_keys WHERE domain_id = %s AND selector = %s",
                (row[0], selector))
    if cur.fetchone() is not None:
        raise DKIMKeyError(f"{domain} already has a key with selector {selector!r}")
    cur.execute(
        "INSERT INTO dkim_keys (domain_id, selector, algorithm, private_key, public_key) "
        "VALUES (%s, %s, %s, %s, %s)",
        (row[0], selector, algorithm, box.seal(private, _context(domain, selector)), public),
    )
    return DKIMKey(domain, selector, algorithm, public, True)


def list_keys_txn(cur: Cursor, domain: str) -> list[DKIMKey]:
    cur.execute(
        "SELECT d.name, k.selector, k.algorithm, k.public_key, k.active FROM dkim_keys k "
        "JOIN domains d ON d.id = k.domain_id WHERE d.name = %s ORDER BY k.id",
        (domain,),
    )
    return [DKIMKey(*row) for row in cur.fetchall()]


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private_key: bytes


def signing_keys_txn(cur: Cursor, box: SecretBox, domain: str) -> list[SigningKey]:
    """The active keys of ``domain``, decrypted (RSA first, then Ed25519: RFC 8463 §4 asks
    signers to add an RSA signature alongside an Ed25519 one)."""
    cur.execute(
        "SELECT k.selector, k.algorithm, k.private_key FROM dkim_keys k "
        "JOIN domains d ON d.id = k.domain_id WHERE d.name = %s AND k.active "
        "ORDER BY k.algorithm DESC, k.id",
        (domain,),
    )
    return [
        SigningKey(domain, selector, algorithm,
                   box.open(bytes(sealed), _context(domain, selector)))
        for selector, algorithm, sealed in cur.fetchall()
    ]
