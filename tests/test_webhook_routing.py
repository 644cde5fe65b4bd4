"""Which events leave the process: the enabled webhooks, remembered a few seconds, and read
again at once when one changes, even while a reading is under way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from esp.storage.db import Database, connect, run_sync
from esp.storage.manage import create_webhook_txn
from esp.webhooks.routing import EndpointDirectory


class HeldDatabase:
    """The real database, whose first answer is held until the test lets it go."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.calls = 0
        self.answered = 0
        self.first_answer: Deferred[None] = Deferred()  # fires once the first reading is done
        self.release: Deferred[None] = Deferred()

    async def run(self, name: str, fn: Any, *args: Any) -> Any:
        self.calls += 1
        answer = await self._db.run(name, fn, *args)
        self.answered += 1
        if self.answered == 1:
            self.first_answer.callback(None)
            await self.release
        return answer


@pytest_twisted.async_yield_fixture
async def db(database_dsn: str) -> AsyncIterator[Database]:
    database = Database(database_dsn, reactor)
    database.open()
    yield database
    database.close()


@pytest_twisted.ensureDeferred
async def test_a_webhook_made_while_the_list_is_being_read_is_seen_at_once(
    db: Database, database_dsn: str,
) -> None:
    held = HeldDatabase(db)
    directory = EndpointDirectory(held, reactor, ttl=3600)
    # A reading starts (an event was published) and reads the list before the webhook...
    first = Deferred.fromCoroutine(directory.wanted())
    await held.first_answer
    # ...then the API makes a webhook and says so, and only then the old list comes back.
    conn = connect(database_dsn)
    run_sync(conn, create_webhook_txn, "http://127.0.0.1:9/hook", ["mailbox.*"], None, True)
    conn.close()
    directory.forget()
    held.release.callback(None)
    wants = await first
    assert wants("mailbox.created", "example.test")
    # And it is remembered: no reading for the next event.
    calls = held.calls
    assert (await directory.wanted())("mailbox.created", None)
    assert held.calls == calls

