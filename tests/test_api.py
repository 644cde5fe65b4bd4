"""The management API over HTTP on loopback, against a running ``twistd esp`` and real
PostgreSQL: tokens, roles, the error shape, and bodies that must change nothing."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg2
import pytest

from esp.api.app import ManagementAPI  # noqa: F401 (declares every endpoint)
from esp.api.openapi import document as openapi_document
from esp.api.tokens import fingerprint
from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp, write_config
from tests.helpers import start_twistd

ROOT_PASSWORD = "root's long password"
ADMIN_PASSWORD = "admin's long password"
USER_PASSWORD = "user's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("root@example.test", ROOT_PASSWORD)
    server.add_user("admin@example.test", ADMIN_PASSWORD)
    server.add_user("user@example.test", USER_PASSWORD)
    server.add_user("other@other.test", "other's long password")
    with psycopg2.connect(module_database_dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET role = 'superadmin' WHERE localpart = 'root'")
        cur.execute("UPDATE users SET role = 'domain_admin' WHERE localpart = 'admin'")
    yield server
    server.process.stop()


def call(esp: EspServer, method: str, path: str, body: object = None, token: str | None = None,
         raw: bytes | None = None, content_type: str = "application/json",
         ) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"http://127.0.0.1:{esp.ports['api']}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        payload = e.read()
        assert e.headers["Content-Type"] == "application/json", payload
        return e.code, json.loads(payload)


def login(esp: EspServer, user: str, password: str) -> dict[str, Any]:
    status, body = call(esp, "POST", "/api/v1/auth/token",
                        {"username": user, "password": password})
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    return body


def error_code(response: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status, body = response
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return status, body["error"]["code"]


def audit_rows(esp: EspServer) -> list[tuple[str, str, str]]:
    """The audit log's changes (logins, written as they happen, are left out)."""
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, action, target FROM audit_log "
                    "WHERE action NOT IN ('login', 'login.failed') ORDER BY id")
        return list(cur.fetchall())


def signing_key(esp: EspServer) -> bytes:
    return (esp.data_dir / "api-signing.key").read_bytes()


def test_health_and_readiness(esp: EspServer) -> None:
    assert call(esp, "GET", "/healthz") == (200, {"status": "ok"})
    assert call(esp, "GET", "/readyz") == (200, {"status": "ready"})
    assert error_code(call(esp, "GET", "/api/v1/nothing-here")) == (404, "not_found")
    assert error_code(call(esp, "DELETE", "/healthz")) == (405, "method_not_allowed")


def test_a_token_for_good_credentials_and_401_for_bad_ones(esp: EspServer) -> None:
    tokens = login(esp, "user@example.test", USER_PASSWORD)
    status, me = call(esp, "GET", "/api/v1/me", token=tokens["access_token"])
    assert status == 200 and me["address"] == "user@example.test" and me["role"] == "user"
    assert error_code(call(esp, "POST", "/api/v1/auth/token",
                           {"username": "user@example.test", "password": "wrong"})) == (
        401, "bad_credentials")
    assert error_code(call(esp, "GET", "/api/v1/me")) == (401, "unauthenticated")
    # The refresh token buys a new pair, and is not an access token itself.
    status, again = call(esp, "POST", "/api/v1/auth/refresh",
                         {"refresh_token": tokens["refresh_token"]})
    assert status == 200 and call(esp, "GET", "/api/v1/me", token=again["access_token"])[0] == 200
    assert error_code(call(esp, "GET", "/api/v1/me", token=tokens["refresh_token"])) == (
        401, "invalid_token")
    assert error_code(call(esp, "POST", "/api/v1/auth/refresh",
                           {"refresh_token": tokens["access_token"]})) == (401, "invalid_token")


def forge(esp: EspServer, key: bytes | None = None, algorithm: str = "HS256",
          **changes: Any) -> str:
    now = int(time.time())
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, password_hash FROM users WHERE localpart = 'root'")
        row = cur.fetchone()
        assert row is not None
    claims = {"iss": "esp", "sub": str(row[0]), "typ": "access", "iat": now, "exp": now + 600,
              "pwd": fingerprint(row[1]), **changes}
    if algorithm == "none":
        return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    return jwt.encode(claims, key if key is not None else signing_key(esp), algorithm=algorithm)


def test_forged_expired_and_orphaned_tokens_are_refused(esp: EspServer) -> None:
    good = forge(esp)
    assert call(esp, "GET", "/api/v1/me", token=good)[0] == 200  # the forger is right
    for token in (
        forge(esp, algorithm="none"),
        forge(esp, key=b"k" * 32),  # a wrong signature
        forge(esp, key=signing_key(esp) * 2, algorithm="HS512"),  # another algorithm
        forge(esp, exp=int(time.time()) - 1),  # expired
        forge(esp, iss="someone-else"),
        forge(esp, pwd="0" * 16),  # issued before a password change
        good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        "not-a-token",
    ):
        assert error_code(call(esp, "GET", "/api/v1/me", token=token)) == (401, "invalid_token")
    # A deleted user's token stops working at once.
    tokens = login(esp, "other@other.test", "other's long password")
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM users WHERE localpart = 'other'")
    assert error_code(call(esp, "GET", "/api/v1/me", token=tokens["access_token"])) == (
        401, "invalid_token")


def test_roles_decide_who_sees_and_makes_domains(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    user = login(esp, "user@example.test", USER_PASSWORD)["access_token"]
    before = audit_rows(esp)

    assert error_code(call(esp, "POST", "/api/v1/domains", {"name": "new.test"}, admin)) == (
        403, "forbidden")
    assert audit_rows(esp) == before  # nothing written
    status, made = call(esp, "POST", "/api/v1/domains", {"name": "New.Test"}, root)
    assert status == 201 and made["name"] == "new.test"
    assert audit_rows(esp) == [*before, ("root@example.test", "domain.create", "new.test")]
    assert error_code(call(esp, "POST", "/api/v1/domains", {"name": "new.test"}, root)) == (
        409, "exists")

    names = [d["name"] for d in call(esp, "GET", "/api/v1/domains", token=root)[1]["items"]]
    assert {"example.test", "new.test"} <= set(names)
    status, mine = call(esp, "GET", "/api/v1/domains", token=admin)
    assert [d["name"] for d in mine["items"]] == ["example.test"]
    assert call(esp, "GET", "/api/v1/domains/example.test", token=admin)[0] == 200
    assert error_code(call(esp, "GET", "/api/v1/domains/new.test", token=admin)) == (
        403, "forbidden")
    assert error_code(call(esp, "GET", "/api/v1/domains/nowhere.test", token=root)) == (
        404, "not_found")
    assert error_code(call(esp, "GET", "/api/v1/domains", token=user)) == (403, "forbidden")


def test_bad_bodies_get_4xx_naming_the_field_and_change_nothing(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    before = audit_rows(esp)
    cases: list[tuple[dict[str, Any], int, str, str | None]] = []
    for kwargs, status, code, field in (
        ({"raw": b"{not json"}, 400, "invalid_json", None),
        ({"raw": b"[1, 2]"}, 400, "validation_failed", ""),
        ({"body": {"name": "x.test", "color": "red"}}, 400, "validation_failed", "color"),
        ({"body": {"name": 42}}, 400, "validation_failed", "name"),
        ({"body": {}}, 400, "validation_failed", "name"),
        ({"body": {"name": "bad name!"}}, 400, "validation_failed", "name"),
        ({"raw": b'{"name": "x.test"}', "content_type": "text/plain"}, 415,
         "unsupported_media_type", None),
    ):
        cases.append((kwargs, status, code, field))
        response = call(esp, "POST", "/api/v1/domains", token=root, **kwargs)
        assert error_code(response) == (status, code), (kwargs, response)
        if field is not None:
            fields = [f["field"] for f in response[1]["error"]["details"]["fields"]]
            assert field in fields, response
    # Past the configured limit (10 MiB): refused from its Content-Length, before it is read.
    with socket.create_connection(("127.0.0.1", esp.ports["api"]), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/domains HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Authorization: Bearer " + root.encode() + b"\r\n"
                     b"Content-Length: 11534336\r\n\r\n{\"name\": \"")
        answer = b""
        while chunk := sock.recv(65536):  # the server answers and hangs up at once
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and json.loads(payload)["error"]["code"] == (
        "too_large")
    assert audit_rows(esp) == before
    names = [d["name"] for d in call(esp, "GET", "/api/v1/domains", token=root)[1]["items"]]
    assert "x.test" not in names and len(cases) == 7


def user_count(esp: EspServer) -> int:
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def test_a_domain_admin_manages_their_domain_and_nothing_else(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    assert call(esp, "POST", "/api/v1/domains", {"name": "elsewhere.test"}, root)[0] == 201
    status, made = call(esp, "POST", "/api/v1/users",
                        {"address": "Carol@Example.test", "password": "carol's password",
                         "display_name": "Carol", "quota_bytes": 1 << 20}, admin)
    assert status == 201, made
    assert made["address"] == "carol@example.test" and made["role"] == "user"
    assert made["identities"] == ["carol@example.test"] and made["quota_bytes"] == 1 << 20
    assert (esp.maildir_root / "example.test" / "carol" / "cur").is_dir()
    # The new user can log in at once, through the same checker as IMAP and SMTP.
    login(esp, "carol@example.test", "carol's password")

    status, alias = call(esp, "POST", "/api/v1/aliases",
                         {"source": "sales@example.test", "destination": "carol@example.test"},
                         admin)
    assert status == 201 and alias["source"] == "sales@example.test"
    assert call(esp, "GET", "/api/v1/users/carol@example.test", token=admin)[1][
        "identities"] == ["carol@example.test", "sales@example.test"]
    status, page = call(esp, "GET", "/api/v1/users?domain=example.test&q=car", token=admin)
    assert status == 200 and [u["address"] for u in page["items"]] == ["carol@example.test"]
    assert page["total"] == 1
    status, changed = call(esp, "PATCH", "/api/v1/users/carol@example.test",
                           {"unlimited": ["quota_bytes"], "display_name": "Carol C."}, admin)
    assert status == 200 and changed["quota_bytes"] is None
    assert changed["display_name"] == "Carol C."
    aliases = call(esp, "GET", "/api/v1/aliases", token=admin)[1]["items"]
    assert {a["source"].rpartition("@")[2] for a in aliases} == {"example.test"}

    # Another domain: refused, and nothing is written.
    before, users_before = audit_rows(esp), user_count(esp)
    for method, path, body in (
        ("POST", "/api/v1/users", {"address": "eve@elsewhere.test", "password": "eve's pass"}),
        ("POST", "/api/v1/aliases", {"source": "x@elsewhere.test",
                                     "destination": "carol@example.test"}),
        ("GET", "/api/v1/users?domain=elsewhere.test", None),
        ("GET", "/api/v1/domains/elsewhere.test", None),
        ("PATCH", "/api/v1/users/root@example.test", {"enabled": False}),  # a superadmin
        ("POST", "/api/v1/users", {"address": "boss@example.test", "password": "a password",
                                   "role": "superadmin"}),
    ):
        assert error_code(call(esp, method, path, body, admin)) == (403, "forbidden"), path
    assert audit_rows(esp) == before and user_count(esp) == users_before
    # A user gets 403 on the administration of their own domain too.
    carol = login(esp, "carol@example.test", "carol's password")["access_token"]
    assert error_code(call(esp, "GET", "/api/v1/users", token=carol)) == (403, "forbidden")
    assert error_code(call(esp, "GET", "/api/v1/users/admin@example.test", token=carol)) == (
        403, "forbidden")
    assert error_code(call(esp, "PATCH", "/api/v1/users/carol@example.test",
                           {"quota_bytes": 1 << 40}, carol)) == (403, "forbidden")

    assert call(esp, "DELETE", f"/api/v1/aliases/{alias['id']}", token=admin)[0] == 204
    assert call(esp, "DELETE", "/api/v1/users/carol@example.test", token=admin)[0] == 204
    assert error_code(call(esp, "GET", "/api/v1/users/carol@example.test", token=admin)) == (
        404, "not_found")
    assert not (esp.maildir_root / "example.test" / "carol").exists()  # moved aside, kept
    actions = [(a, t) for _, a, t in audit_rows(esp)[len(before):]]
    assert actions == [("alias.remove", "sales@example.test"),
                       ("user.remove", "carol@example.test")]


def test_a_user_changes_their_own_password_only(esp: EspServer) -> None:
    esp.add_user("dave@example.test", "dave's first password")
    tokens = login(esp, "dave@example.test", "dave's first password")
    dave = tokens["access_token"]
    path = "/api/v1/users/dave@example.test/password"
    response = call(esp, "PUT", path, {"password": "dave's second password"}, dave)
    assert error_code(response) == (400, "validation_failed")
    assert response[1]["error"]["details"]["fields"][0]["field"] == "current_password"
    assert error_code(call(esp, "PUT", path, {"password": "dave's second password",
                                              "current_password": "a wrong guess"}, dave)) == (
        403, "forbidden")
    assert error_code(call(esp, "PUT", "/api/v1/users/admin@example.test/password",
                           {"password": "taken over!", "current_password": "x"}, dave)) == (
        403, "forbidden")
    assert error_code(call(esp, "PUT", path, {"password": "short",
                                              "current_password": "dave's first password"},
                           dave)) == (400, "validation_failed")
    assert call(esp, "PUT", path, {"password": "dave's second password",
                                   "current_password": "dave's first password"}, dave)[0] == 204
    # Every token issued before the change ends; the new password works.
    assert error_code(call(esp, "GET", "/api/v1/me", token=dave)) == (401, "invalid_token")
    assert error_code(call(esp, "POST", "/api/v1/auth/refresh",
                           {"refresh_token": tokens["refresh_token"]})) == (401, "invalid_token")
    login(esp, "dave@example.test", "dave's second password")
    # The domain's administrator sets it without knowing it.
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    assert call(esp, "PUT", path, {"password": "dave's third password"}, admin)[0] == 204
    login(esp, "dave@example.test", "dave's third password")


def test_api_keys_act_within_their_scopes_and_domain(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    status, made = call(esp, "POST", "/api/v1/api-keys",
                        {"name": "monitoring", "scopes": ["read"]}, root)
    assert status == 201 and made["key"].startswith("esp_") and made["key"].startswith(
        made["prefix"]) and made["scopes"] == ["read"] and made["owner"] == "root@example.test"
    key = made["key"]
    assert call(esp, "GET", "/api/v1/domains", token=key)[0] == 200
    assert call(esp, "GET", "/api/v1/users", token=key)[0] == 200
    before = audit_rows(esp)
    for method, path, body in (
        ("POST", "/api/v1/domains", {"name": "by-key.test"}),
        ("POST", "/api/v1/users", {"address": "k@example.test", "password": "a password"}),
        ("POST", "/api/v1/api-keys", {"name": "escalate", "scopes": ["*"]}),
        ("DELETE", "/api/v1/users/user@example.test", None),
    ):
        response = call(esp, method, path, body, key)
        assert error_code(response) == (403, "forbidden"), response
    assert audit_rows(esp) == before
    # Listed without the secret; stored only as a hash.
    listed = call(esp, "GET", "/api/v1/api-keys", token=root)[1]["items"]
    assert [k["id"] for k in listed if k["name"] == "monitoring"] == [made["id"]]
    assert all("key" not in k for k in listed)
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM api_keys WHERE secret_hash::text LIKE %s",
                    (f"%{key[4:]}%",))
        assert cur.fetchone() == (0,)
    # A key restricted to one domain cannot see another, even for a superadmin.
    status, scoped = call(esp, "POST", "/api/v1/api-keys",
                          {"name": "one domain", "scopes": ["*"], "domain": "example.test"},
                          root)
    assert status == 201
    assert call(esp, "GET", "/api/v1/domains/example.test", token=scoped["key"])[0] == 200
    assert error_code(call(esp, "GET", "/api/v1/domains/new.test", token=scoped["key"])) == (
        403, "forbidden")
    assert [d["name"] for d in call(esp, "GET", "/api/v1/domains",
                                    token=scoped["key"])[1]["items"]] == ["example.test"]
    # Revoked: 401 at once.
    assert call(esp, "DELETE", f"/api/v1/api-keys/{made['id']}", token=root)[0] == 204
    assert error_code(call(esp, "GET", "/api/v1/domains", token=key)) == (401, "invalid_token")
    assert error_code(call(esp, "GET", "/api/v1/domains", token="esp_" + "x" * 43)) == (
        401, "invalid_token")


def test_bad_user_bodies_name_the_field_and_write_nothing(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    before, users = audit_rows(esp), user_count(esp)
    for body, field in (
        ({"address": "x@example.test", "password": "long enough", "quota_bytes": -1},
         "quota_bytes"),
        ({"address": "x@example.test", "password": "long enough", "quota_bytes": "10"},
         "quota_bytes"),
        ({"address": "x@example.test", "password": "long enough", "admin": True}, "admin"),
        ({"address": "not an address", "password": "long enough"}, "address"),
        ({"address": "x@example.test", "password": "long enough", "role": "god"}, "role"),
        ({"address": "x@example.test"}, "password"),
        ({"address": "x@example.test", "password": 12345678}, "password"),
    ):
        response = call(esp, "POST", "/api/v1/users", body, root)
        assert error_code(response) == (400, "validation_failed"), (body, response)
        assert field in [f["field"] for f in response[1]["error"]["details"]["fields"]]
    response = call(esp, "POST", "/api/v1/users",
                    {"address": "x@nowhere.test", "password": "long enough"}, root)
    assert error_code(response) == (422, "unknown_domain")
    assert audit_rows(esp) == before and user_count(esp) == users



def spool_file(esp: EspServer, queue_id: int) -> bytes:
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT m.spool_name FROM queue q JOIN outbound_messages m "
                    "ON m.id = q.message_id WHERE q.id = %s", (queue_id,))
        row = cur.fetchone()
        assert row is not None
    return (esp.data_dir / "spool" / "new" / row[0]).read_bytes()


def multipart(parts: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    boundary = "esp-test-boundary-7f3a"
    body = b""
    for name, filename, kind, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 f"Content-Type: {kind}\r\n\r\n").encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_send_api_delivers_locally_and_queues_signed_mail_for_remote(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    status, key = call(esp, "POST", "/api/v1/domains/example.test/dkim-keys",
                       {"selector": "api1", "algorithm": "ed25519"}, root)
    assert status == 201 and key["dns_name"] == "api1._domainkey.example.test"
    user = login(esp, "user@example.test", USER_PASSWORD)["access_token"]
    status, sent = call(esp, "POST", "/api/v1/messages", {
        "from": {"address": "user@example.test", "name": "The User"},
        "to": ["admin@example.test", "someone@remote.test"],
        "bcc": ["root@example.test"],
        "subject": "Quarterly figures \u2013 final",
        "text": "Hello,\nthe figures are attached.\n",
        "html": "<p>Hello,<br>the figures are attached.</p>",
        "attachments": [{"filename": "figures.csv", "content_type": "text/csv",
                         "content": base64.b64encode(b"q,total\n1,42\n").decode()}],
        "headers": {"X-Campaign": "q4"},
        "tags": ["reports"],
    }, user)
    assert status == 202, sent
    assert sent["tags"] == ["reports"] and len(sent["queue_ids"]) == 1
    assert {d["address"] for d in sent["delivered"]} == {"admin@example.test",
                                                        "root@example.test"}
    # Local: in the recipients' INBOX; Bcc is not in the message.
    (_uid, _size, filename), = esp.messages("admin@example.test")
    stored = esp.message_file("admin@example.test", filename)
    parsed = email.message_from_bytes(stored, policy=email.policy.default)
    assert parsed["Subject"] == "Quarterly figures \u2013 final"
    assert parsed["From"] == "The User <user@example.test>" and parsed["X-Campaign"] == "q4"
    assert "root@example.test" not in stored.decode("utf-8", "replace")
    assert parsed["Message-ID"] == sent["message_id"]
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["figures.csv"]
    assert len(esp.messages("root@example.test")) == 1
    # Remote: a queue row with the message DKIM-signed for the sender's domain.
    spooled = email.message_from_bytes(spool_file(esp, sent["queue_ids"][0]),
                                       policy=email.policy.default)
    signature = str(spooled["DKIM-Signature"])
    assert "d=example.test" in signature and "s=api1" in signature
    status, entry = call(esp, "GET", f"/api/v1/queue/{sent['queue_ids'][0]}", token=root)
    assert status == 200 and entry["recipients"][0]["address"] == "someone@remote.test"

    # Multipart: the JSON request and a file part.
    raw, kind = multipart([
        ("message", None, "application/json", json.dumps(
            {"from": "user@example.test", "to": ["admin@example.test"],
             "subject": "with a file", "text": "see the file"}).encode()),
        ("file", "notes.txt", "text/plain", b"some notes\n"),
    ])
    status, second = call(esp, "POST", "/api/v1/messages", token=user, raw=raw,
                          content_type=kind)
    assert status == 202 and second["queue_ids"] == [], second
    assert len(esp.messages("admin@example.test")) == 2

    # Refusals: a sender the user does not own, a local recipient that does not exist.
    before = len(esp.messages("admin@example.test"))
    response = call(esp, "POST", "/api/v1/messages", {
        "from": "admin@example.test", "to": ["admin@example.test"], "text": "x"}, user)
    assert error_code(response) == (403, "sender_not_allowed")
    response = call(esp, "POST", "/api/v1/messages", {
        "from": "user@example.test", "to": ["admin@example.test", "nobody@example.test"],
        "text": "x"}, user)
    assert error_code(response) == (422, "refused")
    assert response[1]["error"]["details"]["fields"][0]["field"] == "recipients.1"
    response = call(esp, "POST", "/api/v1/messages", {
        "from": "user@example.test", "to": ["admin@example.test"], "text": "x",
        "headers": {"Content-Type": "text/html"}}, user)
    assert error_code(response) == (400, "validation_failed")
    assert len(esp.messages("admin@example.test")) == before


def test_messages_are_listed_read_moved_and_deleted(esp: EspServer) -> None:
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    base = "/api/v1/users/admin@example.test/mailboxes"
    status, boxes = call(esp, "GET", base, token=admin)
    assert status == 200
    ids = {b["name"]: b["id"] for b in boxes["items"]}
    assert {"INBOX", "Archive", "Junk", "Sent", "Trash", "Drafts"} <= set(ids)
    status, page = call(esp, "GET", f"{base}/{ids['INBOX']}/messages?q=figures", token=admin)
    assert status == 200 and page["total"] == 1, page
    message = page["items"][0]
    assert message["subject"] == "Quarterly figures \u2013 final"
    assert message["from"] == "The User <user@example.test>"
    path = f"{base}/{ids['INBOX']}/messages/{message['uid']}"
    request = urllib.request.Request(f"http://127.0.0.1:{esp.ports['api']}{path}/raw")
    request.add_header("Authorization", f"Bearer {admin}")
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (loopback)
        assert answer.headers["Content-Type"] == "message/rfc822"
        assert b"Subject: Quarterly figures" in answer.read()
    status, moved = call(esp, "POST", f"{path}/move", {"mailbox": "Archive"}, admin)
    assert status == 200 and moved["mailbox"] == "Archive" and moved["uid"] >= 1
    assert call(esp, "GET", path, token=admin)[0] == 404
    assert len(esp.messages("admin@example.test", "Archive")) == 1
    archived = f"{base}/{ids['Archive']}/messages/{moved['uid']}"
    assert call(esp, "DELETE", archived, token=admin)[0] == 204
    assert esp.messages("admin@example.test", "Archive") == []
    # Another user's mailboxes are not the caller's to read.
    user = login(esp, "user@example.test", USER_PASSWORD)["access_token"]
    assert error_code(call(esp, "GET", base, token=user)) == (403, "forbidden")
    status, made = call(esp, "POST", "/api/v1/users/user@example.test/mailboxes",
                        {"name": "Projects/2026"}, user)
    assert status == 201 and made["name"] == "Projects/2026"
    for bad in ("../etc", "a//b", "x*", "/abs"):
        response = call(esp, "POST", "/api/v1/users/user@example.test/mailboxes",
                        {"name": bad}, user)
        assert error_code(response) == (400, "validation_failed"), bad


def test_a_domain_shows_the_records_to_publish_and_what_dns_says(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    for domain in ("hosted.test", "dmarc-reject.test"):
        assert call(esp, "POST", "/api/v1/domains", {"name": domain}, root)[0] == 201
        assert call(esp, "POST", f"/api/v1/domains/{domain}/dkim-keys",
                    {"selector": "esp1"}, root)[0] == 201

    def records(domain: str) -> dict[str, tuple[str, str, list[str]]]:
        status, body = call(esp, "GET", f"/api/v1/domains/{domain}/dns", token=root)
        assert status == 200 and body["domain"] == domain
        return {r["name"] if r["type"] == "MX" or "._domainkey." in r["name"]
                or r["name"].startswith("_dmarc.") else "spf": (r["value"], r["status"],
                                                               r["found"])
                for r in body["records"]}

    hosted = records("hosted.test")
    assert hosted["hosted.test"][:2] == ("10 mx.example.test.", "ok")
    assert hosted["spf"][:2] == ("v=spf1 mx ~all", "ok")
    value, status, found = hosted["esp1._domainkey.hosted.test"]
    assert value.startswith("v=DKIM1; k=rsa; p=") and status == "missing" and found == []
    assert hosted["_dmarc.hosted.test"][1] == "missing"
    other = records("dmarc-reject.test")
    assert other["dmarc-reject.test"][1] == "missing"  # no MX at all
    assert other["spf"][1:] == ("different", ["v=spf1 ip4:192.0.2.1 -all"])
    assert other["_dmarc.dmarc-reject.test"][1:] == ("ok", ["v=DMARC1; p=reject"])


def test_the_api_speaks_https_when_configured(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    config = write_config(scratch, database_dsn, test_dns.nameserver)
    text = config.read_text()
    listen = "  api:\n    listen: 'tcp:0:interface=127.0.0.1'\n"
    assert listen in text
    config.write_text(text.replace(listen, listen + "    tls: true\n"))
    process = start_twistd("esp", "--config", str(config))
    try:
        line = process.wait_for("api-0 listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        context = ssl.create_default_context(
            cafile=str(scratch / "var" / "tls" / "selfsigned.crt"))
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=30,
                                    context=context) as answer:
            assert json.loads(answer.read()) == {"status": "ok"}
        with pytest.raises(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/healthz", timeout=30):
            pass
    finally:
        process.stop()


def test_a_domain_admin_cannot_reach_a_superadmin_of_their_domain(esp: EspServer) -> None:
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    before = audit_rows(esp)
    for method, path, body in (
        ("POST", "/api/v1/api-keys", {"name": "x", "scopes": ["*"],
                                      "user": "root@example.test"}),
        ("GET", "/api/v1/api-keys?user=root@example.test", None),
        ("GET", "/api/v1/users/root@example.test/mailboxes", None),
        ("POST", "/api/v1/users/root@example.test/mailboxes", {"name": "mine"}),
        ("PATCH", "/api/v1/users/root@example.test", {"display_name": "owned"}),
        ("PUT", "/api/v1/users/root@example.test/password", {"password": "new password!"}),
        ("DELETE", "/api/v1/users/root@example.test", None),
    ):
        assert error_code(call(esp, method, path, body, admin)) == (403, "forbidden"), path
    assert audit_rows(esp) == before


def test_a_domain_key_stays_in_its_domain(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    assert call(esp, "POST", "/api/v1/domains", {"name": "keyed.test"}, root)[0] == 201
    status, everything = call(esp, "POST", "/api/v1/api-keys",
                              {"name": "all", "scopes": ["*"]}, root)
    assert status == 201
    status, narrow = call(esp, "POST", "/api/v1/api-keys",
                          {"name": "narrow", "scopes": ["*"], "domain": "keyed.test"}, root)
    assert status == 201
    key = narrow["key"]
    response = call(esp, "POST", "/api/v1/messages", {
        "from": "root@example.test", "to": ["admin@example.test"], "text": "x"}, key)
    assert error_code(response) == (403, "forbidden")
    assert error_code(call(esp, "DELETE", f"/api/v1/api-keys/{everything['id']}",
                           token=key)) == (404, "not_found")
    assert [k["id"] for k in call(esp, "GET", "/api/v1/api-keys", token=key)[1]["items"]] == [
        narrow["id"]]
    assert call(esp, "GET", "/api/v1/domains", token=everything["key"])[0] == 200


def test_hostile_strings_are_refused_with_400(esp: EspServer) -> None:
    root = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    before = audit_rows(esp)
    send = {"from": "root@example.test", "to": ["admin@example.test"], "text": "x"}
    for method, path, body, token, status in (
        ("PATCH", "/api/v1/users/user@example.test", {"display_name": "a\u0000b"}, root, 400),
        ("GET", "/api/v1/users?q=a%00b", None, root, 400),
        ("POST", "/api/v1/api-keys", {"name": "old", "scopes": ["read"],
                                      "expires_at": "2001-01-01T00:00:00Z"}, root, 400),
        ("POST", "/api/v1/api-keys", {"name": "naive", "scopes": ["read"],
                                      "expires_at": "2099-01-01T00:00:00"}, root, 400),
        ("POST", "/api/v1/api-keys", {"name": "far", "scopes": ["read"],
                                      "expires_at": "9999-12-31T23:59:59-14:00"}, root, 400),
        ("POST", "/api/v1/messages", {**send, "subject": "a\u000bb"}, root, 400),
        ("POST", "/api/v1/messages", {**send, "headers": {"X-A": "a\u2028b"}}, root, 400),
        ("POST", "/api/v1/messages", {**send, "reply_to": "not an address"}, root, 400),
        ("POST", "/api/v1/webhooks", {"url": "http://127.0.0.1:5432/", "domain": "example.test",
                                      "event_types": ["message.received"]}, admin, 422),
    ):
        response = call(esp, method, path, body, token)
        assert response[0] == status and "error" in response[1], (path, body, response)
    assert audit_rows(esp) == before


def test_users_manage_their_own_rules(esp: EspServer) -> None:
    user = login(esp, "user@example.test", USER_PASSWORD)["access_token"]
    admin = login(esp, "admin@example.test", ADMIN_PASSWORD)["access_token"]
    path = "/api/v1/users/user@example.test/rules"
    rule = {"name": "lists", "conditions": [
        {"field": "list-id", "op": "contains", "value": "example.org"}],
        "actions": [{"type": "fileinto", "mailbox": "Archive"}, {"type": "seen"}]}
    status, made = call(esp, "POST", path, rule, user)
    assert status == 201 and made["actions"] == rule["actions"], made
    assert call(esp, "GET", path, token=user)[1]["items"][0]["id"] == made["id"]
    status, changed = call(esp, "PUT", f"{path}/{made['id']}",
                           {**rule, "enabled": False}, admin)  # their administrator may
    assert status == 200 and changed["enabled"] is False
    before = audit_rows(esp)
    for body, field in (
        ({**rule, "actions": [{"type": "fileinto"}]}, "actions.0"),
        ({**rule, "actions": [{"type": "forward", "to": "not an address"}]}, "actions.0.to"),
        ({**rule, "actions": [{"type": "fileinto", "mailbox": "../x"}]}, "actions.0.mailbox"),
        ({**rule, "conditions": [{"field": "size", "op": "contains", "value": "x"}]},
         "conditions.0"),
        ({**rule, "actions": []}, "actions"),
    ):
        response = call(esp, "POST", path, body, user)
        assert error_code(response) == (400, "validation_failed"), (body, response)
        assert field in [f["field"] for f in response[1]["error"]["details"]["fields"]]
    other = "/api/v1/users/admin@example.test/rules"
    assert error_code(call(esp, "POST", other, rule, user)) == (403, "forbidden")
    assert audit_rows(esp) == before
    assert call(esp, "DELETE", f"{path}/{made['id']}", token=user)[0] == 204
    assert call(esp, "GET", f"{path}/{made['id']}", token=user)[0] == 404

# Last: after it, this client address may not log in for ten minutes.
def test_failed_logins_are_limited_per_account(esp: EspServer) -> None:
    statuses = []
    while len(statuses) < 11 and 429 not in statuses:
        statuses.append(call(esp, "POST", "/api/v1/auth/token",
                             {"username": "admin@example.test", "password": "guess"})[0])
    # 401 until the tenth failure of the window (earlier tests of this module may have failed
    # a login from the same address), then 429.
    assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}
    # Now even the right password waits: the account is being guessed at.
    assert error_code(call(esp, "POST", "/api/v1/auth/token",
                           {"username": "admin@example.test", "password": ADMIN_PASSWORD})) == (
        429, "too_many_failures")


def test_every_endpoint_is_in_the_reference() -> None:
    reference = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    document = openapi_document("test")
    for path, methods in document["paths"].items():
        for method in methods:
            assert f"`{method.upper()} {path}`" in reference, (method, path)
