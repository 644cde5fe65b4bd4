"""FETCH items (RFC 3501 §6.4.5, §7.4.2): what the client asked for, and the response bytes.

Pure functions over a message row and, when a body item is asked for, the message bytes.
BODYSTRUCTURE and the body sections come from the raw bytes; ENVELOPE from Twisted's
``getEnvelope`` over the parsed header.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.mail import imap4

from esp.imap.wire import Atom
from esp.storage.mailboxes import MessageRow


class FetchError(ValueError):
    """The FETCH arguments are not valid (BAD)."""


_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE = frozenset({"FLAGS", "UID", "MODSEQ", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                     "BODYSTRUCTURE", "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"})
_BODY = re.compile(r"^(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d{1,10})(?:\.(\d{1,10}))?>)?$",
                   re.IGNORECASE)
_SECTION = re.compile(
    r"^(?:((?:[1-9][0-9]{0,4})(?:\.[1-9][0-9]{0,4})*)(?:\.|$))?"
    r"(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?(?:\s+\((.*)\))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class FetchItem:
    name: str  # FLAGS, UID, ..., or BODY[] for any body section
    section: str = ""  # as the client wrote it, upper-cased
    part: tuple[int, ...] = ()
    kind: str = ""  # '', HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[str, ...] = ()
    origin: int | None = None
    length: int | None = None
    peek: bool = False

    @property
    def needs_body(self) -> bool:
        return self.name in ("BODY[]", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "ENVELOPE",
                             "BODYSTRUCTURE", "BODY")

    @property
    def sets_seen(self) -> bool:
        return (self.name == "BODY[]" and not self.peek) or self.name in ("RFC822",
                                                                           "RFC822.TEXT")


def parse_fetch(arg: object) -> list[FetchItem]:
    names: list[object]
    if isinstance(arg, list):
        names = arg
    elif isinstance(arg, Atom) and arg.upper() in _MACROS:
        names = [Atom(n) for n in _MACROS[arg.upper()]]
    else:
        names = [arg]
    if not names:
        raise FetchError("empty FETCH item list")
    items = []
    for name in names:
        if not isinstance(name, Atom):
            raise FetchError("FETCH items are atoms")
        upper = name.upper()
        if upper in _SIMPLE:
            items.append(FetchItem(upper))
            continue
        match = _BODY.match(name)
        if match is None:
            raise FetchError(f"unknown FETCH item {name}")
        items.append(_body_item(match))
    return items


def _body_item(match: re.Match[str]) -> FetchItem:
    verb, section, origin, length = match.groups()
    spec = _SECTION.match(section.strip()) if section else None
    if section and spec is None:
        raise FetchError(f"invalid section {section}")
    part: tuple[int, ...] = ()
    kind = ""
    fields: tuple[str, ...] = ()
    if spec is not None:
        if spec.group(1):
            part = tuple(int(p) for p in spec.group(1).split("."))
        kind = (spec.group(2) or "").upper()
        if kind.startswith("HEADER.FIELDS"):
            if spec.group(3) is None or not spec.group(3).strip():
                raise FetchError("HEADER.FIELDS needs a list of field names")
            fields = tuple(f.strip('"').lower() for f in spec.group(3).split())
        elif spec.group(3) is not None:
            raise FetchError(f"invalid section {section}")
        if kind == "MIME" and not part:
            raise FetchError("MIME needs a part number")
    if length is not None and int(length) == 0:
        raise FetchError("a partial fetch of zero octets")
    canonical = section.upper()
    if fields:
        canonical = canonical.split("(")[0].rstrip() + " (" + " ".join(
            f.upper() for f in fields) + ")"
    return FetchItem(
        "BODY[]", canonical, part, kind, fields,
        int(origin) if origin is not None else None,
        int(length) if length is not None else None,
        peek=verb.upper() == "BODY.PEEK",
    )


def render_fetch(items: Sequence[FetchItem], row: MessageRow, body: bytes | None) -> bytes:
    out: list[bytes] = []
    for item in items:
        name = item.name
        if name == "FLAGS":
            out.append(b"FLAGS (" + " ".join(row.flags).encode() + b")")
        elif name == "UID":
            out.append(b"UID %d" % row.uid)
        elif name == "MODSEQ":
            out.append(b"MODSEQ (%d)" % row.modseq)
        elif name == "INTERNALDATE":
            out.append(b'INTERNALDATE "'
                       + row.internal_date.strftime("%d-%b-%Y %H:%M:%S %z").encode() + b'"')
        elif name == "RFC822.SIZE":
            out.append(b"RFC822.SIZE %d" % row.size)
        else:
            assert body is not None
            if name == "ENVELOPE":
                out.append(b"ENVELOPE " + _envelope(body))
            elif name in ("BODYSTRUCTURE", "BODY"):
                out.append(name.encode() + b" "
                           + body_structure(body, extended=name == "BODYSTRUCTURE"))
            elif name == "RFC822":
                out.append(b"RFC822 " + _literal(body))
            elif name == "RFC822.HEADER":
                out.append(b"RFC822.HEADER " + _literal(_split(body)[0]))
            elif name == "RFC822.TEXT":
                out.append(b"RFC822.TEXT " + _literal(_split(body)[1]))
            else:
                data = section_bytes(body, item)
                label = b"BODY[" + item.section.encode() + b"]"
                if item.origin is not None:
                    data = data[item.origin:item.origin + item.length
                                if item.length is not None else None]
                    label += b"<%d>" % item.origin
                out.append(label + b" " + _literal(data))
    return b" ".join(out)


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def _collapse(structure: Any) -> bytes:
    collapsed: bytes = imap4.collapseNestedLists([structure])
    return collapsed


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(header block with its blank line, body)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = data.find(separator)
        if index >= 0:
            return data[:index + len(separator)], data[index + len(separator):]
    return data, b""


def section_bytes(message: bytes, item: FetchItem) -> bytes:
    """The bytes of a BODY[section] (RFC 3501 §6.4.5)."""
    entity = message
    if item.part:
        found = _part_entity(message, item.part, item.kind)
        if found is None:
            return b""
        entity = found
    header, text = _split(entity)
    if item.kind == "":
        return text if item.part else entity
    if item.kind in ("HEADER", "MIME"):
        return header
    if item.kind == "TEXT":
        return text
    wanted = set(item.fields)
    keep = item.kind == "HEADER.FIELDS"
    lines: list[bytes] = []
    current = False
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if current:
                lines.append(line)
            continue
        current = (line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
                   in wanted) == keep
        if current:
            lines.append(line)
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def _part_entity(message: bytes, path: tuple[int, ...], kind: str) -> bytes | None:
    """The bytes of a MIME part (its own header and body), found by its part number."""
    entity = message
    for index in path:
        header, body = _split(entity)
        parsed = email.message_from_bytes(header, policy=email.policy.compat32)
        boundary = parsed.get_boundary() if parsed.get_content_maintype() == "multipart" \
            else None
        if boundary is None:
            if index != 1:
                return None
            if parsed.get_content_type() == "message/rfc822":
                entity = body
                continue
            # A single-part entity's part 1 is its body, with no header of its own.
            return b"\r\n" + body if kind != "MIME" else header
        parts = _multipart_parts(body, boundary.encode("ascii", "replace"))
        if index > len(parts):
            return None
        entity = parts[index - 1]
    return entity


def _multipart_parts(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = b"--" + boundary
    parts: list[bytes] = []
    chunks = re.split(rb"(?:^|\r\n)" + re.escape(delimiter) + rb"(--)?[ \t]*(?:\r\n|$)", body)
    # chunks: preamble, then (closing-marker, part) pairs.
    for i in range(1, len(chunks) - 1, 2):
        if chunks[i] == b"--":
            break
        parts.append(chunks[i + 1])
    return parts


# -- BODYSTRUCTURE (RFC 3501 §7.4.2), from the raw bytes so that sizes and lines are exact --


def _q(value: str | bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    # Header text here is the raw bytes read as Latin-1: written back byte for byte.
    data = value if isinstance(value, bytes) else value.encode("latin-1", "replace")
    if b"\r" in data or b"\n" in data or b"\0" in data or any(c >= 0x80 for c in data):
        return b"{%d}\r\n" % len(data) + data  # 8-bit text cannot be quoted (RFC 3501 §4.3)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _params(header: email.message.Message, name: str) -> bytes:
    params = header.get_params(header=name, unquote=True) or []
    pairs = []
    for key, value in params[1:]:  # the first is the value itself (e.g. text/plain)
        if isinstance(value, tuple):  # RFC 2231: (charset, language, value)
            value = email.utils.collapse_rfc2231_value(value)
        pairs.append(_q(key.lower()) + b" " + _q(str(value)))
    return b"(" + b" ".join(pairs) + b")" if pairs else b"NIL"


def _disposition(header: email.message.Message) -> bytes:
    value = header.get("Content-Disposition")
    if value is None:
        return b"NIL"
    kind = str(value).split(";", 1)[0].strip().lower()
    return b"(" + _q(kind) + b" " + _params(header, "content-disposition") + b")"


def _language(header: email.message.Message) -> bytes:
    value = header.get("Content-Language")
    if value is None:
        return b"NIL"
    tags = [t.strip() for t in str(value).split(",") if t.strip()]
    return b"(" + b" ".join(_q(t) for t in tags) + b")" if tags else b"NIL"


def _lines(body: bytes) -> int:
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def body_structure(entity: bytes, extended: bool, default: str = "text/plain") -> bytes:
    """BODY / BODYSTRUCTURE of a message or MIME part given as raw bytes (header + body)."""
    raw_header, body = _split(entity)
    # Latin-1 keeps every byte (8-bit parameter values stay exactly as sent).
    header = email.message_from_string(raw_header.decode("latin-1"),
                                       policy=email.policy.compat32)
    if header.get("Content-Type") is None:
        header.set_default_type(default)
    maintype = header.get_content_maintype()
    subtype = header.get_content_subtype()
    if maintype == "multipart":
        boundary = header.get_param("boundary")
        parts = _multipart_parts(body, str(boundary).encode("ascii", "replace")) \
            if isinstance(boundary, str) else []
        child_default = "message/rfc822" if subtype == "digest" else "text/plain"
        children = b"".join(body_structure(part, extended, child_default) for part in parts) \
            or b'("text" "plain" NIL NIL NIL "7bit" 0 0)'
        out = b"(" + children + b" " + _q(subtype)
        if extended:
            out += (b" " + _params(header, "content-type") + b" " + _disposition(header)
                    + b" " + _language(header) + b" " + _q(header.get("Content-Location")))
        return out + b")"
    params = _params(header, "content-type")
    if maintype == "text" and params == b"NIL":
        params = b'("charset" "us-ascii")'  # RFC 2045 §5.2 default
    fields = [
        _q(maintype), _q(subtype), params,
        _q(header.get("Content-ID")), _q(header.get("Content-Description")),
        _q(str(header.get("Content-Transfer-Encoding", "7bit")).strip().lower()),
        b"%d" % len(body),
    ]
    if maintype == "message" and subtype == "rfc822":
        fields.append(_envelope(body))
        fields.append(body_structure(body, extended))
        fields.append(b"%d" % _lines(body))
    elif maintype == "text":
        fields.append(b"%d" % _lines(body))
    if extended:
        fields += [_q(header.get("Content-MD5")), _disposition(header), _language(header),
                   _q(header.get("Content-Location"))]
    return b"(" + b" ".join(fields) + b")"


def _envelope(entity: bytes) -> bytes:
    """ENVELOPE (RFC 3501 §7.4.2) of a message given as raw bytes."""
    header = email.message_from_bytes(_split(entity)[0], policy=email.policy.compat32)
    return _collapse(imap4.getEnvelope(_Headers(header)))


class _Headers:
    """What Twisted's getEnvelope reads of a message: its header fields."""

    def __init__(self, message: email.message.Message) -> None:
        self._message = message

    def getHeaders(self, negate: bool, *names: str | bytes) -> dict[str, str]:
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        headers: dict[str, str] = {}
        for key, value in self._message.items():
            lower = key.lower()
            if (lower in wanted) != negate or not names:
                headers.setdefault(lower, str(value))
        return headers
