"""A user's mailboxes and messages, and sending (``POST /api/v1/messages``)."""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import uuid
from typing import Any

from twisted.web.iweb import IRequest

from esp.api.base import APIBase, field_address
from esp.api.framework import (
    ApiError,
    Principal,
    endpoint,
    forbidden,
    invalid_field,
    not_found,
    validate,
)
from esp.api.models import (
    Delivered,
    MailboxCreate,
    MailboxList,
    MailboxOut,
    MailboxRename,
    MessageMove,
    MessageOut,
    MessagePage,
    MessageQuery,
    Recipient,
    SendRequest,
    SendResult,
)
from esp.compose import ComposeError, Draft, FilePart, Mailbox, compose
from esp.envelope import Envelope, Listener, Refusal, Session
from esp.events import Announcement, created_mailboxes, deleted_messages
from esp.storage.directory import User
from esp.storage.mailboxes import (
    InvalidMailboxName,
    MailboxError,
    MailboxExists,
    MailboxInfo,
    NoMailbox,
    check_mailbox_name,
)
from esp.storage.manage import MessageMeta, message_meta_txn, page_messages_txn

MAILBOX_PATH = "/api/v1/users/<address>/mailboxes"
MESSAGE_PATH = MAILBOX_PATH + "/<int:mailbox_id>/messages/<int:uid>"


def mailbox_out(info: MailboxInfo) -> MailboxOut:
    return MailboxOut(id=info.id, name=info.name, special_use=info.special_use,
                      subscribed=info.subscribed, messages=info.messages, unseen=info.unseen,
                      size=info.size, uidvalidity=info.uidvalidity, uidnext=info.uidnext)


def message_out(meta: MessageMeta, mailbox: str) -> MessageOut:
    return MessageOut(id=meta.id, mailbox_id=meta.mailbox_id, mailbox=mailbox, uid=meta.uid,
                      size=meta.size, flags=list(meta.flags), internal_date=meta.internal_date,
                      date=meta.sent_date, subject=meta.subject, from_=meta.from_header,
                      to=meta.to_header, cc=meta.cc_header, message_id=meta.message_id)


def _name(field: str, name: str) -> str:
    name = name.rstrip("/")
    if name.upper() == "INBOX":
        return "INBOX"
    try:
        return check_mailbox_name(name)
    except InvalidMailboxName as e:
        raise invalid_field(field, str(e)) from None


def _mailbox(item: str | Recipient) -> Mailbox:
    if isinstance(item, Recipient):
        return Mailbox(item.address, item.name)
    return Mailbox(item)


class MailRoutes(APIBase):
    @property
    def _store(self) -> Any:
        return self.services.mailboxes

    async def _box(self, user: User, mailbox_id: int) -> MailboxInfo:
        infos: list[MailboxInfo] = await self._store.mailboxes(user.id)
        for info in infos:
            if info.id == mailbox_id:
                return info
        raise not_found(f"{user.address} has no mailbox {mailbox_id}")

    # -- mailboxes ---------------------------------------------------------------------------

    @endpoint("GET", MAILBOX_PATH, summary="A user's mailboxes", tag="mailboxes",
              scope="mailboxes:read", response=MailboxList)
    async def list_mailboxes(self, request: IRequest, principal: Principal,
                             address: str) -> MailboxList:
        user = await self.user(principal, address)
        return MailboxList(items=[mailbox_out(i) for i in await self._store.mailboxes(user.id)])

    @endpoint("POST", MAILBOX_PATH, summary="Make a mailbox (and its missing parents)",
              tag="mailboxes", scope="mailboxes:write", body=MailboxCreate,
              response=MailboxOut, status=201, errors=(409,))
    async def create_mailbox(self, request: IRequest, principal: Principal, address: str,
                             body: MailboxCreate) -> MailboxOut:
        user = await self.user(principal, address)
        name = _name("name", body.name)
        creations = Announcement(created_mailboxes(user.address, "api", principal.user.address),
                                 await self.services.events.leaving())
        try:
            await self._store.create(user.id, name, announce=creations.records)
        except MailboxExists as e:
            raise ApiError(409, "exists", str(e)) from None
        creations.publish(self.services.events)
        info = await self._store.info(user.id, name)
        await self.audit(request, principal, "mailbox.create", f"{user.address}/{name}", {})
        return mailbox_out(info)

    @endpoint("GET", MAILBOX_PATH + "/<int:mailbox_id>", summary="One mailbox",
              tag="mailboxes", scope="mailboxes:read", response=MailboxOut)
    async def get_mailbox(self, request: IRequest, principal: Principal, address: str,
                          mailbox_id: int) -> MailboxOut:
        user = await self.user(principal, address)
        return mailbox_out(await self._box(user, mailbox_id))

    @endpoint("PATCH", MAILBOX_PATH + "/<int:mailbox_id>", summary="Rename a mailbox",
              tag="mailboxes", scope="mailboxes:write", body=MailboxRename,
              response=MailboxOut, errors=(409,))
    async def rename_mailbox(self, request: IRequest, principal: Principal, address: str,
                             mailbox_id: int, body: MailboxRename) -> MailboxOut:
        user = await self.user(principal, address)
        box = await self._box(user, mailbox_id)
        new = _name("name", body.name)
        try:
            await self._store.rename(user.maildir, user.id, box.name, new)
        except (MailboxError, NoMailbox) as e:
            raise ApiError(409, "conflict", str(e)) from None
        await self.audit(request, principal, "mailbox.rename", f"{user.address}/{box.name}",
                         {"after": {"name": new}})
        return mailbox_out(await self._box(user, mailbox_id))

    @endpoint("DELETE", MAILBOX_PATH + "/<int:mailbox_id>", summary="Delete a mailbox and "
              "its messages", tag="mailboxes", scope="mailboxes:write", status=204,
              errors=(409,))
    async def delete_mailbox(self, request: IRequest, principal: Principal, address: str,
                             mailbox_id: int) -> None:
        user = await self.user(principal, address)
        box = await self._box(user, mailbox_id)
        try:
            await self._store.delete(user.maildir, user.id, box.name)
        except MailboxError as e:
            raise ApiError(409, "conflict", str(e)) from None
        await self.audit(request, principal, "mailbox.delete", f"{user.address}/{box.name}",
                         {"before": {"messages": box.messages}})

    # -- messages ----------------------------------------------------------------------------

    @endpoint("GET", MAILBOX_PATH + "/<int:mailbox_id>/messages", summary="Messages of a "
              "mailbox, newest first; q searches their text", tag="messages",
              scope="messages:read", query=MessageQuery, response=MessagePage)
    async def list_messages(self, request: IRequest, principal: Principal, address: str,
                            mailbox_id: int, query: MessageQuery) -> MessagePage:
        user = await self.user(principal, address)
        box = await self._box(user, mailbox_id)
        uids = None
        criteria: list[tuple[Any, ...]] = []
        if query.q:
            criteria.append(("text", query.q))
        if query.unseen is not None:
            criteria.append(("flag", "seen", not query.unseen))
        if criteria:
            uids = await self._store.search(user.maildir, box.id, ("and", criteria))
        rows, total = await self.db.run("api_messages", page_messages_txn, box.id, uids,
                                        query.limit, query.offset)
        return MessagePage(items=[message_out(r, box.name) for r in rows], total=total,
                           limit=query.limit, offset=query.offset)

    async def _message(self, principal: Principal, address: str, mailbox_id: int,
                       uid: int) -> tuple[User, MailboxInfo, MessageMeta]:
        user = await self.user(principal, address)
        box = await self._box(user, mailbox_id)
        meta = await self.db.run("api_message", message_meta_txn, box.id, uid)
        if meta is None:
            raise not_found(f"no message {uid} in {box.name}")
        return user, box, meta

    @endpoint("GET", MESSAGE_PATH, summary="One message's metadata", tag="messages",
              scope="messages:read", response=MessageOut)
    async def get_message(self, request: IRequest, principal: Principal, address: str,
                          mailbox_id: int, uid: int) -> MessageOut:
        _, box, meta = await self._message(principal, address, mailbox_id, uid)
        return message_out(meta, box.name)

    @endpoint("GET", MESSAGE_PATH + "/raw", summary="The message as stored (RFC 5322)",
              tag="messages", scope="messages:read", response_types=("message/rfc822",))
    async def raw_message(self, request: IRequest, principal: Principal, address: str,
                          mailbox_id: int, uid: int) -> bytes:
        user, box, meta = await self._message(principal, address, mailbox_id, uid)
        files = await self._store.read_many(user.maildir, box.folder, [meta.filename])
        if meta.filename not in files:
            raise not_found(f"the file of message {uid} is missing")
        request.setHeader(b"content-type", b"message/rfc822")
        request.setHeader(b"cache-control", b"no-store")
        return bytes(files[meta.filename])

    @endpoint("DELETE", MESSAGE_PATH, summary="Delete a message (expunged at once)",
              tag="messages", scope="messages:write", status=204)
    async def delete_message(self, request: IRequest, principal: Principal, address: str,
                             mailbox_id: int, uid: int) -> None:
        user, box, _ = await self._message(principal, address, mailbox_id, uid)
        deletions = await self._deletions(principal, user, box, "api")
        await self._store.expunge(user.maildir, box.id, user.id, [uid], only_deleted=False,
                                  announce=deletions.records)
        await self.audit(request, principal, "message.delete",
                         f"{user.address}/{box.name}/{uid}", {"uidvalidity": box.uidvalidity})
        deletions.publish(self.services.events)

    @endpoint("POST", MESSAGE_PATH + "/move", summary="Move a message to another of the "
              "user's mailboxes", tag="messages", scope="messages:write", body=MessageMove,
              response=MessageOut, errors=(409,))
    async def move_message(self, request: IRequest, principal: Principal, address: str,
                           mailbox_id: int, uid: int, body: MessageMove) -> MessageOut:
        user, box, meta = await self._message(principal, address, mailbox_id, uid)
        target = await self._store.info(user.id, _name("mailbox", body.mailbox))
        if target is None:
            raise invalid_field("mailbox", f"{user.address} has no mailbox {body.mailbox}")
        if target.id == box.id:
            return message_out(meta, box.name)
        try:
            moved = await self._store.copy(user.maildir, user.id, box.id, [uid], target)
        except MailboxError as e:
            raise ApiError(409, "conflict", str(e)) from None
        deletions = await self._deletions(principal, user, box, "move")
        await self._store.expunge(user.maildir, box.id, user.id, [uid], only_deleted=False,
                                  announce=deletions.records)
        await self.audit(request, principal, "message.move", f"{user.address}/{box.name}/{uid}",
                         {"after": {"mailbox": target.name, "uid": moved[0][1]}})
        deletions.publish(self.services.events)
        new = await self.db.run("api_message", message_meta_txn, target.id, moved[0][1])
        if new is None:
            raise not_found("the message was removed while it moved")
        return message_out(new, target.name)

    async def _deletions(self, principal: Principal, user: User, box: MailboxInfo,
                         how: str) -> Announcement[list[int]]:
        make = deleted_messages(user.address, box.name, box.uidvalidity, how, "api",
                                principal.user.address)
        return Announcement(make, await self.services.events.leaving())

    # -- sending -----------------------------------------------------------------------------

    @endpoint("POST", "/api/v1/messages", summary="Send a message (JSON, or multipart with a "
              "'message' JSON part and file parts as attachments)", tag="messages",
              scope="messages:send", body=SendRequest, response=SendResult, status=202,
              errors=(422,), body_types=("multipart/form-data",))
    async def send(self, request: IRequest, principal: Principal,
                   body: SendRequest | None) -> SendResult:
        files: list[FilePart] = []
        if body is None:
            body, files = _multipart(request)
        draft = Draft(
            sender=_mailbox(body.from_), to=[_mailbox(r) for r in body.to],
            cc=[_mailbox(r) for r in body.cc],
            reply_to=str(field_address("reply_to", body.reply_to)) if body.reply_to else None,
            subject=body.subject,
            text=body.text, html=body.html, headers=body.headers,
            attachments=[*(_attachment(i, a) for i, a in enumerate(body.attachments)), *files],
        )
        recipients = list(dict.fromkeys(
            m.address for m in (*draft.to, *draft.cc, *(_mailbox(r) for r in body.bcc))))
        if not recipients:
            raise invalid_field("to", "give at least one recipient (to, cc or bcc)")
        try:
            message, message_id = compose(draft, self.services.hostname)
        except ComposeError as e:
            raise invalid_field(e.field, e.problem) from None
        if len(message) > self.services.max_message_size:
            raise ApiError(413, "too_large", f"the message is {len(message)} bytes; the limit "
                           f"is {self.services.max_message_size}")
        if principal.key_domain_id is not None:
            domain = await self.domain(principal, draft.sender.address.rpartition("@")[2],
                                       admin=False, field="from")
            if domain.id != principal.key_domain_id:
                raise forbidden("this API key may not send for another domain")
        policy = self.services.sender
        session = Session(Listener.SUBMISSION, self.client_ip(request), "api", True,
                          user=principal.user.address, session_id=f"api-{uuid.uuid4().hex[:12]}")
        sender = draft.sender.address
        try:
            await policy.check_sender(session, sender, len(message))
        except Refusal as refusal:
            raise _refused("from", refusal) from None
        accepted = []
        for index, address in enumerate(recipients):
            try:
                accepted.append(await policy.check_recipient(session, address, len(message),
                                                             sender))
            except Refusal as refusal:
                raise _refused(f"recipients.{index}", refusal, address) from None
        envelope = Envelope(sender, tuple(recipients), len(message))
        try:
            result = await policy.deliver(session, envelope, accepted, message,
                                          {"tags": list(body.tags), "protocol": "api"})
        except Refusal as refusal:
            raise _refused("", refusal) from None
        await self.audit(request, principal, "message.send", message_id,
                         {"recipients": len(recipients), "queued": list(result.queued)})
        return SendResult(
            message_id=message_id, queue_ids=list(result.queued), tags=list(body.tags),
            delivered=[Delivered(address=_owner(accepted, s.user_id), mailbox_id=s.mailbox_id,
                                 uid=s.uid) for s in result.stored],
        )


def _owner(accepted: list[Any], user_id: int) -> str:
    for item in accepted:
        for user in getattr(item.resolution, "users", ()):
            if user.id == user_id:
                return str(user.address)
    return ""


def _attachment(index: int, attachment: Any) -> FilePart:
    try:
        content = base64.b64decode(attachment.content, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_field(f"attachments.{index}.content", "not base64") from None
    return FilePart(attachment.filename, attachment.content_type, content)


def _refused(field: str, refusal: Refusal, address: str | None = None) -> ApiError:
    details: dict[str, object] = {"smtp_code": refusal.code, "smtp_status": refusal.status}
    if field:
        details["fields"] = [{"field": field, "problem": refusal.text}]
    if address is not None:
        details["address"] = address
    if refusal.temporary:
        return ApiError(503, "try_again", refusal.text, details)
    if refusal.code == 553 and field == "from":
        return ApiError(403, "sender_not_allowed", refusal.text, details)
    return ApiError(422, "refused", refusal.text, details)


def _multipart(request: IRequest) -> tuple[SendRequest, list[FilePart]]:
    """A multipart/form-data send: the 'message' part is the JSON request, each part with a
    file name is an attachment."""
    header = request.getHeader(b"content-type") or b""
    raw = request.content.read() if request.content is not None else b""
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + header + b"\r\n\r\n" + raw)
    if not parsed.is_multipart():
        raise invalid_field("", "a multipart/form-data body with a 'message' part")
    message: bytes | None = None
    files = []
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        content = part.get_payload(decode=True) or b""
        if filename:
            files.append(FilePart(str(filename), part.get_content_type(), bytes(content)))
        elif name == "message":
            message = bytes(content)
        else:
            raise invalid_field(str(name or ""), "an unknown part")
    if message is None:
        raise invalid_field("message", "the 'message' part is missing")
    return validate(SendRequest, message), files
