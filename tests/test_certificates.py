"""Certificates against a real Pebble (the ACME test CA): HTTP-01 issuance with real
validation (Pebble's VA fetches the answer from ESP's responder), External Account Binding,
SNI on every TLS port, renewal by a controlled clock served without a restart, and Pebble down
during a renewal."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor, threads

from esp.certs import acme
from esp.certs.manager import CertificateManager
from esp.certs.providers import installed_dns_solvers
from esp.config import load_config
from esp.events import Event
from esp.service import makeService
from esp.storage import directory
from esp.storage.db import run_sync
from tests.dnszone import DNSServer, free_dns_port
from tests.espserver import EspServer, connection, start_esp, write_config
from tests.filterservices import free_port
from tests.helpers import assert_event_matches_schema, run_esp
from tests.pebble import EAB_KEYS, ChallengeTestServer, Pebble, install_solver_plugin
from tests.test_api import call, login


def acme_section(pebble: Pebble, challenge_port: int, certificates: str = "") -> str:
    """The security.tls.acme section (continuing ``security``) for ``pebble``."""
    return (
        "  tls:\n    acme:\n      enabled: true\n      provider: pebble\n"
        "      providers:\n"
        f"        pebble: {{directory: '{pebble.url}', ca_bundle: '{pebble.listener_ca}'}}\n"
        f"      challenge_listen: 'tcp:{challenge_port}:interface=127.0.0.1'\n"
        "      retry_schedule: [300, 1800]\n"
        "      timeout: 60\n"
        + (f"      certificates: {certificates}\n" if certificates else "")
    )


def peer_certificate(port: int, server_name: str | None) -> x509.Certificate:
    """The certificate a TLS client naming ``server_name`` (none: no SNI) is shown."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def starttls_certificate(port: int, server_name: str) -> x509.Certificate:
    """The same over SMTP STARTTLS (port 25's listener)."""
    import smtplib

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client._host = server_name  # the name smtplib sends as SNI
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return x509.load_der_x509_certificate(der)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 (http:)
            return int(answer.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def names_of(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(san.value.get_values_for_type(x509.DNSName))


def issued_by_pebble(certificate: x509.Certificate, pebble: Pebble) -> bool:
    return "Pebble Intermediate CA" in certificate.issuer.rfc4514_string()


@pytest.fixture
def challenge_port() -> int:
    return free_port()


@pytest.fixture
def pebble(scratch: Path, test_dns: DNSServer, challenge_port: int) -> Iterator[Pebble]:
    made = Pebble(scratch / "pebble", test_dns.port, challenge_port).start()
    yield made
    made.stop()


def cert_cli(esp: EspServer, *args: str) -> tuple[int, str, str]:
    result = run_esp("cert", *args, config=esp.data_dir.parent / "esp.yaml")
    return result.returncode, result.stdout, result.stderr


def test_pebble_issues_over_http01_and_each_name_gets_its_own_certificate(
    scratch: Path, database_dsn: str, test_dns: DNSServer, pebble: Pebble, challenge_port: int,
) -> None:
    # Nodes share the secret that seals keys at rest (docs/deployment.md).
    secret = f"  dkim:\n    secret_file: {scratch / 'secret.key'}\n"
    esp = start_esp(scratch, database_dsn, test_dns.nameserver,
                    extra=acme_section(pebble, challenge_port) + secret)
    # Another node on the same database, ordering nothing itself.
    (scratch / "other").mkdir()
    other = start_esp(scratch / "other", database_dsn, test_dns.nameserver, extra=secret)
    try:
        esp.add_domain("acme-one.test")
        esp.add_domain("acme-two.test")
        for name in ("mail.acme-one.test", "mail.acme-two.test"):
            code, out, err = cert_cli(esp, "issue", name, "--wait", "120")
            assert code == 0, out + err + pebble.log()
            assert "issued" in out
        served = {(listener, name): peer_certificate(esp.ports[listener], name)
                  for listener in ("imaps", "submissions")
                  for name in ("mail.acme-one.test", "mail.acme-two.test", None)}
        starttls = starttls_certificate(esp.ports["mx"], "mail.acme-two.test")
        unknown = [http_status(f"http://127.0.0.1:{challenge_port}{path}") for path in (
            "/.well-known/acme-challenge/no-such-token", "/.well-known/acme-challenge/../x",
            "/")]
        code, listing, _ = cert_cli(esp, "list")
        # The other node was told by NOTIFY and serves the new certificate too; its log says
        # so once it has reloaded.
        other.process.wait_for("serving 2 certificates from the database")
        elsewhere = peer_certificate(other.ports["imaps"], "mail.acme-one.test")
    finally:
        other.process.stop()
        esp.process.stop()
    # Real validation: Pebble's VA fetched each token from ESP's responder.
    log = pebble.log()
    for name in ("mail.acme-one.test", "mail.acme-two.test"):
        assert (f"Attempting to validate w/ HTTP: http://{name}:{challenge_port}"
                "/.well-known/acme-challenge/") in log, log
    assert log.count("set VALID by completed challenge") == 2, log
    assert unknown == [404, 404, 404]
    for listener in ("imaps", "submissions"):
        for name in ("mail.acme-one.test", "mail.acme-two.test"):
            certificate = served[(listener, name)]
            assert names_of(certificate) == [name], (listener, name)
            assert issued_by_pebble(certificate, pebble)
        default = served[(listener, None)]
        assert not issued_by_pebble(default, pebble)  # no name: the configured default
        assert names_of(default) == ["mx.example.test"]
    assert names_of(starttls) == ["mail.acme-two.test"]
    assert elsewhere == served[("imaps", "mail.acme-one.test")]
    assert "mail.acme-one.test" in listing and "in service" in listing
    with connection(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT c.names, d.name, c.key_sealed IS NOT NULL, "
                    "position('PRIVATE' in encode(c.key_sealed, 'escape')) "
                    "FROM certificates c LEFT JOIN domains d ON d.id = c.domain_id "
                    "ORDER BY c.id")
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM acme_challenges")
        left = cur.fetchone()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (["mail.acme-one.test"], "acme-one.test", True, 0),  # the key is sealed, not PEM
        (["mail.acme-two.test"], "acme-two.test", True, 0)]
    assert left == (0,)  # answers withdrawn once used


def test_certificates_over_the_api_within_each_admins_domains(
    scratch: Path, database_dsn: str, test_dns: DNSServer, pebble: Pebble, challenge_port: int,
) -> None:
    esp = start_esp(scratch, database_dsn, test_dns.nameserver,
                    extra=acme_section(pebble, challenge_port))
    try:
        esp.add_user("root@acme-one.test", "root's long password")
        esp.add_user("admin@acme-two.test", "admin's long password")
        with connection(database_dsn) as conn, conn.cursor() as cur:
            cur.execute("UPDATE users SET role = 'superadmin' WHERE localpart = 'root'")
            cur.execute("UPDATE users SET role = 'domain_admin' WHERE localpart = 'admin'")
            conn.commit()
        root = login(esp, "root@acme-one.test", "root's long password")["access_token"]
        admin = login(esp, "admin@acme-two.test", "admin's long password")["access_token"]
        refused = call(esp, "POST", "/api/v1/certificates",
                       {"names": ["mail.acme-one.test"]}, admin)
        bad = call(esp, "POST", "/api/v1/certificates", {"names": ["mail.acme-two.test"],
                                                          "provider": "nowhere"}, admin)
        status, made = call(esp, "POST", "/api/v1/certificates",
                            {"names": ["mail.acme-two.test"]}, admin)
        assert status == 202, made
        esp.process.wait_for("certificate for mail.acme-two.test issued")
        _, mine = call(esp, "GET", f"/api/v1/certificates/{made['id']}", token=admin)
        status, other = call(esp, "POST", "/api/v1/certificates",
                             {"names": ["mail.acme-one.test"]}, root)
        assert status == 202, other
        esp.process.wait_for("certificate for mail.acme-one.test issued")
        _, seen_by_admin = call(esp, "GET", "/api/v1/certificates", token=admin)
        _, seen_by_root = call(esp, "GET", "/api/v1/certificates", token=root)
        hidden = call(esp, "GET", f"/api/v1/certificates/{other['id']}", token=admin)
        too_soon = call(esp, "POST", f"/api/v1/certificates/{made['id']}/renew", token=admin)
        renewing = call(esp, "POST", f"/api/v1/certificates/{made['id']}/renew", token=root)
        esp.process.wait_for("certificate for mail.acme-two.test issued", count=2)
        own_name = call(esp, "POST", "/api/v1/certificates",
                        {"names": ["mx.example.test"]}, admin)
        _, audit = call(esp, "GET", "/api/v1/audit?action=certificate.request", token=root)
    finally:
        esp.process.stop()
    assert refused[0] == 403 and bad[0] == 422
    assert mine["status"] == "in_service" and mine["domain"] == "acme-two.test"
    assert mine["issuer"] and "Pebble" in mine["issuer"]
    assert [c["names"] for c in seen_by_admin["items"]] == [["mail.acme-two.test"]]
    assert sorted(c["names"][0] for c in seen_by_root["items"]) == [
        "mail.acme-one.test", "mail.acme-two.test"]
    assert hidden[0] == 403 and renewing[0] == 202
    assert too_soon[0] == 409 and "less than an hour" in too_soon[1]["error"]["message"]
    assert own_name[0] == 403
    assert sorted(e["actor"] for e in audit["items"]) == [
        "admin@acme-two.test", "root@acme-one.test"]


def test_a_certificate_from_another_tool_is_imported_and_served_by_name(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    # What certbot or a corporate CA leaves on disk: a chain (leaf, intermediate) and a key.
    chain, key = make_chain(scratch / "certbot", ["imap.acme-two.test", "acme-two.test"])
    esp = start_esp(scratch, database_dsn, test_dns.nameserver)
    try:
        esp.add_domain("acme-two.test")
        wrong = cert_cli(esp, "import", "--cert", str(chain), "--key",
                         str(make_chain(scratch / "other", ["x.test"])[1]))
        code, out, err = cert_cli(esp, "import", "--cert", str(chain), "--key", str(key))
        assert code == 0, err
        esp.process.wait_for("serving 1 certificates from the database")
        shown = peer_certificate(esp.ports["imaps"], "acme-two.test")
        default = peer_certificate(esp.ports["imaps"], "other.acme-two.test")
        code, listing, _ = cert_cli(esp, "list")
        renew = cert_cli(esp, "renew", "acme-two.test")
    finally:
        esp.process.stop()
    assert wrong[0] != 0 and "does not belong" in wrong[2]
    assert names_of(shown) == ["imap.acme-two.test", "acme-two.test"]
    assert names_of(default) == ["mx.example.test"]  # no wildcard: the default
    assert "\tfile\t" in listing and "in service" in listing
    assert renew[0] != 0 and "only ACME" in renew[2]
    with connection(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, action, target FROM audit_log WHERE action LIKE 'certificate%'")
        [(actor, action, target)] = cur.fetchall()
    assert actor.startswith("cli:") and action == "certificate.import"
    assert target == "imap.acme-two.test"


def make_chain(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """A leaf for ``names`` signed by an intermediate: fullchain.pem and privkey.pem."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corporate Intermediate")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = directory / "fullchain.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                      + ca.public_bytes(serialization.Encoding.PEM))
    private = directory / "privkey.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return chain, private


def test_external_account_binding_registers_with_the_right_key_only(
    scratch: Path, test_dns: DNSServer,
) -> None:
    pebble = Pebble(scratch / "pebble", test_dns.port, free_port(), eab=True).start()
    try:
        base = acme.Provider("pebble-eab", pebble.url, email="admin@acme-one.test",
                             ca_bundle=str(pebble.listener_ca), timeout=60)
        [(kid, key)] = EAB_KEYS.items()
        with pytest.raises(acme.AcmeError, match="External Account Binding"):
            acme.register(base)  # the CA requires it and none is configured
        wrong = "A" * len(key)
        with pytest.raises(acme.AcmeError, match="registration with pebble-eab failed"):
            acme.register(acme.Provider(**{**base.__dict__, "eab_kid": kid,
                                           "eab_hmac_key": wrong}))
        account = acme.register(acme.Provider(**{**base.__dict__, "eab_kid": kid,
                                                 "eab_hmac_key": key}))
    finally:
        pebble.stop()
    assert account.url.startswith(f"https://127.0.0.1:{pebble.acme_port}/")
    assert b"PRIVATE KEY" in account.key_pem


@pytest_twisted.ensureDeferred
async def test_renewal_by_the_clock_is_served_at_once_and_a_ca_outage_keeps_the_old_one(
    scratch: Path, database_dsn: str, test_dns: DNSServer, pebble: Pebble, challenge_port: int,
) -> None:
    name = "mail.acme-one.test"
    config = load_config(write_config(
        scratch, database_dsn, test_dns.nameserver,
        extra=acme_section(pebble, challenge_port, f"[[{name}]]")), environ={})
    with connection(database_dsn) as conn:
        run_sync(conn, directory.add_domain_txn, "acme-one.test")
    service = makeService(config, reactor)
    seen: list[Event] = []
    service.events.subscribe("certificate.#", seen.append)
    service.startService()
    try:
        await service.ready
        manager = service.getServiceNamed("certificate-manager")
        assert isinstance(manager, CertificateManager)
        ports = {listener.name: listener.port.getHost().port for listener in service.listeners}

        async def served() -> dict[str, x509.Certificate]:
            return {listener: await threads.deferToThread(peer_certificate, ports[listener],
                                                          name)
                    for listener in ("imaps-0", "smtp-submissions-0")}

        # The configured certificate is ordered at start; checks run on a timer too, so the
        # test looks at what is served, whichever check did the work.
        await manager.check()
        before = await served()
        assert all(issued_by_pebble(c, pebble) for c in before.values())
        serial = before["imaps-0"].serial_number
        assert await manager.check() == []  # nothing due yet

        # 61 of its 90 days later: a third of its life is left, so it is renewed.
        start = manager.now()
        manager.now = lambda: start + timedelta(days=61)
        await manager.check()
        after = await served()
        assert {c.serial_number for c in after.values()} != {serial}
        assert len({c.serial_number for c in after.values()}) == 1  # the same one on both
        renewed = [e for e in seen if e.type == "certificate.renewed"]
        assert [e.payload["names"] for e in renewed] == [[name], [name]]
        assert format(after["imaps-0"].serial_number, "x") == renewed[-1].payload["serial"]

        # The CA goes away; later, the renewal fails and the certificate stays in service.
        pebble.stop()
        manager.now = lambda: start + timedelta(days=122)
        await manager.check()
        assert (await served())["imaps-0"].serial_number == after["imaps-0"].serial_number
        await manager.check()  # backing off: not tried again at once
        with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT failures, next_attempt_at, last_error FROM certificates")
            [(failures, next_attempt, error)] = cur.fetchall()
        assert failures == 1 and "pebble" in error
        assert next_attempt == manager.now() + timedelta(seconds=300)
        [failed] = [e for e in seen if e.type == "certificate.failed"]
        assert failed.payload["failures"] == 1

        # Back, and the backoff over: renewed on the next check.
        pebble.start()
        manager.now = lambda: start + timedelta(days=122, seconds=301)
        await manager.check()
        assert (await served())["imaps-0"].serial_number != after["imaps-0"].serial_number
    finally:
        await service.stopService()
    for event in seen:
        assert_event_matches_schema(event)


@pytest_twisted.ensureDeferred
async def test_a_wildcard_name_is_validated_through_a_dns01_solver_plugin(
    scratch: Path, database_dsn: str, challenge_port: int,
) -> None:
    install_solver_plugin(scratch / "plugins")
    dns = ChallengeTestServer(scratch / "challtestsrv", free_dns_port()).start()
    pebble = Pebble(scratch / "pebble", dns.dns_port, challenge_port).start()
    solver = (f"      dns_solver: challtestsrv\n"
              f"      dns_solver_settings: {{management: '{dns.management}'}}\n")
    config = load_config(write_config(
        scratch, database_dsn, "127.0.0.1:9",
        extra=acme_section(pebble, challenge_port, "[['*.acme-one.test', acme-one.test]]")
        + solver), environ={})
    service = makeService(config, reactor)
    service.startService()
    try:
        await service.ready
        manager = service.getServiceNamed("certificate-manager")
        await manager.check()
        port = next(listener.port.getHost().port for listener in service.listeners
                    if listener.name == "imaps-0")
        shown = {name: await threads.deferToThread(peer_certificate, port, name)
                 for name in ("anything.acme-one.test", "acme-one.test", "other.test")}
    finally:
        await service.stopService()
        pebble.stop()
        dns.stop()
    assert names_of(shown["anything.acme-one.test"]) == ["*.acme-one.test", "acme-one.test"]
    assert shown["acme-one.test"] == shown["anything.acme-one.test"]
    assert issued_by_pebble(shown["anything.acme-one.test"], pebble)
    assert not issued_by_pebble(shown["other.test"], pebble)
    # The wildcard's authorization went through the plugin (the apex's through HTTP-01).
    assert installed_dns_solvers()["challtestsrv"].published == ["_acme-challenge.acme-one.test"]
    assert f"http://acme-one.test:{challenge_port}/.well-known/acme-challenge/" in pebble.log()
