"""The management API over HTTP on loopback, against a running ``twistd esp`` and real
PostgreSQL: tokens, roles, the error shape, and bodies that must change nothing."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg2
import pytest

from esp.api.tokens import fingerprint
from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp

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
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, action, target FROM audit_log ORDER BY id")
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
