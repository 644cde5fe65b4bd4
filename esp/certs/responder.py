"""The HTTP-01 challenge responder (RFC 8555 §8.3): ``GET /.well-known/acme-challenge/<token>``
answered from the ``acme_challenges`` table, so whichever node the CA reaches can answer for an
order any node placed.  Anything else is 404; nothing here redirects."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from esp.storage.certificates import challenge_answer_txn

TOKEN = re.compile(rb"^[A-Za-z0-9_-]{1,256}$")  # base64url, as RFC 8555 §8.3 makes them


class ChallengeResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, db: Any) -> None:
        super().__init__()
        self._db = db

    def render_GET(self, request: Request) -> bytes | int:
        path = request.postpath or []
        if len(path) != 1 or not TOKEN.match(path[0]):
            return self._not_found(request)
        token = path[0].decode("ascii")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(found: str | None) -> None:
            if gone:
                return  # the client went away meanwhile
            if found is None:
                request.write(self._not_found(request))
            else:
                request.setHeader(b"content-type", b"text/plain")
                request.write(found.encode("ascii"))
            request.finish()

        def failed(failure: Any) -> None:
            self.log.warn("cannot read ACME challenge {token}: {error}", token=token,
                          error=failure.getErrorMessage())
            if gone:
                return
            request.setResponseCode(503)
            request.finish()

        d: Deferred[str | None] = Deferred.fromCoroutine(
            self._db.run("acme_challenge", challenge_answer_txn, token))
        d.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _not_found(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found\n"


def challenge_site(db: Any) -> Site:
    root = Resource()
    known = Resource()
    root.putChild(b".well-known", known)
    known.putChild(b"acme-challenge", ChallengeResource(db))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
