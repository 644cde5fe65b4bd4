"""TLS for every listener: the configured certificate (files, or a self-signed one made once)
and per-name certificates chosen by SNI, replaceable while running.

:class:`CertificateStore` is the connection creator of every TLS port (implicit TLS and
STARTTLS), TLS 1.2 or newer; the certificate manager (``esp.certs``) installs the certificates
kept in the database into it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from esp.config import TLSConfig

SELF_SIGNED_DAYS = 825


class CertificateError(Exception):
    """A certificate or key cannot be loaded or made; the message says which file and why."""


def make_self_signed(hostname: str, directory: Path) -> tuple[Path, Path]:
    """Create (once) a self-signed certificate for ``hostname``; return (certificate, key)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = directory / "selfsigned.crt"
    key_path = directory / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first, written private, both renamed into place so a crash leaves no half pair.
    for path, data, mode in (
        (key_path, key_pem, 0o600),
        (cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    return cert_path, key_path


@dataclass(frozen=True)
class ServedCertificate:
    """A certificate chain and its key, served to clients that name one of ``names``."""

    names: tuple[str, ...]
    chain: tuple[x509.Certificate, ...]
    key: Any  # a cryptography private key

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes,
                 names: Sequence[str] = ()) -> ServedCertificate:
        """Parse a PEM chain (leaf first) and key; the names default to the leaf's DNS
        subject alternative names.  CertificateError when they do not parse or match."""
        try:
            chain = tuple(x509.load_pem_x509_certificates(chain_pem))
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as e:
            raise CertificateError(f"cannot parse the certificate or key: {e}") from e
        if not chain:
            raise CertificateError("no certificate in the chain")
        public = chain[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if public != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CertificateError("the private key does not belong to the certificate")
        return cls(tuple(n.lower() for n in names) or dns_names(chain[0]), chain, key)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for (its SANs; the common name when it has none)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in
                 certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(n.lower() for n in names)


T = TypeVar("T")


def _lookup(table: dict[str, T], server_name: str | None) -> T | None:
    """By name: exact, then the wildcard one label up (RFC 6125 §6.4.3: one label)."""
    if not server_name:
        return None
    name = server_name.lower().rstrip(".")
    found = table.get(name)
    if found is None and "." in name:
        found = table.get("*." + name.split(".", 1)[1])
    return found


def covers(names: Sequence[str], name: str) -> bool:
    """Whether a certificate for ``names`` is valid for ``name`` (a wildcard: one label)."""
    return name in names or ("." in name and "*." + name.split(".", 1)[1] in names)


@implementer(IOpenSSLServerConnectionCreator)
class CertificateStore:
    """The certificates ESP serves, chosen per connection by the name the client asks for
    (SNI), with a default for clients that name none or a name nobody has a certificate for.

    The default comes from ``security.tls`` (files, or a self-signed certificate made once);
    :meth:`install` adds or replaces the others (from the database: ACME, imported files) at
    any time: connections opened afterwards get them, those open keep theirs.  Every TLS
    listener, implicit or STARTTLS, uses this one object as its connection creator."""

    log = Logger()

    def __init__(self, settings: TLSConfig, hostname: str, data_dir: Path) -> None:
        self._settings = settings
        self._hostname = hostname
        self._data_dir = data_dir
        self._default: SSL.Context | None = None
        self._file_default: ServedCertificate | None = None
        self._by_name: dict[str, SSL.Context] = {}

    def load(self) -> None:
        """Read (or make) the configured certificate; blocking, done once at start-up."""
        settings = self._settings
        if (settings.certificate is None) != (settings.private_key is None):
            raise CertificateError(
                "security.tls.certificate and security.tls.private_key go together: set both "
                "or neither"
            )
        if settings.certificate is not None and settings.private_key is not None:
            cert_path, key_path = settings.certificate, settings.private_key
        else:
            cert_path, key_path = make_self_signed(self._hostname, self._data_dir / "tls")
            self.log.info(
                "no certificate configured: serving the self-signed one in {path}",
                path=str(cert_path),
            )
        try:
            chain_pem = cert_path.read_bytes()
            key_pem = key_path.read_bytes()
        except OSError as e:
            raise CertificateError(f"cannot read {e.filename}: {e.strerror}") from e
        try:
            served = ServedCertificate.from_pem(chain_pem, key_pem)
        except CertificateError as e:
            raise CertificateError(f"{cert_path} / {key_path}: {e}") from e
        self._file_default = served
        self.install([])

    def install(self, certificates: Sequence[ServedCertificate]) -> None:
        """Serve ``certificates`` (in place of those installed before) besides the configured
        one.  A certificate for the server's own hostname becomes the default."""
        if self._file_default is None:
            raise CertificateError("certificates were not loaded")
        by_name: dict[str, SSL.Context] = {}
        for certificate in certificates:
            context = self._context(certificate)
            for name in certificate.names:
                by_name[name] = context
        # Each replaced whole, never changed in place: a handshake sees one set or the other.
        self._by_name = by_name
        self._default = (_lookup(by_name, self._hostname)
                         or self._context(self._file_default))

    def _context(self, certificate: ServedCertificate) -> SSL.Context:
        minimum = (ssl.TLSVersion.TLSv1_3 if self._settings.min_version == "1.3"
                   else ssl.TLSVersion.TLSv1_2)
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(certificate.key),
            certificate=crypto.X509.from_cryptography(certificate.leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in certificate.chain[1:]],
            raiseMinimumTo=minimum,
        )
        context: SSL.Context = options.getContext()
        context.set_tlsext_servername_callback(self._choose)
        return context

    def _choose(self, connection: SSL.Connection) -> None:
        """OpenSSL's server-name callback: switch to the certificate for the name asked."""
        name = connection.get_servername()
        if not name:
            return
        context = self.context_for(name.decode("ascii", "replace"))
        if context is not connection.get_context():
            connection.set_context(context)

    def context_for(self, server_name: str | None) -> SSL.Context:
        """The context for a name: an exact match, then a wildcard one label up, then the
        default."""
        if self._default is None:
            raise CertificateError("certificates were not loaded")
        return _lookup(self._by_name, server_name) or self._default

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # Each connection starts on the current default; the callback moves it by SNI.
        return SSL.Connection(self.context_for(None), None)

    def context_factory(self) -> CertificateStore:
        """What listeners and STARTTLS are given: this store (a connection creator)."""
        if self._default is None:
            raise CertificateError("certificates were not loaded")
        return self
