"""Authentication core: argon2id password hashes and the twisted.cred checker over the users table.

SMTP AUTH, IMAP LOGIN/AUTHENTICATE and the API login all authenticate through
:class:`DirectoryChecker`, so there is one source of truth for passwords.
"""

from __future__ import annotations

from typing import Any

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from esp.addresses import InvalidAddress, parse_address
from esp.config import Argon2Config
from esp.storage.directory import DirectoryStore

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


class AuthenticationBusy(Exception):
    """Too many password checks are waiting already; the client should try again later."""


class WeakPassword(ValueError):
    """A new password is refused; the message says why."""


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"passwords may have at most {MAX_PASSWORD_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise WeakPassword("passwords may not contain control characters")


class PasswordHasher:
    """argon2id hashing with parameters from ``security.auth.argon2``.  CPU-heavy: use a thread."""

    def __init__(self, settings: Argon2Config) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=settings.time_cost,
            memory_cost=settings.memory_cost_kib,
            parallelism=settings.parallelism,
            type=argon2.Type.ID,
        )
        # Verified against when the user does not exist, so the answer takes as long either way.
        self._decoy = self._hasher.hash("esp-decoy-password")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def verify_decoy(self, password: str) -> bool:
        self.verify(self._decoy, password)
        return False

    def needs_rehash(self, encoded: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(encoded)
        except argon2.exceptions.InvalidHashError:
            return True


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """Checks a user name (the full address) and password against the users table.

    The avatar id is the normalised address as UTF-8 bytes.  Unknown users, disabled users and
    users of disabled domains fail exactly like a wrong password, after the same hashing work.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        directory: DirectoryStore,
        hasher: PasswordHasher,
        reactor: Any,
        threadpool: ThreadPool,
        max_pending: int = 64,
    ) -> None:
        self._directory = directory
        self._hasher = hasher
        self._reactor = reactor
        self._threadpool = threadpool
        self._max_pending = max_pending
        self._pending = 0

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        # Each check costs 64 MiB and tens of milliseconds of CPU: a flood of attempts must fail
        # fast instead of queueing work that delays every real login behind it.
        if self._pending >= self._max_pending:
            return Deferred.fromCoroutine(self._busy())
        self._pending += 1
        d = Deferred.fromCoroutine(self._check(credentials))

        def done(result: object) -> object:
            self._pending -= 1
            return result

        return d.addBoth(done)

    async def _busy(self) -> bytes | tuple[()]:
        raise AuthenticationBusy("too many authentications in progress")

    async def _check(self, credentials: IUsernamePassword) -> bytes | tuple[()]:
        username: bytes | str = credentials.username
        password: bytes | str = credentials.password
        try:
            name = username.decode("utf-8") if isinstance(username, bytes) else username
            secret = password.decode("utf-8") if isinstance(password, bytes) else password
            address = parse_address(name)
        except (UnicodeDecodeError, InvalidAddress):
            await self._in_thread(self._hasher.verify_decoy, "")
            raise UnauthorizedLogin("bad user name or password") from None
        user = await self._directory.find_user(address)
        if user is None or not user.enabled or not user.domain_enabled:
            await self._in_thread(self._hasher.verify_decoy, secret)
            raise UnauthorizedLogin("bad user name or password")
        if not await self._in_thread(self._hasher.verify, user.password_hash, secret):
            raise UnauthorizedLogin("bad user name or password")
        new_hash = None
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._in_thread(self._hasher.hash, secret)
        await self._directory.record_login(user.id, new_hash)
        return user.address.encode("utf-8")

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await deferToThreadPool(self._reactor, self._threadpool, fn, *args)
