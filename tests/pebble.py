"""A real Pebble (Let's Encrypt's ACME test CA, Debian package ``pebble``) private to a test:
its own listener certificate, ports on loopback, names resolved by the test DNS server, and
real validation (``PEBBLE_VA_ALWAYS_VALID`` is not set: its VA fetches HTTP-01 answers from
ESP).  See ../shared/REAL-SERVICES.md."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.filterservices import Service, _program, free_port

# Pebble's example EAB keys (base64url HMAC keys, as a CA shows them).
EAB_KEYS = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}


def _listener_certificate(directory: Path) -> Path:
    """A CA and a leaf for 127.0.0.1/localhost: Pebble's HTTPS listener; returns the CA file
    clients verify it with."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ca_path = directory / "listener-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path


@dataclass
class Pebble:
    directory: Path
    dns_port: int
    http_port: int  # where its VA fetches HTTP-01 answers: ESP's challenge responder
    eab: bool = False
    validity_seconds: int = 90 * 86400
    acme_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    service: Service | None = None
    listener_ca: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def start(self) -> Pebble:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.listener_ca = _listener_certificate(self.directory)
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.directory / "cert.pem"),
            "privateKey": str(self.directory / "key.pem"),
            "httpPort": self.http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab,
            "externalAccountMACKeys": EAB_KEYS if self.eab else {},
            "certificateValidityPeriod": self.validity_seconds,
        }}
        path = self.directory / "pebble.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)
        process = subprocess.Popen(
            [_program("pebble"), "-config", str(path), "-dnsserver",
             f"127.0.0.1:{self.dns_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.service = Service(process, self.acme_port, b"Listening on: 127.0.0.1:"
                               + str(self.acme_port).encode())
        self.service.wait_ready("pebble (apt-get install pebble; .ci/run does)")
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def log(self) -> str:
        return self.service.tail() if self.service is not None else ""

    def _management(self, path: str) -> bytes:
        assert self.listener_ca is not None
        context = ssl.create_default_context(cafile=str(self.listener_ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}{path}",
                                    context=context, timeout=30) as answer:
            return bytes(answer.read())

    def roots(self) -> bytes:
        """The issuing root (regenerated at each start): what verifies issued chains."""
        return self._management("/roots/0")


@dataclass
class ChallengeTestServer:
    """``pebble-challtestsrv``: a DNS server whose TXT records are set over HTTP (its
    management API), answering every A query with 127.0.0.1 and no AAAA."""

    directory: Path
    dns_port: int
    management_port: int = field(default_factory=free_port)
    service: Service | None = None

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def start(self) -> ChallengeTestServer:
        process = subprocess.Popen(
            [_program("pebble-challtestsrv"), "-dns01", f"127.0.0.1:{self.dns_port}",
             "-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "",
             "-management", f"127.0.0.1:{self.management_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.service = Service(process, self.dns_port, b"Starting challenge servers")
        self.service.wait_ready("pebble-challtestsrv (apt-get install pebble)")
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


# An IDNSChallengeSolver plugin as a third party ships it (in its package's twisted/plugins),
# publishing TXT records through pebble-challtestsrv's management API.
SOLVER_PLUGIN = '''
import json
import urllib.request

from twisted.plugin import IPlugin
from zope.interface import implementer

from esp.interfaces import IDNSChallengeSolver


@implementer(IPlugin, IDNSChallengeSolver)
class ChallTestSolver:
    name = "challtestsrv"

    def configure(self, settings):
        if "management" not in settings:
            raise ValueError("missing management")
        self.management = settings["management"]
        self.published = []

    def _post(self, path, body):
        request = urllib.request.Request(self.management + path,
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def present(self, name, record, value):
        self._post("/set-txt", {"host": record + ".", "value": value})
        self.published.append(record)

    def cleanup(self, name, record, value):
        self._post("/clear-txt", {"host": record + "."})


challtestsrv = ChallTestSolver()
'''


def install_solver_plugin(directory: Path) -> Path:
    """Write the plugin into ``directory``/twisted/plugins and let twisted.plugin find it (as
    an installed package's plugins are found)."""
    import twisted.plugins

    plugins = directory / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "esp_challtest_solver.py").write_text(SOLVER_PLUGIN)
    if str(plugins) not in twisted.plugins.__path__:
        twisted.plugins.__path__.append(str(plugins))
    return plugins
