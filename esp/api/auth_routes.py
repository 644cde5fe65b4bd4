"""Logging in (tokens), the caller, and API keys."""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.web.iweb import IRequest

from esp.addresses import InvalidAddress, parse_address
from esp.api.base import APIBase, field_address, field_domain
from esp.api.framework import ApiError, Principal, endpoint, forbidden, not_found
from esp.api.models import (
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyPage,
    KeyQuery,
    RefreshRequest,
    TokenPair,
    TokenRequest,
    UserDetail,
)
from esp.api.tokens import InvalidToken
from esp.auth import AuthenticationBusy
from esp.events import USER_LOGIN, Event
from esp.limits import SlidingCounter
from esp.storage import apikeys
from esp.storage.directory import NotFound, User, find_user_txn, get_domain_txn
from esp.storage.manage import identities_txn

# Failed logins per client address and per account within the window, before 429.
LOGIN_FAILURES = 10
LOGIN_WINDOW = 600.0


def key_out(key: apikeys.ApiKey) -> KeyOut:
    return KeyOut(id=key.id, name=key.name, owner=key.owner, prefix=key.prefix,
                  scopes=list(key.scopes), domain=key.domain, expires_at=key.expires_at,
                  created_at=key.created_at, last_used_at=key.last_used_at,
                  revoked_at=key.revoked_at)


async def user_detail(api: APIBase, user: User) -> UserDetail:
    identities = await api.db.run("api_identities", identities_txn, user)
    return UserDetail(id=user.id, address=user.address, display_name=user.display_name,
                      role=user.role, enabled=user.enabled, quota_bytes=user.quota_bytes,
                      quota_messages=user.quota_messages, used_bytes=user.used_bytes,
                      used_messages=user.used_messages, identities=identities)


class AuthRoutes(APIBase):
    def start_login_limits(self) -> None:
        seconds = self.services.reactor.seconds
        self._failures_by_ip = SlidingCounter(LOGIN_WINDOW, seconds)
        self._failures_by_account = SlidingCounter(LOGIN_WINDOW, seconds)

    @endpoint("POST", "/api/v1/auth/token", summary="Log in: a token pair for a user name "
              "and password", tag="auth", public=True, body=TokenRequest, response=TokenPair,
              errors=(401, 429))
    async def token(self, request: IRequest, body: TokenRequest) -> TokenPair:
        ip = self.client_ip(request)
        try:
            # Counted by the account, however its name is spelt.
            account = str(parse_address(body.username))
        except InvalidAddress:
            account = body.username.strip().lower()
        if (self._failures_by_ip.count(ip) >= LOGIN_FAILURES
                or self._failures_by_account.count(account) >= LOGIN_FAILURES):
            request.setHeader(b"retry-after", str(int(LOGIN_WINDOW)).encode())
            raise ApiError(429, "too_many_failures", "too many failed logins; try again later")
        try:
            # The avatar id is the user's address, normalised.
            avatar: bytes = await self.services.checker.requestAvatarId(
                UsernamePassword(body.username.encode(), body.password.encode()))
        except AuthenticationBusy:
            request.setHeader(b"retry-after", b"1")
            raise ApiError(429, "busy", "too many logins in progress; try again") from None
        except UnauthorizedLogin:
            self._failures_by_ip.add(ip)
            self._failures_by_account.add(account)
            self._announce_login(account, ip, False)
            raise ApiError(401, "bad_credentials", "bad user name or password") from None
        user = await self.db.run("api_login_user", find_user_txn,
                                 parse_address(avatar.decode("utf-8")))
        if user is None:
            raise ApiError(401, "bad_credentials", "bad user name or password")
        self._announce_login(user.address, ip, True)
        return self._pair(user)

    @endpoint("POST", "/api/v1/auth/refresh", summary="A new token pair for a refresh token",
              tag="auth", public=True, body=RefreshRequest, response=TokenPair, errors=(401,))
    async def refresh(self, request: IRequest, body: RefreshRequest) -> TokenPair:
        try:
            claims = self.services.tokens.verify(body.refresh_token, "refresh",
                                                 self.services.reactor.seconds())
        except InvalidToken as e:
            raise ApiError(401, "invalid_token", f"the token is not valid: {e}") from None
        return self._pair(await self.current_user(claims.user_id, claims.fingerprint))

    def _pair(self, user: User) -> TokenPair:
        now = self.services.reactor.seconds()
        tokens = self.services.tokens
        return TokenPair(
            access_token=tokens.issue(user.id, user.password_hash, "access", now),
            refresh_token=tokens.issue(user.id, user.password_hash, "refresh", now),
            token_type="Bearer",  # noqa: S106 (the scheme, not a secret)
            expires_in=tokens.access_lifetime,
        )

    def _announce_login(self, user: str, ip: str, success: bool) -> None:
        self.services.events.publish(Event(
            USER_LOGIN,
            {"user": user, "protocol": "api", "client_ip": ip, "success": success},
            domain=user.rpartition("@")[2] or None,
            actor=user if success else None,
        ))

    @endpoint("GET", "/api/v1/me", summary="The caller", tag="auth", response=UserDetail)
    async def me(self, request: IRequest, principal: Principal) -> UserDetail:
        return await user_detail(self, principal.user)

    # -- API keys ----------------------------------------------------------------------------

    @endpoint("POST", "/api/v1/api-keys", summary="Make an API key (shown once)", tag="auth",
              scope="keys:write", body=KeyCreate, response=KeyCreated, status=201)
    async def create_key(self, request: IRequest, principal: Principal,
                         body: KeyCreate) -> KeyCreated:
        owner = principal.user
        if body.user is not None:
            found = await self.db.run("api_find_user", find_user_txn,
                                      field_address("user", body.user))
            if found is None:
                raise ApiError(400, "validation_failed", f"invalid field user: no user "
                               f"{body.user}", {"fields": [{"field": "user",
                                                            "problem": "no such user"}]})
            if found.id != owner.id and not principal.manages(found):
                raise forbidden(f"you may not make keys for {found.address}")
            owner = found
        domain_id = principal.key_domain_id
        if body.domain is not None:
            try:
                domain = await self.db.run("api_domain", get_domain_txn,
                                           field_domain("domain", body.domain))
            except NotFound:
                raise ApiError(400, "validation_failed", "invalid field domain: not hosted",
                               {"fields": [{"field": "domain",
                                            "problem": "not hosted here"}]}) from None
            if domain_id is not None and domain.id != domain_id:
                raise forbidden("this key may not reach beyond its own domain")
            domain_id = domain.id
        scopes = sorted(set(body.scopes))
        # A key never holds more than the key that made it.
        if principal.scopes is not None and not all(principal.has_scope(s) for s in scopes):
            raise forbidden("a key cannot make a key with scopes it does not hold")
        key, secret = await self.change(
            request, principal, "apikey.create", lambda made: f"key {made[0].id}",
            apikeys.create_key_txn, owner.id, body.name, scopes, domain_id, body.expires_at,
            summary=lambda made: {"after": {"owner": made[0].owner, "name": made[0].name,
                                            "scopes": scopes, "domain": made[0].domain}})
        request.setHeader(b"location", f"/api/v1/api-keys/{key.id}".encode())
        return KeyCreated(**key_out(key).model_dump(), key=secret)

    async def _key(self, principal: Principal, key_id: int) -> apikeys.ApiKey:
        key = await self.db.run("api_key", apikeys.get_key_txn, key_id)
        if key is None:
            raise not_found(f"no API key {key_id}")
        if key.user_id != principal.user.id:
            owner = await self.db.run("api_find_user", find_user_txn, parse_address(key.owner))
            if owner is None or not principal.manages(owner):
                raise not_found(f"no API key {key_id}")
        # A key restricted to a domain sees only keys restricted to the same one.
        if principal.key_domain_id is not None and key.domain_id != principal.key_domain_id:
            raise not_found(f"no API key {key_id}")
        return key

    @endpoint("GET", "/api/v1/api-keys", summary="API keys: the caller's, or (with ?user=) "
              "a user's the caller administers", tag="auth", scope="keys:read",
              query=KeyQuery, response=KeyPage)
    async def list_keys(self, request: IRequest, principal: Principal,
                        query: KeyQuery) -> KeyPage:
        user_id = principal.user.id
        if query.user is not None:
            found = await self.db.run("api_find_user", find_user_txn,
                                      field_address("user", query.user))
            if found is None:
                raise not_found(f"no user {query.user}")
            principal.require_self_or_admin_of(found)
            user_id = found.id
        keys, total = await self.db.run("api_keys", apikeys.list_keys_txn, user_id,
                                        principal.key_domain_id, query.limit, query.offset)
        return KeyPage(items=[key_out(k) for k in keys], total=total, limit=query.limit,
                       offset=query.offset)

    @endpoint("GET", "/api/v1/api-keys/<int:key_id>", summary="One API key", tag="auth",
              scope="keys:read", response=KeyOut)
    async def get_key(self, request: IRequest, principal: Principal, key_id: int) -> KeyOut:
        return key_out(await self._key(principal, key_id))

    @endpoint("DELETE", "/api/v1/api-keys/<int:key_id>", summary="Revoke an API key",
              tag="auth", scope="keys:write", status=204)
    async def revoke_key(self, request: IRequest, principal: Principal, key_id: int) -> None:
        key = await self._key(principal, key_id)
        await self.change(request, principal, "apikey.revoke", f"key {key.id}",
                          apikeys.revoke_key_txn, key.id,
                          summary=lambda _: {"before": {"owner": key.owner, "name": key.name}})
