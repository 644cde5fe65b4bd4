"""ACME providers and the DNS-01 solver, from the configuration."""

from __future__ import annotations

from typing import Any

from twisted.plugin import getPlugins

from esp.certs.acme import Provider
from esp.config import AcmeConfig, ConfigError
from esp.interfaces import IDNSChallengeSolver


def acme_providers(config: AcmeConfig) -> dict[str, Provider]:
    return {
        name: Provider(name, p.directory, email=p.email or config.email, eab_kid=p.eab_kid,
                       eab_hmac_key=p.eab_hmac_key,
                       ca_bundle=str(p.ca_bundle) if p.ca_bundle else None,
                       timeout=config.timeout)
        for name, p in config.all_providers().items()
    }


def installed_dns_solvers() -> dict[str, Any]:
    import twisted.plugins

    return {str(p.name): p for p in getPlugins(IDNSChallengeSolver, twisted.plugins)}


def chosen_dns_solver(name: str | None, settings: dict[str, Any]) -> Any:
    """The configured solver, configured; None when none is chosen.  ConfigError when it is
    not installed or refuses its settings."""
    if name is None:
        return None
    solvers = installed_dns_solvers()
    solver = solvers.get(name)
    if solver is None:
        known = ", ".join(sorted(solvers)) or "none"
        raise ConfigError(f"security.tls.acme.dns_solver: no DNS-01 solver {name!r} is "
                          f"installed (installed: {known})")
    try:
        solver.configure(dict(settings))
    except ValueError as e:
        raise ConfigError(f"security.tls.acme.dns_solver_settings: {e}") from e
    return solver
