"""What the SMTP listeners accept: senders, recipients and messages, by the rules of each port.

- MX (25): recipients must be in a hosted domain (554 otherwise: never an open relay) and exist
  as a user, alias or catch-all (550 otherwise).
- Submission (587/465): the client has authenticated; the sender must be an address the user
  owns (553 otherwise); recipients anywhere, hosted ones must exist.

Dependency failures become 4xx, never 5xx.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esp.addresses import Address, InvalidAddress, parse_address
from esp.delivery import (
    DeliveryFailed,
    DeliveryResult,
    LocalDelivery,
    LocalRecipient,
    MailboxFull,
)
from esp.envelope import Accepted, Envelope, Listener, Refusal, Session, temporary_failure
from esp.filters import FILTER_FIELDS, JUNK, Decision, FilterContext, filter_headers
from esp.filters.pipeline import FilterPipeline
from esp.mailauth import MailAuthenticator, SPFResult, Verdict, remove_forged_results
from esp.message import complete_submission, remove_fields, split_header
from esp.rules import Facts, Rule
from esp.rules import apply as apply_rules
from esp.signing import DKIMSigner, author_domain
from esp.storage.db import Database, DatabaseUnavailable
from esp.storage.directory import (
    DirectoryStore,
    NotHosted,
    Resolution,
    UnknownRecipient,
    User,
)
from esp.storage.dkimkeys import DKIMKeyError
from esp.storage.mailstore import find_mailbox_txn, find_special_use_txn
from esp.storage.queue import is_suppressed_txn
from esp.ttlcache import TTLCache


@dataclass(frozen=True)
class MailAuthPolicy:
    """Sender authentication on the MX, and what to do with its results."""

    authenticator: MailAuthenticator
    threadpool: ThreadPool
    reactor: Any
    enforce_dmarc: bool = True
    reject_spf_fail: bool = True

    async def run(self, fn: Any, *args: Any) -> Any:
        return await deferToThreadPool(self.reactor, self.threadpool, fn, *args)


class InboundPolicy:
    log = Logger()

    def __init__(
        self,
        db: Database,
        directory: DirectoryStore,
        delivery: LocalDelivery,
        mailauth: MailAuthPolicy | None = None,
        signer: DKIMSigner | None = None,
        hostname: str = "localhost",
        filters: FilterPipeline | None = None,
        rules: TTLCache[int, list[Rule]] | None = None,
    ) -> None:
        self._filters = filters
        self._rules = rules
        self._hostname = hostname
        self._db = db
        self._directory = directory
        self._delivery = delivery
        self._mailauth = mailauth
        self._signer = signer

    async def check_sender(self, session: Session, sender: str, size: int | None) -> object:
        if session.listener is Listener.MX:
            if self._mailauth is None:
                return None
            # RFC 7208 §2.4: SPF is checked at MAIL FROM; its verdict waits for DMARC.
            return await self._mailauth.run(
                self._mailauth.authenticator.check_spf, session.client_ip, session.helo, sender
            )
        if session.user is None:
            raise Refusal(530, "5.7.0", "Authentication required")
        if not sender:
            raise Refusal(553, "5.7.1", "Sender <> is not allowed for submission")
        address = _parse(sender, 553, "5.1.7", "Bad sender address syntax")
        try:
            user = await self._directory.find_user(parse_address(session.user))
            allowed = user is not None and await self._directory.may_send_as(user.id, address)
        except DatabaseUnavailable:
            raise temporary_failure() from None
        if not allowed:
            raise Refusal(
                553, "5.7.1", f"Sender address <{address}> is not owned by {session.user}"
            )
        return None

    async def check_recipient(
        self, session: Session, recipient: str, size: int | None, sender: str = ""
    ) -> Accepted:
        address = _parse(recipient, 501, "5.1.3", "Bad recipient address syntax")
        try:
            resolution = await self._directory.resolve_recipient(address)
        except NotHosted:
            if session.user is None:
                raise Refusal(554, "5.7.1", f"<{address}>: Relay access denied") from None
            await self._check_suppressed(sender, str(address))
            return Accepted(str(address), Resolution((), (str(address),)))
        except UnknownRecipient:
            raise Refusal(
                550, "5.1.1", f"<{address}>: Recipient address rejected: no such user here"
            ) from None
        except DatabaseUnavailable:
            raise temporary_failure() from None
        await self._check_quota(resolution, size or 0)
        return Accepted(str(address), resolution)

    async def _check_suppressed(self, sender: str, address: str) -> None:
        """Refuse an address that bounced hard for the sender's domain (until an operator
        takes it off the list): sending again would only bounce again."""
        domain = sender.rpartition("@")[2]
        if not domain:
            return
        try:
            reason = await self._db.run("is_suppressed", is_suppressed_txn, domain, address)
        except DatabaseUnavailable:
            raise temporary_failure() from None
        if reason is not None:
            reason = "".join(c if " " <= c <= "~" else "?" for c in reason[:200])
            raise Refusal(
                550, "5.7.1",
                f"<{address}>: Recipient is on the suppression list of {domain.lower()} "
                f"after a permanent failure ({reason})",
            )

    async def _check_quota(self, resolution: Resolution, size: int) -> None:
        # The user rows just read carry the usage: no second round trip per recipient.
        for user in resolution.users:
            if size and user.quota_bytes is not None and size > user.quota_bytes:
                raise Refusal(552, "5.2.3", "Message is larger than the recipient's quota")
            over_bytes = user.quota_bytes is not None and user.used_bytes + size > user.quota_bytes
            over_count = (
                user.quota_messages is not None and user.used_messages + 1 > user.quota_messages
            )
            if over_bytes or over_count:
                raise Refusal(452, "4.2.2", "Mailbox full, try again later")

    async def receive(
        self,
        session: Session,
        envelope: Envelope,
        accepted: Sequence[Accepted],
        message: bytes,
    ) -> str:
        """Take the message for the accepted recipients; the ids for the 250 reply."""
        result = await self.deliver(session, envelope, accepted, message)
        ids = [f"{m.mailbox_id}.{m.uid}" for m in result.stored]
        ids += [f"q{q}" for q in result.queued]
        return " ".join(ids)

    async def deliver(
        self,
        session: Session,
        envelope: Envelope,
        accepted: Sequence[Accepted],
        message: bytes,
        event_payload: dict[str, object] | None = None,
    ) -> DeliveryResult:
        """Store the message for local recipients and queue it for remote ones (signed, when
        submitted); raises Refusal."""
        users: dict[int, tuple[User, str]] = {}
        remote: dict[str, None] = {}
        for item in accepted:
            route = item.resolution
            assert isinstance(route, Resolution)  # what check_recipient handed out
            for user in route.users:
                users.setdefault(user.id, (user, item.address))
            for address in route.external:
                remote[address] = None
        quarantine = False
        if session.listener is Listener.MX and self._mailauth is not None:
            message, quarantine = await self._authenticate(envelope, message)
        if session.user is not None:
            message = complete_submission(message, self._hostname)
        # Hosted domains the mail is for: of the users it reaches and of the addresses it
        # was sent to (an alias of one domain may lead to a user of another).
        domains = {u.address.rpartition("@")[2] for u, _ in users.values()} | {
            item.address.rpartition("@")[2].lower() for item in accepted
            if isinstance(item.resolution, Resolution) and item.resolution.users}
        if self._filters and session.user is None:
            # Our filters' own header fields, forged by the sender, must not survive a
            # filter that passed the message without writing its own.
            message = remove_fields(message, FILTER_FIELDS)
        decision = await self._filter(session, envelope, message, sorted(domains))
        folder: str | None = JUNK if quarantine else None
        keywords: tuple[str, ...] = ()
        if decision is not None and decision.action == "quarantine":
            if session.user is not None:
                # Spam or a virus from one of our users goes to nobody.
                raise Refusal(554, "5.7.1", "Message refused by the content filter")
            if remote:
                self.log.info("not forwarding quarantined mail to {count} address(es)",
                              count=len(remote))
                remote.clear()
        if decision is not None and session.user is None:
            # Headers, keywords and folders are for mail that arrives; what a user submits
            # only gets the chain's refusals.
            message = filter_headers(decision.headers) + message
            folder = folder or decision.folder
            keywords = decision.keywords
        local, forwards = await self._apply_rules(
            [u for u, _ in users.values()], message, envelope, decision, folder, keywords)
        if forwards:
            message = b"".join(f"X-ESP-Forwarded-By: {a}\r\n".encode() for a in forwards
                               ) + message
            for _, target in forwards.items():
                for address in target:
                    remote[address] = None
        sender_user_id = None
        if session.user is not None:
            sender = await self._directory.find_user(parse_address(session.user))
            sender_user_id = sender.id if sender else None
            if remote and self._signer is not None:
                message = await self._sign(envelope, message)
        try:
            result = await self._delivery.deliver(
                message,
                envelope.sender,
                local,
                tuple(remote),
                sender_user_id=sender_user_id,
                event_payload={"client_ip": session.client_ip, "session": session.session_id,
                               **(event_payload or {})},
            )
        except MailboxFull:
            raise Refusal(552, "5.2.2", "Mailbox full") from None
        except DeliveryFailed:
            raise temporary_failure() from None
        for stored in result.stored:
            self._directory.count_stored(stored.user_id, stored.size)
        return result

    async def _sign(self, envelope: Envelope, message: bytes) -> bytes:
        """DKIM-sign what an authenticated user sends out, with the keys of the From domain
        when it is the domain of the envelope sender (checked to be theirs); else unsigned."""
        assert self._signer is not None
        domain = author_domain(message)
        if domain is None or domain != envelope.sender.rpartition("@")[2].lower():
            return message
        try:
            return await self._signer.sign(message, domain)
        except (DatabaseUnavailable, DKIMKeyError) as e:
            self.log.error("cannot DKIM-sign for {domain}: {error}", domain=domain, error=str(e))
            raise temporary_failure() from None

    async def _filter(
        self, session: Session, envelope: Envelope, message: bytes, domains: Sequence[str],
    ) -> Decision | None:
        """Run the filter chain; raise its refusal (before the 250: no bounce is made)."""
        if not self._filters:
            return None
        context = FilterContext(
            sender=envelope.sender, recipients=envelope.recipients, message=message,
            client_ip=session.client_ip, helo=session.helo, user=session.user,
            listener=session.listener.value, queue_id=session.session_id,
            recipient_domains=tuple(domains),
        )
        try:
            decision = await self._filters.run(context)
        except DatabaseUnavailable:
            raise temporary_failure() from None
        if decision.refused:
            assert decision.code is not None and decision.status is not None
            raise Refusal(decision.code, decision.status, decision.text)
        return decision

    async def _apply_rules(
        self, users: Sequence[User], message: bytes, envelope: Envelope,
        decision: Decision | None, folder: str | None, keywords: tuple[str, ...],
    ) -> tuple[list[LocalRecipient], dict[str, list[str]]]:
        """Each user's rules: where their copy goes (or none), and whom it is forwarded to
        (by the user's address; a user whose forward came back is not forwarded again)."""
        try:
            rules = await self._rules.get_many([u.id for u in users]) if self._rules else {}
        except DatabaseUnavailable:
            raise temporary_failure() from None
        facts: Facts | None = None
        local: list[LocalRecipient] = []
        forwards: dict[str, list[str]] = {}
        for user in users:
            mine = rules.get(user.id) or []
            if not mine:
                local.append(await self._recipient(user, folder, keywords))
                continue
            if facts is None:
                facts = _facts(message, envelope, decision, folder)
            outcome = apply_rules(mine, facts)
            if outcome.forward and f"X-ESP-Forwarded-By: {user.address}\r\n".encode() not in (
                    split_header(message)[0]):
                forwards[user.address] = outcome.forward
            if outcome.discard:
                continue
            local.append(await self._recipient(
                user, outcome.mailbox or folder,
                (*keywords, *(k for k in outcome.keywords if k not in keywords)),
                tuple(outcome.flags)))
        return local, forwards

    async def _recipient(self, user: User, folder: str | None, keywords: tuple[str, ...],
                         flags: tuple[str, ...] = ()) -> LocalRecipient:
        """Where the message goes for ``user``: INBOX, or ``folder`` (a mailbox name, or
        \\Junk for the user's junk mailbox (RFC 6154), whatever it is called now); INBOX
        when the user has no such mailbox."""
        plain = LocalRecipient(user_id=user.id, address=user.address, maildir=user.maildir,
                               keywords=keywords, flags=flags)
        if folder is None:
            return plain
        try:
            if folder == JUNK:
                box = await self._db.run("find_junk", find_special_use_txn, user.id, JUNK)
            else:
                box = await self._db.run("find_folder", find_mailbox_txn, user.id, folder)
        except DatabaseUnavailable:
            raise temporary_failure() from None
        if box is None:
            return plain
        return LocalRecipient(user_id=user.id, address=user.address, maildir=user.maildir,
                              folder=box.folder, mailbox=box.name, keywords=keywords,
                              flags=flags)

    async def _authenticate(self, envelope: Envelope, message: bytes) -> tuple[bytes, bool]:
        """Check DKIM and DMARC, apply the policy, add Authentication-Results; (message,
        whether to quarantine)."""
        assert self._mailauth is not None
        auth = self._mailauth.authenticator
        spf_result = envelope.sender_note
        if not isinstance(spf_result, SPFResult):
            spf_result = SPFResult("none", "", envelope.sender)
        message = remove_forged_results(message, auth.authserv_id)
        verdict: Verdict = await self._mailauth.run(auth.verify, message, spf_result)
        dmarc = verdict.dmarc
        if self._mailauth.enforce_dmarc and dmarc.disposition == "reject":
            raise Refusal(
                550, "5.7.1", f"Message rejected by the DMARC policy of {dmarc.from_domain}"
            )
        if (
            self._mailauth.reject_spf_fail
            and spf_result.result == "fail"
            and dmarc.result == "none"
        ):
            raise Refusal(550, "5.7.23", f"SPF validation failed for {spf_result.domain}")
        quarantine = self._mailauth.enforce_dmarc and dmarc.disposition == "quarantine"
        return verdict.header + message, quarantine


def _facts(message: bytes, envelope: Envelope, decision: Decision | None,
           folder: str | None) -> Facts:
    header = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        split_header(message)[0])
    category = None
    for verdict in decision.verdicts if decision is not None else ():
        if isinstance(verdict.details.get("category"), str):
            category = verdict.details["category"]
    return Facts(header, envelope.sender, len(message), category, folder == JUNK)


def _parse(text: str, code: int, status: str, message: str) -> Address:
    try:
        return parse_address(text)
    except InvalidAddress as e:
        raise Refusal(code, status, f"{message}: {e}") from None
