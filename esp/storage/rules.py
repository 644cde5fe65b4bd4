"""Per-user rules in ``filter_rules`` (rows with a user_id): read for delivery, and managed by
the API.  The conditions and actions are JSON, validated by the API before they are stored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.extras

from esp.rules import Rule
from esp.storage.db import Cursor


@dataclass(frozen=True)
class RuleRow:
    id: int
    user_id: int
    name: str
    priority: int
    enabled: bool
    match: str
    conditions: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    created_at: datetime

    def rule(self) -> Rule:
        return Rule(self.id, self.name, self.conditions, self.actions, self.match,
                    self.priority)


# The conditions column holds {"match": "all" | "any", "all": [...]}: one JSON value, so that
# the match mode needs no column of its own.
_ROW = """
    SELECT id, user_id, name, priority, enabled, coalesce(conditions ->> 'match', 'all'),
           coalesce(conditions -> 'all', '[]'::jsonb), actions, created_at
    FROM filter_rules
"""


def _row(row: Sequence[Any]) -> RuleRow:
    return RuleRow(*row)


def rules_for_txn(cur: Cursor, user_ids: Sequence[int]) -> dict[int, list[Rule]]:
    """The enabled rules of each user, in the order they run."""
    cur.execute(f"{_ROW} WHERE user_id = ANY(%s) AND enabled ORDER BY priority, id",
                (list(user_ids),))
    found: dict[int, list[Rule]] = {user_id: [] for user_id in user_ids}
    for row in cur.fetchall():
        found[row[1]].append(_row(row).rule())
    return found


def list_rules_txn(cur: Cursor, user_id: int) -> list[RuleRow]:
    cur.execute(f"{_ROW} WHERE user_id = %s ORDER BY priority, id", (user_id,))
    return [_row(row) for row in cur.fetchall()]


def get_rule_txn(cur: Cursor, user_id: int, rule_id: int) -> RuleRow | None:
    cur.execute(f"{_ROW} WHERE user_id = %s AND id = %s", (user_id, rule_id))
    row = cur.fetchone()
    return _row(row) if row else None


def save_rule_txn(
    cur: Cursor, user_id: int, rule_id: int | None, name: str, priority: int, enabled: bool,
    match: str, conditions: list[dict[str, Any]], actions: list[dict[str, Any]],
) -> RuleRow | None:
    """Insert (rule_id None) or replace a rule; None when there is no such rule to replace."""
    values = (name, priority, enabled,
              psycopg2.extras.Json({"match": match, "all": conditions}),
              psycopg2.extras.Json(actions))
    if rule_id is None:
        cur.execute("INSERT INTO filter_rules (user_id, name, priority, enabled, conditions, "
                    "actions) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (user_id, *values))
    else:
        cur.execute("UPDATE filter_rules SET name = %s, priority = %s, enabled = %s, "
                    "conditions = %s, actions = %s, updated_at = now() "
                    "WHERE user_id = %s AND id = %s RETURNING id",
                    (*values, user_id, rule_id))
    row = cur.fetchone()
    return get_rule_txn(cur, user_id, row[0]) if row else None


def delete_rule_txn(cur: Cursor, user_id: int, rule_id: int) -> bool:
    cur.execute("DELETE FROM filter_rules WHERE user_id = %s AND id = %s", (user_id, rule_id))
    return bool(cur.rowcount)
