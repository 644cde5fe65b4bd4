"""A user's rules: conditions and actions applied to each message delivered to them."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from esp.api.base import APIBase, field_address
from esp.api.framework import Principal, endpoint, invalid_field, not_found
from esp.api.models import RuleIn, RuleList, RuleOut
from esp.storage.directory import User
from esp.storage.mailboxes import InvalidMailboxName, check_mailbox_name
from esp.storage.rules import (
    RuleRow,
    delete_rule_txn,
    get_rule_txn,
    list_rules_txn,
    save_rule_txn,
)

RULES = "/api/v1/users/<address>/rules"


def rule_out(row: RuleRow) -> RuleOut:
    return RuleOut(id=row.id, name=row.name, priority=row.priority, enabled=row.enabled,
                   match=row.match, conditions=row.conditions, actions=row.actions,
                   created_at=row.created_at)


def _stored(body: RuleIn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The conditions and actions as stored: only the keys each uses, addresses and mailbox
    names checked."""
    conditions = [c.model_dump(exclude_none=True) for c in body.conditions]
    actions = []
    for index, action in enumerate(body.actions):
        stored = action.model_dump(exclude_none=True)
        if action.to is not None:
            stored["to"] = str(field_address(f"actions.{index}.to", action.to))
        if action.mailbox is not None and action.mailbox.upper() != "INBOX":
            try:
                check_mailbox_name(action.mailbox)
            except InvalidMailboxName as e:
                raise invalid_field(f"actions.{index}.mailbox", str(e)) from None
        actions.append(stored)
    return conditions, actions


class RulesRoutes(APIBase):
    def _forget(self, user: User) -> None:
        if self.services.forget_rules is not None:
            self.services.forget_rules(user.id)

    @endpoint("GET", RULES, summary="A user's rules, in the order they run", tag="rules",
              scope="rules:read", response=RuleList)
    async def list_rules(self, request: IRequest, principal: Principal,
                         address: str) -> RuleList:
        user = await self.user(principal, address)
        rows = await self.db.run("api_rules", list_rules_txn, user.id)
        return RuleList(items=[rule_out(r) for r in rows])

    @endpoint("POST", RULES, summary="Add a rule", tag="rules", scope="rules:write",
              body=RuleIn, response=RuleOut, status=201)
    async def create_rule(self, request: IRequest, principal: Principal, address: str,
                          body: RuleIn) -> RuleOut:
        user = await self.user(principal, address)
        conditions, actions = _stored(body)
        row = await self.change(
            request, principal, "rule.create",
            lambda r: f"{user.address} rule {r.id if r else 0}",
            save_rule_txn, user.id, None, body.name, body.priority, body.enabled,
            body.match, conditions, actions,
            summary=lambda r: {"after": {"name": body.name, "actions": actions}})
        assert row is not None
        self._forget(user)
        request.setHeader(b"location", f"/api/v1/users/{user.address}/rules/{row.id}".encode())
        return rule_out(row)

    @endpoint("GET", RULES + "/<int:rule_id>", summary="One rule", tag="rules",
              scope="rules:read", response=RuleOut)
    async def get_rule(self, request: IRequest, principal: Principal, address: str,
                       rule_id: int) -> RuleOut:
        user = await self.user(principal, address)
        row = await self.db.run("api_rule", get_rule_txn, user.id, rule_id)
        if row is None:
            raise not_found(f"{user.address} has no rule {rule_id}")
        return rule_out(row)

    @endpoint("PUT", RULES + "/<int:rule_id>", summary="Replace a rule", tag="rules",
              scope="rules:write", body=RuleIn, response=RuleOut)
    async def replace_rule(self, request: IRequest, principal: Principal, address: str,
                           rule_id: int, body: RuleIn) -> RuleOut:
        user = await self.user(principal, address)
        conditions, actions = _stored(body)
        row = await self.change(
            request, principal, "rule.update", f"{user.address} rule {rule_id}",
            save_rule_txn, user.id, rule_id, body.name, body.priority, body.enabled,
            body.match, conditions, actions,
            summary=lambda _: {"after": {"name": body.name, "actions": actions}})
        if row is None:
            raise not_found(f"{user.address} has no rule {rule_id}")
        self._forget(user)
        return rule_out(row)

    @endpoint("DELETE", RULES + "/<int:rule_id>", summary="Remove a rule", tag="rules",
              scope="rules:write", status=204)
    async def delete_rule(self, request: IRequest, principal: Principal, address: str,
                          rule_id: int) -> None:
        user = await self.user(principal, address)
        row = await self.db.run("api_rule", get_rule_txn, user.id, rule_id)
        if row is None:
            raise not_found(f"{user.address} has no rule {rule_id}")
        await self.change(request, principal, "rule.remove", f"{user.address} rule {rule_id}",
                          delete_rule_txn, user.id, rule_id,
                          summary=lambda _: {"before": {"name": row.name}})
        self._forget(user)
