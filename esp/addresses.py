"""Mail addresses and domain names: parsing and normalisation (pure functions, no I/O).

Every address is stored and compared in one form: the local part lower-cased (every real mail
system treats local parts case-insensitively, RFC 5321 §2.4 notwithstanding) and the domain as a
lower-case IDNA A-label.  Quoted local parts are not accepted for hosted accounts.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 atext, plus any non-ASCII character (RFC 6531 local parts).
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+$")


class InvalidAddress(ValueError):
    """Not a mail address or domain name we accept; the message says what is wrong."""


@dataclass(frozen=True, order=True)
class Address:
    localpart: str
    domain: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"


def normalize_domain(text: str) -> str:
    """Lower-case A-label form of a domain: ``Bücher.Example`` → ``xn--bcher-kva.example``."""
    name = text.strip().rstrip(".")
    if not name:
        raise InvalidAddress("empty domain name")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise InvalidAddress(f"{text!r} is not a valid internationalised domain name") from e
    name = name.lower()
    if len(name) > 253:
        raise InvalidAddress(f"{text!r} is longer than 253 characters")
    labels = name.split(".")
    if len(labels) < 2:
        raise InvalidAddress(f"{text!r} is not a fully qualified domain name (no dot)")
    for label in labels:
        if not label:
            raise InvalidAddress(f"{text!r}: empty label (two dots in a row, or a leading dot)")
        if not _LABEL.match(label):
            raise InvalidAddress(
                f"{text!r}: label {label!r} must be 1-63 letters, digits or '-', "
                "not starting or ending with '-'"
            )
    if labels[-1].isdigit():
        raise InvalidAddress(f"{text!r} looks like an IP address, not a domain name")
    return name


def normalize_localpart(text: str) -> str:
    local = unicodedata.normalize("NFC", text).lower()
    if not local:
        raise InvalidAddress("empty local part")
    if len(local.encode("utf-8")) > 64:
        raise InvalidAddress(f"local part {text!r} is longer than 64 octets")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidAddress(f"local part {text!r}: dots may not lead, trail or repeat")
    if not all(_ATEXT.match(atom) for atom in local.split(".")):
        raise InvalidAddress(
            f"local part {text!r} may hold only letters, digits and !#$%&'*+/=?^_`{{|}}~-"
        )
    return local


# The same senders and recipients come again and again (each recipient of each message is
# parsed, and on submission the sender too): remembered, each costs a lookup instead of NFC
# normalisation, IDNA and a regular expression per atom.  An address is immutable; a refused
# one is not remembered (it raises).
@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> Address:
    """Parse ``local@domain`` into its normal form; raise :class:`InvalidAddress` otherwise."""
    value = text.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    local, at, domain = value.rpartition("@")
    if not at:
        raise InvalidAddress(f"{text!r} is not an address (no '@')")
    if any(c.isspace() or c in '"<>()[],;:\\' or ord(c) < 32 for c in local):
        raise InvalidAddress(f"{text!r}: quoted or special characters in the local part")
    return Address(normalize_localpart(local), normalize_domain(domain))
