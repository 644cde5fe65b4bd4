"""The searchable text of a message: what IMAP ``SEARCH BODY`` looks in.

The body as a reader sees it, not as it travels: every ``text/plain`` part decoded from its
transfer encoding (base64, quoted-printable) and its charset, ``text/html`` parts reduced to
their text (no tags, scripts or styles), the file names of attachments, and the same for
attached messages (``message/rfc822``).  Broken MIME gives what can be read, never an error.
The full-text index (:mod:`esp.storage.bodyindex`) is built from this text.
"""

from __future__ import annotations

import codecs
import email
import email.header
import email.message
import email.policy
from html.parser import HTMLParser

# Text kept per message: enough for any letter, bounded for PostgreSQL's tsvector (1 MiB) and
# for the work a single huge message can cause.
MAX_TEXT = 256 * 1024
# Parts looked at per message (a crafted message can have thousands).
MAX_PARTS = 200


class _HtmlText(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title"})
    # Tags that separate words; inline ones (b, i, span, a...) may sit inside a word.
    _BREAKS = frozenset({"address", "article", "aside", "blockquote", "br", "dd", "div", "dl",
                         "dt", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
                         "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table",
                         "tbody", "td", "th", "thead", "tr", "ul"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BREAKS:
            self.chunks.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BREAKS:
            self.chunks.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def html_text(html: str) -> str:
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: S110 (broken HTML: keep what was read)
        pass
    return " ".join("".join(parser.chunks).split())


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    if charset.lower() in ("us-ascii", "ascii"):
        charset = "utf-8"  # undeclared 8-bit text is most often UTF-8
    return payload.decode(charset, "replace")


def body_text(message: bytes) -> str:
    """The searchable text of ``message`` (at most MAX_TEXT characters)."""
    try:
        parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    except Exception:  # the parser rarely raises; never refuse a message here
        return ""
    chunks: list[str] = []
    size = 0
    for count, part in enumerate(parsed.walk()):
        if count >= MAX_PARTS or size >= MAX_TEXT:
            break
        try:
            text = _part_text(part)
        except Exception:  # noqa: S112 (one broken part does not hide the others)
            continue
        if text:
            chunks.append(text)
            size += len(text)
    return "\n".join(chunks)[:MAX_TEXT]


def _part_text(part: email.message.Message) -> str:
    if part.is_multipart():
        return ""
    pieces = []
    filename = part.get_filename()
    if filename:
        pieces.append(str(email.header.make_header(email.header.decode_header(filename))))
    kind = part.get_content_type()
    attached = (part.get_content_disposition() == "attachment")
    if kind == "text/plain" or (kind.startswith("text/") and kind != "text/html"
                                and not attached):
        pieces.append(_decode(part))
    elif kind == "text/html":
        pieces.append(html_text(_decode(part)))
    return "\n".join(pieces)
