"""IMAP on the wire: assembling a command from lines and literals, and reading its arguments.

Twisted's ``IMAP4Server`` reads literals inside arguments into a 4 KiB buffer, sets no overall
limit on an APPEND literal and re-parses the line after every literal.  Here a command is first
assembled whole, within limits known before any byte of a literal is accepted (the literal's
announced size is checked against the command's limit; a synchronizing literal that is too big
is refused before the client sends it), and then tokenized once.

Tokens: an atom is :class:`Atom` (ASCII text, including the bracketed sections of fetch
attributes such as ``BODY[HEADER.FIELDS (DATE)]<0.100>``), a quoted string or a literal is
``bytes``, a parenthesized list is a Python ``list``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# RFC 3501 §9: ATOM-CHAR is any CHAR except atom-specials; ']' is allowed outside resp-specials.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}$")


class CommandError(Exception):
    """The command cannot be read: answer BAD (with the tag when there is one)."""

    def __init__(self, message: str, tag: bytes | None = None) -> None:
        super().__init__(message)
        self.tag = tag


class Atom(str):
    """An atom (or a fetch attribute with its bracketed section)."""

    __slots__ = ()


# -- assembling a command ----------------------------------------------------------------------


@dataclass
class Limits:
    line: int = 64 * 1024  # one line of a command, without its literals
    literal: int = 64 * 1024  # a literal of any command but APPEND
    append: int = 25 * 1024 * 1024  # an APPEND literal (the message)


@dataclass
class Pending:
    """A command being assembled: its text so far, with each literal replaced by a marker."""

    tag: bytes
    name: bytes
    parts: list[bytes] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)
    size: int = 0


class Assembler:
    """Feeds on bytes; yields complete commands ``(line, literals)`` or raises CommandError.

    ``line`` is the whole command with every literal replaced by ``{}`` and the literal bytes
    in order in ``literals``; :func:`tokenize` puts them back.  ``on_continuation`` is called
    when a synchronizing literal may be sent.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._pending: Pending | None = None
        self._literal_left = 0  # bytes of the current literal still to come
        self._discard = 0  # bytes of a refused non-synchronizing literal to skip
        self._skip_line = False  # then the rest of that command's line

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """A raw line (for IDLE's DONE and AUTHENTICATE), or None until one is complete."""
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > self.limits.line:
                self._buffer.clear()
                raise CommandError("line too long")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def next_command(self) -> tuple[Pending, bool] | None:
        """The next complete command, ``(pending, False)``; ``(pending, True)`` when a
        synchronizing literal is now expected (send a continuation); None for more input."""
        while True:
            if self._discard:
                skipped = min(self._discard, len(self._buffer))
                del self._buffer[:skipped]
                self._discard -= skipped
                if self._discard:
                    return None
            if self._skip_line:
                rest = self._take_line()
                if rest is None:
                    return None
                match = _LITERAL.search(rest)
                if match is not None and match.group(2):
                    self._discard = int(match.group(1))
                else:
                    self._skip_line = False
                continue
            if self._pending is not None and self._literal_left:
                if len(self._buffer) < self._literal_left:
                    return None
                take = self._literal_left
                self._pending.literals.append(bytes(self._buffer[:take]))
                del self._buffer[:take]
                self._literal_left = 0
            line = self._take_line()
            if line is None:
                return None
            pending = self._pending
            if pending is None:
                pending = self._start(line)
            match = _LITERAL.search(line)
            if match is None:
                pending.parts.append(line)
                self._pending = None
                return pending, False
            size, non_sync = int(match.group(1)), bool(match.group(2))
            limit = self.limits.append if pending.name == b"APPEND" else self.limits.literal
            pending.size += len(line) + size
            if size > limit or pending.size > self.limits.append + self.limits.line:
                self._pending = None
                if non_sync:
                    # RFC 7888 §4: the octets come anyway, and the rest of the command.
                    self._discard = size
                    self._skip_line = True
                raise CommandError(
                    "[TOOBIG] literal too large" if pending.name == b"APPEND"
                    else "literal too large", pending.tag,
                )
            pending.parts.append(line[:match.start()] + b"{}")
            self._pending = pending
            self._literal_left = size
            if size == 0:
                pending.literals.append(b"")
                continue
            if not non_sync:
                return pending, True

    def _take_line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > self.limits.line:
                tag = self._pending.tag if self._pending else _tag_of(bytes(self._buffer))
                self._buffer.clear()
                self._pending = None
                raise CommandError("line too long", tag)
            return None
        if end > self.limits.line:
            tag = self._pending.tag if self._pending else _tag_of(bytes(self._buffer[:end]))
            del self._buffer[:end + 2]
            self._pending = None
            raise CommandError("line too long", tag)
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def _start(self, line: bytes) -> Pending:
        tag, _, rest = line.partition(b" ")
        if not tag or not _is_tag(tag):
            raise CommandError("missing or invalid tag")
        name, _, _ = rest.partition(b" ")
        if not name:
            raise CommandError("missing command", tag)
        return Pending(tag, name.upper())

    @property
    def literal_size(self) -> int:
        """The size of the synchronizing literal the client is waiting to send."""
        return self._literal_left

    def refuse_literal(self) -> None:
        """Drop the command waiting for its synchronizing literal: without the continuation
        the client sends no literal (RFC 3501 §7.5)."""
        self._pending = None
        self._literal_left = 0


def _tag_of(line: bytes) -> bytes | None:
    tag = line.partition(b" ")[0]
    return tag if tag and _is_tag(tag) else None


def _is_tag(tag: bytes) -> bool:
    return len(tag) <= 64 and all(c not in _ATOM_SPECIALS and c != 0x2B for c in tag)


# -- tokenizing ----------------------------------------------------------------------------------


def tokenize(pending: Pending) -> list[object]:
    """The arguments of a command (after tag and name), literals in place."""
    text = b"".join(pending.parts)
    literals = iter(pending.literals)
    # Skip "tag name" (and the separating space).
    start = text.index(b" ") + 1 if b" " in text else len(text)
    name_end = text.find(b" ", start)
    position = len(text) if name_end < 0 else name_end + 1
    if name_end >= 0 and position >= len(text):
        raise CommandError("trailing space", pending.tag)
    tokens, position = _items(text, position, literals, pending.tag, depth=0)
    if position != len(text):
        raise CommandError("unbalanced parentheses", pending.tag)
    return tokens


def _items(
    text: bytes, i: int, literals: object, tag: bytes, depth: int
) -> tuple[list[object], int]:
    if depth > 16:
        raise CommandError("lists nested too deeply", tag)
    items: list[object] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == 0x29:  # ')'
            if depth == 0:
                raise CommandError("unbalanced parentheses", tag)
            return items, i
        if c == 0x28:  # '('
            inner, i = _items(text, i + 1, literals, tag, depth + 1)
            if i >= n or text[i] != 0x29:
                raise CommandError("unbalanced parentheses", tag)
            items.append(inner)
            i += 1
        elif c == 0x22:  # '"'
            value, i = _quoted(text, i + 1, tag)
            items.append(value)
        elif text.startswith(b"{}", i):
            try:
                items.append(next(literals))  # type: ignore[call-overload]
            except StopIteration:
                raise CommandError("literal marker without a literal", tag) from None
            i += 2
        else:
            atom, i = _atom(text, i, tag)
            items.append(atom)
        if i < n:
            if text[i] == 0x20:
                i += 1
                if i >= n or text[i] in (0x20, 0x29):
                    raise CommandError("unexpected space", tag)
            elif text[i] != 0x29:
                raise CommandError(f"unexpected character {chr(text[i])!r}", tag)
    if depth:
        raise CommandError("unbalanced parentheses", tag)
    return items, i


def _quoted(text: bytes, i: int, tag: bytes) -> tuple[bytes, int]:
    out = bytearray()
    n = len(text)
    while i < n:
        c = text[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:  # backslash: only \" and \\ are allowed
            if i + 1 < n and text[i + 1] in (0x22, 0x5C):
                out.append(text[i + 1])
                i += 2
                continue
            raise CommandError("invalid escape in quoted string", tag)
        if c in (0x0D, 0x0A, 0x00):
            raise CommandError("invalid character in quoted string", tag)
        out.append(c)
        i += 1
    raise CommandError("unterminated quoted string", tag)


def _atom(text: bytes, i: int, tag: bytes) -> tuple[Atom, int]:
    start = i
    n = len(text)
    brackets = 0
    if text[i] == 0x5C:  # a system flag: "\" atom
        i += 1
    while i < n:
        c = text[i]
        if c == 0x5B:  # '[' opens a section: anything but CR/LF up to its ']'
            brackets += 1
        elif c == 0x5D:
            if not brackets:
                break
            brackets -= 1
        elif brackets:
            if c in (0x0D, 0x0A, 0x00):
                raise CommandError("invalid character in section", tag)
        elif c in _ATOM_SPECIALS:
            if c in (0x25, 0x2A):  # list wildcards and '*' in sequence sets are atom chars here
                i += 1
                continue
            break
        elif c >= 0x80:
            raise CommandError("8-bit characters in an atom", tag)
        i += 1
    if brackets:
        raise CommandError("unbalanced brackets", tag)
    if i == start:
        raise CommandError(f"unexpected character {chr(text[i])!r}", tag)
    return Atom(text[start:i].decode("ascii")), i


# -- writing responses ---------------------------------------------------------------------------


_QUOTABLE = re.compile(rb'^[\x01-\x09\x0B\x0C\x0E-\x7F]*$')


def astring(value: str | bytes) -> bytes:
    """A string for a response: quoted when that is possible, else a literal."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) < 1024 and _QUOTABLE.match(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def nstring(value: str | bytes | None) -> bytes:
    return b"NIL" if value is None else astring(value)
