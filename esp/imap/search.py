"""SEARCH keys (RFC 3501 §6.4.4) into the storage's criteria tree
(:mod:`esp.storage.mailsearch`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

from esp.imap.wire import Atom
from esp.storage.mailsearch import Criterion

MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_DATE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_FLAGS = {"ANSWERED": ("answered", True), "DELETED": ("deleted", True),
          "DRAFT": ("draft", True), "FLAGGED": ("flagged", True), "SEEN": ("seen", True),
          "UNANSWERED": ("answered", False), "UNDELETED": ("deleted", False),
          "UNDRAFT": ("draft", False), "UNFLAGGED": ("flagged", False),
          "UNSEEN": ("seen", False), "OLD": None, "ALL": None}
_HEADERS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATES = {"BEFORE": ("date", "<"), "ON": ("date", "="), "SINCE": ("date", ">="),
          "SENTBEFORE": ("sent", "<"), "SENTON": ("sent", "="), "SENTSINCE": ("sent", ">=")}
_SEQUENCE = re.compile(r"^[0-9*:,]+$")


class SearchError(ValueError):
    """BAD: the search keys are not valid."""


class BadCharset(Exception):
    """NO [BADCHARSET]: the charset is not one we can search in."""


def parse_search(
    args: list[Any], sequence: Callable[[str, bool], list[tuple[int, int]]]
) -> Criterion:
    """``args`` after SEARCH (optionally starting with CHARSET x); ``sequence(set, uid)``
    turns a sequence set into UID ranges."""
    charset = "utf-8"
    if args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
        if len(args) < 2:
            raise SearchError("CHARSET needs a name")
        name = args[1].decode("ascii", "replace") if isinstance(args[1], bytes) else args[1]
        if name.upper() not in ("UTF-8", "US-ASCII"):
            raise BadCharset(name)
        args = args[2:]
    if not args:
        raise SearchError("SEARCH needs at least one key")
    tokens = iter(args)
    keys = []
    for token in tokens:
        keys.append(_key(token, tokens, charset, sequence))
    return keys[0] if len(keys) == 1 else ("and", keys)


def _text(value: object, charset: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode(charset)
        except UnicodeDecodeError:
            raise SearchError(f"search text is not {charset}") from None
    if isinstance(value, str):
        return str(value)
    raise SearchError("a string was expected")


def _next(tokens: Iterator[Any], what: str) -> Any:
    try:
        return next(tokens)
    except StopIteration:
        raise SearchError(f"{what} expected") from None


def _date(value: object) -> date:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    match = _DATE.match(text)
    if match is None or match.group(2).lower() not in MONTHS:
        raise SearchError(f"invalid date {text!r}")
    try:
        return date(int(match.group(3)), MONTHS[match.group(2).lower()], int(match.group(1)))
    except ValueError:
        raise SearchError(f"invalid date {text!r}") from None


def _key(token: Any, tokens: Iterator[Any], charset: str,
         sequence: Callable[[str, bool], list[tuple[int, int]]]) -> Criterion:
    if isinstance(token, list):
        if not token:
            raise SearchError("empty parenthesized search key")
        inner = iter(token)
        keys = [_key(t, inner, charset, sequence) for t in inner]
        return keys[0] if len(keys) == 1 else ("and", keys)
    if not isinstance(token, Atom):
        raise SearchError("a search key was expected")
    name = token.upper()
    if name in _FLAGS:
        flag = _FLAGS[name]
        return ("all",) if flag is None else ("flag", *flag)
    if name in ("NEW", "RECENT"):
        return ("not", ("all",))  # ESP does not keep \Recent (allowed by RFC 9051)
    if name in _HEADERS:
        return ("header", _HEADERS[name], _text(_next(tokens, "a string"), charset))
    if name in _DATES:
        kind, op = _DATES[name]
        return (kind, op, _date(_next(tokens, "a date")))
    if name == "HEADER":
        field = _text(_next(tokens, "a header name"), charset)
        if not field or not all(33 <= ord(c) <= 126 and c != ":" for c in field):
            raise SearchError("invalid header field name")
        return ("header", field, _text(_next(tokens, "a string"), charset))
    if name in ("BODY", "TEXT"):
        return (name.lower(), _text(_next(tokens, "a string"), charset))
    if name in ("KEYWORD", "UNKEYWORD"):
        keyword = _next(tokens, "a keyword")
        if not isinstance(keyword, Atom):
            raise SearchError("a keyword is an atom")
        return ("keyword", str(keyword), name == "KEYWORD")
    if name in ("LARGER", "SMALLER"):
        number = _next(tokens, "a number")
        if not isinstance(number, Atom) or not number.isdigit() or len(number) > 12:
            raise SearchError("a number was expected")
        return ("size", ">" if name == "LARGER" else "<", int(number))
    if name == "MODSEQ":  # RFC 7162 §3.1.5; the optional entry name and type are ignored
        value = _next(tokens, "a MODSEQ")
        if isinstance(value, bytes):
            _next(tokens, "an entry type")
            value = _next(tokens, "a MODSEQ")
        if not isinstance(value, Atom) or not value.isdigit() or len(value) > 19:
            raise SearchError("invalid MODSEQ")
        return ("modseq", int(value))
    if name == "NOT":
        return ("not", _key(_next(tokens, "a search key"), tokens, charset, sequence))
    if name == "OR":
        first = _key(_next(tokens, "a search key"), tokens, charset, sequence)
        second = _key(_next(tokens, "a search key"), tokens, charset, sequence)
        return ("or", first, second)
    if name == "UID":
        uids = _next(tokens, "a UID set")
        if not isinstance(uids, Atom) or not _SEQUENCE.match(uids):
            raise SearchError("invalid UID set")
        return ("uids", sequence(str(uids), True))
    if _SEQUENCE.match(name):
        return ("uids", sequence(str(token), False))
    raise SearchError(f"unknown search key {name}")


def uses_modseq(node: Criterion) -> bool:
    kind = node[0]
    if kind == "modseq":
        return True
    if kind == "not":
        return uses_modseq(node[1])
    if kind == "or":
        return uses_modseq(node[1]) or uses_modseq(node[2])
    if kind == "and":
        return any(uses_modseq(c) for c in node[1])
    return False
