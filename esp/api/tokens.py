"""JSON Web Tokens for the management API (PyJWT).

Access tokens are short-lived; a refresh token (longer-lived) buys a new pair.  The algorithm
is fixed (HS256 with a 256-bit key): a token naming any other algorithm, ``none`` included,
is refused before its signature is looked at.  Both carry the user's id and a fingerprint of
their password hash, so that a password change (or a deleted user) ends every token issued
before it; the role is read from the database on each request, never from the token.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

ALGORITHM = "HS256"
ISSUER = "esp"
KEY_BYTES = 32


class InvalidToken(Exception):
    """The token is not one of ours, or no longer good."""


@dataclass(frozen=True)
class Claims:
    user_id: int
    fingerprint: str


def load_or_create_key(path: Path) -> bytes:
    """The signing key in ``path``, made (0600) on first use."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path}: a signing key needs at least {KEY_BYTES} bytes")
    return key


def fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:16]


class TokenIssuer:
    """Issues and checks tokens with the key in ``key_file`` (read, or made, by :meth:`load`
    at start-up)."""

    def __init__(self, key_file: Path, access_lifetime: int, refresh_lifetime: int) -> None:
        self._key_file = key_file
        self._key = b""
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime

    def load(self) -> None:
        self._key = load_or_create_key(self._key_file)

    def issue(self, user_id: int, password_hash: str, kind: str, now: float) -> str:
        if not self._key:
            raise RuntimeError("the signing key is not loaded")
        lifetime = self.access_lifetime if kind == "access" else self.refresh_lifetime
        claims = {
            "iss": ISSUER, "sub": str(user_id), "typ": kind, "pwd": fingerprint(password_hash),
            "iat": int(now), "exp": int(now) + lifetime, "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str, kind: str, now: float) -> Claims:
        if not self._key:
            raise InvalidToken("the signing key is not loaded")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM:
                raise InvalidToken("unexpected token algorithm")
            claims = jwt.decode(
                token, self._key, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["exp", "iat", "iss", "sub", "typ", "pwd"],
                         "verify_exp": False},
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            raise InvalidToken("the token has expired")
        if claims.get("typ") != kind:
            raise InvalidToken(f"not an {kind} token" if kind == "access" else
                               f"not a {kind} token")
        try:
            user_id = int(claims["sub"])
        except (TypeError, ValueError):
            raise InvalidToken("bad subject") from None
        return Claims(user_id, str(claims["pwd"]))
