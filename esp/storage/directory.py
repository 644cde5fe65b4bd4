"""The directory: domains, users, aliases and each user's mailboxes, in PostgreSQL.

Transaction functions (``*_txn``) hold the SQL; :class:`DirectoryStore` runs them on the pool for
the services, and the admin CLI runs the same functions on its own connection.  Addresses arrive
here already normalised by :mod:`esp.addresses`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg2.errors
import psycopg2.extras

from esp.addresses import Address, InvalidAddress, normalize_domain, parse_address
from esp.storage.db import Cursor, Database, Prepared
from esp.storage.maildir import Maildir, folder_directory, user_directory
from esp.storage.pgasync import AsyncDatabase

# RFC 6154 special-use mailboxes every new user gets, with INBOX.
DEFAULT_MAILBOXES: Sequence[tuple[str, str | None]] = (
    ("INBOX", None),
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
    ("Archive", "\\Archive"),
)
ROLES = ("user", "domain_admin", "superadmin")
# How far alias chains are followed, and how many addresses one recipient may expand into.
MAX_ALIAS_DEPTH = 10
MAX_EXPANSION = 1000


class DirectoryError(Exception):
    """A directory change cannot be made; the message says why in operator terms."""


class AlreadyExists(DirectoryError):
    pass


class NotFound(DirectoryError):
    pass


class UnknownRecipient(DirectoryError):
    """The address is in a hosted domain but names no user, alias or catch-all."""


class NotHosted(DirectoryError):
    """The address is not in a domain this server hosts."""


@dataclass(frozen=True)
class Domain:
    id: int
    name: str
    enabled: bool
    users: int = 0
    aliases: int = 0


@dataclass(frozen=True)
class User:
    id: int
    address: str
    domain_id: int
    display_name: str
    role: str
    enabled: bool
    maildir: str
    quota_bytes: int | None
    quota_messages: int | None
    used_bytes: int
    used_messages: int
    password_hash: str = field(default="", repr=False)
    domain_enabled: bool = True


@dataclass(frozen=True)
class Alias:
    source: str  # '@domain' for the catch-all
    destination: str


@dataclass(frozen=True)
class Resolution:
    """Where mail for one recipient goes: local users and external addresses."""

    users: tuple[User, ...]
    external: tuple[str, ...]


# -- domains ---------------------------------------------------------------------------------


def add_domain_txn(cur: Cursor, name: str) -> Domain:
    name = normalize_domain(name)
    try:
        cur.execute(
            "INSERT INTO domains (name) VALUES (%s) RETURNING id, name, enabled", (name,)
        )
    except psycopg2.errors.UniqueViolation:
        raise AlreadyExists(f"domain {name} already exists") from None
    row = cur.fetchone()
    assert row is not None
    return Domain(row[0], row[1], row[2])


def list_domains_txn(cur: Cursor) -> list[Domain]:
    cur.execute(
        """
        SELECT d.id, d.name, d.enabled,
               (SELECT count(*) FROM users u WHERE u.domain_id = d.id),
               (SELECT count(*) FROM aliases a WHERE a.domain_id = d.id)
        FROM domains d ORDER BY d.name
        """
    )
    return [Domain(*row) for row in cur.fetchall()]


def get_domain_txn(cur: Cursor, name: str) -> Domain:
    name = normalize_domain(name)
    cur.execute("SELECT id, name, enabled FROM domains WHERE name = %s", (name,))
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"domain {name} is not hosted here")
    return Domain(row[0], row[1], row[2])


def remove_domain_txn(cur: Cursor, name: str) -> Domain:
    domain = get_domain_txn(cur, name)
    cur.execute("SELECT count(*) FROM users WHERE domain_id = %s", (domain.id,))
    row = cur.fetchone()
    users = row[0] if row else 0
    if users:
        raise DirectoryError(
            f"domain {domain.name} still has {users} user(s); remove them first"
        )
    cur.execute("DELETE FROM domains WHERE id = %s", (domain.id,))
    return domain


# -- users -----------------------------------------------------------------------------------

_USER_COLUMNS = """
    u.id, u.localpart || '@' || d.name, u.domain_id, u.display_name, u.role, u.enabled,
    u.maildir, u.quota_bytes, u.quota_messages, u.used_bytes, u.used_messages,
    u.password_hash, d.enabled
"""


def _user(row: Sequence[object]) -> User:
    return User(*row)  # type: ignore[arg-type]


def add_user_txn(
    cur: Cursor,
    address: Address,
    password_hash: str,
    maildir_root: Path,
    display_name: str = "",
    role: str = "user",
    quota_bytes: int | None = None,
    quota_messages: int | None = None,
) -> User:
    """Create a user with INBOX and the special-use mailboxes, and their Maildir folders."""
    if role not in ROLES:
        raise DirectoryError(f"role {role!r} is not one of {', '.join(ROLES)}")
    domain = get_domain_txn(cur, address.domain)
    relative = user_directory(domain.name, address.localpart)
    root = Maildir(maildir_root / relative)
    if root.holds_mail():
        raise DirectoryError(
            f"{root.path} already holds mail (of an earlier account?); move it away first"
        )
    try:
        cur.execute(
            """
            INSERT INTO users (domain_id, localpart, password_hash, display_name, role,
                               maildir, quota_bytes, quota_messages)
            VALUES (%s, %s, %s, %s, %s, %s,
                    COALESCE(%s, (SELECT default_quota_bytes FROM domains WHERE id = %s)), %s)
            RETURNING id
            """,
            (
                domain.id, address.localpart, password_hash, display_name, role, relative,
                quota_bytes, domain.id, quota_messages,
            ),
        )
    except psycopg2.errors.UniqueViolation:
        raise AlreadyExists(f"user {address} already exists") from None
    row = cur.fetchone()
    assert row is not None
    user_id = row[0]
    for name, special_use in DEFAULT_MAILBOXES:
        folder = folder_directory(name)
        cur.execute(
            """
            INSERT INTO mailboxes (user_id, name, special_use, folder)
            VALUES (%s, %s, %s, %s)
            """,
            (user_id, name, special_use, folder),
        )
        # Made before the commit: a user row never exists without its Maildir.  Should the
        # commit fail, the empty directories are reused when the user is added again.
        root.folder(folder).create()
    return get_user_txn(cur, address)


def get_user_txn(cur: Cursor, address: Address) -> User:
    cur.execute(
        f"""
        SELECT {_USER_COLUMNS}
        FROM users u JOIN domains d ON d.id = u.domain_id
        WHERE d.name = %s AND u.localpart = %s
        """,
        (address.domain, address.localpart),
    )
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"no user {address}")
    return _user(row)


def user_by_id_txn(cur: Cursor, user_id: int) -> User | None:
    cur.execute(
        f"SELECT {_USER_COLUMNS} FROM users u JOIN domains d ON d.id = u.domain_id "
        "WHERE u.id = %s",
        (user_id,),
    )
    row = cur.fetchone()
    return None if row is None else _user(row)


def record_audit_txn(
    cur: Cursor, actor: str, actor_ip: str | None, action: str, target: str | None,
    details: dict[str, object],
) -> None:
    """One line of the audit log: who (and from where) did what to what."""
    cur.execute(
        "INSERT INTO audit_log (actor, actor_ip, action, target, details) "
        "VALUES (%s, %s, %s, %s, %s)",
        (actor, actor_ip, action, target, psycopg2.extras.Json(details)),
    )


def find_user_txn(cur: Cursor, address: Address) -> User | None:
    try:
        return get_user_txn(cur, address)
    except NotFound:
        return None


def list_users_txn(cur: Cursor, domain: str | None = None) -> list[User]:
    if domain is not None:
        get_domain_txn(cur, domain)
        cur.execute(
            f"""
            SELECT {_USER_COLUMNS} FROM users u JOIN domains d ON d.id = u.domain_id
            WHERE d.name = %s ORDER BY d.name, u.localpart
            """,
            (normalize_domain(domain),),
        )
    else:
        cur.execute(
            f"""
            SELECT {_USER_COLUMNS} FROM users u JOIN domains d ON d.id = u.domain_id
            ORDER BY d.name, u.localpart
            """
        )
    return [_user(row) for row in cur.fetchall()]


def set_password_txn(cur: Cursor, address: Address, password_hash: str) -> None:
    user = get_user_txn(cur, address)
    cur.execute(
        "UPDATE users SET password_hash = %s, updated_at = now() WHERE id = %s",
        (password_hash, user.id),
    )


def record_login_txn(cur: Cursor, user_id: int, new_hash: str | None = None) -> None:
    """Note a successful login, storing a re-computed hash when the parameters changed."""
    cur.execute(
        """
        UPDATE users SET last_login_at = now(),
                         password_hash = COALESCE(%s, password_hash)
        WHERE id = %s
        """,
        (new_hash, user_id),
    )


def remove_user_txn(cur: Cursor, address: Address) -> User:
    """Delete the user and its mailbox index.  The caller moves the Maildir aside after the
    commit (:func:`esp.storage.maildir.retire`): the files stay for the operator."""
    user = get_user_txn(cur, address)
    cur.execute("DELETE FROM users WHERE id = %s", (user.id,))
    return user


# -- aliases ---------------------------------------------------------------------------------


def parse_alias_source(text: str) -> Address:
    """``alias@domain``, or ``@domain`` for the domain's catch-all (localpart '')."""
    value = text.strip()
    if value.startswith("@"):
        return Address("", normalize_domain(value[1:]))
    return parse_address(value)


def _format_source(localpart: str, domain: str) -> str:
    return f"{localpart}@{domain}"


def add_alias_txn(cur: Cursor, source: Address, destination: Address) -> Alias:
    domain = get_domain_txn(cur, source.domain)
    if source == destination:
        # Postfix's idiom "bob -> bob, carol": keep a copy in the mailbox and forward one.
        if find_user_txn(cur, source) is None:
            raise DirectoryError(f"alias {source} cannot point at itself")
    elif _is_hosted(cur, destination.domain) and not _exists_locally(cur, destination):
        raise NotFound(
            f"{destination} is in a hosted domain but is neither a user nor an alias"
        )
    if source.localpart and source != destination and _reaches(cur, destination, source):
        raise DirectoryError(f"alias {source} -> {destination} would make a loop")
    try:
        cur.execute(
            "INSERT INTO aliases (domain_id, localpart, destination) VALUES (%s, %s, %s)",
            (domain.id, source.localpart, str(destination)),
        )
    except psycopg2.errors.UniqueViolation:
        raise AlreadyExists(
            f"alias {_format_source(source.localpart, source.domain)} -> {destination} "
            "already exists"
        ) from None
    return Alias(_format_source(source.localpart, domain.name), str(destination))


def list_aliases_txn(cur: Cursor, domain: str | None = None) -> list[Alias]:
    query = """
        SELECT a.localpart, d.name, a.destination
        FROM aliases a JOIN domains d ON d.id = a.domain_id
    """
    if domain is not None:
        get_domain_txn(cur, domain)
        cur.execute(
            query + " WHERE d.name = %s ORDER BY d.name, a.localpart, a.destination",
            (normalize_domain(domain),),
        )
    else:
        cur.execute(query + " ORDER BY d.name, a.localpart, a.destination")
    return [Alias(_format_source(local, dom), dest) for local, dom, dest in cur.fetchall()]


def remove_alias_txn(
    cur: Cursor, source: Address, destination: Address | None = None
) -> list[Alias]:
    """Remove one destination of an alias, or all of them; return what was removed."""
    domain = get_domain_txn(cur, source.domain)
    if destination is None:
        cur.execute(
            "DELETE FROM aliases WHERE domain_id = %s AND localpart = %s RETURNING destination",
            (domain.id, source.localpart),
        )
    else:
        cur.execute(
            """
            DELETE FROM aliases WHERE domain_id = %s AND localpart = %s AND destination = %s
            RETURNING destination
            """,
            (domain.id, source.localpart, str(destination)),
        )
    removed = [Alias(_format_source(source.localpart, domain.name), r[0]) for r in cur]
    if not removed:
        raise NotFound(f"no alias {_format_source(source.localpart, domain.name)}"
                       + (f" -> {destination}" if destination else ""))
    return removed


def is_hosted_txn(cur: Cursor, domain: str) -> bool:
    """Whether mail for ``domain`` is delivered here."""
    return _is_hosted(cur, domain.lower())


def _is_hosted(cur: Cursor, domain: str) -> bool:
    cur.execute("SELECT 1 FROM domains WHERE name = %s", (domain,))
    return cur.fetchone() is not None


def _alias_targets(cur: Cursor, address: Address) -> list[str]:
    cur.execute(
        """
        SELECT a.destination FROM aliases a JOIN domains d ON d.id = a.domain_id
        WHERE d.name = %s AND a.localpart = %s ORDER BY a.destination
        """,
        (address.domain, address.localpart),
    )
    return [row[0] for row in cur.fetchall()]


def _exists_locally(cur: Cursor, address: Address) -> bool:
    return find_user_txn(cur, address) is not None or bool(_alias_targets(cur, address))


def _reaches(cur: Cursor, start: Address, goal: Address) -> bool:
    seen = {start}
    frontier = [start]
    while frontier:
        current = frontier.pop()
        if current == goal:
            return True
        for target in _alias_targets(cur, current):
            address = parse_address(target)
            if address not in seen and len(seen) < MAX_EXPANSION:
                seen.add(address)
                frontier.append(address)
    return False


# -- recipient resolution --------------------------------------------------------------------


_lookup = Prepared(
    "esp_lookup_address",
    f"""
    SELECT (SELECT coalesce(array_agg(a.destination ORDER BY a.destination), '{{}}')
            FROM aliases a WHERE a.domain_id = d.id AND a.localpart = %(local)s::text),
           {_USER_COLUMNS}
    FROM domains d LEFT JOIN users u ON u.domain_id = d.id AND u.localpart = %(local)s::text
    WHERE d.name = %(domain)s::text
    """,
)


def _lookup_txn(cur: Cursor, address: Address) -> tuple[bool, User | None, list[str]]:
    """One round trip for the common case: is the domain hosted, the user, the alias targets."""
    _lookup.execute(cur, _lookup_params(address))
    return _lookup_result(cur.fetchone())


def _lookup_params(address: Address) -> dict[str, object]:
    return {"local": address.localpart, "domain": address.domain}


def _lookup_result(row: Sequence[Any] | None) -> tuple[bool, User | None, list[str]]:
    if row is None:
        return False, None, []
    targets = list(row[0])
    user = _user(row[1:]) if row[1] is not None else None
    return True, user, targets


def resolve_recipient_txn(
    cur: Cursor, address: Address, delimiter: str = "+", use_catch_all: bool = True
) -> Resolution:
    """Expand a recipient into local users and external addresses.

    Order, as Postfix's virtual maps: an alias for the exact address (an alias may name the
    user itself to keep a copy), then the user, then ``local+detail`` as ``local``, then the
    domain's catch-all.  Alias chains are followed to :data:`MAX_ALIAS_DEPTH`; loops end where
    an address repeats.
    """
    memo: dict[Address, tuple[bool, User | None, list[str]]] = {}

    def lookup(a: Address) -> tuple[bool, User | None, list[str]]:
        if a not in memo:
            memo[a] = _lookup_txn(cur, a)
        return memo[a]

    if not lookup(address)[0]:
        raise NotHosted(f"{address.domain} is not a domain hosted here")
    users: dict[int, User] = {}
    external: dict[str, None] = {}
    seen: set[Address] = set()

    def expand(current: Address, depth: int) -> bool:
        if current in seen or len(seen) >= MAX_EXPANSION or depth > MAX_ALIAS_DEPTH:
            return True  # a loop or a runaway chain: this branch adds nothing more
        seen.add(current)
        hosted, _, _ = lookup(current)
        if not hosted:
            external[str(current)] = None
            return True
        for candidate in _candidates(current, delimiter):
            _, user, targets = lookup(candidate)
            if targets:
                for target in targets:
                    try:
                        destination = parse_address(target)
                    except InvalidAddress:
                        continue
                    if destination == candidate:
                        if user is not None:
                            users[user.id] = user
                        continue
                    expand(destination, depth + 1)
                return True
            if user is not None:
                users[user.id] = user
                return True
        catch_all = lookup(Address("", current.domain))[2] if use_catch_all else []
        for target in catch_all:
            try:
                expand(parse_address(target), depth + 1)
            except InvalidAddress:
                continue
        return bool(catch_all)

    if not expand(address, 0) or (not users and not external):
        raise UnknownRecipient(f"{address}: no such user here")
    return Resolution(tuple(users.values()), tuple(external))


def _candidates(address: Address, delimiter: str) -> list[Address]:
    found = [address]
    if delimiter and delimiter in address.localpart:
        base = address.localpart.split(delimiter, 1)[0]
        if base:
            found.append(Address(base, address.domain))
    return found


def may_send_as_txn(cur: Cursor, user_id: int, address: Address) -> bool:
    """Whether a user may use ``address`` as sender: their own address (``+detail`` too) or an
    alias that reaches them.  A catch-all does not count: it would let a user send as anyone."""
    try:
        resolution = resolve_recipient_txn(cur, address, use_catch_all=False)
    except (UnknownRecipient, NotHosted):
        return False
    return any(user.id == user_id for user in resolution.users)


# -- the asynchronous face used by services ---------------------------------------------------


class DirectoryStore:
    """Directory operations for services, each a named transaction on the pool."""

    # Most recipients cached at once; past that the cache starts afresh.
    CACHE_SIZE = 10_000

    def __init__(
        self,
        db: Database,
        maildir_root: Path,
        fast: AsyncDatabase | None = None,
        cache_seconds: float = 0.0,
    ) -> None:
        self._db = db
        self._maildir_root = maildir_root
        self._fast = fast
        # Plain-user recipients found in the last ``cache_seconds``: a busy MX asks for the
        # same few addresses hundreds of times a second.  Only positive answers are kept, so
        # a new user or alias is found at once; a removed one, or a quota just filled, is
        # noticed within ``cache_seconds`` (the store still refuses a vanished mailbox).
        self._cache_seconds = cache_seconds
        self._cache: dict[Address, tuple[float, Resolution]] = {}
        self._cached_for: dict[int, set[Address]] = {}  # user id → its cached addresses

    async def find_user(self, address: Address) -> User | None:
        return await self._db.run("find_user", find_user_txn, address)

    async def record_login(self, user_id: int, new_hash: str | None = None) -> None:
        await self._db.run("record_login", record_login_txn, user_id, new_hash)

    async def resolve_recipient(self, address: Address) -> Resolution:
        if self._fast is not None:
            now = time.monotonic()
            cached = self._cache.get(address)
            if cached is not None and cached[0] > now:
                return cached[1]
            # The common case, a plain user, in one statement on the reactor; aliases,
            # +details and catch-alls take the full resolution below.
            rows = await self._fast.fetch(_lookup, _lookup_params(address))
            hosted, user, targets = _lookup_result(rows[0] if rows else None)
            if not hosted:
                raise NotHosted(f"{address.domain} is not a domain hosted here")
            if user is not None and not targets:
                resolution = Resolution((user,), ())
                if self._cache_seconds > 0:
                    if len(self._cache) >= self.CACHE_SIZE:
                        self._cache.clear()
                        self._cached_for.clear()
                    self._cache[address] = (now + self._cache_seconds, resolution)
                    self._cached_for.setdefault(user.id, set()).add(address)
                return resolution
        return await self._db.run("resolve_recipient", resolve_recipient_txn, address)

    def count_stored(self, user_id: int, size: int) -> None:
        """A message of ``size`` bytes was stored for ``user_id``: the cached usage follows, so
        the quota check of the next recipient sees it (deliveries by other processes show
        when the cached answer expires)."""
        for address in self._cached_for.get(user_id, ()):
            entry = self._cache.get(address)
            if entry is None:
                continue
            expires, resolution = entry
            users = tuple(
                replace(u, used_bytes=u.used_bytes + size, used_messages=u.used_messages + 1)
                if u.id == user_id else u
                for u in resolution.users
            )
            self._cache[address] = (expires, Resolution(users, resolution.external))

    async def may_send_as(self, user_id: int, address: Address) -> bool:
        return await self._db.run("may_send_as", may_send_as_txn, user_id, address)
