"""What every group of endpoints uses: the services behind the API, who is calling, the audit
log, and the lookups that turn a path parameter into a row (or a 404/403)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from esp.addresses import Address, InvalidAddress, normalize_domain, parse_address
from esp.api.framework import ApiError, Principal, forbidden, invalid_field, not_found
from esp.api.tokens import InvalidToken, TokenIssuer, fingerprint
from esp.events import EventBus
from esp.storage import apikeys
from esp.storage.db import Cursor, Database
from esp.storage.directory import (
    Domain,
    NotFound,
    User,
    find_user_txn,
    get_domain_txn,
    record_audit_txn,
    user_by_id_txn,
)

T = TypeVar("T")


@dataclass
class APIServices:
    """What the endpoints need from the rest of ESP; built by :func:`esp.service.makeService`."""

    db: Database
    checker: Any  # the shared twisted.cred checker (esp.auth.DirectoryChecker)
    hash_password: Callable[[str], Awaitable[str]]
    verify_password: Callable[[str, str], Awaitable[bool]]  # (stored hash, password)
    tokens: TokenIssuer
    events: EventBus
    reactor: Any
    maildir_root: Path
    is_ready: Callable[[], bool] = lambda: True
    mailboxes: Any = None  # esp.storage.mailboxes.MailboxStore
    sender: Any = None  # esp.inbound.InboundPolicy: what submission does with a message
    dkim_box: Any = None  # esp.storage.dkimkeys.SecretBox
    resolver: Any = None  # esp.dns.Resolver
    dns_pool: Any = None  # thread pool for DNS lookups
    disk_pool: Any = None  # thread pool for files
    spool_dir: Path = Path("spool")
    wake_outbound: Callable[[], None] | None = None
    hostname: str = "localhost"
    filter_chain: tuple[str, ...] = ()
    filter_factories: Mapping[str, Any] = field(default_factory=dict)
    forget_domain_filters: Callable[[str], None] | None = None
    forget_rules: Callable[[int], None] | None = None
    webhook_networks: tuple[str, ...] = ()
    forget_endpoints: Callable[[], None] | None = None
    max_message_size: int = 50 * 1024 * 1024
    acme_providers: tuple[str, ...] = ("letsencrypt",)
    acme_default_provider: str = "letsencrypt"


class APIBase:
    log = Logger()

    def __init__(self, services: APIServices) -> None:
        self.services = services
        self.db = services.db

    # -- who is calling ----------------------------------------------------------------------

    @staticmethod
    def client_ip(request: IRequest) -> str:
        host = request.getClientAddress()
        return str(getattr(host, "host", "")) or "unknown"

    async def authenticate(self, request: IRequest) -> Principal:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        if apikeys.looks_like_key(token):
            return await self._key_principal(token)
        try:
            claims = self.services.tokens.verify(token, "access", self.services.reactor.seconds())
        except InvalidToken as e:
            raise ApiError(401, "invalid_token", f"the token is not valid: {e}") from None
        return Principal(await self.current_user(claims.user_id, claims.fingerprint))

    async def _key_principal(self, secret: str) -> Principal:
        key = await self.db.run("api_key_use", apikeys.use_key_txn, secret)
        if key is None:
            raise ApiError(401, "invalid_token", "the API key is not valid (or revoked, or "
                           "expired)")
        user = await self.db.run("api_user", user_by_id_txn, key.user_id)
        if user is None or not user.enabled or not user.domain_enabled:
            raise ApiError(401, "invalid_token", "the API key's user is disabled")
        return Principal(user, frozenset(key.scopes), key.id, key.domain_id)

    async def current_user(self, user_id: int, print_: str) -> User:
        user = await self.db.run("api_user", user_by_id_txn, user_id)
        if (user is None or not user.enabled or not user.domain_enabled
                or fingerprint(user.password_hash) != print_):
            raise ApiError(401, "invalid_token", "the token is no longer valid")
        return user

    async def audit(self, request: IRequest, principal: Principal, action: str, target: str,
                    details: dict[str, object]) -> None:
        await self.db.run("api_audit", record_audit_txn, principal.actor,
                          self.client_ip(request), action, target, details)

    async def change(
        self, request: IRequest, principal: Principal, action: str,
        target: str | Callable[[T], str], fn: Callable[..., T], *args: Any,
        summary: Callable[[T], dict[str, object]] | None = None,
    ) -> T:
        """Run the change ``fn(cur, *args)`` and its audit log line in one transaction."""
        ip = self.client_ip(request)

        def txn(cur: Cursor) -> T:
            result = fn(cur, *args)
            record_audit_txn(cur, principal.actor, ip, action,
                             target(result) if callable(target) else target,
                             summary(result) if summary is not None else {})
            return result

        return cast(T, await self.db.run(f"api_{action}", txn))

    # -- path parameters to rows -------------------------------------------------------------

    async def domain(self, principal: Principal, name: str, admin: bool = True,
                     field: str | None = None) -> Domain:
        """The hosted domain ``name``: 404 when it is not (422 naming ``field`` when it came
        from a field of the request, not its path), 403 when the caller does not administer
        it (with ``admin``)."""
        try:
            domain = await self.db.run("api_domain", get_domain_txn, name)
        except (NotFound, InvalidAddress, ValueError):
            if field is not None:
                raise ApiError(422, "unknown_domain", f"{name} is not hosted here",
                               {"fields": [{"field": field, "problem": "not hosted here"}]}
                               ) from None
            raise not_found(f"no domain {name}") from None
        if admin and not principal.administers(domain):
            raise forbidden(f"you do not administer {domain.name}")
        return domain

    async def user(self, principal: Principal, address: str) -> User:
        """The user at ``address``, which the caller must be or administer."""
        try:
            parsed = parse_address(address)
        except InvalidAddress:
            raise not_found(f"no user {address}") from None
        user = await self.db.run("api_find_user", find_user_txn, parsed)
        if user is None:
            raise not_found(f"no user {parsed}")
        principal.require_self_or_admin_of(user)
        return user


def field_address(name: str, text: str) -> Address:
    """A body field that must be an address: 400 naming the field when it is not."""
    try:
        return parse_address(text)
    except InvalidAddress as e:
        raise invalid_field(name, str(e)) from None


def field_domain(name: str, text: str) -> str:
    try:
        return normalize_domain(text)
    except (InvalidAddress, ValueError) as e:
        raise invalid_field(name, str(e)) from None
