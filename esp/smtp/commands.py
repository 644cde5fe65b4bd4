"""Parsing SMTP command arguments: paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 1870,
RFC 6152, RFC 6531).  Pure functions; errors carry the reply to send."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from esp.envelope import Refusal

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class PathArgument:
    address: str  # '' for the null path <>
    params: dict[str, str | None] = field(default_factory=dict)


def _syntax(text: str) -> Refusal:
    return Refusal(501, "5.5.4", text)


def parse_path_argument(arg: str, keyword: str, allow_null: bool) -> PathArgument:
    """Parse ``FROM:<a@b> SIZE=10`` (or ``TO:``).

    Tolerates a space after the colon and a missing pair of angle brackets, as deployed clients
    need; refuses control characters and over-long paths.
    """
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise _syntax(f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise _syntax("Unbalanced '<' in address")
        path, params_text = rest[1:end], rest[end + 1 :]
        if params_text and not params_text.startswith(" "):
            raise _syntax("Expected a space after the address")
    else:
        path, _, params_text = rest.partition(" ")
    if path.startswith("@"):
        # RFC 5321 §4.1.2 source route "@a,@b:user@c": accepted and ignored (Appendix C).
        _, colon, path = path.partition(":")
        if not colon:
            raise _syntax("Bad source route")
    if len(path) > MAX_PATH:
        raise Refusal(501, "5.1.3", "Address too long")
    if _CONTROL.search(path) or (" " in path and '"' not in path):
        raise Refusal(501, "5.1.3", "Bad address syntax")
    if not path:
        if not allow_null:
            raise Refusal(501, "5.1.3", "Null address not allowed here")
    elif "@" not in path.strip('"'):
        raise Refusal(501, "5.1.3", "Address needs a domain")
    return PathArgument(path, parse_params(params_text))


def _closing_bracket(text: str) -> int:
    if '"' not in text and "\\" not in text:
        return text.find(">")  # nothing quoted or escaped: the first '>' (the common case)
    quoted = False
    escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise _syntax(f"Bad parameter {item!r}")
        key = key.upper()
        if key in params:
            raise _syntax(f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def parse_size(value: str | None) -> int:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise _syntax("SIZE needs a number")
    return int(value)
