"""Certificates: list them, ask for ACME ones, renew, remove (docs/certificates.md)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from esp.api.base import APIBase
from esp.api.framework import ApiError, Principal, endpoint, forbidden, not_found
from esp.api.models import CertificateOut, CertificatePage, CertificateRequest, Paging
from esp.storage.certificates import (
    CertificateRow,
    get_certificate_txn,
    hosted_domain_of_txn,
    list_certificates_txn,
    remove_certificate_txn,
    renew_now_txn,
    request_certificate_txn,
)
from esp.storage.db import Cursor


def certificate_out(row: CertificateRow) -> CertificateOut:
    status = ("waiting" if row.chain_pem is None and not row.last_error
              else "failing" if row.last_error else "in_service")
    return CertificateOut(
        id=row.id, names=list(row.names), domain=row.domain, source=row.source,  # type: ignore[arg-type]
        provider=row.provider, status=status, not_before=row.not_before,  # type: ignore[arg-type]
        not_after=row.not_after, issuer=row.issuer, serial=row.serial, renew_at=row.renew_at,
        next_attempt_at=row.next_attempt_at if row.source == "acme" else None,
        failures=row.failures, last_error=row.last_error)


class CertRoutes(APIBase):
    def _may_see(self, principal: Principal, row: CertificateRow, domain_id: int | None) -> bool:
        if principal.role == "superadmin" and principal.key_domain_id is None:
            return True
        return domain_id is not None and principal.administers(domain_id)

    async def _certificate(self, principal: Principal, certificate_id: int) -> CertificateRow:
        def txn(cur: Cursor) -> tuple[CertificateRow | None, int | None]:
            row = get_certificate_txn(cur, certificate_id)
            return row, hosted_domain_of_txn(cur, row.names[0]) if row else None

        row, domain_id = await self.db.run("api_certificate", txn)
        if row is None:
            raise not_found(f"no certificate {certificate_id}")
        if not self._may_see(principal, row, domain_id):
            raise forbidden("you do not administer this certificate's domain")
        return row

    @endpoint("GET", "/api/v1/certificates", summary="Certificates of the caller's domains "
              "(all for a superadmin)", tag="certificates", scope="certificates:read",
              query=Paging, response=CertificatePage)
    async def list_certificates(self, request: IRequest, principal: Principal,
                                query: Paging) -> CertificatePage:
        principal.require_admin()

        def txn(cur: Cursor) -> list[tuple[CertificateRow, int | None]]:
            return [(r, hosted_domain_of_txn(cur, r.names[0]))
                    for r in list_certificates_txn(cur)]

        rows = [r for r, d in await self.db.run("api_certificates", txn)
                if self._may_see(principal, r, d)]
        page = rows[query.offset:query.offset + query.limit]
        return CertificatePage(items=[certificate_out(r) for r in page], total=len(rows),
                               limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/certificates", summary="Ask for an ACME certificate (ordered "
              "at once by a node with security.tls.acme.enabled; an existing one for the same "
              "names is renewed)", tag="certificates", scope="certificates:write",
              body=CertificateRequest, response=CertificateOut, status=202, errors=(422,))
    async def request_certificate(self, request: IRequest, principal: Principal,
                                  body: CertificateRequest) -> CertificateOut:
        principal.require_admin()
        names = list(dict.fromkeys(body.names))
        if body.provider is not None and body.provider not in self.services.acme_providers:
            raise ApiError(422, "invalid", f"no ACME provider {body.provider!r}",
                           {"fields": [{"field": "provider", "problem": "not configured"}]})
        provider = body.provider or self.services.acme_default_provider
        if not (principal.role == "superadmin" and principal.key_domain_id is None):
            owners = await self.db.run(
                "api_certificate_domains",
                lambda cur: [hosted_domain_of_txn(cur, n) for n in names])
            if any(d is None or not principal.administers(d) for d in owners):
                raise forbidden("every name must be in a domain you administer")

        def txn(cur: Cursor) -> CertificateRow:
            row, made = request_certificate_txn(cur, names, provider)
            if not made:
                row = renew_now_txn(cur, row.id) or row
            return row

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
              "ACME certificate now", tag="certificates", scope="certificates:write",
              response=CertificateOut, status=202, errors=(409,))
    async def renew_certificate(self, request: IRequest, principal: Principal,
                                certificate_id: int) -> CertificateOut:
        row = await self._certificate(principal, certificate_id)
        if row.source != "acme":
            raise ApiError(409, "conflict", "only ACME certificates are renewed by ESP")
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
