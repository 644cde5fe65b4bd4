"""ACME v2 (RFC 8555) issuance with certbot's ``acme`` library.

Why not txacme, which the design names: its last release (0.9.3) speaks only ACME v1, which
Let's Encrypt has retired, and fails to import on Python 3.10+.  ``acme`` is the client
certbot itself uses, kept current with the CAs (ACME v2, External Account Binding, ACME
Renewal Information); it is blocking (requests), so everything here runs in a thread pool
thread, never on the reactor.

Challenges: HTTP-01 answers are published on a :class:`ChallengeBoard` (the database table
every node's responder reads), DNS-01 ones through an :class:`esp.interfaces.IDNSChallengeSolver`
(the only way to get a wildcard name).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWK, JWKRSA

USER_AGENT = "esp (https://github.com/esp-mail/esp)"


class AcmeError(Exception):
    """Issuance failed; the message says at which step and what the CA answered."""


@dataclass(frozen=True)
class Provider:
    """One ACME server and how we register with it."""

    name: str
    directory: str
    email: str | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = None  # base64url, as the CA shows it
    ca_bundle: str | None = None  # to verify the ACME server's own TLS certificate
    timeout: float = 300.0  # for one order, challenges and finalization included


@dataclass(frozen=True)
class Account:
    key_pem: bytes
    url: str


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes  # leaf first
    key_pem: bytes
    account: Account  # the one used (new when none was given)


class ChallengeBoard(Protocol):
    """Where HTTP-01 answers are published for the responder (blocking calls)."""

    def publish(self, token: str, key_authorization: str, name: str) -> None: ...

    def withdraw(self, tokens: Sequence[str]) -> None: ...


class DNSSolver(Protocol):
    def present(self, name: str, record: str, value: str) -> None: ...

    def cleanup(self, name: str, record: str, value: str) -> None: ...


def _network(provider: Provider, key: JWK, account_url: str | None) -> client.ClientNetwork:
    verify: Any = provider.ca_bundle or True
    net = client.ClientNetwork(key, verify_ssl=verify, user_agent=USER_AGENT,
                               timeout=min(60, int(provider.timeout)))
    if account_url is not None:
        net.account = messages.RegistrationResource(uri=account_url, body=messages.Registration())
    return net


def register(provider: Provider) -> Account:
    """Make a new account key and register it (with External Account Binding when the provider
    has a key id and HMAC key: ZeroSSL, or any CA that requires it)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = JWKRSA(key=private)
    net = _network(provider, key, None)
    try:
        directory = client.ClientV2.get_directory(provider.directory, net)
        acme = client.ClientV2(directory, net=net)
        eab = None
        if provider.eab_kid and provider.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(), kid=provider.eab_kid,
                hmac_key=provider.eab_hmac_key, directory=directory)
        elif acme.external_account_required():
            raise AcmeError(f"{provider.name} requires External Account Binding: set eab_kid "
                            "and eab_hmac_key")
        registration = messages.NewRegistration.from_data(
            email=provider.email, terms_of_service_agreed=True,
            external_account_binding=eab)
        account = acme.new_account(registration)
    except (errors.Error, messages.Error, OSError, ValueError) as e:
        raise AcmeError(f"registration with {provider.name} failed: {e}") from e
    key_pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return Account(key_pem, account.uri)


class UnknownAccount(AcmeError):
    """The CA does not know the account (a test CA reset, an account deactivated)."""


def issue(provider: Provider, account: Account, names: Sequence[str],
          board: ChallengeBoard, dns_solver: DNSSolver | None = None) -> Issued:
    """Order a certificate for ``names`` with a new key, answer the challenges (HTTP-01 for
    plain names, DNS-01 through ``dns_solver`` for wildcards), finalize.  The account must be
    registered (:func:`register`) and kept by the caller first: a failed order must not cost
    a registration.  UnknownAccount when the CA no longer knows it."""
    private = serialization.load_pem_private_key(account.key_pem, password=None)
    if not isinstance(private, rsa.RSAPrivateKey):
        raise AcmeError("the stored account key is not an RSA key")
    key = JWKRSA(key=private)
    net = _network(provider, key, account.url)
    certificate_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = certificate_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=provider.timeout)
    published: list[str] = []
    records: list[tuple[str, str, str]] = []
    try:
        directory = client.ClientV2.get_directory(provider.directory, net)
        acme = client.ClientV2(directory, net=net)
        order = acme.new_order(crypto_util.make_csr(key_pem, list(names)))
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # reused: validated recently
            name = authorization.body.identifier.value
            wildcard = bool(authorization.body.wildcard)
            # RFC 8555 gives the challenges no order: choose. HTTP-01 for a plain name (the
            # responder answers it on every node), DNS-01 where only it works (wildcards).
            kinds = {type(b.chall): b for b in authorization.body.challenges}
            body = (kinds.get(challenges.DNS01) if wildcard else
                    kinds.get(challenges.HTTP01) or (kinds.get(challenges.DNS01)
                                                     if dns_solver is not None else None))
            if body is None or (isinstance(body.chall, challenges.DNS01) and dns_solver is None):
                raise AcmeError(f"no challenge we can answer for {name}"
                                + (" (a wildcard needs a DNS-01 solver)" if wildcard else ""))
            response, validation = body.response_and_validation(key)
            if isinstance(body.chall, challenges.DNS01):
                assert dns_solver is not None
                record = body.chall.validation_domain_name(name)
                dns_solver.present(name, record, validation)
                records.append((name, record, validation))
            else:
                token = body.chall.encode("token")
                board.publish(token, validation, name)
                published.append(token)
            acme.answer_challenge(body, response)
        order = acme.poll_and_finalize(order, deadline=deadline)
    except AcmeError:
        raise
    except messages.Error as e:
        if e.code == "accountDoesNotExist":
            raise UnknownAccount(str(e)) from e
        raise AcmeError(f"ordering from {provider.name} failed: {e}") from e
    except errors.ValidationError as e:
        problems = "; ".join(
            f"{a.body.identifier.value}: {c.error}" for a in e.failed_authzrs
            for c in a.body.challenges if c.error is not None)
        raise AcmeError(f"validation failed: {problems or e}") from e
    except errors.TimeoutError as e:
        raise AcmeError(f"the order did not complete within {provider.timeout:.0f}s") from e
    except (errors.Error, OSError, ValueError) as e:
        raise AcmeError(f"ordering from {provider.name} failed: {e}") from e
    finally:
        # Clean-up never hides what went wrong: answers left behind expire, records are
        # harmless.
        if published:
            try:
                board.withdraw(published)
            except Exception:  # noqa: S110
                pass
        for name, record, value in records:
            if dns_solver is not None:
                try:
                    dns_solver.cleanup(name, record, value)
                except Exception:  # noqa: S110
                    pass
    if not order.fullchain_pem:
        raise AcmeError("the CA returned no certificate")
    return Issued(order.fullchain_pem.encode(), key_pem, account)


def suggested_renewal(provider: Provider, account: Account,
                      chain_pem: bytes) -> datetime.datetime | None:
    """When the CA suggests renewing (ACME Renewal Information, RFC 9773), None when it
    offers no such information."""
    private = serialization.load_pem_private_key(account.key_pem, password=None)
    if not isinstance(private, rsa.RSAPrivateKey):
        return None
    net = _network(provider, JWKRSA(key=private), account.url)
    try:
        directory = client.ClientV2.get_directory(provider.directory, net)
        when, _ = client.ClientV2(directory, net=net).renewal_time(chain_pem)
    except (errors.Error, messages.Error, OSError, ValueError):
        return None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when
