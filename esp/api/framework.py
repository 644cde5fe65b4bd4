"""The plumbing every endpoint of the management API shares.

An endpoint is declared once with :func:`endpoint`: its method and path, who may call it (a
scope), the models of its body, query and answer, and the error statuses it may give.  The
declaration routes the request (Klein), authenticates the caller, parses and validates what
was sent, serialises the answer, and is also what :mod:`esp.api.openapi` reads to write the
OpenAPI document, so the document cannot drift from the code.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from klein import Klein
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from twisted.web.iweb import IRequest

from esp.storage.directory import Domain, User

M = TypeVar("M", bound=BaseModel)

# The routing table of the whole API: endpoint modules add to it, ManagementAPI serves it.
ROUTES = Klein()



class ApiError(Exception):
    """An answer other than success, in the one error shape."""

    def __init__(self, status: int, code: str, message: str,
                 details: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details if details is not None else {}


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def invalid_field(name: str, problem: str) -> ApiError:
    return ApiError(400, "validation_failed", f"invalid field {name or '(body)'}: {problem}",
                    {"fields": [{"field": name, "problem": problem}]})


def _no_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: refuse it anywhere in a request."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("may not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _no_nul(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _no_nul(item)
    return value


class Strict(BaseModel):
    """A request body: unknown fields and wrong JSON types are refused, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_nul(cls, value: Any) -> Any:
        return _no_nul(value)


class Query(BaseModel):
    """Query parameters: strings from the URL, converted (``limit=10``), unknown ones refused."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_nul(cls, value: Any) -> Any:
        return _no_nul(value)


class Out(BaseModel):
    """An answer body."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, through a session token (every scope) or an API key (its
    scopes, perhaps one domain)."""

    user: User
    scopes: frozenset[str] | None = None
    key_id: int | None = None
    key_domain_id: int | None = None

    @property
    def actor(self) -> str:
        if self.key_id is None:
            return self.user.address
        return f"{self.user.address} (key {self.key_id})"

    @property
    def role(self) -> str:
        return self.user.role

    def has_scope(self, scope: str) -> bool:
        if self.scopes is None or "*" in self.scopes or scope in self.scopes:
            return True
        return scope.endswith(":read") and "read" in self.scopes

    def require_scope(self, scope: str) -> None:
        if not self.has_scope(scope):
            raise forbidden(f"this API key does not have the {scope} scope")

    def administers(self, domain: Domain | int) -> bool:
        """Whether the caller may manage ``domain`` (a Domain or its id)."""
        domain_id = domain if isinstance(domain, int) else domain.id
        if self.key_domain_id is not None and self.key_domain_id != domain_id:
            return False
        return self.role == "superadmin" or (
            self.role == "domain_admin" and self.user.domain_id == domain_id)

    def require_admin_of(self, domain: Domain) -> None:
        if not self.administers(domain):
            raise forbidden(f"you do not administer {domain.name}")

    def require_superadmin(self) -> None:
        if self.role != "superadmin" or self.key_domain_id is not None:
            raise forbidden("this needs the superadmin role")

    def require_admin(self) -> None:
        if self.role == "user":
            raise forbidden("this needs an administrator role")

    def manages(self, user: User) -> bool:
        """Whether the caller may change ``user``'s account as an administrator: their
        domain's, and only a superadmin changes a superadmin."""
        return self.administers(user.domain_id) and (
            user.role != "superadmin" or self.role == "superadmin")

    def is_self_or_admin_of(self, user: User) -> bool:
        return self.manages(user) or (
            user.id == self.user.id
            and (self.key_domain_id is None or self.key_domain_id == user.domain_id))

    def require_self_or_admin_of(self, user: User) -> None:
        if not self.is_self_or_admin_of(user):
            raise forbidden(f"you may not manage {user.address}")


# -- the declaration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One endpoint, as routed and as documented."""

    method: str
    path: str  # Klein/werkzeug rule: /api/v1/users/<address>
    name: str
    summary: str
    tag: str
    scope: str | None
    public: bool
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    errors: tuple[int, ...]
    # Media types of an answer that is not JSON (a raw message), of bodies besides JSON.
    response_types: tuple[str, ...] = ()
    body_types: tuple[str, ...] = ()
    description: str = ""


OPERATIONS: list[Operation] = []
_PARAMETER = re.compile(r"<(?:(\w+):)?(\w+)>")
# The largest id a path may carry: larger ones are 404 without reaching the database (whose
# bigint they would overflow).
INT_MAX = 2**53 - 1


def path_parameters(rule: str) -> list[tuple[str, str]]:
    """(name, converter) of each parameter of a werkzeug rule."""
    return [(m.group(2), m.group(1) or "string") for m in _PARAMETER.finditer(rule)]


def endpoint(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    scope: str | None = None,
    public: bool = False,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    errors: Sequence[int] = (),
    response_types: Sequence[str] = (),
    body_types: Sequence[str] = (),
    description: str = "",
) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """Declare and route an endpoint.  The handler is called as ``handler(api, request,
    principal, **path_parameters, [query=...], [body=...])`` (no principal when ``public``)
    and returns a model of ``response`` (sent with ``status``), ``None`` (204) or bytes it
    has answered itself."""
    statuses = set(errors) | {503}
    if not public:
        statuses |= {401, 403}
    if body is not None or body_types:
        statuses |= {400, 413, 415}
    if query is not None:
        statuses.add(400)
    if path_parameters(path):
        statuses.add(404)

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Any:
        operation = Operation(
            method=method, path=path, name=handler.__name__, summary=summary, tag=tag,
            scope=scope, public=public, body=body, query=query, response=response,
            status=status, errors=tuple(sorted(statuses)), response_types=tuple(response_types),
            body_types=tuple(body_types), description=description,
        )
        if any(o.name == operation.name for o in OPERATIONS):
            # Klein finds a handler by its function name: a second one would replace the first.
            raise ValueError(f"two endpoints are named {operation.name}")
        OPERATIONS.append(operation)

        @functools.wraps(handler)
        async def serve(api: Any, request: IRequest, **params: Any) -> bytes:
            arguments: dict[str, Any] = dict(params)
            if any(isinstance(v, int) and v > INT_MAX for v in params.values()):
                raise not_found("no such resource")
            if not public:
                principal = await api.authenticate(request)
                if scope is not None:
                    principal.require_scope(scope)
                call: tuple[Any, ...] = (api, request, principal)
            else:
                call = (api, request)
            if query is not None:
                arguments["query"] = parse_query(request, query)
            if body is not None:
                # A body in one of ``body_types`` (multipart) is the handler's to read.
                other = media_type(request).decode("latin-1") in body_types
                arguments["body"] = None if other else parse_body(request, body)
            result = await handler(*call, **arguments)
            if isinstance(result, bytes):
                return result
            if result is None:
                request.setResponseCode(204)
                return b""
            return json_response(request, status, result.model_dump(mode="json", by_alias=True))

        return ROUTES.route(path, methods=[method])(serve)

    return decorate


# -- what goes over the wire -------------------------------------------------------------------


def json_response(request: IRequest, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


def error_response(request: IRequest, status: int, code: str, message: str,
                   details: object = None) -> bytes:
    return json_response(request, status, {"error": {
        "code": code, "message": message, "details": details if details is not None else {}}})


def _fields(error: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    return [{"field": prefix + ".".join(str(p) for p in item["loc"]), "problem": item["msg"]}
            for item in error.errors()]


def _refuse(fields: list[dict[str, str]]) -> ApiError:
    first = fields[0]
    return ApiError(400, "validation_failed",
                    f"invalid field {first['field'] or '(body)'}: {first['problem']}",
                    {"fields": fields})


def media_type(request: IRequest) -> bytes:
    return (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()


def validate(model: type[M], raw: bytes) -> M:
    """The JSON document ``raw`` as ``model``: 400 invalid_json when it is not JSON, 400
    validation_failed naming each bad field (JSON types are kept: "1" is not a number)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid_field("", "expected a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise _refuse(_fields(e)) from None


def parse_body(request: IRequest, model: type[M]) -> M:
    if media_type(request) != b"application/json":
        raise ApiError(415, "unsupported_media_type", "send application/json")
    return validate(model, request.content.read() if request.content is not None else b"")


def parse_query(request: IRequest, model: type[M]) -> M:
    values: dict[str, object] = {}
    for raw_name, raw_values in (request.args or {}).items():
        try:
            name = raw_name.decode("utf-8")
            decoded = [v.decode("utf-8") for v in raw_values]
        except UnicodeDecodeError:
            raise _refuse([{"field": repr(raw_name)[2:-1],
                            "problem": "not UTF-8"}]) from None
        if len(decoded) > 1:
            raise _refuse([{"field": name, "problem": "given more than once"}])
        values[name] = decoded[0]
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise _refuse(_fields(e)) from None
