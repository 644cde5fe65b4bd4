"""Certificates: the ACME client, the HTTP-01 responder, the manager that issues, renews and
serves them (docs/certificates.md)."""
