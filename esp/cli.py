"""``esp``: the operator's command line (migrate, domains, users, aliases, DKIM keys, the
outbound queue, the suppression list and API keys).

It works on the configured database directly: the embedded cluster of the data directory (started
for the command and stopped again when ESP is not running) or the server of the DSN.  It runs
the same transaction functions as the services, and records each change in the audit log.

Exit status: 0 done; 1 the change was refused (duplicate, unknown domain...); 2 bad usage or
input; 69 the database is unavailable; 78 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import psycopg2.extensions

from esp.addresses import InvalidAddress, normalize_domain, parse_address
from esp.auth import PasswordHasher, WeakPassword, check_new_password
from esp.config import Config, ConfigError, default_config_path, load_config
from esp.dns import Resolver
from esp.filters.pipeline import installed_filters
from esp.message import split_header
from esp.storage import apikeys, directory, dkimkeys, manage, queue
from esp.storage.cluster import ClusterError, EmbeddedCluster
from esp.storage.db import Cursor, DatabaseUnavailable, connect, run_sync
from esp.storage.maildir import retire
from esp.storage.migrations import MigrationError, apply_migrations_txn, load_migrations
from esp.webhooks import guard

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78


class UsageProblem(Exception):
    """Bad input from the operator (exit status 2)."""


# -- connecting --------------------------------------------------------------------------------


@contextmanager
def open_database(config: Config) -> Iterator[psycopg2.extensions.connection]:
    """A connection to the configured database with the schema up to date.

    For the embedded cluster: when ESP is running, its cluster is used as it is; otherwise the
    cluster is started for this command and stopped afterwards.
    """
    cluster = None
    started = False
    if config.embedded_database:
        embedded = config.storage.database.embedded
        cluster = EmbeddedCluster(
            config.data_dir / "pg",
            bin_dir=embedded.bin_dir,
            run_as=embedded.run_as,
            startup_timeout=embedded.startup_timeout,
        )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        # Owning the cluster means ESP is not running: start it for this command and stop it
        # after.  Otherwise ESP owns it and it is running; use it and leave it alone.
        if cluster.try_own():
            started = cluster.start()
        elif not cluster.is_running():
            raise ClusterError("ESP is starting or stopping the database; try again shortly")
        dsn = cluster.dsn
    else:
        dsn = config.storage.database.dsn or ""
    try:
        connection = connect(dsn, application_name="esp-cli")
        try:
            run_sync(connection, apply_migrations_txn, load_migrations())
            yield connection
        finally:
            connection.close()
    finally:
        if cluster is not None:
            try:
                if started:
                    cluster.stop()
            finally:
                cluster.disown()


def _actor() -> str:
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    return f"cli:{name}"


def _audit_txn(cur: Cursor, action: str, target: str, details: dict[str, Any]) -> None:
    cur.execute(
        "INSERT INTO audit_log (actor, action, target, details) VALUES (%s, %s, %s, %s)",
        (_actor(), action, target, json.dumps(details)),
    )


def _change(
    action: str, target: str, fn: Callable[..., Any], *args: Any, **details: Any
) -> Callable[[Cursor], Any]:
    """A transaction that makes a change and writes its audit record in the same commit."""

    def txn(cur: Cursor) -> Any:
        result = fn(cur, *args)
        _audit_txn(cur, action, target, details)
        return result

    return txn


# -- passwords ---------------------------------------------------------------------------------


def read_password(from_stdin: bool, stdin: TextIO, prompt_for: str) -> str:
    if from_stdin:
        line = stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not stdin.isatty():
            raise UsageProblem(
                "no terminal to ask for the password on; pipe it in with --password-stdin"
            )
        password = getpass.getpass(f"New password for {prompt_for}: ")
        if getpass.getpass("Repeat it: ") != password:
            raise UsageProblem("the two passwords differ")
    try:
        check_new_password(password)
    except WeakPassword as e:
        raise UsageProblem(str(e)) from None
    return password


def parse_size(text: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``2G`` (binary units) → bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    if value and value[-1] in units:
        factor, value = units[value[-1]], value[:-1]
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500M, 2G)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return number * factor


# -- commands ----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    migrations = load_migrations()
    with open_database(config) as connection:
        # open_database has migrated already; a second run proves nothing is left to apply.
        pending = run_sync(connection, apply_migrations_txn, migrations)
    assert pending == []
    out.write(f"schema at version {migrations[-1].version}\n")
    return 0


def cmd_domain_add(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        domain = run_sync(
            connection,
            _change("domain.add", args.name, directory.add_domain_txn, args.name),
        )
    out.write(f"domain {domain.name} added\n")
    return 0


def cmd_domain_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        domains = run_sync(connection, directory.list_domains_txn)
    if args.json:
        out.write(json.dumps([d.__dict__ for d in domains], indent=2) + "\n")
        return 0
    for d in domains:
        state = "" if d.enabled else " (disabled)"
        out.write(f"{d.name}\t{d.users} users\t{d.aliases} aliases{state}\n")
    return 0


def cmd_domain_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        domain = run_sync(
            connection,
            _change("domain.remove", args.name, directory.remove_domain_txn, args.name),
        )
    out.write(f"domain {domain.name} removed\n")
    return 0


def _address(text: str) -> Any:
    try:
        return parse_address(text)
    except InvalidAddress as e:
        raise UsageProblem(f"bad address: {e}") from None


def cmd_user_add(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    address = _address(args.address)
    password = read_password(args.password_stdin, sys.stdin, str(address))
    hashed = PasswordHasher(config.security.auth.argon2).hash(password)
    with open_database(config) as connection:
        user = run_sync(
            connection,
            _change(
                "user.add",
                str(address),
                lambda cur: directory.add_user_txn(
                    cur,
                    address,
                    hashed,
                    config.maildir_root,
                    display_name=args.name or "",
                    role=args.role,
                    quota_bytes=args.quota,
                ),
                role=args.role,
            ),
        )
    out.write(f"user {user.address} added (Maildir {config.maildir_root / user.maildir})\n")
    return 0


def cmd_user_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        users = run_sync(connection, directory.list_users_txn, args.domain)
    if args.json:
        rows = [
            {k: v for k, v in u.__dict__.items() if k != "password_hash"} for u in users
        ]
        out.write(json.dumps(rows, indent=2) + "\n")
        return 0
    for u in users:
        quota = "unlimited" if u.quota_bytes is None else f"{u.quota_bytes} bytes"
        state = "" if u.enabled else " (disabled)"
        out.write(f"{u.address}\t{u.role}\tquota {quota}\tused {u.used_bytes} bytes{state}\n")
    return 0


def cmd_user_passwd(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    address = _address(args.address)
    with open_database(config) as connection:
        # Fail on an unknown user before asking for a password.
        run_sync(connection, directory.get_user_txn, address)
        password = read_password(args.password_stdin, sys.stdin, str(address))
        hashed = PasswordHasher(config.security.auth.argon2).hash(password)
        run_sync(
            connection,
            _change("user.passwd", str(address), directory.set_password_txn, address, hashed),
        )
    out.write(f"password of {address} changed\n")
    return 0


def cmd_user_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    address = _address(args.address)
    with open_database(config) as connection:
        user = run_sync(
            connection,
            _change("user.remove", str(address), directory.remove_user_txn, address),
        )
    kept = retire(config.maildir_root, user.maildir)
    where = f"; its mail was moved to {kept} until you delete it" if kept else ""
    out.write(f"user {user.address} removed{where}\n")
    return 0


def _alias_source(text: str) -> Any:
    try:
        return directory.parse_alias_source(text)
    except InvalidAddress as e:
        raise UsageProblem(f"bad alias: {e}") from None


def cmd_alias_add(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    source = _alias_source(args.source)
    destination = _address(args.destination)
    with open_database(config) as connection:
        alias = run_sync(
            connection,
            _change(
                "alias.add", args.source, directory.add_alias_txn, source, destination,
                destination=str(destination),
            ),
        )
    out.write(f"alias {alias.source} -> {alias.destination} added\n")
    return 0


def cmd_alias_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        aliases = run_sync(connection, directory.list_aliases_txn, args.domain)
    if args.json:
        out.write(json.dumps([a.__dict__ for a in aliases], indent=2) + "\n")
        return 0
    for a in aliases:
        out.write(f"{a.source}\t{a.destination}\n")
    return 0


def cmd_alias_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    source = _alias_source(args.source)
    destination = _address(args.destination) if args.destination else None
    with open_database(config) as connection:
        removed = run_sync(
            connection,
            _change(
                "alias.remove", args.source, directory.remove_alias_txn, source, destination
            ),
        )
    for a in removed:
        out.write(f"alias {a.source} -> {a.destination} removed\n")
    return 0


# -- API keys ----------------------------------------------------------------------------------


def _key_line(key: apikeys.ApiKey) -> str:
    state = " (revoked)" if key.revoked_at else ""
    where = f"\tdomain {key.domain}" if key.domain else ""
    scopes = ",".join(key.scopes)
    return f"{key.id}\t{key.prefix}...\t{key.owner}\t{key.name}\t{scopes}{where}{state}\n"


def cmd_apikey_create(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    address = _address(args.user)
    scopes = sorted(set(args.scope))
    unknown = [s for s in scopes if s not in apikeys.SCOPES]
    if unknown:
        raise UsageProblem(f"unknown scope(s) {', '.join(unknown)}; "
                           f"known: {', '.join(apikeys.SCOPES)}")
    expires = None
    if args.expires:
        try:
            expires = datetime.fromisoformat(args.expires)
        except ValueError:
            raise UsageProblem(f"--expires {args.expires!r} is not an ISO 8601 time") from None
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)

    def create(cur: Cursor) -> tuple[apikeys.ApiKey, str]:
        user = directory.get_user_txn(cur, address)
        domain_id = None
        if args.domain:
            domain_id = directory.get_domain_txn(cur, args.domain).id
        return apikeys.create_key_txn(cur, user.id, args.name, scopes, domain_id, expires)

    with open_database(config) as connection:
        key, secret = run_sync(connection, _change(
            "apikey.create", str(address), create, name=args.name, scopes=scopes,
            domain=args.domain))
    out.write(f"API key {key.id} for {key.owner} ({', '.join(key.scopes)}); it is shown "
              f"only now:\n{secret}\n")
    return 0


def cmd_apikey_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        user_id = None
        if args.user:
            user_id = run_sync(connection, directory.get_user_txn, _address(args.user)).id
        keys, _ = run_sync(connection, apikeys.list_keys_txn, user_id, None, 10_000, 0)
    for key in keys:
        out.write(_key_line(key))
    return 0


def cmd_apikey_revoke(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        key = run_sync(connection, _change(
            "apikey.revoke", f"key {args.id}", apikeys.revoke_key_txn, args.id))
    if key is None:
        raise Refused(f"no API key {args.id}")
    out.write(f"API key {key.id} ({key.name}, of {key.owner}) revoked\n")
    return 0


# -- webhooks ----------------------------------------------------------------------------------


def cmd_webhook_add(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    allow = guard.networks(config.events.webhooks.allow_networks)
    resolver = Resolver(config.server.dns.nameservers, config.server.dns.timeout)
    try:
        guard.check_url(args.url, allow, resolver)
    except guard.Refused as e:
        raise UsageProblem(f"{args.url}: {e}") from None
    patterns = tuple(dict.fromkeys(args.event))
    bad = [p for p in patterns if not _EVENT_PATTERN.match(p)]
    if bad:
        raise UsageProblem(f"not event patterns: {', '.join(bad)} (e.g. message.received, "
                           "message.*, #)")

    def add(cur: Cursor) -> manage.WebhookRow:
        domain_id = directory.get_domain_txn(cur, args.domain).id if args.domain else None
        return manage.create_webhook_txn(cur, args.url, sorted(patterns), domain_id, True)

    with open_database(config) as connection:
        row = run_sync(connection, _change("webhook.create", args.url, add,
                                           event_types=sorted(patterns), domain=args.domain))
    out.write(f"webhook {row.id} added; its signing secret is shown only now:\n{row.secret}\n")
    return 0


def cmd_webhook_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        rows, _ = run_sync(connection, manage.page_webhooks_txn, None, 10_000, 0)
    for row in rows:
        state = "" if row.enabled else f" (disabled: {row.disabled_reason or 'by hand'})"
        scope = f"\tdomain {row.domain}" if row.domain else ""
        out.write(f"{row.id}\t{row.url}\t{','.join(row.event_types)}{scope}{state}\n")
    return 0


def cmd_webhook_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    def remove(cur: Cursor) -> manage.WebhookRow:
        row = manage.get_webhook_txn(cur, args.id)
        if row is None:
            raise Refused(f"no webhook {args.id}")  # rolled back: nothing to audit
        manage.delete_webhook_txn(cur, args.id)
        return row

    with open_database(config) as connection:
        row = run_sync(connection, _change("webhook.remove", f"webhook {args.id}", remove))
    out.write(f"webhook {row.id} ({row.url}) removed\n")
    return 0


# -- filters -----------------------------------------------------------------------------------


def cmd_filters_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    factories = installed_filters()
    chain = config.filters.chain
    if args.json:
        out.write(json.dumps([
            {"name": name, "description": f.description, "in_chain": name in chain,
             "sends_mail_off_machine": bool(getattr(f, "sends_mail_off_machine", False)),
             "settings": f.settings.model_json_schema()}
            for name, f in sorted(factories.items())], indent=2) + "\n")
        return 0
    for name, factory in sorted(factories.items()):
        where = f" (position {chain.index(name) + 1} in the chain)" if name in chain else ""
        out.write(f"{name}{where}: {factory.description}\n")
        schema = factory.settings.model_json_schema()
        for key, prop in schema.get("properties", {}).items():
            default = f" (default {json.dumps(prop['default'])})" if "default" in prop else ""
            about = f": {prop['description']}" if "description" in prop else ""
            out.write(f"    {key}{default}{about}\n")
    return 0


# -- argument parsing --------------------------------------------------------------------------


# -- DKIM keys ---------------------------------------------------------------------------------


def _dkim_record(key: dkimkeys.DKIMKey) -> str:
    # One TXT record, split into strings of at most 255 bytes (RFC 7208 §3.3 style).
    value = key.dns_value
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    state = "" if key.active else "  ; inactive"
    return f"{key.dns_name}. IN TXT {chunks}{state}\n"


def cmd_dkim_generate(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    domain = normalize_domain(args.domain)
    selector = args.selector or config.security.dkim.default_selector
    if args.algorithm == "ed25519" and not args.selector:
        selector += "-ed25519"  # both kinds side by side under the default selector
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", selector):
        raise UsageProblem(f"{selector!r} is not a DKIM selector (a-z, 0-9 and -)")
    box = dkimkeys.SecretBox(config.dkim_secret_file, create=True)
    with open_database(config) as connection:
        key = run_sync(connection, _change(
            "dkim.generate", domain, dkimkeys.add_key_txn, box, domain, selector,
            dkimkeys.ALGORITHMS[args.algorithm], selector=selector, algorithm=args.algorithm,
        ))
    out.write(f"DKIM key {selector} ({key.algorithm}) generated for {domain}; publish:\n")
    out.write(_dkim_record(key))
    return 0


def cmd_dkim_show(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    domain = normalize_domain(args.domain)
    with open_database(config) as connection:
        keys = run_sync(connection, dkimkeys.list_keys_txn, domain)
    if not keys:
        raise UsageProblem(f"{domain} has no DKIM key (esp dkim generate {domain})")
    for key in keys:
        out.write(_dkim_record(key))
    return 0


# -- outbound queue and suppression list ---------------------------------------------------------


_EVENT_PATTERN = re.compile(r"^(#|[a-z_]+(\.([a-z_]+|\*))*)$")


class Refused(Exception):
    """The change cannot be made as asked (exit status 1)."""


def _queue_line(entry: queue.QueueEntry) -> str:
    pending = [a for a, status, _ in entry.recipients if status in ("queued", "deferred")]
    when = entry.next_attempt_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    error = f"\t{entry.last_error}" if entry.last_error else ""
    return (f"{entry.queue_id}\t{entry.status}\t{entry.size}\t<{entry.sender}>\t"
            f"{','.join(pending) or entry.recipient_domain}\tattempts {entry.attempts}\t"
            f"next {when}{error}\n")


def cmd_queue_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        entries = run_sync(connection, queue.list_queue_txn, args.all)
    if args.json:
        out.write(json.dumps([_entry_json(e) for e in entries], indent=2) + "\n")
        return 0
    for entry in entries:
        out.write(_queue_line(entry))
    return 0


def _entry_json(entry: queue.QueueEntry) -> dict[str, Any]:
    return {
        "id": entry.queue_id, "message_id": entry.message_id, "sender": entry.sender,
        "domain": entry.recipient_domain, "status": entry.status, "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at.isoformat(), "last_error": entry.last_error,
        "created_at": entry.created_at.isoformat(), "size": entry.size,
        "recipients": [{"address": a, "status": s, "last_error": e}
                       for a, s, e in entry.recipients],
    }


def cmd_queue_show(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        entry = run_sync(connection, queue.get_queue_entry_txn, args.id)
    if entry is None:
        raise Refused(f"no queue entry {args.id}")
    if args.json:
        out.write(json.dumps(_entry_json(entry), indent=2) + "\n")
        return 0
    out.write(_queue_line(entry))
    for address, status, error in entry.recipients:
        out.write(f"  <{address}>\t{status}" + (f"\t{error}" if error else "") + "\n")
    path = config.spool_dir / "new" / entry.spool_name
    if args.headers and path.exists():
        header, _ = split_header(path.read_bytes())
        out.write(header.decode("utf-8", "replace").replace("\r\n", "\n"))
    return 0


def cmd_queue_retry(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        count = run_sync(connection, _change(
            "queue.retry", ",".join(map(str, args.ids)), queue.retry_txn, args.ids))
    if count < len(args.ids):
        out.write(f"{count} of {len(args.ids)} entries were waiting and are due now\n")
        return EXIT_REFUSED if count == 0 else 0
    out.write(f"{count} entries due now\n")
    return 0


def cmd_queue_flush(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        count = run_sync(connection, _change("queue.flush", "*", queue.retry_txn, None))
    out.write(f"{count} entries due now\n")
    return 0


def cmd_queue_delete(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        deleted, spool = run_sync(connection, _change(
            "queue.delete", str(args.id), queue.delete_txn, args.id))
    if not deleted:
        raise Refused(f"queue entry {args.id} is not waiting (unknown, done or being "
                      "delivered right now)")
    if spool is not None:
        (config.spool_dir / "new" / spool).unlink(missing_ok=True)
    out.write(f"queue entry {args.id} deleted (no report goes to the sender)\n")
    return 0


def cmd_suppression_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    domain = normalize_domain(args.domain) if args.domain else None
    with open_database(config) as connection:
        entries = run_sync(connection, queue.list_suppressions_txn, domain)
    if args.json:
        out.write(json.dumps([{**e.__dict__, "created_at": e.created_at.isoformat()}
                              for e in entries], indent=2) + "\n")
        return 0
    for e in entries:
        when = e.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"{e.domain}\t{e.address}\t{when}\t{e.reason}\n")
    return 0


def cmd_suppression_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    domain = normalize_domain(args.domain)
    address = str(parse_address(args.address))
    with open_database(config) as connection:
        removed = run_sync(connection, _change(
            "suppression.remove", f"{domain}:{address}", queue.remove_suppression_txn,
            domain, address))
    if not removed:
        raise Refused(f"{address} is not on the suppression list of {domain}")
    out.write(f"{address} removed from the suppression list of {domain}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esp",
        description="Administer an ESP mail server: domains, users, aliases, schema.",
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=None,
        help="YAML configuration (default: ./esp.yaml if present, else built-in defaults "
        "with data under ./var, as `twistd esp` uses)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(run=cmd_migrate)

    domain = commands.add_parser("domain", help="hosted domains").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = domain.add_parser("add", help="host a domain")
    p.add_argument("name")
    p.set_defaults(run=cmd_domain_add)
    p = domain.add_parser("list", help="list hosted domains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_domain_list)
    p = domain.add_parser("remove", help="stop hosting a domain (it must have no users)")
    p.add_argument("name")
    p.set_defaults(run=cmd_domain_remove)

    user = commands.add_parser("user", help="mail users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = user.add_parser("add", help="add a user (the password is prompted for)")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("--name", help="display name")
    p.add_argument("--role", choices=directory.ROLES, default="user")
    p.add_argument("--quota", type=parse_size, help="storage quota, e.g. 2G (default: none)")
    p.set_defaults(run=cmd_user_add)
    p = user.add_parser("list", help="list users")
    p.add_argument("domain", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_user_list)
    p = user.add_parser("passwd", help="set a user's password")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(run=cmd_user_passwd)
    p = user.add_parser("remove", help="remove a user (its Maildir files are kept)")
    p.add_argument("address")
    p.set_defaults(run=cmd_user_remove)

    alias = commands.add_parser("alias", help="aliases and catch-alls").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = alias.add_parser(
        "add", help="add an alias: SOURCE is alias@domain, or @domain for the catch-all"
    )
    p.add_argument("source")
    p.add_argument("destination", help="a local user, another alias or an external address")
    p.set_defaults(run=cmd_alias_add)
    p = alias.add_parser("list", help="list aliases")
    p.add_argument("domain", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_alias_list)
    p = alias.add_parser("remove", help="remove an alias (one destination, or all)")
    p.add_argument("source")
    p.add_argument("destination", nargs="?")
    p.set_defaults(run=cmd_alias_remove)

    dkim_ = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = dkim_.add_parser("generate", help="make a signing key for a hosted domain")
    p.add_argument("domain")
    p.add_argument("--selector", help="default: security.dkim.default_selector "
                                      "(with -ed25519 for an Ed25519 key)")
    p.add_argument("--algorithm", choices=sorted(dkimkeys.ALGORITHMS), default="rsa")
    p.set_defaults(run=cmd_dkim_generate)
    p = dkim_.add_parser("show", help="print the DNS records a domain's keys need")
    p.add_argument("domain")
    p.set_defaults(run=cmd_dkim_show)

    queue_ = commands.add_parser("queue", help="the outbound queue").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = queue_.add_parser("list", help="entries still to deliver (one per message and "
                                       "recipient domain)")
    p.add_argument("--all", action="store_true", help="include delivered and bounced ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_queue_list)
    p = queue_.add_parser("show", help="one entry: recipients, their last errors")
    p.add_argument("id", type=int)
    p.add_argument("--headers", action="store_true", help="print the message header too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_queue_show)
    p = queue_.add_parser("retry", help="try waiting entries again now")
    p.add_argument("ids", type=int, nargs="+", metavar="id")
    p.set_defaults(run=cmd_queue_retry)
    p = queue_.add_parser("flush", help="try every waiting entry again now")
    p.set_defaults(run=cmd_queue_flush)
    p = queue_.add_parser("delete", help="drop a waiting entry without a report to the sender")
    p.add_argument("id", type=int)
    p.set_defaults(run=cmd_queue_delete)

    apikey = commands.add_parser("apikey", help="keys for the management API").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = apikey.add_parser("create", help="make a key for a user (printed once)")
    p.add_argument("user", help="the user the key acts for (never beyond their role)")
    p.add_argument("--name", required=True, help="what the key is for")
    p.add_argument("--scope", action="append", required=True,
                   help=f"repeat for several: {', '.join(apikeys.SCOPES)}")
    p.add_argument("--domain", help="restrict the key to this domain")
    p.add_argument("--expires", help="ISO 8601 time after which the key stops working")
    p.set_defaults(run=cmd_apikey_create)
    p = apikey.add_parser("list", help="keys (of one user)")
    p.add_argument("--user")
    p.set_defaults(run=cmd_apikey_list)
    p = apikey.add_parser("revoke", help="end a key at once")
    p.add_argument("id", type=int)
    p.set_defaults(run=cmd_apikey_revoke)

    webhook = commands.add_parser("webhook", help="webhooks (docs/events.md)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = webhook.add_parser("add", help="send events to a URL (the secret is printed once)")
    p.add_argument("url")
    p.add_argument("--event", action="append", required=True,
                   help="event type or pattern, repeat for several: message.received, "
                        "message.*, # (everything)")
    p.add_argument("--domain", help="only events of this hosted domain")
    p.set_defaults(run=cmd_webhook_add)
    p = webhook.add_parser("list", help="webhooks and whether they are enabled")
    p.set_defaults(run=cmd_webhook_list)
    p = webhook.add_parser("remove", help="stop sending to a webhook")
    p.add_argument("id", type=int)
    p.set_defaults(run=cmd_webhook_remove)

    filters_ = commands.add_parser("filters", help="message filter plugins").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = filters_.add_parser("list", help="installed filters with their settings")
    p.add_argument("--json", action="store_true", help="with each settings JSON schema")
    p.set_defaults(run=cmd_filters_list)

    suppression = commands.add_parser(
        "suppression", help="addresses refused at submission after a hard bounce"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = suppression.add_parser("list", help="suppressed addresses (of one sending domain)")
    p.add_argument("domain", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_suppression_list)
    p = suppression.add_parser("remove", help="let a domain send to an address again")
    p.add_argument("domain")
    p.add_argument("address")
    p.set_defaults(run=cmd_suppression_remove)

    from esp.certs.commands import add_commands  # it uses this module's helpers

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    err = sys.stderr
    try:
        config = load_config(args.config if args.config else default_config_path())
    except ConfigError as e:
        err.write(f"esp: {e}\n")
        return EXIT_CONFIG
    try:
        result: int = args.run(args, config, sys.stdout)
        return result
    except UsageProblem as e:
        err.write(f"esp: {e}\n")
        return EXIT_USAGE
    except InvalidAddress as e:
        err.write(f"esp: {e}\n")
        return EXIT_USAGE
    except (directory.DirectoryError, dkimkeys.DKIMKeyError, Refused) as e:
        err.write(f"esp: {e}\n")
        return EXIT_REFUSED
    except (DatabaseUnavailable, ClusterError, MigrationError) as e:
        err.write(f"esp: {e}\n")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        err.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
