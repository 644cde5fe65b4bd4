"""The audit log's subscriber: logins, successful and failed, from every protocol, with the
client's address (changes made over the API and the CLI are written by them, in the
transaction of the change).  Old lines go after ``events.audit.retention_days``."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from esp.events import USER_LOGIN, Event
from esp.interfaces import IEventSubscriber
from esp.storage.db import Cursor
from esp.storage.directory import record_audit_txn


def forget_old_txn(cur: Cursor, days: int, limit: int = 10_000) -> int:
    cur.execute("DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE "
                "occurred_at < now() - %s * interval '1 day' ORDER BY id LIMIT %s)",
                (days, limit))
    return int(cur.rowcount)


@implementer(IEventSubscriber)
class AuditLogger:
    name = "audit"
    patterns = (USER_LOGIN,)
    log = Logger()

    def __init__(self, db: Any, retention_days: int) -> None:
        self._db = db
        self._retention = retention_days

    async def handle(self, event: Event) -> None:
        payload = event.payload
        ok = bool(payload.get("success"))
        ip = str(payload.get("client_ip") or "") or None
        await self._db.run(
            "audit_login", record_audit_txn, str(payload.get("user") or "?"),
            ip if ip and ip != "unknown" else None, "login" if ok else "login.failed",
            str(payload.get("protocol") or ""),
            {k: v for k, v in payload.items() if k in ("protocol", "listener")})
        if random.random() < 0.001:  # noqa: S311 (housekeeping)
            Deferred.fromCoroutine(self._db.run("audit_retention", forget_old_txn,
                                                self._retention)).addErrback(
                lambda f: self.log.failure("audit retention", f))
