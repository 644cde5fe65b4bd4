"""The pure parts of filtering: merging verdicts, checking them, the header fields filters
add, removing forged ones, and per-user rules."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from esp.filters import JUNK, Verdict, check_verdict, filter_headers, merge
from esp.message import remove_fields
from esp.rules import Facts, Rule, apply


def test_the_first_refusal_ends_the_chain_and_the_rest_add_up() -> None:
    decision = merge([
        Verdict("tag", headers=(("X-A", "1"),), keywords=("$A",), folder="Lists"),
        Verdict("quarantine", headers=(("X-B", "2"),), keywords=("$A", "$B")),
        Verdict.defer("later"),
        Verdict.reject("never seen"),
    ])
    assert decision.action == "defer" and decision.code == 451 and decision.text == "later"
    decision = merge([Verdict("tag", headers=(("X-A", "1"),), keywords=("$A",), folder="Lists"),
                      Verdict("quarantine", headers=(("X-B", "2"),), keywords=("$A", "$B"))])
    assert decision.action == "quarantine" and decision.folder == JUNK
    assert decision.headers == (("X-A", "1"), ("X-B", "2"))
    assert decision.keywords == ("$A", "$B")
    assert merge([Verdict("tag", folder="Lists")]).folder == "Lists"
    assert merge([]).action == "accept"


@pytest.mark.parametrize("verdict", [
    Verdict("reject"),  # no code
    Verdict("reject", code=250, status="2.0.0"),  # would answer 250 and drop the message
    Verdict("defer", code=550, status="5.7.1"),  # a temporary failure made permanent
    Verdict("reject", code=550, status="4.7.1"),
    Verdict("maybe"),  # type: ignore[arg-type]
    "accept",
])
def test_malformed_verdicts_are_refused(verdict: object) -> None:
    with pytest.raises(ValueError):
        check_verdict(verdict)


def test_well_formed_verdicts_pass() -> None:
    for verdict in (Verdict(), Verdict.reject("no"), Verdict.defer("later"),
                    Verdict("reject", code=550, status="5.1.1")):
        assert check_verdict(verdict) is verdict


def test_added_header_fields_are_folded_ascii_and_named_properly() -> None:
    long_value = " ".join(f"SYMBOL_{n}(0.10)" for n in range(60)) + " " + "x" * 2000
    block = filter_headers([("X-Spamd-Result", long_value), ("Bad Name\r\nBcc", "v"),
                            ("X-Note", "caf\u00e9\u2028\r\nBcc: evil@example.test")])
    lines = block.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert all(len(line) <= 78 for line in lines if b"xxxxx" not in line)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        block + b"\r\n")
    assert list(parsed.keys()) == ["X-Spamd-Result", "X-Note"]
    assert "Bcc" not in parsed and parsed["X-Note"] == "caf????Bcc: evil@example.test"


def test_forged_fields_are_removed_with_their_continuation_lines() -> None:
    message = (b"X-Spam: No\r\nFrom: a@b.test\r\nX-Virus-Scanned: clean\r\n\tvery clean\r\n"
               b"Subject: hi\r\n\r\nX-Spam: in the body stays\r\n")
    assert remove_fields(message, frozenset({"x-spam", "x-virus-scanned"})) == (
        b"From: a@b.test\r\nSubject: hi\r\n\r\nX-Spam: in the body stays\r\n")
    assert remove_fields(b"Subject: x\r\n\r\nbody", frozenset({"x-spam"})) == (
        b"Subject: x\r\n\r\nbody")


def facts(header: bytes, sender: str = "bob@example.org", size: int = 1000,
          category: str | None = None, spam: bool = False) -> Facts:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(header)
    return Facts(parsed, sender, size, category, spam)


def test_rules_match_and_act_in_order_until_stop() -> None:
    rules = [
        Rule(1, "lists", [{"field": "list-id", "op": "contains", "value": "Example.ORG"}],
             [{"type": "fileinto", "mailbox": "Lists"}, {"type": "seen"}]),
        Rule(2, "boss", [{"field": "from", "op": "ends_with", "value": "@boss.test"},
                         {"field": "subject", "op": "contains", "value": "urgent"}],
             [{"type": "flag"}, {"type": "stop"}], match="any"),
        Rule(3, "big", [{"field": "size", "op": "over", "value": 500}],
             [{"type": "keyword", "keyword": "$Big"}]),
        Rule(4, "promo", [{"field": "category", "op": "is", "value": "promotions"},
                          {"field": "spam", "op": "is", "value": False}],
             [{"type": "forward", "to": "me@elsewhere.test"}, {"type": "discard"}]),
    ]
    one = apply(rules, facts(b"List-Id: <news.example.org>\r\nSubject: hello\r\n\r\n"))
    assert (one.mailbox, one.flags, one.keywords, one.matched) == (
        "Lists", ["\\Seen"], ["$Big"], [1, 3])
    two = apply(rules, facts(b"From: Boss <b@boss.test>\r\nSubject: lunch\r\n\r\n"))
    assert two.flags == ["\\Flagged"] and two.matched == [2]  # stopped before 'big'
    three = apply(rules, facts(b"Subject: sale\r\n\r\n", size=10, category="promotions"))
    assert three.forward == ["me@elsewhere.test"] and three.discard
    four = apply(rules, facts(b"Subject: sale\r\n\r\n", size=10, category="promotions",
                              spam=True))
    assert not four.discard and four.matched == []
    header = apply([Rule(5, "h", [{"field": "header", "name": "X-Mailer", "op": "is",
                                   "value": "bulkmailer 2"}], [{"type": "seen"}])],
                   facts(b"X-Mailer: BulkMailer 2\r\n\r\n"))
    assert header.flags == ["\\Seen"]
