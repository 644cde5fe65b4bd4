"""The outbound queue, the audit log and webhooks."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IRequest

from esp.api.base import APIBase, field_domain
from esp.api.directory_routes import visible_domains
from esp.api.framework import ApiError, Principal, endpoint, forbidden, not_found
from esp.api.models import (
    AttemptOut,
    AuditEntry,
    AuditPage,
    AuditQuery,
    DeliveryOut,
    DeliveryPage,
    DomainFilter,
    Paging,
    QueueEntryOut,
    QueuePage,
    QueueQuery,
    QueueRecipient,
    SecretOut,
    SecretRotation,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookPage,
    WebhookUpdate,
)
from esp.storage import queue
from esp.storage.db import Cursor
from esp.storage.directory import Domain
from esp.storage.manage import (
    WebhookRow,
    create_webhook_txn,
    delete_webhook_txn,
    get_webhook_txn,
    page_audit_txn,
    page_deliveries_txn,
    page_domains_txn,
    page_webhooks_txn,
    redeliver_txn,
    rotate_secret_txn,
    update_webhook_txn,
)
from esp.webhooks import guard


def queue_out(entry: queue.QueueEntry) -> QueueEntryOut:
    return QueueEntryOut(
        id=entry.queue_id, sender=entry.sender, recipient_domain=entry.recipient_domain,
        status=entry.status, attempts=entry.attempts, next_attempt_at=entry.next_attempt_at,
        last_error=entry.last_error, created_at=entry.created_at, size=entry.size,
        recipients=[QueueRecipient(address=a, status=s, last_error=e)
                    for a, s, e in entry.recipients])


def webhook_out(row: WebhookRow) -> WebhookOut:
    return WebhookOut(id=row.id, url=row.url, event_types=list(row.event_types),
                      domain=row.domain, enabled=row.enabled,
                      consecutive_failures=row.consecutive_failures,
                      disabled_reason=row.disabled_reason, created_at=row.created_at)


class OpsRoutes(APIBase):
    async def _check_url(self, url: str) -> None:
        """Webhooks go to public addresses (or the configured allow-list): checked now, and
        again before every delivery."""
        services = self.services
        try:
            await deferToThreadPool(services.reactor, services.dns_pool, guard.check_url, url,
                                    guard.networks(services.webhook_networks),
                                    services.resolver)
        except guard.Refused as e:
            raise ApiError(422, "internal_url", str(e),
                           {"fields": [{"field": "url", "problem": str(e)}]}) from None

    def _changed(self) -> None:
        if self.services.forget_endpoints is not None:
            self.services.forget_endpoints()

    # -- queue -------------------------------------------------------------------------------

    async def _sender_domains(self, principal: Principal) -> list[str] | None:
        """The sender domains whose queue the caller sees (None: all)."""
        principal.require_admin()
        ids = visible_domains(principal)
        if ids is None:
            return None
        domains, _ = await self.db.run("api_domains", page_domains_txn, ids, len(ids) or 1, 0)
        return [d.name for d in domains]

    async def _entry(self, principal: Principal, queue_id: int) -> queue.QueueEntry:
        entry = await self.db.run("api_queue_entry", queue.get_queue_entry_txn, queue_id)
        domains = await self._sender_domains(principal)
        if entry is None or (domains is not None
                             and entry.sender.rpartition("@")[2].lower() not in domains):
            raise not_found(f"no queue entry {queue_id}")
        return entry

    @endpoint("GET", "/api/v1/queue", summary="Outbound messages waiting (all=true: also "
              "the finished ones), of the caller's domains", tag="queue", scope="queue:read",
              query=QueueQuery, response=QueuePage)
    async def list_queue(self, request: IRequest, principal: Principal,
                         query: QueueQuery) -> QueuePage:
        domains = await self._sender_domains(principal)
        entries, total = await self.db.run("api_queue", queue.page_queue_txn, query.all,
                                           domains, query.limit, query.offset)
        return QueuePage(items=[queue_out(e) for e in entries], total=total,
                         limit=query.limit, offset=query.offset)

    @endpoint("GET", "/api/v1/queue/<int:queue_id>", summary="One queue entry", tag="queue",
              scope="queue:read", response=QueueEntryOut)
    async def get_queue_entry(self, request: IRequest, principal: Principal,
                              queue_id: int) -> QueueEntryOut:
        return queue_out(await self._entry(principal, queue_id))

    @endpoint("POST", "/api/v1/queue/<int:queue_id>/retry", summary="Try a waiting entry "
              "now", tag="queue", scope="queue:write", response=QueueEntryOut, errors=(409,))
    async def retry_queue_entry(self, request: IRequest, principal: Principal,
                                queue_id: int) -> QueueEntryOut:
        entry = await self._entry(principal, queue_id)
        not_waiting = ApiError(409, "not_waiting", f"queue entry {queue_id} is {entry.status}, "
                               "not waiting")

        def retry(cur: Cursor) -> None:
            if not queue.retry_txn(cur, [queue_id]):
                raise not_waiting  # rolls back: nothing changed, nothing to audit

        await self.change(request, principal, "queue.retry", str(queue_id), retry)
        if self.services.wake_outbound is not None:
            self.services.wake_outbound()
        return queue_out(await self._entry(principal, queue_id))

    @endpoint("DELETE", "/api/v1/queue/<int:queue_id>", summary="Drop a waiting entry (no "
              "report goes to the sender)", tag="queue", scope="queue:write", status=204,
              errors=(409,))
    async def delete_queue_entry(self, request: IRequest, principal: Principal,
                                 queue_id: int) -> None:
        entry = await self._entry(principal, queue_id)
        not_waiting = ApiError(409, "not_waiting", f"queue entry {queue_id} is {entry.status}, "
                               "not waiting")

        def delete(cur: Cursor) -> str | None:
            deleted, spool = queue.delete_txn(cur, queue_id)
            if not deleted:
                raise not_waiting
            return spool

        spool = await self.change(request, principal, "queue.delete", str(queue_id), delete)
        if spool is not None:
            path = self.services.spool_dir / "new" / spool
            await deferToThreadPool(self.services.reactor, self.services.disk_pool,
                                    path.unlink, True)

    # -- audit log ---------------------------------------------------------------------------

    @endpoint("GET", "/api/v1/audit", summary="The audit log, newest first (superadmin)",
              tag="audit", scope="audit:read", query=AuditQuery, response=AuditPage)
    async def audit_log(self, request: IRequest, principal: Principal,
                        query: AuditQuery) -> AuditPage:
        principal.require_superadmin()
        rows, total = await self.db.run(
            "api_audit_log", page_audit_txn, actor=query.actor, action=query.action,
            target=query.target, since=query.since, until=query.until, limit=query.limit,
            offset=query.offset)
        return AuditPage(items=[AuditEntry(**row.__dict__) for row in rows], total=total,
                         limit=query.limit, offset=query.offset)

    # -- webhooks ----------------------------------------------------------------------------

    async def _webhook(self, principal: Principal, webhook_id: int) -> WebhookRow:
        row = await self.db.run("api_webhook", get_webhook_txn, webhook_id)
        if row is None:
            raise not_found(f"no webhook {webhook_id}")
        if not (row.domain_id is None and principal.role == "superadmin"
                and principal.key_domain_id is None) and not (
                row.domain_id is not None and principal.administers(row.domain_id)):
            raise forbidden("you do not administer this webhook's domain")
        return row

    @endpoint("GET", "/api/v1/webhooks", summary="Webhooks of the caller's domains",
              tag="webhooks", scope="webhooks:read", query=DomainFilter, response=WebhookPage,
              errors=(422,))
    async def list_webhooks(self, request: IRequest, principal: Principal,
                            query: DomainFilter) -> WebhookPage:
        principal.require_admin()
        ids = visible_domains(principal)
        if query.domain is not None:
            ids = [(await self.domain(principal, query.domain, field="domain")).id]
        rows, total = await self.db.run("api_webhooks", page_webhooks_txn, ids, query.limit,
                                        query.offset)
        return WebhookPage(items=[webhook_out(r) for r in rows], total=total,
                           limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/webhooks", summary="Add a webhook (its secret is shown once)",
              tag="webhooks", scope="webhooks:write", body=WebhookCreate,
              response=WebhookCreated, status=201, errors=(422,))
    async def create_webhook(self, request: IRequest, principal: Principal,
                             body: WebhookCreate) -> WebhookCreated:
        await self._check_url(body.url)
        domain: Domain | None = None
        if body.domain is not None:
            domain = await self.domain(principal, field_domain("domain", body.domain),
                                       field="domain")
        else:
            principal.require_superadmin()
        row = await self.change(
            request, principal, "webhook.create", lambda r: f"webhook {r.id}",
            create_webhook_txn, body.url, sorted(set(body.event_types)),
            domain.id if domain else None, body.enabled,
            summary=lambda r: {"after": webhook_out(r).model_dump(mode="json")})
        self._changed()
        request.setHeader(b"location", f"/api/v1/webhooks/{row.id}".encode())
        return WebhookCreated(**webhook_out(row).model_dump(), secret=row.secret)

    @endpoint("GET", "/api/v1/webhooks/<int:webhook_id>", summary="One webhook",
              tag="webhooks", scope="webhooks:read", response=WebhookOut)
    async def get_webhook(self, request: IRequest, principal: Principal,
                          webhook_id: int) -> WebhookOut:
        return webhook_out(await self._webhook(principal, webhook_id))

    @endpoint("PATCH", "/api/v1/webhooks/<int:webhook_id>", summary="Change a webhook "
              "(enabling it again clears its failures)", tag="webhooks",
              scope="webhooks:write", body=WebhookUpdate, response=WebhookOut, errors=(422,))
    async def update_webhook(self, request: IRequest, principal: Principal, webhook_id: int,
                             body: WebhookUpdate) -> WebhookOut:
        before = await self._webhook(principal, webhook_id)
        if body.url is not None:
            await self._check_url(body.url)
        changes = {k: v for k, v in body.model_dump(exclude_unset=True).items()
                   if v is not None}
        if "event_types" in changes:
            changes["event_types"] = sorted(set(changes["event_types"]))
        row = await self.change(
            request, principal, "webhook.update", f"webhook {webhook_id}", update_webhook_txn,
            webhook_id, changes,
            summary=lambda r: {"before": webhook_out(before).model_dump(mode="json"),
                               "after": webhook_out(r).model_dump(mode="json")})
        self._changed()
        return webhook_out(row)

    @endpoint("DELETE", "/api/v1/webhooks/<int:webhook_id>", summary="Remove a webhook",
              tag="webhooks", scope="webhooks:write", status=204)
    async def delete_webhook(self, request: IRequest, principal: Principal,
                             webhook_id: int) -> None:
        row = await self._webhook(principal, webhook_id)
        await self.change(request, principal, "webhook.remove", f"webhook {webhook_id}",
                          delete_webhook_txn, webhook_id,
                          summary=lambda _: {"before": {"url": row.url}})
        self._changed()

    @endpoint("GET", "/api/v1/webhooks/<int:webhook_id>/deliveries", summary="A webhook's "
              "deliveries, newest first, with every attempt", tag="webhooks",
              scope="webhooks:read", query=Paging, response=DeliveryPage)
    async def webhook_deliveries(self, request: IRequest, principal: Principal,
                                 webhook_id: int, query: Paging) -> DeliveryPage:
        await self._webhook(principal, webhook_id)
        rows, total = await self.db.run("api_deliveries", page_deliveries_txn, webhook_id,
                                        query.limit, query.offset)
        return DeliveryPage(items=[DeliveryOut(
            **{k: v for k, v in row.__dict__.items() if k != "tries"},
            tries=[AttemptOut(**t.__dict__) for t in row.tries]) for row in rows],
            total=total, limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/webhooks/<int:webhook_id>/deliveries/<int:delivery_id>/retry",
              summary="Deliver again now (also a delivery that gave up)", tag="webhooks",
              scope="webhooks:write", status=204, errors=(409,))
    async def redeliver(self, request: IRequest, principal: Principal, webhook_id: int,
                        delivery_id: int) -> None:
        await self._webhook(principal, webhook_id)
        not_now = ApiError(409, "in_progress", "no such delivery, or it is being attempted "
                           "right now")

        def again(cur: Cursor) -> None:
            if not redeliver_txn(cur, webhook_id, delivery_id):
                raise not_now

        await self.change(request, principal, "webhook.redeliver",
                          f"webhook {webhook_id} delivery {delivery_id}", again)

    @endpoint("POST", "/api/v1/webhooks/<int:webhook_id>/rotate-secret", summary="A new "
              "signing secret; the old one signs too during the overlap", tag="webhooks",
              scope="webhooks:write", body=SecretRotation, response=SecretOut)
    async def rotate_secret(self, request: IRequest, principal: Principal, webhook_id: int,
                            body: SecretRotation) -> SecretOut:
        await self._webhook(principal, webhook_id)
        secret = await self.change(request, principal, "webhook.rotate_secret",
                                   f"webhook {webhook_id}", rotate_secret_txn, webhook_id,
                                   body.overlap_seconds)
        until = datetime.fromtimestamp(self.services.reactor.seconds() + body.overlap_seconds,
                                       UTC)
        return SecretOut(secret=secret, previous_valid_until=until)
