"""The management API (Klein): JSON in and out, one error shape, JWT bearer tokens.

Every error is ``{"error": {"code", "message", "details"}}`` with its HTTP status (400 for a
body that does not validate, naming the field; 401, 403, 404, 409, 413, 429, 503).  Requests
are authenticated by ``Authorization: Bearer <access token>``; the user is loaded from the
directory on every request (a deleted or disabled user, or a changed password, ends their
tokens at once).  Roles: ``superadmin`` (everything), ``domain_admin`` (their own domain),
``user`` (only themself).  Every change is written to the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from klein import Klein
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from esp.addresses import InvalidAddress, normalize_domain, parse_address
from esp.api.tokens import InvalidToken, TokenIssuer, fingerprint
from esp.auth import AuthenticationBusy
from esp.events import USER_LOGIN, Event, EventBus
from esp.limits import SlidingCounter
from esp.storage.db import Database, DatabaseUnavailable
from esp.storage.directory import (
    AlreadyExists,
    Domain,
    NotFound,
    User,
    add_domain_txn,
    find_user_txn,
    get_domain_txn,
    list_domains_txn,
    record_audit_txn,
    user_by_id_txn,
)

M = TypeVar("M", bound=BaseModel)
# Failed logins per client address and per account within the window, before 429.
LOGIN_FAILURES = 10
LOGIN_WINDOW = 600.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 details: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details if details is not None else {}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenRequest(Strict):
    username: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class RefreshRequest(Strict):
    refresh_token: str = Field(min_length=1, max_length=4096)


class DomainCreate(Strict):
    name: str = Field(min_length=1, max_length=253)


def _json(request: IRequest, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


def _error(request: IRequest, status: int, code: str, message: str,
           details: object = None) -> bytes:
    return _json(request, status, {"error": {
        "code": code, "message": message, "details": details if details is not None else {}}})


def _domain(domain: Domain) -> dict[str, object]:
    return {"name": domain.name, "enabled": domain.enabled, "users": domain.users,
            "aliases": domain.aliases}


def _user(user: User) -> dict[str, object]:
    return {"id": user.id, "address": user.address, "display_name": user.display_name,
            "role": user.role, "enabled": user.enabled, "quota_bytes": user.quota_bytes,
            "quota_messages": user.quota_messages, "used_bytes": user.used_bytes,
            "used_messages": user.used_messages}


class ManagementAPI:
    app = Klein()
    log = Logger()

    def __init__(
        self, db: Database, checker: Any, tokens: TokenIssuer, events: EventBus,
        reactor: Any, is_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._db = db
        self._checker = checker
        self._tokens = tokens
        self._events = events
        self._reactor = reactor
        self._is_ready = is_ready
        self._failures_by_ip = SlidingCounter(LOGIN_WINDOW, reactor.seconds)
        self._failures_by_account = SlidingCounter(LOGIN_WINDOW, reactor.seconds)

    # -- plumbing --------------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Any) -> bytes:
        error: ApiError = failure.value
        if error.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="esp"')
        return _error(request, error.status, error.code, error.message, error.details)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Any) -> bytes:
        error: HTTPException = failure.value
        status = error.code or 400
        codes = {404: "not_found", 405: "method_not_allowed"}
        if status == 405:
            allowed = getattr(error, "valid_methods", None) or []
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return _error(request, status, codes.get(status, "bad_request"),
                      "no such resource" if status == 404 else (error.description or ""))

    @app.handle_errors(DatabaseUnavailable)
    def _database_error(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"retry-after", b"5")
        return _error(request, 503, "unavailable",
                      "the database is unavailable; try again later")

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Any) -> bytes:
        self.log.failure("API request failed", failure)
        return _error(request, 500, "internal", "internal error")

    def _body(self, request: IRequest, model: type[M]) -> M:
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            raise ApiError(415, "unsupported_media_type", "send application/json")
        raw = request.content.read() if request.content is not None else b""
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "validation_failed", "the body must be a JSON object",
                           {"fields": [{"field": "", "problem": "expected an object"}]})
        try:
            return model.model_validate(data)
        except ValidationError as e:
            fields = [{"field": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
                      for err in e.errors()]
            raise ApiError(400, "validation_failed",
                           f"invalid field {fields[0]['field'] or '(body)'}: "
                           f"{fields[0]['problem']}", {"fields": fields}) from None

    def _client_ip(self, request: IRequest) -> str:
        host = request.getClientAddress()
        return str(getattr(host, "host", "")) or "unknown"

    async def _authenticated(self, request: IRequest) -> User:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        try:
            claims = self._tokens.verify(token.strip(), "access", self._reactor.seconds())
        except InvalidToken as e:
            raise ApiError(401, "invalid_token", f"the token is not valid: {e}") from None
        return await self._current_user(claims.user_id, claims.fingerprint)

    async def _current_user(self, user_id: int, print_: str) -> User:
        user = await self._db.run("api_user", user_by_id_txn, user_id)
        if (user is None or not user.enabled or not user.domain_enabled
                or fingerprint(user.password_hash) != print_):
            raise ApiError(401, "invalid_token", "the token is no longer valid")
        return user

    async def _audit(self, request: IRequest, actor: User, action: str, target: str,
                     details: dict[str, object]) -> None:
        await self._db.run("api_audit", record_audit_txn, actor.address,
                           self._client_ip(request), action, target, details)

    @staticmethod
    def _require_superadmin(user: User) -> None:
        if user.role != "superadmin":
            raise ApiError(403, "forbidden", "this needs the superadmin role")

    @staticmethod
    def _may_see_domain(user: User, domain: Domain) -> bool:
        return user.role == "superadmin" or (
            user.role == "domain_admin" and user.domain_id == domain.id)

    # -- health ----------------------------------------------------------------------------------

    async def _database_answers(self) -> None:
        """Raises DatabaseUnavailable (503) when it does not."""
        await self._db.run("api_health", lambda cur: cur.execute("SELECT 1"))

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        await self._database_answers()
        return _json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        if not self._is_ready():
            raise ApiError(503, "starting", "ESP is still starting")
        await self._database_answers()
        return _json(request, 200, {"status": "ready"})

    # -- authentication --------------------------------------------------------------------------

    @app.route("/api/v1/auth/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        body = self._body(request, TokenRequest)
        ip = self._client_ip(request)
        account = body.username.strip().lower()
        if (self._failures_by_ip.count(ip) >= LOGIN_FAILURES
                or self._failures_by_account.count(account) >= LOGIN_FAILURES):
            request.setHeader(b"retry-after", str(int(LOGIN_WINDOW)).encode())
            raise ApiError(429, "too_many_failures",
                           "too many failed logins; try again later")
        try:
            # The avatar id is the user's address, normalised.
            avatar: bytes = await self._checker.requestAvatarId(
                UsernamePassword(body.username.encode(), body.password.encode()))
        except AuthenticationBusy:
            request.setHeader(b"retry-after", b"1")
            raise ApiError(429, "busy", "too many logins in progress; try again") from None
        except UnauthorizedLogin:
            self._failures_by_ip.add(ip)
            self._failures_by_account.add(account)
            self._announce_login(account, ip, False)
            raise ApiError(401, "bad_credentials", "bad user name or password") from None
        address = parse_address(avatar.decode("utf-8"))
        user = await self._db.run("api_login_user", find_user_txn, address)
        if user is None:
            raise ApiError(401, "bad_credentials", "bad user name or password")
        self._announce_login(user.address, ip, True)
        return _json(request, 200, self._pair(user))

    @app.route("/api/v1/auth/refresh", methods=["POST"])
    async def refresh(self, request: IRequest) -> bytes:
        body = self._body(request, RefreshRequest)
        try:
            claims = self._tokens.verify(body.refresh_token, "refresh", self._reactor.seconds())
        except InvalidToken as e:
            raise ApiError(401, "invalid_token", f"the token is not valid: {e}") from None
        user = await self._current_user(claims.user_id, claims.fingerprint)
        return _json(request, 200, self._pair(user))

    def _pair(self, user: User) -> dict[str, object]:
        now = self._reactor.seconds()
        return {
            "access_token": self._tokens.issue(user.id, user.password_hash, "access", now),
            "refresh_token": self._tokens.issue(user.id, user.password_hash, "refresh", now),
            "token_type": "Bearer",
            "expires_in": self._tokens.access_lifetime,
        }

    def _announce_login(self, user: str, ip: str, success: bool) -> None:
        self._events.publish(Event(
            USER_LOGIN,
            {"user": user, "protocol": "api", "client_ip": ip, "success": success},
            domain=user.rpartition("@")[2] or None,
            actor=user if success else None,
        ))

    @app.route("/api/v1/me", methods=["GET"])
    async def me(self, request: IRequest) -> bytes:
        return _json(request, 200, _user(await self._authenticated(request)))

    # -- domains ---------------------------------------------------------------------------------

    @app.route("/api/v1/domains", methods=["GET"])
    async def list_domains(self, request: IRequest) -> bytes:
        user = await self._authenticated(request)
        if user.role == "user":
            raise ApiError(403, "forbidden", "this needs an administrator role")
        domains = [d for d in await self._db.run("api_domains", list_domains_txn)
                   if self._may_see_domain(user, d)]
        return _json(request, 200, {"items": [_domain(d) for d in domains]})

    @app.route("/api/v1/domains", methods=["POST"])
    async def create_domain(self, request: IRequest) -> bytes:
        user = await self._authenticated(request)
        self._require_superadmin(user)
        body = self._body(request, DomainCreate)
        try:
            name = normalize_domain(body.name)
        except (InvalidAddress, ValueError) as e:
            raise ApiError(400, "validation_failed", f"invalid field name: {e}",
                           {"fields": [{"field": "name", "problem": str(e)}]}) from None
        try:
            domain = await self._db.run("api_add_domain", add_domain_txn, name)
        except AlreadyExists as e:
            raise ApiError(409, "exists", str(e)) from None
        await self._audit(request, user, "domain.create", name, {"after": _domain(domain)})
        request.setHeader(b"location", f"/api/v1/domains/{name}".encode())
        return _json(request, 201, _domain(domain))

    @app.route("/api/v1/domains/<string:name>", methods=["GET"])
    async def get_domain(self, request: IRequest, name: str) -> bytes:
        user = await self._authenticated(request)
        try:
            domain = await self._db.run("api_domain", get_domain_txn, name)
        except (NotFound, InvalidAddress, ValueError):
            raise ApiError(404, "not_found", f"no domain {name}") from None
        if not self._may_see_domain(user, domain):
            raise ApiError(403, "forbidden", f"you do not administer {domain.name}")
        return _json(request, 200, _domain(domain))

