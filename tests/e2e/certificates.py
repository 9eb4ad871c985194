"""TLS for end-to-end tests: a certificate authority made at test time (trustme), and clients
that trust it."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


def issue(authority: trustme.CA, path: Path) -> Path:
    """A key and certificate chain for 127.0.0.1 and localhost, in one PEM file at ``path``."""
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def trusting(authority: trustme.CA, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that trusts ``authority`` (and offers ``alpn``, if given).

    httpx sets its own ALPN protocols on the context it is given, so a WebSocket client, which
    must get HTTP/1.1, needs a context of its own.
    """
    context = ssl.create_default_context()
    authority.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context
