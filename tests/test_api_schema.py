"""The served OpenAPI document against the running API: schemathesis generates requests from
it (valid and invalid ones) and checks every answer: no 5xx, only documented statuses and
content types, bodies that match their schemas."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import psycopg2

from esp.storage import apikeys
from esp.storage.db import run_sync
from tests.dnszone import DNSServer
from tests.espserver import connection, start_esp
from tests.helpers import Server, wait_for_logs

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
    module_scratch: Path, module_database_dsn: str, test_dns: DNSServer,
) -> None:
    program = shutil.which("st")
    assert program is not None, "schemathesis (pip install schemathesis) is not installed"
    esp = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    try:
        esp.add_user("root@example.test", "root's long password")
        esp.add_user("someone@example.test", "someone's long password")
        with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
            cur.execute("UPDATE users SET role = 'superadmin' WHERE localpart = 'root'")
        with connection(esp.dsn) as conn:
            root_id = run_sync(conn, lambda cur: cur.execute(
                "SELECT id FROM users WHERE localpart = 'root'") or cur.fetchone()[0])
            _, key = run_sync(conn, apikeys.create_key_txn, root_id, "fuzz", ["*"], None, None)
        base = f"http://127.0.0.1:{esp.ports['api']}"
        with urllib.request.urlopen(f"{base}/api/v1/openapi.json", timeout=30) as answer:  # noqa: S310
            document = json.loads(answer.read())
        assert document["openapi"].startswith("3.1")
        assert {"/api/v1/users", "/api/v1/messages", "/api/v1/queue"} <= set(document["paths"])

        fuzz = Server(subprocess.Popen(
            [program, "run", f"{base}/api/v1/openapi.json", "--url", base,
             "--checks", CHECKS, "--max-examples", "8", "--seed", "7", "--workers", "1",
             "--phases", "examples,coverage,fuzzing", "--no-color",
             "--suppress-health-check", "all", "--generation-database", "none",
             "--request-timeout", "30", "--max-failures", "20",
             # The key itself must survive the run: revoking keys is tested elsewhere.
             "--exclude-operation-id", "revoke_key",
             "--header", f"Authorization: Bearer {key}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=module_scratch))
        # Its output ends as it exits (waiting on its exit status instead could miss it:
        # the check runs only when one of the logs moves).
        wait_for_logs([esp.process, fuzz], lambda: fuzz.ended, "the schemathesis run to end",
                      timeout=600)
        fuzz.stop()
        report = fuzz.log
        assert fuzz.process.returncode == 0, report[-20000:]
        assert "API request failed" not in esp.process.log, esp.process.log[-20000:]
    finally:
        esp.process.stop()
