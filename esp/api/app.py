"""The management API (Klein): JSON in and out, one error shape, JWT bearer tokens and API keys.

Every error is ``{"error": {"code", "message", "details"}}`` with its HTTP status (400 for a
body that does not validate, naming the field; 401, 403, 404, 409, 413, 415, 422, 429, 503).
Requests are authenticated by ``Authorization: Bearer`` with an access token or an API key;
the user is loaded from the directory on every request (a deleted or disabled user, or a
changed password, ends their tokens at once).  Roles: ``superadmin`` (everything),
``domain_admin`` (their own domain), ``user`` (only themself); an API key acts for its user
within its scopes and, if it has one, its domain.  Every change is written to the audit log
in the transaction that makes it.

The endpoints live in ``*_routes`` modules, grouped by resource; this class joins them and
adds what is common: errors, health, and the OpenAPI document.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

import esp
from esp.api.auth_routes import AuthRoutes
from esp.api.base import APIServices
from esp.api.cert_routes import CertRoutes
from esp.api.directory_routes import DirectoryRoutes
from esp.api.framework import ROUTES, ApiError, endpoint, error_response
from esp.api.mail_routes import MailRoutes
from esp.api.models import StatusOut
from esp.api.openapi import document
from esp.api.ops_routes import OpsRoutes
from esp.api.rules_routes import RulesRoutes
from esp.storage.db import DatabaseUnavailable


class ManagementAPI(AuthRoutes, DirectoryRoutes, MailRoutes, RulesRoutes, OpsRoutes,
                    CertRoutes):
    app = ROUTES

    def __init__(self, services: APIServices) -> None:
        super().__init__(services)
        self.start_login_limits()
        self._openapi = json.dumps(document(esp.__version__), separators=(",", ":")).encode()

    # -- errors ------------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Any) -> bytes:
        error: ApiError = failure.value
        if error.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="esp"')
        return error_response(request, error.status, error.code, error.message, error.details)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Any) -> bytes:
        error: HTTPException = failure.value
        status = error.code or 400
        codes = {404: "not_found", 405: "method_not_allowed"}
        if status == 405:
            allowed = getattr(error, "valid_methods", None) or []
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return error_response(request, status, codes.get(status, "bad_request"),
                              "no such resource" if status == 404 else (error.description or ""))

    @app.handle_errors(DatabaseUnavailable)
    def _database_error(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"retry-after", b"5")
        return error_response(request, 503, "unavailable",
                              "the database is unavailable; try again later")

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Any) -> bytes:
        self.log.failure("API request failed", failure)
        return error_response(request, 500, "internal", "internal error")

    # -- health and the document -------------------------------------------------------------

    async def _database_answers(self) -> None:
        """Raises DatabaseUnavailable (503) when it does not."""
        await self.db.run("api_health", lambda cur: cur.execute("SELECT 1"))

    @endpoint("GET", "/healthz", summary="200 when the database answers", tag="health",
              public=True, response=StatusOut)
    async def healthz(self, request: IRequest) -> StatusOut:
        await self._database_answers()
        return StatusOut(status="ok")

    @endpoint("GET", "/readyz", summary="200 once ESP has started and the database answers",
              tag="health", public=True, response=StatusOut)
    async def readyz(self, request: IRequest) -> StatusOut:
        if not self.services.is_ready():
            raise ApiError(503, "starting", "ESP is still starting")
        await self._database_answers()
        return StatusOut(status="ready")

    @ROUTES.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self._openapi

