"""The ESMTP server protocol: one class for MX (25), submission (587) and submissions (465).

It subclasses Twisted's :class:`twisted.mail.smtp.ESMTP` for its reply formatting, timeouts and
TLS plumbing, and replaces the input side, where the base class is unsafe:

- Commands are run one at a time: while a command waits for mail logic (a database lookup), the
  next pipelined command stays in the buffer, so a RCPT can never overtake its MAIL's answer.
- After STARTTLS, whatever the client pipelined in clear text is discarded and the session
  starts over (RFC 3207 §4.2; CVE-2011-0411).
- DATA ends only at ``CRLF . CRLF``.  Lines of any length stay message content (the base class
  leaves DATA mode on a 16 KiB line and runs the rest of the body as commands); a message holding
  a bare CR or LF is refused whole, so ``LF . CRLF`` tricks cannot smuggle a second message
  (the 2023 "SMTP smuggling" class).
- The message size is enforced while reading (RFC 1870), not after.

It knows nothing of storage: senders, recipients and messages go to an
:class:`esp.interfaces.IInboundPolicy`, whose :class:`esp.envelope.Refusal` answers are turned
into reply lines here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from esp.auth import AuthenticationBusy
from esp.envelope import Accepted, Envelope, Listener, Refusal, Session
from esp.events import USER_LOGIN, Event, EventBus
from esp.limits import ConnectionLimits
from esp.loglines import LineLog
from esp.smtp.commands import parse_path_argument, parse_size

MAX_COMMAND_LINE = 4096  # RFC 5321 §4.5.3.1.4 says 512; AUTH responses and extensions need more
MAX_BUFFERED = 1024 * 1024  # input held while a command is in progress before we stop reading
_END_OF_DATA = b"\r\n.\r\n"


@dataclass(frozen=True)
class SMTPSettings:
    hostname: str
    listener: Listener
    max_message_size: int
    max_recipients: int
    max_errors: int = 10
    idle_timeout: int = 300
    allow_plaintext_auth: bool = False  # without TLS; only honoured for loopback clients


def received_date(now: float | None = None) -> str:
    """The RFC 5322 date-time of this second, for Received: formatted once a second rather
    than once a message (``email.utils.format_datetime`` is one of the costlier steps of a
    delivery on the reactor)."""
    return _date_of_second(int(time.time() if now is None else now))


@functools.lru_cache(maxsize=1)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


class ESMTPServer(smtp.ESMTP):
    log = Logger()
    accepted_log = LineLog(log)
    # A TCP or TLS transport once connected (Twisted types it as the bare ITransport).
    transport: Any

    def __init__(
        self,
        settings: SMTPSettings,
        policy: Any,
        checker: Any,
        tls: Any,
        limits: ConnectionLimits,
        events: EventBus,
        clock: Any,
        count_refusal: Callable[[str, Refusal], None] | None = None,
    ) -> None:
        super().__init__(chal={}, contextFactory=tls)
        # Told of every MAIL, RCPT and message refused (the stage, the refusal): metrics.
        self._count_refusal = count_refusal
        self.settings = settings
        self.host = settings.hostname.encode("ascii")
        self.timeout = settings.idle_timeout
        self._policy = policy
        self._checker = checker
        self._limits = limits
        self._events = events
        self._clock = clock
        self._buffer = b""
        self._busy = False
        self._discarding_line = False
        self._state = "command"
        self._data = bytearray()
        self._data_too_big = False
        self._bdat_remaining = 0
        self._bdat_last = False
        self._errors = 0
        self._auth_step: Callable[[bytes], None] | None = None
        self._admitted = False
        self._peer_ip = ""
        self.session_id = secrets.token_hex(6)
        self._message_count = 0
        self._tls = settings.listener is Listener.SUBMISSIONS
        self._user: str | None = None
        self._bdat_refusal: Refusal | None = None
        self._output_paused = False
        self.callLater = clock.callLater  # type: ignore[method-assign]  # idle timer on our clock
        self._reset_session()

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer_ip = getattr(peer, "host", str(peer))
        self.canStartTLS = ITLSTransport.providedBy(self.transport) and self.ctx is not None
        refusal = self._limits.admit(self._peer_ip)
        if refusal is not None:
            self._reply(421, "4.7.0", f"{self.settings.hostname} {refusal}")
            self.transport.loseConnection()
            return
        self._admitted = True
        # Our replies are a stream the client must read: when the transport's buffer fills,
        # we stop reading its commands (pauseProducing) until it drains.
        self.transport.registerProducer(self, True)
        self._reply(220, None, f"{self.settings.hostname} ESMTP ESP")
        self.setTimeout(self.timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._admitted:
            self._limits.release(self._peer_ip)
            self._admitted = False
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        self._reply(421, "4.4.2", f"{self.settings.hostname} Timeout, closing connection")
        self.transport.loseConnection()

    # -- input framing ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buffer += data
        if len(self._buffer) > MAX_BUFFERED:
            self._update_reading()
        self._process()

    def _process(self) -> None:
        while not self._busy and not self._output_paused and not self.transport.disconnecting:
            if self._state == "data":
                if not self._consume_data():
                    return
                continue
            if self._state == "bdat":
                if not self._consume_bdat():
                    return
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._buffer = b""
                    if not self._discarding_line:
                        self._discarding_line = True
                        self._error(500, "5.5.6", "Line too long")
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            if self._discarding_line:
                self._discarding_line = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self._error(500, "5.5.6", "Line too long")
                continue
            self._line(line)

    def _line(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            self._error(500, "5.5.2", "Bare CR, LF or NUL in a command line")
            return
        if self._auth_step is not None:
            self._auth_step(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(500, "5.5.2", "Command line is not UTF-8")
            return
        verb, _, arg = text.strip(" ").partition(" ")
        handler = getattr(self, "cmd_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self._error(500, "5.5.2", "Command not recognized")
            return
        try:
            result = handler(arg.strip(" "))
        except Exception:
            # A bug must cost this command, not the session (or the reactor).
            self.log.failure("SMTP command {verb} failed", verb=verb.upper())
            self._reply(451, "4.3.0", "Local error in processing, try again later")
            return
        if isinstance(result, Deferred):
            self._wait(result, reset_on_error=verb.upper() in ("MAIL", "DATA", "BDAT"))

    def _wait(self, d: Deferred[Any], reset_on_error: bool = True) -> None:
        """Hold further input until ``d`` fires (one command at a time)."""
        self._busy = True

        def failed(failure: Failure) -> None:
            self.log.failure("SMTP session {session} failed", failure, session=self.session_id)
            self._reply(451, "4.3.0", "Local error in processing, try again later")
            if reset_on_error:
                self._reset_transaction()

        def done(result: object) -> None:
            self._busy = False
            if self.transport.disconnecting:
                return
            self._update_reading()
            self._process()

        d.addErrback(failed)
        d.addBoth(done)

    # -- flow control: a client that does not read our replies stops being read ---------------

    def pauseProducing(self) -> None:
        self._output_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_paused = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        self._output_paused = True

    def _update_reading(self) -> None:
        # Stop reading only once a fair amount is waiting: a TLS transport pauses us during its
        # handshake, and it must go on reading to finish that handshake.
        waiting = self._busy or self._output_paused
        if waiting and len(self._buffer) > MAX_BUFFERED:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _run(self, coroutine: Awaitable[None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine)  # type: ignore[arg-type]

    # -- replies ------------------------------------------------------------------------------

    def _reply(self, code: int, status: str | None, text: str) -> None:
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            prefix = f"{code}{sep}" + (f"{status} " if status else "")
            out.append((prefix + line).encode("utf-8") + b"\r\n")
        self.transport.writeSequence(out)

    def _refused(self, refusal: Refusal, stage: str) -> None:
        if self._count_refusal is not None:
            self._count_refusal(stage, refusal)
        self._reply(refusal.code, refusal.status, refusal.text)

    def _error(self, code: int, status: str, text: str) -> None:
        self._errors += 1
        if self._errors > self.settings.max_errors:
            self._reply(421, "4.7.0", f"{self.settings.hostname} Too many errors, closing")
            self.transport.loseConnection()
            return
        self._reply(code, status, text)

    # -- session state ------------------------------------------------------------------------

    def _reset_session(self) -> None:
        self._helo: str | None = None
        self._esmtp = False
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._sender: str | None = None
        self._sender_note: object = None
        self._envelope_params: dict[str, str | None] = {}
        self._size_declared: int | None = None
        self._accepted: list[Accepted] = []
        self._data = bytearray()
        self._data_too_big = False
        self._bdat_remaining = 0
        self._bdat_last = False
        if self._state in ("data", "bdat"):
            self._state = "command"

    def session(self) -> Session:
        return Session(
            listener=self.settings.listener,
            client_ip=self._peer_ip,
            helo=self._helo or "",
            tls=self._tls,
            user=self._user,
            session_id=self.session_id,
        )

    @property
    def _is_loopback(self) -> bool:
        return self._peer_ip.startswith("127.") or self._peer_ip == "::1"

    @property
    def _auth_offered(self) -> bool:
        if self.settings.listener is Listener.MX:
            return False
        return self._tls or (self.settings.allow_plaintext_auth and self._is_loopback)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.settings.max_message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
            b"CHUNKING": None,
        }
        if self.canStartTLS and not self._tls:
            ext[b"STARTTLS"] = None
        if self._auth_offered and self._user is None:
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    # -- commands -----------------------------------------------------------------------------

    def cmd_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def cmd_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            self._error(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self._reset_transaction()
        self._helo = arg
        self._esmtp = esmtp
        hello = f"{self.settings.hostname} Hello {arg} [{self._peer_ip}]"
        if not esmtp:
            self._reply(250, None, hello)
            return
        lines = [hello]
        for name, values in self.extensions().items():
            lines.append(name.decode() + ("" if not values else " " + b" ".join(values).decode()))
        self._reply(250, None, "\n".join(lines))

    def cmd_NOOP(self, arg: str) -> None:
        self._reply(250, "2.0.0", "OK")

    def cmd_RSET(self, arg: str) -> None:
        self._reset_transaction()
        self._reply(250, "2.0.0", "OK")

    def cmd_QUIT(self, arg: str) -> None:
        self._reply(221, "2.0.0", f"{self.settings.hostname} closing connection")
        self.transport.loseConnection()

    def cmd_HELP(self, arg: str) -> None:
        self._reply(214, "2.0.0", "See RFC 5321")

    def cmd_VRFY(self, arg: str) -> None:
        # Address verification would hand out the user list (RFC 5321 §3.5.3 allows 252).
        self._reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def cmd_EXPN(self, arg: str) -> None:
        self._error(502, "5.5.1", "EXPN not available")

    def cmd_STARTTLS(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
        elif self._tls:
            self._error(503, "5.5.1", "TLS already active")
        elif not self.canStartTLS:
            self._error(454, "4.7.0", "TLS not available")
        else:
            self._reply(220, "2.0.0", "Ready to start TLS")
            # RFC 3207 §4.2: nothing the client sent before the handshake may be acted upon.
            self._buffer = b""
            self.transport.startTLS(self.ctx)
            self._tls = True
            self._user = None
            self._reset_session()

    def cmd_AUTH(self, arg: str) -> None:
        if self.settings.listener is Listener.MX:
            self._error(503, "5.5.1", "Authentication not enabled here")
            return
        if self._helo is None or not self._esmtp:
            self._error(503, "5.5.1", "Send EHLO first")
            return
        if self._user is not None:
            self._error(503, "5.5.1", "Already authenticated")
            return
        if self._sender is not None:
            self._error(503, "5.5.1", "AUTH not allowed during a mail transaction")
            return
        if not self._auth_offered:
            self._error(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        empty_initial = initial == "="  # RFC 4954 §4: "=" is an initial response of zero length
        if mechanism == "PLAIN":
            if empty_initial:
                self._auth_plain(b"")
            elif initial:
                self._auth_plain(initial.encode())
            else:
                self._auth_step = self._auth_plain
                self._reply(334, None, "")
        elif mechanism == "LOGIN":
            if initial and not empty_initial:
                self._auth_login_user(initial.encode())
            else:
                self._auth_step = self._auth_login_user
                self._reply(334, None, base64.b64encode(b"Username:").decode())
        else:
            self._error(504, "5.5.4", "Unrecognized authentication type")

    def _decode_auth(self, line: bytes) -> bytes | None:
        self._auth_step = None
        if line == b"":
            return b""
        if line == b"*":
            self._error(501, "5.0.0", "Authentication cancelled")
            return None
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._error(501, "5.5.2", "Cannot decode response")
            return None

    def _auth_plain(self, line: bytes) -> None:
        decoded = self._decode_auth(line)
        if decoded is None:
            return
        parts = decoded.split(b"\x00")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            self._error(501, "5.5.2", "Bad PLAIN response")
            return
        self._wait(self._run(self._authenticate(parts[1], parts[2])))

    def _auth_login_user(self, line: bytes) -> None:
        username = self._decode_auth(line)
        if username is None:
            return

        def password_step(response: bytes) -> None:
            password = self._decode_auth(response)
            if password is not None:
                self._wait(self._run(self._authenticate(username, password)))

        self._auth_step = password_step
        self._reply(334, None, base64.b64encode(b"Password:").decode())

    async def _authenticate(self, username: bytes, password: bytes) -> None:
        try:
            avatar = await self._checker.requestAvatarId(UsernamePassword(username, password))
        except UnauthorizedLogin:
            await self._auth_failed(username)
            return
        except AuthenticationBusy:
            self._reply(454, "4.7.0", "Temporary authentication failure, try again later")
            return
        except Exception:
            # RFC 4954 §6: a server-side problem during AUTH is 454, and the session goes on.
            self.log.failure("authentication failed in the backend")
            self._reply(454, "4.7.0", "Temporary authentication failure, try again later")
            return
        self._user = avatar.decode("utf-8")
        self._reply(235, "2.7.0", "Authentication successful")
        self._events.publish(
            Event(
                USER_LOGIN,
                {"user": self._user, "protocol": "smtp", "client_ip": self._peer_ip,
                 "listener": self.settings.listener.value, "success": True},
                domain=self._user.rpartition("@")[2],
                actor=self._user,
            )
        )

    async def _auth_failed(self, username: bytes) -> None:
        failures = self._limits.auth_failures.add(self._peer_ip)
        account = username.decode("utf-8", "replace").lower()
        failures = max(failures, self._limits.auth_failures.add("user:" + account))
        self._events.publish(Event(
            USER_LOGIN,
            {"user": account[:320], "protocol": "smtp", "client_ip": self._peer_ip,
             "listener": self.settings.listener.value, "success": False},
            domain=account.rpartition("@")[2][:253] or None,
        ))
        # Slow each failure down, more with every recent failure from this address or for this
        # account, so guessing passwords is slow without locking the real user out.
        delay = min(2 ** (failures - 1), 16)
        d: Deferred[None] = Deferred()
        self._clock.callLater(delay, d.callback, None)
        await d
        self._reply(535, "5.7.8", "Authentication credentials invalid")
        limit = self._limits.auth_failures_per_ip
        if limit and self._limits.auth_failures.count(self._peer_ip) >= limit:
            self._reply(421, "4.7.0", f"{self.settings.hostname} Too many failed logins")
            self.transport.loseConnection()

    def _transaction_allowed(self) -> bool:
        if self._helo is None:
            self._error(503, "5.5.1", "Send HELO/EHLO first")
            return False
        if self.settings.listener is not Listener.MX and self._user is None:
            if not self._tls and not self._auth_offered:
                self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            else:
                self._error(530, "5.7.0", "Authentication required")
            return False
        return True

    def cmd_MAIL(self, arg: str) -> Deferred[None] | None:
        if not self._transaction_allowed():
            return None
        if self._sender is not None:
            self._error(503, "5.5.1", "Nested MAIL command")
            return None
        try:
            path = parse_path_argument(arg, "FROM", allow_null=True)
            size = self._check_mail_params(path.params, path.address)
        except Refusal as refusal:
            self._errors += 1
            self._refused(refusal, "mail")
            return None
        return self._run(self._mail(path.address, path.params, size))

    def _check_mail_params(self, params: dict[str, str | None], address: str) -> int | None:
        size = None
        for key, value in params.items():
            if key == "SIZE":
                size = parse_size(value)
                if size > self.settings.max_message_size:
                    raise Refusal(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise Refusal(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise Refusal(501, "5.5.4", "SMTPUTF8 takes no value")
            elif key == "AUTH":
                continue  # RFC 4954 §5: we may ignore it
            else:
                raise Refusal(555, "5.5.4", f"Unsupported MAIL parameter {key}")
        if not address.isascii() and "SMTPUTF8" not in params:
            raise Refusal(553, "5.6.7", "Non-ASCII address without SMTPUTF8")
        return size

    async def _mail(self, address: str, params: dict[str, str | None], size: int | None) -> None:
        try:
            self._sender_note = await self._policy.check_sender(self.session(), address, size)
        except Refusal as refusal:
            self._errors += 1
            self._refused(refusal, "mail")
            return
        self._sender = address
        self._envelope_params = params
        self._size_declared = size
        self._reply(250, "2.1.0", "Sender OK")

    def cmd_RCPT(self, arg: str) -> Deferred[None] | None:
        if self._sender is None:
            self._error(503, "5.5.1", "Need MAIL command first")
            return None
        if len(self._accepted) >= self.settings.max_recipients:
            self._reply(452, "4.5.3", "Too many recipients")
            return None
        try:
            path = parse_path_argument(arg, "TO", allow_null=False)
            if path.params:
                raise Refusal(555, "5.5.4", f"Unsupported RCPT parameter {next(iter(path.params))}")
            if not path.address.isascii() and "SMTPUTF8" not in self._envelope_params:
                raise Refusal(553, "5.6.7", "Non-ASCII address without SMTPUTF8")
        except Refusal as refusal:
            self._errors += 1
            self._refused(refusal, "rcpt")
            return None
        return self._run(self._rcpt(path.address))

    async def _rcpt(self, address: str) -> None:
        try:
            accepted = await self._policy.check_recipient(
                self.session(), address, self._size_declared, self._sender or ""
            )
        except Refusal as refusal:
            if not refusal.temporary:
                self._errors += 1
            self._refused(refusal, "rcpt")
            return
        self._accepted.append(accepted)
        self._reply(250, "2.1.5", "Recipient OK")

    def cmd_DATA(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: DATA")
        elif self._sender is None:
            self._error(503, "5.5.1", "Need MAIL command first")
        elif not self._accepted:
            self._error(554, "5.5.1", "No valid recipients")
        elif self._data:
            self._error(503, "5.5.1", "DATA may not follow BDAT in one transaction")
        else:
            self._state = "data"
            # The stream starts just after the DATA line's CRLF, which can begin the terminator.
            self._data = bytearray(b"\r\n")
            self._reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _consume_data(self) -> bool:
        """Move buffered input into the message; True when the message is complete."""
        if not self._buffer:
            return False
        start = max(0, len(self._data) - 4)
        self._data += self._buffer
        self._buffer = b""
        end = self._data.find(_END_OF_DATA, start)
        if end < 0:
            self._bound_data()
            return False
        self._buffer = bytes(self._data[end + len(_END_OF_DATA) :])
        body = bytes(self._data[: end + 2])  # keeps the leading and the final CRLF
        self._data = bytearray()
        self._state = "command"
        body = body.replace(b"\r\n..", b"\r\n.")[2:]  # RFC 5321 §4.5.2 dot-unstuffing
        if len(body) > self.settings.max_message_size:
            self._data_too_big = True
        self._message_complete(body)
        return True

    def _bound_data(self) -> None:
        # Past the size limit, keep only what could hold the start of the terminator.
        if len(self._data) > self.settings.max_message_size + 2:
            self._data_too_big = True
            del self._data[: len(self._data) - 4]

    def cmd_BDAT(self, arg: str) -> None:
        parts = arg.split()
        if not parts or not (parts[0].isascii() and parts[0].isdigit()) or len(parts) > 2 or (
            len(parts) == 2 and parts[1].upper() != "LAST"
        ):
            self._error(501, "5.5.4", "Syntax: BDAT size [LAST]")
            return
        # RFC 3030 §2: the chunk is read even when it is going to be refused.
        self._bdat_refusal = None
        if self._sender is None:
            self._bdat_refusal = Refusal(503, "5.5.1", "Need MAIL command first")
        elif not self._accepted:
            self._bdat_refusal = Refusal(554, "5.5.1", "No valid recipients")
        self._state = "bdat"
        self._bdat_remaining = int(parts[0])
        self._bdat_last = len(parts) == 2

    def _consume_bdat(self) -> bool:
        """Move the chunk's octets into the message; True when the chunk is complete."""
        take = min(self._bdat_remaining, len(self._buffer))
        if take:
            if not self._data_too_big and self._bdat_refusal is None:
                self._data += self._buffer[:take]
                if len(self._data) > self.settings.max_message_size:
                    self._data_too_big = True
                    self._data = bytearray()
            self._buffer = self._buffer[take:]
            self._bdat_remaining -= take
        if self._bdat_remaining:
            return False
        self._state = "command"
        if self._bdat_refusal is not None:
            refusal, self._bdat_refusal = self._bdat_refusal, None
            self._errors += 1
            self._refused(refusal, "data")
            self._reset_transaction()
        elif self._bdat_last:
            body = bytes(self._data)
            self._data = bytearray()
            self._message_complete(body)
        elif self._data_too_big:
            self._reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            self._reset_transaction()
        else:
            self._reply(250, "2.0.0", f"{len(self._data)} octets received")
        return True

    def _message_complete(self, body: bytes) -> None:
        if self._data_too_big:
            self._refused(Refusal(552, "5.3.4", "Message size exceeds fixed maximum message size"),
                          "data")
            self._reset_transaction()
            return
        if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
            self._refused(Refusal(550, "5.6.0",
                                  "Message contains bare CR or LF characters (RFC 5321 §2.3.8)"),
                          "data")
            self._reset_transaction()
            return
        self._wait(self._run(self._deliver(body)))

    async def _deliver(self, body: bytes) -> None:
        envelope = Envelope(
            sender=self._sender or "",
            recipients=tuple(a.address for a in self._accepted),
            size_declared=self._size_declared,
            smtputf8="SMTPUTF8" in self._envelope_params,
            body=(self._envelope_params.get("BODY") or "7BIT").upper(),
            sender_note=self._sender_note,
        )
        accepted = list(self._accepted)
        self._message_count += 1
        queue_id = f"{self.session_id}.{self._message_count}"
        message = self._received_header(envelope, queue_id) + body
        try:
            stored = await self._policy.receive(self.session(), envelope, accepted, message)
        except Refusal as refusal:
            self._refused(refusal, "data")
        else:
            # One line per message (esp.loglines: one log event for many).
            self.accepted_log.line(
                f"accepted {queue_id} from=<{envelope.sender}> "
                f"to={list(envelope.recipients)} size={len(message)} stored={stored}"
            )
            self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        finally:
            self._reset_transaction()

    def _received_header(self, envelope: Envelope, queue_id: str) -> bytes:
        # RFC 5321 §4.4 and RFC 3848 protocol types.
        protocol = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
        if self._tls:
            protocol += "S"
        if self._user is not None:
            protocol += "A"
        if not self._esmtp:
            protocol = "SMTP"
        helo = "".join(c if c.isprintable() and c not in "()" else "?" for c in self._helo or "")
        recipient = (
            f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        )
        header = (
            f"Received: from {helo} ([{self._peer_ip}])\r\n"
            f"\tby {self.settings.hostname} (ESP) with {protocol} id {queue_id}{recipient};\r\n"
            f"\t{received_date()}\r\n"
        )
        return header.encode("utf-8")
