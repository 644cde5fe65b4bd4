"""Configuration: one YAML file, parsed once into frozen, typed objects.

Every module receives the piece of :class:`Config` it needs; none reads files or the environment
itself.  Unknown keys and bad values raise :class:`ConfigError`, whose message names the key, the
value and what is allowed, so start-up stops with something an operator can act on.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from twisted.internet import endpoints

DEFAULT_CONFIG_NAME = "esp.yaml"
DEFAULT_DATA_DIR = "var"

# Secrets and deployment-specific values that may come from the environment instead of the file.
ENVIRONMENT_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "ESP_DATABASE_DSN": ("storage", "database", "dsn"),
    "ESP_DATA_DIR": ("storage", "data_dir"),
    "ESP_MAILDIR_ROOT": ("storage", "maildir", "root"),
    "ESP_HOSTNAME": ("server", "hostname"),
}


_NO_REACTOR: Any = object()


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def _endpoint_description(value: str) -> str:
    """Check that a listening address is a Twisted server endpoint string, without binding it."""
    try:
        # The parsers only keep the reactor they are given; nothing is bound or opened here.
        endpoints.serverFromString(_NO_REACTOR, value)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(
            f"not a server endpoint description ({e}); "
            "expected e.g. 'tcp:2525:interface=127.0.0.1' or 'unix:/run/esp/smtp.sock'"
        ) from e
    return value


def _listen_list(value: Any) -> Any:
    # A single string is the common case; lists allow several addresses (IPv4 and IPv6).
    if isinstance(value, str):
        return [value]
    return value


def _hostname(value: str) -> str:
    name = value.rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or any(
        not label or len(label) > 63 or label.startswith("-") or label.endswith("-")
        or not all(c.isalnum() or c == "-" for c in label)
        or not label.isascii()
        for label in labels
    ):
        raise ValueError("expected a host name made of letters, digits, '-' and '.'")
    return name


Endpoint = Annotated[str, AfterValidator(_endpoint_description)]
Listen = Annotated[tuple[Endpoint, ...], BeforeValidator(_listen_list)]
HostName = Annotated[str, AfterValidator(_hostname)]
Size = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    """Base of every configuration section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SMTPListener(Section):
    listen: Listen


class SMTPConfig(Section):
    mx: SMTPListener = SMTPListener(listen=("tcp:2525:interface=127.0.0.1",))
    submission: SMTPListener = SMTPListener(listen=("tcp:2587:interface=127.0.0.1",))
    # Implicit TLS (RFC 8314): the listener is plain TCP; TLS comes from the certificate store.
    submissions: SMTPListener = SMTPListener(listen=("tcp:2465:interface=127.0.0.1",))
    max_message_size: Size = 25 * 1024 * 1024
    max_recipients: Size = 100
    # Per session: bad commands before 421, and seconds of silence before 421 (RFC 5321
    # §4.5.3.2 suggests 5 minutes).
    max_errors: Size = 10
    idle_timeout: Annotated[int, Field(ge=10, le=3600)] = 300
    # Per client address; 0 turns a limit off.
    connections_per_ip: Annotated[int, Field(ge=0)] = 50
    connection_rate_per_ip: Annotated[int, Field(ge=0)] = 600
    auth_failures_per_ip: Annotated[int, Field(ge=0)] = 10


class IMAPConfig(Section):
    listen: Listen = ("tcp:2143:interface=127.0.0.1",)
    # Implicit TLS (RFC 8314), as for SMTP submissions.
    listen_tls: Listen = ("tcp:2993:interface=127.0.0.1",)
    # Seconds of silence before the server logs a client out (RFC 3501 §5.4: at least 30 min).
    idle_timeout: Annotated[int, Field(ge=1800, le=86400)] = 1800
    # Seconds between "* OK Still here" during IDLE, for NAT boxes on mobile networks.
    idle_keepalive: Annotated[int, Field(ge=10, le=1500)] = 120
    # Per client address and per user; 0 turns a limit off.
    connections_per_ip: Annotated[int, Field(ge=0)] = 100
    connection_rate_per_ip: Annotated[int, Field(ge=0)] = 600
    auth_failures_per_ip: Annotated[int, Field(ge=0)] = 10
    sessions_per_user: Annotated[int, Field(ge=0)] = 50


class APIConfig(Section):
    enabled: bool = True
    listen: Listen = ("tcp:8080:interface=127.0.0.1",)
    # Seconds an access token is good for, and a refresh token.
    token_lifetime: Annotated[int, Field(ge=60, le=86400)] = 900
    refresh_lifetime: Annotated[int, Field(ge=300, le=90 * 86400)] = 7 * 86400
    # The HS256 signing key (at least 32 bytes); default <data_dir>/api-signing.key, made on
    # first start.
    signing_key_file: Path | None = None
    # Largest request body accepted (413 past it).
    max_body: Size = 10 * 1024 * 1024
    # Serve HTTPS on every API listener, with the certificates of the SMTP and IMAP ports
    # (security.tls, SNI included).  Off by default: the default listener is on loopback.
    tls: bool = False


class MetricsConfig(Section):
    enabled: bool = True
    # Prometheus scrapes /metrics here (each process its own figures; see docs).
    listen: Listen = ("tcp:9464:interface=127.0.0.1",)
    # Seconds between readings of the queue and outbox depths.
    interval: Annotated[float, Field(gt=0, le=3600)] = 15.0


def _default_hostname() -> str:
    # The machine's name may not be a valid host name (e.g. 'mail_01'): then say so in config
    # rather than refuse to start.
    try:
        return _hostname(socket.gethostname())
    except ValueError:
        return "localhost.localdomain"


class DNSConfig(Section):
    # "ip" or "ip:port" ("[v6]:port"); empty: the system resolver (/etc/resolv.conf).  Use a
    # local validating resolver in production.
    nameservers: tuple[str, ...] = ()
    timeout: Annotated[float, Field(gt=0, le=60)] = 5.0


def _relay(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    host, port = parse_host_port(value, 25)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]' or '[v6]:port' → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or (port_text and not port_text.isdigit()):
        raise ValueError("expected 'host', 'host:port' or '[ipv6]:port'")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError("the port must be 1-65535")
    return host.lower(), port


class OutboundConfig(Section):
    """Delivery of queued mail to other servers (``esp.outbound``)."""

    # Run delivery workers in this process; every node may (they share the queue).
    enabled: bool = True
    # Port of remote MX hosts (MX records carry none): 25, other values are for tests.
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    # A smart host that takes all outbound mail instead of MX lookups: 'host[:port]'.
    relay: Annotated[str | None, AfterValidator(_relay)] = None
    # Name given in EHLO; default server.hostname.
    helo_name: HostName | None = None
    # Connections open at once, overall and per destination domain.
    max_connections: Annotated[int, Field(ge=1, le=1000)] = 20
    max_connections_per_destination: Annotated[int, Field(ge=1, le=100)] = 5
    # Messages sent over one connection before it is closed.
    messages_per_connection: Annotated[int, Field(ge=1, le=10000)] = 100
    # STARTTLS: 'may' uses it when offered (opportunistic, RFC 7435), 'encrypt' requires it,
    # 'none' never uses it.
    tls: Literal["may", "encrypt", "none"] = "may"
    # Seconds: connecting, waiting for a reply (RFC 5321 §4.5.3.2 says 5 min), waiting for the
    # reply to the end of the message (10 min).
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    command_timeout: Annotated[float, Field(gt=0, le=3600)] = 300.0
    data_timeout: Annotated[float, Field(gt=0, le=3600)] = 600.0
    # Waits after the 1st, 2nd... failed attempt, in seconds; the last one repeats.
    retry_schedule: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1)] = (
        60, 300, 900, 3600, 7200,
    )
    # Seconds a message may stay in the queue before what is undelivered is bounced.
    max_queue_time: Annotated[int, Field(ge=60)] = 5 * 24 * 3600
    # Seconds a claimed row stays leased to its worker without renewal; a worker that dies
    # loses its rows to the others after this long.
    lease_time: Annotated[float, Field(ge=1, le=3600)] = 300.0
    # Seconds between looks at the queue when nothing woke the workers (mail queued by other
    # nodes, `esp queue retry`).
    poll_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0


class ServerConfig(Section):
    hostname: HostName = Field(default_factory=_default_hostname)
    # Processes serving the listeners (this one included); 0 means one per CPU core.
    workers: Annotated[int, Field(ge=0, le=256)] = 1
    smtp: SMTPConfig = Field(default_factory=SMTPConfig)
    imap: IMAPConfig = Field(default_factory=IMAPConfig)
    api: APIConfig = Field(default_factory=APIConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dns: DNSConfig = Field(default_factory=DNSConfig)
    outbound: OutboundConfig = Field(default_factory=OutboundConfig)


class EmbeddedDatabaseConfig(Section):
    # Directory holding initdb and pg_ctl; by default PATH, `pg_config --bindir`,
    # /usr/lib/postgresql/*/bin and the `pgserver` wheel are searched in that order.
    bin_dir: Path | None = None
    # initdb refuses to run as root; as root the cluster runs as this existing account.
    run_as: str = "postgres"
    startup_timeout: Annotated[int, Field(ge=1, le=3600)] = 60


class DatabaseConfig(Section):
    # libpq connection string or URI.  Empty: run the embedded cluster under <data_dir>/pg.
    dsn: str | None = None
    pool_min: Annotated[int, Field(ge=1)] = 1
    pool_max: Annotated[int, Field(ge=1)] = 10
    embedded: EmbeddedDatabaseConfig = Field(default_factory=EmbeddedDatabaseConfig)


class MaildirConfig(Section):
    # Default: <data_dir>/maildir.  Layout: <root>/<domain>/<localpart>/{cur,new,tmp}.
    root: Path | None = None


class BodyIndexConfig(Section):
    """The full-text index of message bodies (IMAP SEARCH BODY/TEXT)."""

    # Index new messages in the background (a search indexes what is left of its mailbox).
    background: bool = True
    # Seconds between looks for messages to index (one batch per look while mail arrives).
    interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # Messages per transaction.
    batch: Annotated[int, Field(ge=1, le=10000)] = 200


class StorageConfig(Section):
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    # Seconds a found recipient (a plain user) is remembered; 0 asks the database every time.
    directory_cache_seconds: Annotated[float, Field(ge=0, le=300)] = 1.0
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    maildir: MaildirConfig = Field(default_factory=MaildirConfig)
    # Bodies of queued outbound mail; default <data_dir>/spool.  Nodes sharing one database
    # share this directory too (like the Maildir root).
    spool_dir: Path | None = None
    body_index: BodyIndexConfig = Field(default_factory=BodyIndexConfig)


class AcmeProviderConfig(Section):
    # The ACME directory URL.
    directory: Annotated[str, Field(pattern=r"^https?://")]
    # Contact address given at registration (expiry notices from the CA).
    email: str | None = None
    # External Account Binding (ZeroSSL, commercial CAs): key id and base64url HMAC key.
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    # CA bundle to verify the ACME server's own HTTPS certificate (a private CA); default: the
    # system's.
    ca_bundle: Path | None = None


DEFAULT_ACME_PROVIDERS: dict[str, AcmeProviderConfig] = {
    "letsencrypt": AcmeProviderConfig(
        directory="https://acme-v02.api.letsencrypt.org/directory"),
    "letsencrypt-staging": AcmeProviderConfig(
        directory="https://acme-staging-v02.api.letsencrypt.org/directory"),
    "zerossl": AcmeProviderConfig(directory="https://acme.zerossl.com/v2/DV90"),
}


class AcmeConfig(Section):
    # Issue and renew certificates with ACME (RFC 8555).  Off: certificates are served from the
    # database (imported ones, those another node issued) but none is ordered here.
    enabled: bool = False
    # The provider new certificates use, a key of ``providers``.
    provider: str = "letsencrypt"
    # Contact address for every provider that sets none.
    email: str | None = None
    # Built in: letsencrypt, letsencrypt-staging, zerossl (ZeroSSL needs eab_kid and
    # eab_hmac_key).  Entries here are added to them, or replace one of the same name.
    providers: dict[str, AcmeProviderConfig] = Field(default_factory=dict)
    # Certificates to have: each a list of names (the first names the certificate), e.g.
    # [[mail.example.com, example.com], [mx.example.org]].  More over the CLI and the API.
    certificates: list[list[Annotated[str, Field(pattern=r"^(\*\.)?[a-z0-9.-]+$")]]] = Field(
        default_factory=list)
    # Where the HTTP-01 challenge responder listens (the CA connects to port 80).
    challenge_listen: Listen = ("tcp:80",)
    # Seconds between renewal checks (a tenth of jitter either way).
    check_interval: Annotated[float, Field(gt=0)] = 43200.0
    # Seconds to wait after the 1st, 2nd, ... failed attempt (the last repeats).
    retry_schedule: tuple[Annotated[float, Field(gt=0)], ...] = (300, 1800, 7200, 21600, 43200)
    # Seconds one order may take, challenges and finalization included.
    timeout: Annotated[float, Field(gt=0)] = 300.0
    # An IDNSChallengeSolver plugin by name, for DNS-01 (wildcard names); its settings.
    dns_solver: str | None = None
    dns_solver_settings: dict[str, Any] = Field(default_factory=dict)

    def all_providers(self) -> dict[str, AcmeProviderConfig]:
        return {**DEFAULT_ACME_PROVIDERS, **self.providers}


class TLSConfig(Section):
    # PEM files; with neither set a self-signed certificate is generated under <data_dir>/tls.
    # This is the default certificate: clients that name no server, or a name no certificate
    # in the database covers, get it.
    certificate: Path | None = None
    private_key: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    acme: AcmeConfig = Field(default_factory=AcmeConfig)


class Argon2Config(Section):
    # RFC 9106 second recommended option (64 MiB, 3 passes, 4 lanes).
    time_cost: Annotated[int, Field(ge=1, le=100)] = 3
    memory_cost_kib: Annotated[int, Field(ge=8 * 1024, le=4 * 1024 * 1024)] = 64 * 1024
    parallelism: Annotated[int, Field(ge=1, le=64)] = 4


class AuthConfig(Section):
    # Plain-text AUTH/LOGIN is refused outside TLS; this permits it from loopback clients only.
    allow_plaintext_on_loopback: bool = False
    argon2: Argon2Config = Field(default_factory=Argon2Config)


class MailAuthConfig(Section):
    # SPF, DKIM and DMARC checks on the MX port, reported in Authentication-Results.
    enabled: bool = True
    # Apply the sender domain's DMARC policy: reject (550 5.7.1) or quarantine (Junk).
    enforce_dmarc: bool = True
    # SPF "fail" from a domain that publishes no DMARC policy: 550 5.7.23.
    reject_spf_fail: bool = True


class DKIMConfig(Section):
    # 32 random bytes that encrypt the DKIM private keys stored in the database (AES-256-GCM);
    # unset: <data_dir>/dkim-secret.key, generated on first use.  Every node needs the same.
    secret_file: Path | None = None
    # Selector given to new keys: <selector>._domainkey.<domain>.
    default_selector: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")] = "esp"


class SecurityConfig(Section):
    tls: TLSConfig = Field(default_factory=TLSConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    mailauth: MailAuthConfig = Field(default_factory=MailAuthConfig)
    dkim: DKIMConfig = Field(default_factory=DKIMConfig)


class FiltersConfig(Section):
    # Filter names in the order they run (`esp filters list` shows what is installed).
    chain: tuple[str, ...] = ()
    # Each filter's settings by name (checked against the filter's own schema at start-up).
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Seconds a domain's filter choices and a user's rules (both set over the API) are
    # cached by each process.
    domain_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    rules_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0


class WebhooksConfig(Section):
    # Deliver events to the configured webhooks from this process.
    enabled: bool = True
    # Networks webhooks may reach besides public addresses (e.g. 10.0.0.0/8 for an internal
    # receiver); loopback, private, link-local and metadata addresses are refused otherwise.
    allow_networks: tuple[str, ...] = ()
    # Seconds to wait for a receiver's answer.
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    # Deliveries in a row that gave up before the webhook is disabled.
    disable_after: Annotated[int, Field(ge=1)] = 10
    # Deliveries attempted at once by each process.
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 16
    # Seconds before each retry of a failed delivery (then it gives up): about a day.
    retry_schedule: tuple[Annotated[float, Field(gt=0)], ...] = (
        5, 300, 1800, 7200, 18000, 36000, 36000)

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            ipaddress.ip_network(text, strict=False)  # ValueError names the bad one
        return value


class AuditConfig(Section):
    # Write logins (and failed logins) to the audit log, with the client's address.
    logins: bool = True
    # Days audit lines are kept.
    retention_days: Annotated[int, Field(ge=1)] = 365


class EventsConfig(Section):
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    # IEventSubscriber plugins (found through twisted.plugin) to run, by name.
    subscribers: tuple[str, ...] = ()


class Config(Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    # Where this configuration came from (None: built-in defaults); not a YAML key.
    source: Path | None = Field(default=None, exclude=True)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir

    @property
    def maildir_root(self) -> Path:
        return self.storage.maildir.root or self.storage.data_dir / "maildir"

    @property
    def spool_dir(self) -> Path:
        return self.storage.spool_dir or self.storage.data_dir / "spool"

    @property
    def dkim_secret_file(self) -> Path:
        return self.security.dkim.secret_file or self.storage.data_dir / "dkim-secret.key"

    @property
    def embedded_database(self) -> bool:
        return not self.storage.database.dsn


def default_config_path(cwd: Path | None = None) -> Path | None:
    """The file used when none is named: ``./esp.yaml`` if it exists, else none (defaults)."""
    candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Read, override from the environment, validate and resolve paths.

    Relative paths in a file are taken relative to the file's directory (a service manager's
    working directory is usually ``/``); without a file, relative to the working directory.
    """
    raw: Any = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, not {raw!r}")
    _apply_environment(raw, os.environ if environ is None else environ)
    where = str(path) if path is not None else "configuration"
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(where, e)) from None
    base = path.resolve().parent if path is not None else (cwd or Path.cwd()).resolve()
    return _resolve_paths(config, base, path)


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, keys in ENVIRONMENT_OVERRIDES.items():
        value = environ.get(name)
        if value is None or value == "":
            continue
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{name} overrides {'.'.join(keys)}, but {key} in the file is not a mapping"
                )
            node = child
        node[keys[-1]] = value


def _resolve_paths(config: Config, base: Path, source: Path | None) -> Config:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (base / p.expanduser()).resolve()

    storage = config.storage
    database = storage.database
    tls = config.security.tls
    return config.model_copy(
        update={
            "source": source.resolve() if source is not None else None,
            "storage": storage.model_copy(
                update={
                    "data_dir": absolute(storage.data_dir),
                    "maildir": storage.maildir.model_copy(
                        update={"root": absolute(storage.maildir.root)}
                    ),
                    "spool_dir": absolute(storage.spool_dir),
                    "database": database.model_copy(
                        update={
                            "embedded": database.embedded.model_copy(
                                update={"bin_dir": absolute(database.embedded.bin_dir)}
                            )
                        }
                    ),
                }
            ),
            "security": config.security.model_copy(
                update={
                    "tls": tls.model_copy(
                        update={
                            "certificate": absolute(tls.certificate),
                            "private_key": absolute(tls.private_key),
                            "acme": tls.acme.model_copy(update={"providers": {
                                name: p.model_copy(update={"ca_bundle": absolute(p.ca_bundle)})
                                for name, p in tls.acme.providers.items()}}),
                        }
                    ),
                    "dkim": config.security.dkim.model_copy(
                        update={"secret_file": absolute(config.security.dkim.secret_file)}
                    ),
                }
            ),
        }
    )


def _describe(where: str, error: ValidationError) -> str:
    lines = [f"{where}: invalid configuration"]
    for item in error.errors(include_url=False):
        loc = item["loc"]
        key = ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in loc)
        key = key.replace(".[", "[")
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_fields_at(loc[:-1])))
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
            continue
        value = item.get("input")
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        lines.append(f"  {key}: {value!r} is not allowed: {message}")
    return "\n".join(lines)


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [name for name, f in model.model_fields.items() if not f.exclude]
