"""TLS for every listener: certificates from files, or a self-signed one made once.

:class:`CertificateStore` gives each TLS port (implicit TLS and STARTTLS) its OpenSSL context with
TLS 1.2 or newer.  Per-domain certificates chosen by SNI and ACME issuance build on this store.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import Logger

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


class CertificateStore:
    """The TLS contexts ESP serves with."""

    log = Logger()

    def __init__(self, settings: TLSConfig, hostname: str, data_dir: Path) -> None:
        self._settings = settings
        self._hostname = hostname
        self._data_dir = data_dir
        self._options: ssl.CertificateOptions | None = None

    def load(self) -> None:
        """Read (or make) the certificate; blocking, done once at start-up."""
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
            chain = x509.load_pem_x509_certificates(chain_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as e:
            raise CertificateError(f"{cert_path} / {key_path}: {e}") from e
        if not chain:
            raise CertificateError(f"{cert_path} holds no certificate")
        minimum = (
            ssl.TLSVersion.TLSv1_3 if settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        from OpenSSL import crypto

        self._options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=minimum,
        )

    def context_factory(self) -> ssl.CertificateOptions:
        if self._options is None:
            raise CertificateError("certificates were not loaded")
        return self._options
