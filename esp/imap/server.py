"""The IMAP4rev1 server protocol (RFC 3501), one class for 143 (STARTTLS) and 993 (implicit TLS).

It subclasses Twisted's :class:`twisted.mail.imap4.IMAP4Server` for its states, greeting,
timeout and TLS plumbing, and replaces the input side and the mailbox model, where the base
class falls short (see the module docstring of :mod:`esp.imap.wire` and ``docs/imap.md``):
commands are assembled whole within limits, run one at a time in order, and a selected mailbox
is a :class:`Selected` session view holding the sequence-number ↔ UID map and the MODSEQ the
client has seen, so untagged EXISTS / EXPUNGE / FETCH responses are sent only where RFC 3501
§7 allows them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from esp import __version__
from esp.addresses import InvalidAddress, parse_address
from esp.auth import AuthenticationBusy
from esp.delivery import DeliveryFailed, LocalDelivery, LocalRecipient, MailboxFull
from esp.events import (
    USER_LOGIN,
    Announcement,
    Event,
    EventBus,
    created_mailboxes,
    deleted_messages,
)
from esp.imap.fetch import FetchError, FetchItem, parse_fetch, render_fetch
from esp.imap.idle import Changes, IdleWaker
from esp.imap.search import MONTHS, BadCharset, SearchError, parse_search, uses_modseq
from esp.imap.wire import Assembler, Atom, CommandError, Limits, Pending, astring, tokenize
from esp.limits import ConnectionLimits, SessionCounter
from esp.storage.db import DatabaseUnavailable
from esp.storage.directory import User
from esp.storage.mailboxes import (
    DELIMITER,
    InvalidMailboxName,
    MailboxError,
    MailboxExists,
    MailboxInfo,
    MailboxStore,
    MessageRow,
    NoMailbox,
    Snapshot,
    check_mailbox_name,
)
from esp.storage.mailstore import QuotaExceeded
from esp.storage.notify import MailboxNotifier


@dataclass(frozen=True)
class IMAPSettings:
    hostname: str
    implicit_tls: bool
    allow_plaintext_auth: bool
    idle_timeout: int = 1800
    # RFC 2177 clients stay in IDLE for up to 29 minutes; NAT boxes forget quiet connections
    # much sooner, so an untagged OK goes out this often during IDLE.
    idle_keepalive: int = 120
    max_message_size: int = 25 * 1024 * 1024
    max_errors: int = 20


class No(Exception):
    """A tagged NO answer (with an optional response code in the text)."""


class Bad(Exception):
    """A tagged BAD answer: the arguments do not make sense."""


@dataclass
class Selected:
    """The client's view of its selected mailbox."""

    info: MailboxInfo
    readonly: bool
    uids: list[int]
    modseq: int
    flags: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def _ranges(self, spec: str, uid: bool) -> list[tuple[int, int]]:
        """The (low, high) pairs of a sequence set (RFC 3501 §9), UIDs or sequence numbers."""
        if not self.uids and not uid and spec in ("*", "1:*", "*:1"):
            return []
        largest = (self.uids[-1] if self.uids else 0) if uid else len(self.uids)
        ranges = []
        for part in spec.split(","):
            low, sep, high = part.partition(":")
            a = _number(low, largest)
            b = _number(high, largest) if sep else a
            if a > b:
                a, b = b, a
            if not uid and (a < 1 or b > len(self.uids)):
                raise Bad("invalid message sequence number")
            ranges.append((a, b))
        return ranges

    def ranges_of(self, spec: str, uid: bool) -> list[tuple[int, int]]:
        """A sequence set as UID ranges (for SEARCH), without listing every UID."""
        ranges = self._ranges(spec, uid)
        return ranges if uid else [(self.uids[a - 1], self.uids[b - 1]) for a, b in ranges]

    def uids_of(self, spec: str, uid: bool) -> list[int]:
        """The UIDs a sequence set names, in ascending order."""
        chosen: set[int] = set()
        for a, b in self._ranges(spec, uid):
            if uid:
                chosen.update(self.uids[bisect.bisect_left(self.uids, a):
                                        bisect.bisect_right(self.uids, b)])
            else:
                chosen.update(self.uids[a - 1:b])
        return sorted(chosen)


_NUMBER = re.compile(r"^[1-9][0-9]{0,9}$")
_SYSTEM_FLAGS = frozenset({"\\seen", "\\answered", "\\flagged", "\\deleted", "\\draft"})


def _number(text: str, largest: int) -> int:
    if text == "*":
        return largest
    if not _NUMBER.match(text) or int(text) > 0xFFFFFFFF:
        raise Bad(f"invalid sequence set element {text!r}")
    return int(text)


Handler = Callable[["IMAPServer", bytes, list[Any], bool], Awaitable[None] | None]
_COMMANDS: dict[bytes, tuple[frozenset[str], Handler]] = {}
_UID_COMMANDS = frozenset({b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE",
                           b"SORT"})
ANY = frozenset({"unauth", "auth", "select"})
AUTHED = frozenset({"auth", "select"})
SELECTED = frozenset({"select"})


def command(name: str, states: frozenset[str]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name.encode()] = (states, fn)
        return fn
    return register


class IMAPServer(imap4.IMAP4Server):
    log = Logger()
    transport: Any

    def __init__(
        self,
        settings: IMAPSettings,
        store: MailboxStore,
        delivery: LocalDelivery,
        notifier: MailboxNotifier,
        checker: Any,
        directory: Any,
        context_factory: Any,
        events: EventBus,
        clock: Any,
        limits: ConnectionLimits | None = None,
        sessions: SessionCounter | None = None,
        waker: IdleWaker | None = None,
    ) -> None:
        imap4.IMAP4Server.__init__(self, contextFactory=context_factory)
        self._limits = limits or ConnectionLimits(clock.seconds, 0, 0, 0)
        self._sessions = sessions or SessionCounter(0)
        self._admitted = False
        self._session_key: str | None = None
        self._delivery = delivery
        self._notifier = notifier
        self._waker = waker or IdleWaker(store, notifier, clock)
        self._idle_box: int | None = None  # the mailbox the waker watches for us
        self._changed = False  # a change arrived while a command was running
        self._condstore = False  # RFC 7162: the client has used or enabled CONDSTORE
        # Whether the selected mailbox may have changed since we last looked: set by SELECT
        # and by every notification, so a command costs no query when nothing happened.
        self._dirty = False
        self._keepalive: Any = None
        self.settings = settings
        self.timeOut = settings.idle_timeout
        self._store = store
        self._checker = checker
        self._directory = directory
        self._events = events
        self._clock = clock
        self._assembler = Assembler(Limits(append=settings.max_message_size))
        self._tls = settings.implicit_tls
        self._user: User | None = None
        self._selected: Selected | None = None
        self._busy = False
        self._mode = "command"  # or "idle", "authenticate"
        self._idle_tag = b""
        self._auth_tag = b""
        self._errors = 0
        self._peer_ip = ""

    # -- connection -------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.timeOut)
        self.canStartTLS = (
            self.ctx is not None and ITLSTransport(self.transport, None) is not None
        )
        peer = self.transport.getPeer()
        self._peer_ip = getattr(peer, "host", "")
        refusal = self._limits.admit(self._peer_ip)
        if refusal is not None:
            self.state = "logout"
            self._send(b"* BYE [UNAVAILABLE] " + refusal.encode())
            self.transport.loseConnection()
            return
        self._admitted = True
        self._send(b"* OK [CAPABILITY " + b" ".join(self._capabilities()) + b"] "
                   + self.settings.hostname.encode() + b" ESP IMAP4rev1 ready")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._admitted:
            self._limits.release(self._peer_ip)
            self._admitted = False
        if self._session_key is not None:
            self._sessions.release(self._session_key)
            self._session_key = None
        self.setTimeout(None)
        self._select(None)
        self._stop_keepalive()
        self.state = "logout"

    # -- the selected mailbox and its notifications -------------------------------------------

    def _select(self, selected: Selected | None) -> None:
        self._leave_idle()
        if self._selected is not None:
            self._notifier.unsubscribe(self._selected.info.id, self._mailbox_changed)
        self._selected = selected
        self.state = "select" if selected is not None else (
            "auth" if self._user is not None else "unauth")
        if selected is not None:
            self._notifier.subscribe(selected.info.id, self._mailbox_changed)
            # What changed between the snapshot and the subscription is looked for once.
            self._dirty = True

    def _mailbox_changed(self, mailbox_id: int | None) -> None:
        """Someone (any session, any node) changed our mailbox: the next command's response
        carries the news.  (In IDLE the waker tells us instead: ``_enter_idle``.)"""
        self._dirty = True

    def _enter_idle(self) -> None:
        if self._selected is not None and self._idle_box is None:
            self._idle_box = self._selected.info.id
            self._notifier.unsubscribe(self._idle_box, self._mailbox_changed)
            self._waker.start(self._idle_box, self)

    def _leave_idle(self) -> None:
        if self._idle_box is not None:
            self._waker.stop(self._idle_box, self)
            self._notifier.subscribe(self._idle_box, self._mailbox_changed)
            self._idle_box = None
            self._dirty = True  # a wake-up may have been on its way

    # -- esp.imap.idle.Sleeper: woken together with the other sessions of the mailbox ---------

    def idle_modseq(self, mailbox_id: int) -> int | None:
        selected = self._selected
        if (self._mode != "idle" or self.transport is None or selected is None
                or selected.info.id != mailbox_id):
            return None
        self._dirty = True
        if self._busy:
            self._changed = True  # told once the work in hand is done
            return None
        self._busy = True  # until woken: input waits, later notifications are remembered
        self._dirty = False
        return selected.modseq

    def woken(self, changes: Changes | None) -> None:
        self._busy = False
        if self.transport is None:
            return
        selected = self._selected
        if changes is None:
            self._dirty = True
            self._run(self._sync(expunges=True))
            return
        if selected is not None:
            self._apply_changes(selected, changes, expunges=True, push=True)
        if self._changed and self._mode == "idle":
            self._changed = False
            self._run(self._sync(expunges=True))
            return
        self._pump()

    def _still_here(self) -> None:
        self._keepalive = None
        if self._mode == "idle" and self.transport is not None:
            self._send(b"* OK Still here")
            self._keepalive = self._clock.callLater(self.settings.idle_keepalive,
                                                    self._still_here)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None

    def timeoutConnection(self) -> None:
        self._send(b"* BYE Autologout; idle for too long")
        self.transport.loseConnection()

    @property
    def _is_loopback(self) -> bool:
        return self._peer_ip.startswith("127.") or self._peer_ip == "::1"

    def _login_allowed(self) -> bool:
        return self._tls or (self.settings.allow_plaintext_auth and self._is_loopback)

    def _capabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"IDLE", b"NAMESPACE",
                b"UNSELECT", b"CHILDREN", b"SPECIAL-USE", b"UIDPLUS", b"MOVE", b"QUOTA",
                b"QUOTA=RES-STORAGE", b"QUOTA=RES-MESSAGE", b"ENABLE", b"CONDSTORE", b"SORT"]
        if self.state == "unauth":
            if not self._tls and self.canStartTLS:
                caps.append(b"STARTTLS")
            caps.append(b"AUTH=PLAIN" if self._login_allowed() else b"LOGINDISABLED")
        return caps

    # -- input ------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._assembler.feed(data)
        self._pump()

    def _pump(self) -> None:
        while not self._busy and self.transport is not None and self.state != "logout":
            try:
                if self._mode == "idle":
                    line = self._assembler.next_line()
                    if line is None:
                        return
                    self._idle_line(line)
                    continue
                if self._mode == "authenticate":
                    line = self._assembler.next_line()
                    if line is None:
                        return
                    self._run(self._auth_continue(line))
                    continue
                ready = self._assembler.next_command()
            except CommandError as e:
                self._bad(e.tag, str(e))
                continue
            if ready is None:
                return
            pending, continuation = ready
            if continuation:
                user = self._user
                if (pending.name == b"APPEND" and user is not None
                        and user.quota_bytes is not None
                        and self._assembler.literal_size > user.quota_bytes):
                    # Larger than the whole quota: refused before a byte of it is sent.
                    self._assembler.refuse_literal()
                    self._send(pending.tag + b" NO [OVERQUOTA] Message larger than the quota")
                    continue
                self._send(b"+ Ready for literal data")
                continue
            self._dispatch(pending)

    def _bad(self, tag: bytes | None, text: str) -> None:
        self._errors += 1
        self._send((tag or b"*") + b" BAD " + text.encode())
        if self._errors >= self.settings.max_errors:
            self._send(b"* BYE Too many errors")
            self.state = "logout"
            self.transport.loseConnection()

    def _dispatch(self, pending: Pending) -> None:
        tag = pending.tag
        try:
            args = tokenize(pending)
        except CommandError as e:
            self._bad(tag, str(e))
            return
        name = pending.name
        uid = False
        if name == b"UID":
            if not args or not isinstance(args[0], Atom) or \
                    args[0].upper().encode() not in _UID_COMMANDS:
                self._bad(tag, "UID needs FETCH, STORE, SEARCH, COPY, MOVE or EXPUNGE")
                return
            name, args, uid = args[0].upper().encode(), args[1:], True
        entry = _COMMANDS.get(name)
        if entry is None:
            self._bad(tag, f"unknown command {name.decode('ascii', 'replace')}")
            return
        states, handler = entry
        if self.state not in states:
            self._bad(tag, f"{name.decode()} is not allowed now")
            return
        self._run(self._guarded(tag, handler, args, uid))

    async def _guarded(self, tag: bytes, handler: Handler, args: list[Any], uid: bool) -> None:
        try:
            result = handler(self, tag, args, uid)
            if result is not None:
                await result
        except (Bad, FetchError, SearchError) as e:
            self._bad(tag, str(e))
        except No as e:
            self._send(tag + b" NO " + str(e).encode())
        except DatabaseUnavailable:
            self._send(tag + b" NO [UNAVAILABLE] Temporary failure, try again later")
        except (IndexError, TypeError, ValueError, AttributeError) as e:
            # Arguments of the wrong shape that no check caught: BAD, and a trace for us.
            self.log.warn("invalid arguments: {error!r}", error=e)
            self._bad(tag, "invalid arguments")

    def _run(self, work: Awaitable[None]) -> None:
        self._busy = True
        d: Deferred[None] = Deferred.fromCoroutine(work)  # type: ignore[arg-type]

        def done(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                self.log.failure("IMAP command failed", result)
                self._send(b"* BYE Internal error")
                self.transport.loseConnection()
                return
            if self._changed and self._mode == "idle" and self.transport is not None:
                self._changed = False
                self._run(self._sync(expunges=True))
                return
            if self.transport is not None:
                self._pump()

        d.addBoth(done)

    def _send(self, line: bytes) -> None:
        self._write(line + b"\r\n")

    def _ok(self, tag: bytes, text: str) -> None:
        self._send(tag + b" OK " + text.encode())

    # -- IDLE and AUTHENTICATE lines ---------------------------------------------------------------

    def _idle_line(self, line: bytes) -> None:
        self._mode = "command"
        self._leave_idle()
        self._stop_keepalive()
        if line.upper() != b"DONE":
            self._bad(self._idle_tag, "expected DONE")
            return
        self._run(self._end_idle())

    async def _end_idle(self) -> None:
        await self._sync(expunges=True)
        self._ok(self._idle_tag, "IDLE terminated")

    async def _auth_continue(self, line: bytes) -> None:
        self._mode = "command"
        if line == b"*":
            self._bad(self._auth_tag, "AUTHENTICATE cancelled")
            return
        await self._auth_plain(self._auth_tag, line)

    async def _auth_plain(self, tag: bytes, encoded: bytes) -> None:
        try:
            decoded = base64.b64decode(encoded, validate=True) if encoded != b"=" else b""
        except (binascii.Error, ValueError):
            self._bad(tag, "invalid base64")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            self._bad(tag, "invalid PLAIN response")
            return
        await self._login(tag, parts[1], parts[2])

    async def _login(self, tag: bytes, username: bytes, password: bytes) -> None:
        try:
            avatar = await self._checker.requestAvatarId(UsernamePassword(username, password))
        except UnauthorizedLogin:
            account = username.decode("utf-8", "replace").lower()
            failures = max(self._limits.auth_failures.add(self._peer_ip),
                           self._limits.auth_failures.add("user:" + account))
            # Slower with every recent failure from this address or for this account.
            pause: Deferred[None] = Deferred()
            self._clock.callLater(min(2 ** (failures - 1), 16), pause.callback, None)
            await pause
            self._announce_login(account, False)
            limit = self._limits.auth_failures_per_ip
            if limit and self._limits.auth_failures.count(self._peer_ip) >= limit:
                self._send(b"* BYE Too many failed logins")
                self._send(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials")
                self.state = "logout"
                self.transport.loseConnection()
                return
            self._send(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials")
            return
        except AuthenticationBusy:
            self._send(tag + b" NO [UNAVAILABLE] Temporary failure, try again later")
            return
        address = avatar.decode("utf-8")
        try:
            user = await self._directory.find_user(parse_address(address))
        except InvalidAddress:
            user = None
        if user is None:
            self._send(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials")
            return
        if not self._sessions.acquire(user.address):
            self._send(tag + b" NO [LIMIT] Too many sessions for this account")
            return
        self._session_key = user.address
        self._user = user
        self.state = "auth"
        self._send(tag + b" OK [CAPABILITY " + b" ".join(self._capabilities())
                   + b"] Logged in")
        self._announce_login(user.address, True)

    async def _deletions(self, mailbox: MailboxInfo, how: str) -> Announcement[list[int]]:
        """The message.deleted events of an expunge, written with it (see Announcement)."""
        assert self._user is not None
        make = deleted_messages(self._user.address, mailbox.name, mailbox.uidvalidity, how,
                                "imap", self._user.address)
        return Announcement(make, await self._events.leaving())

    def _announce_login(self, user: str, success: bool) -> None:
        self._events.publish(Event(
            USER_LOGIN,
            {"user": user, "protocol": "imap", "client_ip": self._peer_ip, "success": success},
            domain=user.rpartition("@")[2] or None,
            actor=user if success else None,
        ))

    # -- untagged updates -------------------------------------------------------------------------

    async def _sync(self, expunges: bool) -> None:
        """Tell the client what changed in its mailbox since it last heard (RFC 3501 §7)."""
        selected = self._selected
        if selected is None or not self._dirty:
            return
        self._dirty = False  # a notification during the query sets it again
        changes = await self._store.changes(selected.info.id, selected.modseq)
        if selected is self._selected:
            self._apply_changes(selected, changes, expunges)

    def _apply_changes(
        self, selected: Selected, changes: Changes, expunges: bool, push: bool = False
    ) -> None:
        highest, changed, gone = changes
        if gone and not expunges:
            self._dirty = True  # still to tell
            return  # held back until a command that allows EXPUNGE responses
        out: list[bytes] = []
        for uid in gone:
            seq = selected.seq_of(uid)
            if seq is not None:
                del selected.uids[seq - 1]
                selected.flags.pop(uid, None)
                out.append(b"* %d EXPUNGE\r\n" % seq)
        new = [row for row in changed if row.uid > (selected.uids[-1] if selected.uids else 0)]
        if new:
            selected.uids.extend(row.uid for row in new)
            out.append(b"* %d EXISTS\r\n" % len(selected.uids))
        for row in changed:
            if row in new:
                continue
            seq = selected.seq_of(row.uid)
            if seq is not None and selected.flags.get(row.uid) != row.flags:
                selected.flags[row.uid] = row.flags
                modseq = b" MODSEQ (%d)" % row.modseq if self._condstore else b""
                out.append(b"* %d FETCH (FLAGS (%s) UID %d%s)\r\n"
                           % (seq, " ".join(row.flags).encode(), row.uid, modseq))
        selected.modseq = highest
        if out:
            (self._push if push else self._write)(b"".join(out))

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _push(self, data: bytes) -> None:
        """Send news (IDLE, untagged updates) now: the listeners' connections send their first
        write of a reactor turn at once (esp.prompt), so the news of the first of thousands of
        IDLE sessions woken together reaches its client while the last is being prepared."""
        self._write(data)


# -- names ----------------------------------------------------------------------------------------


def decode_name(value: object) -> str:
    """A mailbox name from the client (modified UTF-7, RFC 3501 §5.1.3), checked."""
    if not isinstance(value, bytes | str):
        raise Bad("mailbox name expected")
    raw = value.encode() if isinstance(value, str) else value
    try:
        name = raw.decode("imap4-utf-7")
        canonical = name.encode("imap4-utf-7") == raw
    except (UnicodeError, ValueError):
        canonical = False
    if not canonical or any(c >= 0x80 or c < 0x20 for c in raw):
        # Only the one encoding RFC 3501 §5.1.3 allows: it must come back unchanged.
        raise Bad("invalid mailbox name (modified UTF-7)")
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX/"):
        name = "INBOX" + name[5:]
    return name


def check_name(name: str) -> str:
    try:
        return check_mailbox_name(name)
    except InvalidMailboxName:
        raise No("[CANNOT] Invalid mailbox name") from None


def encode_name(name: str) -> bytes:
    return astring(name.encode("imap4-utf-7"))


def _pattern(reference: str, pattern: str) -> re.Pattern[str]:
    full = reference + pattern if reference and not pattern.startswith(DELIMITER) else pattern
    regex = "".join(
        ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in full
    )
    if full.upper().startswith("INBOX"):
        return re.compile("(?i:INBOX)" + regex[5:] + "$")
    return re.compile(regex + "$")


# -- commands: any state --------------------------------------------------------------------------


@command("CAPABILITY", ANY)
def _capability(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    self._send(b"* CAPABILITY " + b" ".join(self._capabilities()))
    self._ok(tag, "CAPABILITY completed")


@command("NOOP", ANY)
async def _noop(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await self._sync(expunges=True)
    self._ok(tag, "NOOP completed")


@command("LOGOUT", ANY)
def _logout(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    self._send(b"* BYE Logging out")
    self._ok(tag, "LOGOUT completed")
    self.state = "logout"
    self.transport.loseConnection()


@command("ID", ANY)
def _id(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    self._send(b'* ID ("name" "ESP" "version" "' + __version__.encode() + b'")')
    self._ok(tag, "ID completed")


@command("STARTTLS", frozenset({"unauth"}))
def _starttls(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if self._tls or not self.canStartTLS:
        raise Bad("TLS is already active" if self._tls else "STARTTLS is not available")
    self._ok(tag, "Begin TLS negotiation now")
    # RFC 3501 §6.2.1: nothing the client pipelined behind STARTTLS is kept.
    self._assembler = Assembler(self._assembler.limits)
    self.transport.startTLS(self.ctx)
    self._tls = True


@command("LOGIN", frozenset({"unauth"}))
async def _login(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 2 or isinstance(args[0], list) or isinstance(args[1], list):
        raise Bad("LOGIN needs a user name and a password")
    if not self._login_allowed():
        raise No("[PRIVACYREQUIRED] Use STARTTLS first")
    user, password = (a.encode() if isinstance(a, str) else a for a in args)
    await self._login(tag, user, password)


@command("AUTHENTICATE", frozenset({"unauth"}))
async def _authenticate(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if not args or not isinstance(args[0], Atom) or len(args) > 2:
        raise Bad("AUTHENTICATE needs a mechanism")
    if args[0].upper() != "PLAIN":
        raise No("Unsupported authentication mechanism")
    if not self._login_allowed():
        raise No("[PRIVACYREQUIRED] Use STARTTLS first")
    if len(args) == 2:
        initial = args[1].encode() if isinstance(args[1], str) else args[1]
        await self._auth_plain(tag, initial)
        return
    self._auth_tag = tag
    self._mode = "authenticate"
    self._send(b"+ ")


# -- commands: authenticated ----------------------------------------------------------------------


@command("NAMESPACE", AUTHED)
def _namespace(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    self._send(b'* NAMESPACE (("" "/")) NIL NIL')
    self._ok(tag, "NAMESPACE completed")


async def _select(self: IMAPServer, tag: bytes, args: list[Any], readonly: bool) -> None:
    if len(args) == 2 and isinstance(args[1], list):
        if [str(a).upper() for a in args[1]] != ["CONDSTORE"]:
            raise Bad("unknown SELECT parameter")
        self._condstore = True
        args = args[:1]
    if len(args) != 1:
        raise Bad("SELECT needs a mailbox name")
    name = decode_name(args[0])
    assert self._user is not None
    self._select(None)
    snapshot: Snapshot | None = await self._store.select(self._user.id, name)
    if snapshot is None:
        raise No("[NONEXISTENT] No such mailbox")
    info = snapshot.mailbox
    selected = Selected(info, readonly, list(snapshot.uids), info.highestmodseq)
    flags = " ".join(("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft",
                      *snapshot.keywords))
    self._send(f"* FLAGS ({flags})".encode())
    permanent = "" if readonly else f"{flags} \\*"
    self._send(f"* OK [PERMANENTFLAGS ({permanent})] Flags permitted".encode())
    self._send(b"* %d EXISTS" % len(selected.uids))
    self._send(b"* 0 RECENT")
    if snapshot.first_unseen_uid is not None:
        seq = selected.seq_of(snapshot.first_unseen_uid)
        if seq is not None:
            self._send(b"* OK [UNSEEN %d] First unseen" % seq)
    self._send(b"* OK [UIDVALIDITY %d] UIDs valid" % info.uidvalidity)
    self._send(b"* OK [UIDNEXT %d] Predicted next UID" % info.uidnext)
    self._send(b"* OK [HIGHESTMODSEQ %d] Highest" % info.highestmodseq)
    self._select(selected)
    self._ok(tag, f"[READ-{'ONLY' if readonly else 'WRITE'}] "
                  f"{'EXAMINE' if readonly else 'SELECT'} completed")


@command("SELECT", AUTHED)
async def _select_cmd(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _select(self, tag, args, readonly=False)


@command("EXAMINE", AUTHED)
async def _examine(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _select(self, tag, args, readonly=True)


async def _list(self: IMAPServer, tag: bytes, args: list[Any], subscribed: bool) -> None:
    if len(args) != 2:
        raise Bad("LIST needs a reference and a pattern")
    reference, pattern = decode_name(args[0]) if args[0] else "", decode_name(args[1])
    verb = b"LSUB" if subscribed else b"LIST"
    if pattern == "":
        self._send(b'* ' + verb + b' (\\Noselect) "/" ""')
        self._ok(tag, f"{verb.decode()} completed")
        return
    assert self._user is not None
    matcher = _pattern(reference, pattern)
    for box in await self._store.mailboxes(self._user.id):
        if not matcher.match(box.name) or (subscribed and not box.subscribed):
            continue
        attributes = ["\\HasChildren" if box.has_children else "\\HasNoChildren"]
        if box.special_use:
            attributes.append(box.special_use)
        self._send(b"* " + verb + b" (" + " ".join(attributes).encode() + b') "/" '
                   + encode_name(box.name))
    self._ok(tag, f"{verb.decode()} completed")


@command("LIST", AUTHED)
async def _list_cmd(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _list(self, tag, args, subscribed=False)


@command("LSUB", AUTHED)
async def _lsub(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _list(self, tag, args, subscribed=True)


@command("STATUS", AUTHED)
async def _status(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
        raise Bad("STATUS needs a mailbox and a list of items")
    name = decode_name(args[0])
    assert self._user is not None
    info = await self._store.info(self._user.id, name)
    if info is None:
        raise No("[NONEXISTENT] No such mailbox")
    values = {"MESSAGES": info.messages, "RECENT": 0, "UIDNEXT": info.uidnext,
              "UIDVALIDITY": info.uidvalidity, "UNSEEN": info.unseen, "SIZE": info.size}
    out = []
    for item in args[1]:
        key = str(item).upper()
        if key not in values:
            raise Bad(f"unknown STATUS item {key}")
        out.append(f"{key} {values[key]}")
    self._send(b"* STATUS " + encode_name(info.name) + b" (" + " ".join(out).encode() + b")")
    self._ok(tag, "STATUS completed")


@command("IDLE", AUTHED)
async def _idle(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if args:
        raise Bad("IDLE takes no arguments")
    self._idle_tag = tag
    self._mode = "idle"
    self._enter_idle()
    self._send(b"+ idling")
    self._keepalive = self._clock.callLater(self.settings.idle_keepalive, self._still_here)
    await self._sync(expunges=True)


# -- commands: selected ---------------------------------------------------------------------------


@command("CHECK", SELECTED)
async def _check(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await self._sync(expunges=True)
    self._ok(tag, "CHECK completed")


@command("CLOSE", SELECTED)
async def _close(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    selected = self._selected
    assert selected is not None and self._user is not None
    self._select(None)
    if not selected.readonly:
        deletions = await self._deletions(selected.info, "close")
        await self._store.expunge(self._user.maildir, selected.info.id, self._user.id,
                                  announce=deletions.records)
        deletions.publish(self._events)
    self._ok(tag, "CLOSE completed")


@command("UNSELECT", SELECTED)
def _unselect(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    self._select(None)
    self._ok(tag, "UNSELECT completed")


@command("EXPUNGE", SELECTED)
async def _expunge(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    selected = self._selected
    assert selected is not None and self._user is not None
    if selected.readonly:
        raise No("[READ-ONLY] Mailbox is read-only")
    only = None
    if uid:
        if len(args) != 1 or not isinstance(args[0], str):
            raise Bad("UID EXPUNGE needs a UID set")
        only = selected.uids_of(args[0], uid=True)
    deletions = await self._deletions(selected.info, "expunge")
    await self._store.expunge(self._user.maildir, selected.info.id, self._user.id, only,
                              announce=deletions.records)
    deletions.publish(self._events)
    await self._sync(expunges=True)
    self._ok(tag, "EXPUNGE completed")


@command("FETCH", SELECTED)
async def _fetch(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    selected = self._selected
    assert selected is not None and self._user is not None
    changed_since = None
    if len(args) == 3 and isinstance(args[2], list):
        modifiers = [str(a).upper() if isinstance(a, str) else a for a in args[2]]
        if len(modifiers) != 2 or modifiers[0] != "CHANGEDSINCE" or \
                not str(modifiers[1]).isdigit():
            raise Bad("unknown FETCH modifier")
        changed_since = int(modifiers[1])
        args = args[:2]
    if len(args) != 2 or not isinstance(args[0], str):
        raise Bad("FETCH needs a sequence set and items")
    items = parse_fetch(args[1])
    if changed_since is not None and not any(i.name == "MODSEQ" for i in items):
        items.append(FetchItem("MODSEQ"))
    if any(i.name == "MODSEQ" for i in items):
        self._condstore = True
    if uid and not any(i.name == "UID" for i in items):
        items.insert(0, FetchItem("UID"))
    uids = selected.uids_of(args[0], uid)
    await self._sync(expunges=False)
    rows = await self._store.rows(selected.info.id, uids) if uids else []
    if changed_since is not None:
        rows = [r for r in rows if r.modseq > changed_since]
    needs_body = any(i.needs_body for i in items)
    sets_seen = not selected.readonly and any(i.sets_seen for i in items)
    if sets_seen:
        unseen = [r.uid for r in rows if "\\Seen" not in r.flags]
        if unseen:
            changed = {r.uid: r for r in
                       await self._store.store(selected.info.id, unseen, "+", ["\\Seen"])}
            rows = [changed.get(r.uid, r) for r in rows]
    # Bodies in batches: one trip to the disk pool per 50 messages, not one per message.
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50]
        bodies = (await self._store.read_many(self._user.maildir, selected.info.folder,
                                              [r.filename for r in chunk])
                  if needs_body else {})
        for row in chunk:
            seq = selected.seq_of(row.uid)
            if seq is None or (needs_body and row.filename not in bodies):
                continue  # gone meanwhile (expunged by another session)
            selected.flags[row.uid] = row.flags
            self.transport.write(b"* %d FETCH (" % seq
                                 + render_fetch(items, row, bodies.get(row.filename))
                                 + b")\r\n")
    self._ok(tag, f"{'UID ' if uid else ''}FETCH completed")


@command("STORE", SELECTED)
async def _store(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    selected = self._selected
    assert selected is not None
    unchanged_since = None
    if len(args) == 4 and isinstance(args[1], list):
        modifier = [str(a).upper() for a in args[1]]
        if len(modifier) != 2 or modifier[0] != "UNCHANGEDSINCE" or not modifier[1].isdigit():
            raise Bad("unknown STORE modifier")
        unchanged_since = int(modifier[1])
        self._condstore = True
        args = [args[0], *args[2:]]
    if len(args) != 3 or not isinstance(args[0], str) or not isinstance(args[1], str):
        raise Bad("STORE needs a sequence set, an item and flags")
    if selected.readonly:
        raise No("[READ-ONLY] Mailbox is read-only")
    item = args[1].upper()
    match = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
    if match is None:
        raise Bad(f"unknown STORE item {item}")
    mode = match.group(1) or "="
    silent = bool(match.group(2))
    flags = args[2] if isinstance(args[2], list) else [args[2]]
    for flag in flags:
        if not isinstance(flag, Atom) or (flag.startswith("\\") and flag.lower() not in
                                          _SYSTEM_FLAGS):
            raise Bad(f"invalid flag {flag!r}")
    uids = selected.uids_of(args[0], uid)
    await self._sync(expunges=False)
    modified: list[int] = []
    current: list[MessageRow] = []
    if uids:
        changed = await self._store.store(selected.info.id, uids, mode,
                                          [str(f) for f in flags], unchanged_since)
        if unchanged_since is not None or not silent:
            current = await self._store.rows(selected.info.id, uids)  # as committed
        if unchanged_since is not None:
            done = {r.uid for r in changed}
            # Refused: changed by someone after the client's MODSEQ (RFC 7162 §3.1.3).
            modified = [r.uid for r in current
                        if r.uid not in done and r.modseq > unchanged_since]
    if not silent:
        for row in current:
            seq = selected.seq_of(row.uid)
            if seq is None or row.uid in modified:
                continue
            selected.flags[row.uid] = row.flags
            extra = b" UID %d" % row.uid if uid else b""
            if self._condstore:
                extra += b" MODSEQ (%d)" % row.modseq
            self._send(b"* %d FETCH (FLAGS (%s)%s)" % (seq, " ".join(row.flags).encode(),
                                                      extra))
    code = ""
    if modified:
        numbers = modified if uid else [selected.seq_of(u) or 0 for u in modified]
        code = f"[MODIFIED {_uid_set(sorted(numbers))}] "
    self._ok(tag, f"{code}{'UID ' if uid else ''}STORE completed")


# -- commands: managing mailboxes -----------------------------------------------------------------


@command("CREATE", AUTHED)
async def _create(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 1:
        raise Bad("CREATE needs a mailbox name")
    name = check_name(decode_name(args[0]).rstrip(DELIMITER))
    if name.upper() == "INBOX":
        raise No("[ALREADYEXISTS] INBOX always exists")
    assert self._user is not None
    make = created_mailboxes(self._user.address, "imap", self._user.address)
    creations = Announcement(make, await self._events.leaving())
    try:
        await self._store.create(self._user.id, name, announce=creations.records)
    except MailboxExists:
        raise No("[ALREADYEXISTS] Mailbox already exists") from None
    creations.publish(self._events)
    self._ok(tag, "CREATE completed")


@command("DELETE", AUTHED)
async def _delete(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 1:
        raise Bad("DELETE needs a mailbox name")
    name = decode_name(args[0])
    assert self._user is not None
    if self._selected is not None and self._selected.info.name == name:
        self._select(None)
    try:
        await self._store.delete(self._user.maildir, self._user.id, name)
    except NoMailbox:
        raise No("[NONEXISTENT] No such mailbox") from None
    except MailboxError as e:
        raise No(f"[CANNOT] {e}") from None
    self._ok(tag, "DELETE completed")


@command("RENAME", AUTHED)
async def _rename(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 2:
        raise Bad("RENAME needs two mailbox names")
    old = decode_name(args[0])
    new = check_name(decode_name(args[1]).rstrip(DELIMITER))
    assert self._user is not None
    try:
        await self._store.rename(self._user.maildir, self._user.id, old, new)
    except NoMailbox:
        raise No("[NONEXISTENT] No such mailbox") from None
    except MailboxExists:
        raise No("[ALREADYEXISTS] Mailbox already exists") from None
    except MailboxError as e:
        raise No(f"[CANNOT] {e}") from None
    if self._selected is not None and self._selected.info.name == old and old != "INBOX":
        self._select(None)
    await self._sync(expunges=True)
    self._ok(tag, "RENAME completed")


async def _subscribe(self: IMAPServer, tag: bytes, args: list[Any], subscribed: bool) -> None:
    if len(args) != 1:
        raise Bad("a mailbox name is needed")
    assert self._user is not None
    try:
        await self._store.subscribe(self._user.id, decode_name(args[0]), subscribed)
    except NoMailbox:
        if subscribed:
            raise No("[NONEXISTENT] No such mailbox") from None
    self._ok(tag, f"{'' if subscribed else 'UN'}SUBSCRIBE completed")


@command("SUBSCRIBE", AUTHED)
async def _subscribe_cmd(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _subscribe(self, tag, args, True)


@command("UNSUBSCRIBE", AUTHED)
async def _unsubscribe(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _subscribe(self, tag, args, False)


_DATE_TIME = re.compile(
    r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$"
)
def parse_date_time(value: object) -> datetime:
    """RFC 3501 date-time: "17-Jul-1996 02:44:25 -0700"."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    match = _DATE_TIME.match(text)
    if match is None or match.group(2).lower() not in MONTHS:
        raise Bad("invalid date-time")
    day, _, year, hour, minute, second, sign, zh, zm = match.groups()
    offset = timedelta(hours=int(zh), minutes=int(zm)) * (1 if sign == "+" else -1)
    try:
        return datetime(int(year), MONTHS[match.group(2).lower()], int(day), int(hour),
                        int(minute), int(second), tzinfo=timezone(offset))
    except ValueError:
        raise Bad("invalid date-time") from None


@command("APPEND", AUTHED)
async def _append(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) < 2 or len(args) > 4 or not isinstance(args[-1], bytes):
        raise Bad("APPEND needs a mailbox, optional flags and date, and a literal message")
    name = decode_name(args[0])
    flags: list[str] = []
    internal_date = None
    for extra in args[1:-1]:
        if isinstance(extra, list) and not flags:
            for flag in extra:
                if not isinstance(flag, Atom) or (flag.startswith("\\") and flag.lower() not in
                                                  _SYSTEM_FLAGS):
                    raise Bad(f"invalid flag {flag!r}")
                flags.append(str(flag))
        elif isinstance(extra, bytes) and internal_date is None:
            internal_date = parse_date_time(extra)
        else:
            raise Bad("invalid APPEND arguments")
    message = args[-1]
    if not message:
        raise Bad("empty message")
    assert self._user is not None
    info = await self._store.info(self._user.id, name)
    if info is None:
        raise No("[TRYCREATE] No such mailbox")
    user = self._user
    recipient = LocalRecipient(
        user_id=user.id, address=user.address, maildir=user.maildir, folder=info.folder,
        mailbox=info.name,
        keywords=tuple(f for f in flags if not f.startswith("\\")),
        flags=tuple(f for f in flags if f.startswith("\\")),
    )
    try:
        result = await self._delivery.deliver(
            message, "", [recipient], enforce_quota=True, internal_date=internal_date,
            event_payload={"protocol": "imap"},
        )
    except MailboxFull:
        raise No("[OVERQUOTA] Quota exceeded") from None
    except DeliveryFailed:
        raise No("[UNAVAILABLE] Temporary failure, try again later") from None
    stored = result.stored[0]
    await self._sync(expunges=True)
    self._ok(tag, f"[APPENDUID {info.uidvalidity} {stored.uid}] APPEND completed")


@command("SEARCH", SELECTED)
async def _search(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    selected = self._selected
    assert selected is not None and self._user is not None
    try:
        criterion = parse_search(args, selected.ranges_of)
    except BadCharset:
        raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset") from None
    await self._sync(expunges=False)
    found = await self._store.search(self._user.maildir, selected.info.id, criterion)
    known = [u for u in found if selected.seq_of(u) is not None]
    numbers = known if uid else [selected.seq_of(u) or 0 for u in known]
    suffix = b""
    if uses_modseq(criterion):
        self._condstore = True
        if known:
            rows = await self._store.rows(selected.info.id, known)
            suffix = b" (MODSEQ %d)" % max(r.modseq for r in rows)
    self._send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers) + suffix)
    self._ok(tag, f"{'UID ' if uid else ''}SEARCH completed")


def _uid_set(uids: Sequence[int]) -> str:
    """A compact UID set: 1:3,7,9:10."""
    parts: list[str] = []
    start = previous = None
    for uid in uids:
        if previous is not None and uid == previous + 1:
            previous = uid
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}:{previous}")
        start = previous = uid
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}:{previous}")
    return ",".join(parts)


async def _copy(self: IMAPServer, tag: bytes, args: list[Any], uid: bool, move: bool) -> None:
    selected = self._selected
    assert selected is not None and self._user is not None
    verb = "MOVE" if move else "COPY"
    if len(args) != 2 or not isinstance(args[0], str):
        raise Bad(f"{verb} needs a sequence set and a mailbox")
    if move and selected.readonly:
        raise No("[READ-ONLY] Mailbox is read-only")
    uids = selected.uids_of(args[0], uid)
    target = await self._store.info(self._user.id, decode_name(args[1]))
    if target is None:
        raise No("[TRYCREATE] No such mailbox")
    await self._sync(expunges=False)
    pairs: list[tuple[int, int]] = []
    if uids:
        try:
            pairs = await self._store.copy(self._user.maildir, self._user.id,
                                           selected.info.id, uids, target)
        except QuotaExceeded:
            raise No("[OVERQUOTA] Quota exceeded") from None
        except NoMailbox:
            raise No("[TRYCREATE] No such mailbox") from None
    code = (f"[COPYUID {target.uidvalidity} {_uid_set([a for a, _ in pairs])} "
            f"{_uid_set([b for _, b in pairs])}] " if pairs else "")
    if move:
        if pairs:
            self._send(f"* OK {code}Moved".encode())
            deletions = await self._deletions(selected.info, "move")
            await self._store.expunge(self._user.maildir, selected.info.id, self._user.id,
                                      [a for a, _ in pairs], only_deleted=False,
                                      announce=deletions.records)
            deletions.publish(self._events)
            await self._sync(expunges=True)
        self._ok(tag, f"{'UID ' if uid else ''}MOVE completed")
    else:
        if target.id == selected.info.id:
            await self._sync(expunges=True)
        self._ok(tag, f"{code}{'UID ' if uid else ''}COPY completed")


@command("COPY", SELECTED)
async def _copy_cmd(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _copy(self, tag, args, uid, move=False)


@command("MOVE", SELECTED)
async def _move(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    await _copy(self, tag, args, uid, move=True)


# -- QUOTA (RFC 9208): one quota root, "", for all of a user's mailboxes -------------------------


async def _send_quota(self: IMAPServer) -> None:
    assert self._user is not None
    user = await self._directory.find_user(parse_address(self._user.address))
    if user is None:
        raise No("[UNAVAILABLE] The account is gone")
    resources = []
    if user.quota_bytes is not None:
        resources.append(f"STORAGE {(user.used_bytes + 1023) // 1024} "
                         f"{user.quota_bytes // 1024}")
    if user.quota_messages is not None:
        resources.append(f"MESSAGE {user.used_messages} {user.quota_messages}")
    self._send(b'* QUOTA "" (' + " ".join(resources).encode() + b")")


@command("GETQUOTAROOT", AUTHED)
async def _getquotaroot(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 1:
        raise Bad("GETQUOTAROOT needs a mailbox name")
    name = decode_name(args[0])
    assert self._user is not None
    if await self._store.info(self._user.id, name) is None:
        raise No("[NONEXISTENT] No such mailbox")
    self._send(b"* QUOTAROOT " + encode_name(name) + b' ""')
    await _send_quota(self)
    self._ok(tag, "GETQUOTAROOT completed")


@command("GETQUOTA", AUTHED)
async def _getquota(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if len(args) != 1:
        raise Bad("GETQUOTA needs a quota root")
    if args[0] not in (b"", ""):
        raise No("[NONEXISTENT] No such quota root")
    await _send_quota(self)
    self._ok(tag, "GETQUOTA completed")


@command("SETQUOTA", AUTHED)
def _setquota(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    raise No("[NOPERM] Quotas are set by the administrator")


@command("ENABLE", AUTHED)
def _enable(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    if not args or any(not isinstance(a, Atom) for a in args):
        raise Bad("ENABLE needs capability names")
    enabled = []
    for name in args:
        if name.upper() == "CONDSTORE":
            self._condstore = True
            enabled.append("CONDSTORE")
    self._send(("* ENABLED " + " ".join(enabled)).rstrip().encode())
    self._ok(tag, "ENABLE completed")


_SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"})


@command("SORT", SELECTED)
async def _sort(self: IMAPServer, tag: bytes, args: list[Any], uid: bool) -> None:
    """RFC 5256 SORT: (keys) charset search-keys."""
    selected = self._selected
    assert selected is not None and self._user is not None
    if len(args) < 3 or not isinstance(args[0], list) or not args[0]:
        raise Bad("SORT needs sort keys, a charset and search keys")
    keys: list[tuple[str, bool]] = []
    reverse = False
    for item in args[0]:
        name = str(item).upper() if isinstance(item, Atom) else ""
        if name == "REVERSE" and not reverse:
            reverse = True
            continue
        if name not in _SORT_KEYS:
            raise Bad(f"unknown sort key {item!r}")
        keys.append((name, reverse))
        reverse = False
    if reverse or not keys:
        raise Bad("REVERSE must precede a sort key")
    try:
        criterion = parse_search([Atom("CHARSET"), *args[1:]], selected.ranges_of)
    except BadCharset:
        raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset") from None
    await self._sync(expunges=False)
    found = await self._store.search(self._user.maildir, selected.info.id, criterion, keys)
    known = [u for u in found if selected.seq_of(u) is not None]
    numbers = known if uid else [selected.seq_of(u) or 0 for u in known]
    self._send(b"* SORT" + b"".join(b" %d" % n for n in numbers))
    self._ok(tag, f"{'UID ' if uid else ''}SORT completed")
