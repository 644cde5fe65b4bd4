"""The published event schemas (docs/schemas/events) are the ones the code checks against, one
per event type; the suite checks every event it sees against them (tests/helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from esp.events import EVENT_TYPES, MESSAGE_DELETED, Event
from esp.eventschemas import event_body, schema_of
from tests.helpers import assert_event_matches_schema

DOCS = Path(__file__).parent.parent / "docs" / "schemas" / "events"


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_each_type_has_its_schema_published(event_type: str) -> None:
    published = json.loads((DOCS / f"{event_type}.json").read_text())
    assert published == schema_of(event_type), (
        "regenerate with: python -m esp.eventschemas docs/schemas/events")
    jsonschema.Draft202012Validator.check_schema(published)
    assert f"`{event_type}`" in (DOCS.parent.parent / "events.md").read_text()


def test_a_payload_that_breaks_its_schema_is_caught() -> None:
    good = Event(MESSAGE_DELETED, {"user": "a@example.test", "mailbox": "INBOX", "uid": 3,
                                   "uidvalidity": 7, "reason": "expunge", "protocol": "imap"},
                 domain="example.test", actor="a@example.test")
    assert_event_matches_schema(good)
    missing = Event(MESSAGE_DELETED, {k: v for k, v in good.payload.items() if k != "uid"})
    with pytest.raises(jsonschema.ValidationError):
        assert_event_matches_schema(missing)
    extra = Event(MESSAGE_DELETED, {**good.payload, "surprise": 1})
    with pytest.raises(AssertionError, match="surprise"):
        assert_event_matches_schema(extra)
    assert event_body(good)["data"]["id"] == str(good.id)
