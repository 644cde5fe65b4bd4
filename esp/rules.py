"""Per-user rules, applied to each message as it is delivered to the user, after the filter
pipeline: conditions on the message (header fields, envelope sender, size, the category the
LLM filter gave, whether it is spam) and actions (file into a mailbox, add a keyword, mark
read or flagged, discard, forward, stop).  Pure: no I/O.

Rules run in priority order (then creation order); every matching rule's actions apply, until
a ``stop``.  String comparisons ignore case.  There are no regular expressions: a rule can
never cost more than a scan of the header.
"""

from __future__ import annotations

import email.message
import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("from", "to", "cc", "subject", "sender", "list-id", "header", "size", "category",
          "spam")
ADDRESS_FIELDS = frozenset({"from", "to", "cc", "sender"})
STRING_OPS = ("contains", "not_contains", "is", "starts_with", "ends_with")
NUMBER_OPS = ("over", "under")
ACTIONS = ("fileinto", "keyword", "seen", "flag", "discard", "forward", "stop")


@dataclass(frozen=True)
class Facts:
    """What rules may look at, for one message."""

    header: email.message.Message
    sender: str
    size: int
    category: str | None = None
    spam: bool = False

    def value(self, condition: Mapping[str, Any]) -> str | int | bool | None:
        name = condition["field"]
        if name == "sender":
            return self.sender
        if name == "size":
            return self.size
        if name == "category":
            return self.category or ""
        if name == "spam":
            return self.spam
        header = condition.get("name", "") if name == "header" else name
        values = self.header.get_all(header) or []
        return " ".join(str(v) for v in values)


def _compare(op: str, text: str, target: str) -> bool:
    if op == "contains":
        return target in text
    if op == "is":
        return text.strip() == target
    if op == "starts_with":
        return text.startswith(target)
    if op == "ends_with":
        return text.rstrip().endswith(target)
    return False


def _matches(condition: Mapping[str, Any], facts: Facts) -> bool:
    value = facts.value(condition)
    op, wanted = condition["op"], condition.get("value")
    if isinstance(value, bool):
        return value is bool(wanted) if op == "is" else False
    if isinstance(value, int):
        if not isinstance(wanted, int):
            return False
        return value > wanted if op == "over" else value < wanted if op == "under" else False
    text, target = (value or "").lower(), str(wanted or "").lower()
    # An address field is compared as written and address by address, so that "from ends
    # with @example.org" holds for "Bob <bob@example.org>".
    candidates = [text]
    if condition["field"] in ADDRESS_FIELDS:
        candidates += [address.lower() for _, address in email.utils.getaddresses([text])
                       if address]
    if op == "not_contains":
        return not any(target in c for c in candidates)
    return any(_compare(op, c, target) for c in candidates)


@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    conditions: Sequence[Mapping[str, Any]]
    actions: Sequence[Mapping[str, Any]]
    match: str = "all"  # or "any"
    priority: int = 0

    def matches(self, facts: Facts) -> bool:
        if not self.conditions:
            return True
        results = (_matches(c, facts) for c in self.conditions)
        return any(results) if self.match == "any" else all(results)


@dataclass
class Outcome:
    """What the rules decided for one recipient."""

    mailbox: str | None = None
    keywords: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    discard: bool = False
    forward: list[str] = field(default_factory=list)
    matched: list[int] = field(default_factory=list)


def apply(rules: Sequence[Rule], facts: Facts) -> Outcome:
    outcome = Outcome()
    for rule in rules:
        if not rule.matches(facts):
            continue
        outcome.matched.append(rule.id)
        for action in rule.actions:
            kind = action["type"]
            if kind == "fileinto":
                outcome.mailbox = str(action["mailbox"])
            elif kind == "keyword" and action["keyword"] not in outcome.keywords:
                outcome.keywords.append(str(action["keyword"]))
            elif kind == "seen" and "\\Seen" not in outcome.flags:
                outcome.flags.append("\\Seen")
            elif kind == "flag" and "\\Flagged" not in outcome.flags:
                outcome.flags.append("\\Flagged")
            elif kind == "discard":
                outcome.discard = True
            elif kind == "forward" and action["to"] not in outcome.forward:
                outcome.forward.append(str(action["to"]))
            elif kind == "stop":
                return outcome
    return outcome
