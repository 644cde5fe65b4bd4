"""The bodies the management API reads and writes (pydantic models, also the OpenAPI schemas)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

from esp.api.framework import Out, Query, Strict
from esp.auth import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from esp.storage.apikeys import SCOPES

T = TypeVar("T")

# Labels of letters (any script: IDNA names are converted), digits and hyphens, near enough.
DOMAIN_PATTERN = r"^[^\s@/.]+(\.[^\s@/.]+)+\.?$"
Address = Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$",
                               description="user@domain")]
DomainName = Annotated[str, Field(min_length=1, max_length=253, pattern=DOMAIN_PATTERN)]
NewPassword = Annotated[str, Field(min_length=MIN_PASSWORD_LENGTH,
                                   max_length=MAX_PASSWORD_LENGTH)]
Role = Literal["user", "domain_admin", "superadmin"]
Scope = Literal[SCOPES]  # type: ignore[valid-type]
Quota = Annotated[int, Field(ge=0, le=2**62)]


class Page(Out, Generic[T]):
    items: list[T]
    total: int = Field(ge=0)
    limit: int = Field(ge=1)
    offset: int = Field(ge=0)


class Paging(Query):
    limit: int = Field(100, ge=1, le=1000, description="at most this many items")
    offset: int = Field(0, ge=0, le=2**31, description="skip this many items")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorOut(Out):
    error: ErrorBody


class StatusOut(Out):
    status: str


# -- authentication ----------------------------------------------------------------------------


class TokenRequest(Strict):
    username: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class RefreshRequest(Strict):
    refresh_token: str = Field(min_length=1, max_length=4096)


class TokenPair(Out):
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"]
    expires_in: int


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[Scope] = Field(min_length=1, max_length=len(SCOPES))
    domain: str | None = Field(None, min_length=1, max_length=253,
                               description="restrict the key to this domain")
    expires_at: datetime | None = Field(None, description="no use after this time (with "
                                        "its UTC offset)")
    user: Address | None = Field(None, description="make the key for this user "
                                 "(administrators only); the caller by default")


    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give the UTC offset (e.g. 2027-01-01T00:00:00Z)")
        if value <= datetime.now(UTC) or value.year >= 9999:
            raise ValueError("must be in the future (and before the year 9999)")
        return value


class KeyOut(Out):
    id: int
    name: str
    owner: str
    prefix: str = Field(description="the first characters of the key")
    scopes: list[str]
    domain: str | None
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, never again")


class KeyPage(Page[KeyOut]):
    pass


class KeyQuery(Paging):
    user: Address | None = None


# -- domains -----------------------------------------------------------------------------------


class DomainCreate(Strict):
    name: DomainName


class DomainUpdate(Strict):
    enabled: bool | None = None


class DomainOut(Out):
    name: str
    enabled: bool
    users: int
    aliases: int


class DomainPage(Page[DomainOut]):
    pass


class DnsRecord(Out):
    type: str
    name: str
    value: str
    purpose: str
    status: str = Field(description="ok, missing, different, or unchecked (DNS did not "
                        "answer)")
    found: list[str] = Field(description="what DNS answers for this name and type today")


class DnsRecords(Out):
    domain: str
    records: list[DnsRecord]


FilterName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+$")]


class DomainFiltersBody(Strict):
    disabled: list[FilterName] = Field([], max_length=50,
                                       description="filters of the chain this domain skips")
    enabled: list[FilterName] = Field([], max_length=50,
                                      description="opt-in filters (those that send mail off "
                                      "the machine, such as llm) this domain turns on")


class FilterInfo(Out):
    name: str
    description: str
    sends_mail_off_machine: bool
    settings: dict[str, Any] = Field(description="the JSON schema of its settings")


class DomainFiltersOut(Out):
    domain: str
    chain: list[str] = Field(description="the server's chain, in order")
    disabled: list[str]
    enabled: list[str]
    installed: list[FilterInfo]


class DkimCreate(Strict):
    selector: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]*)$")
    algorithm: Literal["rsa", "ed25519"] = "rsa"


class DkimOut(Out):
    selector: str
    algorithm: str
    active: bool
    dns_name: str
    dns_value: str


class DkimList(Out):
    items: list[DkimOut]


# -- users and aliases -------------------------------------------------------------------------


class UserCreate(Strict):
    address: Address
    password: NewPassword
    display_name: str = Field("", max_length=200)
    role: Role = "user"
    quota_bytes: Quota | None = None
    quota_messages: Quota | None = None


class UserUpdate(Strict):
    display_name: str | None = Field(None, max_length=200)
    role: Role | None = None
    enabled: bool | None = None
    quota_bytes: Quota | None = None
    quota_messages: Quota | None = None
    unlimited: list[Literal["quota_bytes", "quota_messages"]] = Field(
        [], description="quotas to lift (set to unlimited)")


class PasswordChange(Strict):
    password: NewPassword
    current_password: str | None = Field(
        None, min_length=1, max_length=1024,
        description="needed when changing one's own password")


class UserOut(Out):
    id: int
    address: str
    display_name: str
    role: str
    enabled: bool
    quota_bytes: int | None
    quota_messages: int | None
    used_bytes: int
    used_messages: int


class UserDetail(UserOut):
    identities: list[str] = Field(description="addresses the user may send as")


class UserPage(Page[UserOut]):
    pass


class UserQuery(Paging):
    domain: str | None = Field(None, max_length=253)
    q: str | None = Field(None, max_length=320, description="part of the address")


class AliasCreate(Strict):
    source: str = Field(min_length=2, max_length=320,
                        description="alias@domain, or @domain for the catch-all")
    destination: Address


class AliasOut(Out):
    id: int
    source: str
    destination: str


class AliasPage(Page[AliasOut]):
    pass


class DomainFilter(Paging):
    domain: str | None = Field(None, max_length=253)


# -- mailboxes and messages ----------------------------------------------------------------------


class MailboxCreate(Strict):
    name: str = Field(min_length=1, max_length=512)


class MailboxRename(Strict):
    name: str = Field(min_length=1, max_length=512)


class MailboxOut(Out):
    id: int
    name: str
    special_use: str | None
    subscribed: bool
    messages: int
    unseen: int
    size: int
    uidvalidity: int
    uidnext: int


class MailboxList(Out):
    items: list[MailboxOut]


class MessageQuery(Paging):
    q: str | None = Field(None, max_length=1000, description="words in the text of the message")
    unseen: bool | None = None


class MessageOut(Out):
    id: int
    mailbox_id: int
    mailbox: str
    uid: int
    size: int
    flags: list[str]
    internal_date: datetime
    date: datetime | None
    subject: str | None
    from_: str | None = Field(serialization_alias="from")
    to: str | None
    cc: str | None
    message_id: str | None


class MessagePage(Page[MessageOut]):
    pass


class MessageMove(Strict):
    mailbox: str = Field(min_length=1, max_length=512)


class Recipient(Strict):
    address: Address
    name: str = Field("", max_length=200)


class Attachment(Strict):
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", max_length=255,
                              pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
    content: str = Field(description="base64", max_length=50 * 1024 * 1024)


class SendRequest(Strict):
    from_: Address | Recipient = Field(alias="from")
    to: list[Address | Recipient] = Field([], max_length=1000)
    cc: list[Address | Recipient] = Field([], max_length=1000)
    bcc: list[Address | Recipient] = Field([], max_length=1000)
    reply_to: Address | None = None
    subject: str = Field("", max_length=998)
    text: str | None = Field(None, max_length=20 * 1024 * 1024)
    html: str | None = Field(None, max_length=20 * 1024 * 1024)
    attachments: list[Attachment] = Field([], max_length=100)
    headers: dict[str, str] = Field({}, max_length=50)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field([], max_length=20)


class Delivered(Out):
    address: str
    mailbox_id: int
    uid: int


class SendResult(Out):
    message_id: str
    queue_ids: list[int]
    delivered: list[Delivered]
    tags: list[str]


# -- queue, audit, webhooks --------------------------------------------------------------------


class QueueRecipient(Out):
    address: str
    status: str
    last_error: str | None


class QueueEntryOut(Out):
    id: int
    sender: str
    recipient_domain: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    size: int
    recipients: list[QueueRecipient]


class QueuePage(Page[QueueEntryOut]):
    pass


class QueueQuery(Paging):
    all: bool = Field(False, description="also rows that are finished")


class AuditQuery(Paging):
    actor: str | None = Field(None, max_length=400)
    action: str | None = Field(None, max_length=100)
    target: str | None = Field(None, max_length=400)
    since: datetime | None = None
    until: datetime | None = None


class AuditEntry(Out):
    id: int
    occurred_at: datetime
    actor: str
    actor_ip: str | None
    action: str
    target: str | None
    details: dict[str, Any]


class AuditPage(Page[AuditEntry]):
    pass


EventPattern = Annotated[str, Field(min_length=1, max_length=100,
                                    pattern=r"^(#|[a-z_]+(\.([a-z_]+|\*))*)$")]


class WebhookCreate(Strict):
    url: str = Field(min_length=8, max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
    event_types: list[EventPattern] = Field(min_length=1, max_length=50)
    domain: str | None = Field(None, min_length=1, max_length=253)
    enabled: bool = True


class WebhookUpdate(Strict):
    url: str | None = Field(None, min_length=8, max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
    event_types: list[EventPattern] | None = Field(None, min_length=1, max_length=50)
    enabled: bool | None = None


class WebhookOut(Out):
    id: int
    url: str
    event_types: list[str]
    domain: str | None
    enabled: bool
    consecutive_failures: int
    disabled_reason: str | None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the signing secret (Standard Webhooks): shown this once")


class WebhookPage(Page[WebhookOut]):
    pass


# -- per-user rules ------------------------------------------------------------------------------

Keyword = Annotated[str, Field(min_length=1, max_length=64,
                               pattern=r'^[^\\\s(){%*"\]\x00-\x1f\x7f][^\s(){%*"\\\]\x00-\x1f\x7f]*$')]


class ConditionIn(Strict):
    field: Literal["from", "to", "cc", "subject", "sender", "list-id", "header", "size",
                   "category", "spam"]
    op: Literal["contains", "not_contains", "is", "starts_with", "ends_with", "over", "under"]
    value: Annotated[str, Field(max_length=500)] | int | bool
    name: str | None = Field(None, min_length=1, max_length=76,
                             pattern=r"^[!-9;-~]+$", description="the header field, for "
                             "field 'header'")

    @model_validator(mode="after")
    def _fits(self) -> ConditionIn:
        if self.field == "size":
            if self.op not in ("over", "under") or isinstance(self.value, bool) or not (
                    isinstance(self.value, int)):
                raise ValueError("size takes over/under and a number of bytes")
        elif self.field == "spam":
            if self.op != "is" or not isinstance(self.value, bool):
                raise ValueError("spam takes 'is' and true or false")
        elif self.op in ("over", "under") or not isinstance(self.value, str):
            raise ValueError(f"{self.field} takes a text comparison and a string")
        if (self.field == "header") != (self.name is not None):
            raise ValueError("'name' is for field 'header', which needs it")
        return self


class ActionIn(Strict):
    type: Literal["fileinto", "keyword", "seen", "flag", "discard", "forward", "stop"]
    mailbox: str | None = Field(None, min_length=1, max_length=512)
    keyword: Keyword | None = None
    to: Address | None = None

    @model_validator(mode="after")
    def _fits(self) -> ActionIn:
        needs = {"fileinto": "mailbox", "keyword": "keyword", "forward": "to"}
        for kind, name in needs.items():
            if (self.type == kind) != (getattr(self, name) is not None):
                raise ValueError(f"'{name}' goes with (and only with) type {kind}")
        return self


class RuleIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    priority: int = Field(0, ge=-1000, le=1000, description="lower runs first")
    enabled: bool = True
    match: Literal["all", "any"] = "all"
    conditions: list[ConditionIn] = Field([], max_length=20,
                                          description="none: every message matches")
    actions: list[ActionIn] = Field(min_length=1, max_length=10)


class RuleOut(Out):
    id: int
    name: str
    priority: int
    enabled: bool
    match: str
    conditions: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    created_at: datetime


class RuleList(Out):
    items: list[RuleOut]


class AttemptOut(Out):
    attempted_at: datetime
    status: int | None = Field(description="the receiver's HTTP status; null: no answer")
    error: str | None
    latency_ms: int
    response: str | None = Field(description="the start of the answer's body")


class DeliveryOut(Out):
    id: int
    event_id: str = Field(description="also the webhook-id header of every attempt")
    event_type: str
    status: str = Field(description="pending, delivering, delivered or failed (gave up)")
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    tries: list[AttemptOut]


class DeliveryPage(Page[DeliveryOut]):
    pass


class SecretRotation(Strict):
    overlap_seconds: int = Field(86400, ge=0, le=30 * 86400,
                                 description="how long the old secret keeps signing too")


class SecretOut(Out):
    secret: str = Field(description="the new secret: shown this once")
    previous_valid_until: datetime


# -- certificates ------------------------------------------------------------------------------

CertificateName = Annotated[str, Field(
    min_length=3, max_length=253, pattern=r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]"
    r"[a-z0-9-]{0,61}[a-z0-9]$", description="a host name, lower case (A-labels); *.name for "
    "a wildcard (needs a DNS-01 solver)")]


class CertificateRequest(Strict):
    names: list[CertificateName] = Field(min_length=1, max_length=100,
                                         description="the first names the certificate")
    provider: str | None = Field(None, min_length=1, max_length=64,
                                 pattern=r"^[A-Za-z0-9._-]+$",
                                 description="an ACME provider of the configuration; default "
                                             "security.tls.acme.provider")


class CertificateOut(Out):
    id: int
    names: list[str]
    domain: str | None
    source: Literal["acme", "file"]
    provider: str | None
    status: Literal["waiting", "in_service", "failing"]
    not_before: datetime | None
    not_after: datetime | None
    issuer: str | None
    serial: str | None
    renew_at: datetime | None
    next_attempt_at: datetime | None
    failures: int
    last_error: str | None


class CertificatePage(Page[CertificateOut]):
    pass
