"""Certificates: list them, ask for ACME ones, renew, remove (docs/certificates.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from twisted.web.iweb import IRequest

from esp.api.base import APIBase
from esp.api.framework import ApiError, Principal, endpoint, forbidden, not_found
from esp.api.models import CertificateOut, CertificatePage, CertificateRequest, Paging
from esp.storage.certificates import (
    CertificateRow,
    get_certificate_txn,
    hosted_domains_of_txn,
    list_certificates_txn,
    remove_certificate_txn,
    renew_now_txn,
    request_certificate_txn,
)
from esp.storage.db import Cursor
from esp.tls import covers


def certificate_out(row: CertificateRow) -> CertificateOut:
    status = ("in_service" if row.chain_pem is not None and not row.last_error
              else "failing" if row.last_error else "waiting")
    return CertificateOut(
        id=row.id, names=list(row.names), domain=row.domain, source=row.source,  # type: ignore[arg-type]
        provider=row.provider, status=status, not_before=row.not_before,  # type: ignore[arg-type]
        not_after=row.not_after, issuer=row.issuer, serial=row.serial, renew_at=row.renew_at,
        next_attempt_at=row.next_attempt(datetime.now(UTC)),
        failures=row.failures, last_error=row.last_error)


# A domain administrator may not have a certificate reordered sooner than this after the
# last issuance (the CA's limits are per account, and the account is everybody's).
MANUAL_RENEWAL_INTERVAL = timedelta(hours=1)


def _is_superadmin(principal: Principal) -> bool:
    return principal.role == "superadmin" and principal.key_domain_id is None


class CertRoutes(APIBase):
    def _may_manage(self, principal: Principal, owners: list[int | None]) -> bool:
        """A superadmin, or an administrator of the hosted domain of every name."""
        return _is_superadmin(principal) or (
            bool(owners) and all(d is not None and principal.administers(d) for d in owners))

    async def _certificate(self, principal: Principal, certificate_id: int) -> CertificateRow:
        def txn(cur: Cursor) -> tuple[CertificateRow | None, list[int | None]]:
            row = get_certificate_txn(cur, certificate_id)
            return row, hosted_domains_of_txn(cur, row.names) if row else []

        row, owners = await self.db.run("api_certificate", txn)
        if row is None:
            raise not_found(f"no certificate {certificate_id}")
        if not self._may_manage(principal, owners):
            raise forbidden("you do not administer the domains of all its names")
        return row

    def _check_renewal(self, principal: Principal, row: CertificateRow) -> None:
        if row.source != "acme":
            raise ApiError(409, "conflict", f"{row.names[0]} has an imported certificate; "
                           "ESP renews only ACME ones")
        if _is_superadmin(principal):
            return
        now = datetime.now(UTC)
        if row.issued_at is not None and now - row.issued_at < MANUAL_RENEWAL_INTERVAL:
            raise ApiError(409, "conflict", "it was issued less than an hour ago")
        if row.failures and row.next_attempt_at > now:
            raise ApiError(409, "conflict", "the last attempt failed; the next is at "
                           f"{row.next_attempt_at.isoformat()} ({row.last_error})")

    @endpoint("GET", "/api/v1/certificates", summary="Certificates of the caller's domains "
              "(all for a superadmin)", tag="certificates", scope="certificates:read",
              query=Paging, response=CertificatePage)
    async def list_certificates(self, request: IRequest, principal: Principal,
                                query: Paging) -> CertificatePage:
        principal.require_admin()

        def txn(cur: Cursor) -> list[tuple[CertificateRow, list[int | None]]]:
            return [(r, hosted_domains_of_txn(cur, r.names)) for r in list_certificates_txn(cur)]

        rows = [r for r, owners in await self.db.run("api_certificates", txn)
                if self._may_manage(principal, owners)]
        page = rows[query.offset:query.offset + query.limit]
        return CertificatePage(items=[certificate_out(r) for r in page], total=len(rows),
                               limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/certificates", summary="Ask for an ACME certificate (ordered "
              "at once by a node with security.tls.acme.enabled; an existing one for the same "
              "names is renewed)", tag="certificates", scope="certificates:write",
              body=CertificateRequest, response=CertificateOut, status=202, errors=(409, 422))
    async def request_certificate(self, request: IRequest, principal: Principal,
                                  body: CertificateRequest) -> CertificateOut:
        principal.require_admin()
        names = list(dict.fromkeys(body.names))
        if body.provider is not None and body.provider not in self.services.acme_providers:
            raise ApiError(422, "invalid", f"no ACME provider {body.provider!r}",
                           {"fields": [{"field": "provider", "problem": "not configured"}]})
        provider = body.provider or self.services.acme_default_provider
        if not _is_superadmin(principal):
            if provider != self.services.acme_default_provider:
                raise forbidden("only a superadmin chooses the ACME provider")
            if covers(names, self.services.hostname.lower()):
                raise forbidden("the server's own name is the superadmin's to certify")
            owners = await self.db.run(
                "api_certificate_domains",
                hosted_domains_of_txn, names)
            if not self._may_manage(principal, owners):
                raise forbidden("every name must be in a domain you administer")

        def txn(cur: Cursor) -> CertificateRow:
            row, made = request_certificate_txn(cur, names, provider)
            if made:
                return row
            self._check_renewal(principal, row)
            return renew_now_txn(cur, row.id) or row

        row = await self.change(request, principal, "certificate.request", names[0], txn,
                                summary=lambda r: {"names": names, "provider": provider})
        request.setHeader(b"location", f"/api/v1/certificates/{row.id}".encode())
        return certificate_out(row)

    @endpoint("GET", "/api/v1/certificates/<int:certificate_id>", summary="One certificate",
              tag="certificates", scope="certificates:read", response=CertificateOut)
    async def get_certificate(self, request: IRequest, principal: Principal,
                              certificate_id: int) -> CertificateOut:
        return certificate_out(await self._certificate(principal, certificate_id))

    @endpoint("POST", "/api/v1/certificates/<int:certificate_id>/renew", summary="Renew an "
              "ACME certificate now (a domain administrator: not within an hour of the last "
              "issuance, nor while a failed attempt's wait runs)", tag="certificates",
              scope="certificates:write", response=CertificateOut, status=202, errors=(409,))
    async def renew_certificate(self, request: IRequest, principal: Principal,
                                certificate_id: int) -> CertificateOut:
        row = await self._certificate(principal, certificate_id)
        self._check_renewal(principal, row)
        renewed = await self.change(request, principal, "certificate.renew", row.names[0],
                                    renew_now_txn, certificate_id)
        return certificate_out(renewed or row)

    @endpoint("DELETE", "/api/v1/certificates/<int:certificate_id>", summary="Stop serving "
              "(and renewing) a certificate", tag="certificates", scope="certificates:write",
              status=204)
    async def delete_certificate(self, request: IRequest, principal: Principal,
                                 certificate_id: int) -> None:
        row = await self._certificate(principal, certificate_id)
        await self.change(request, principal, "certificate.remove", row.names[0],
                          remove_certificate_txn, certificate_id)
