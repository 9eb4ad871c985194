"""Believe ``X-Forwarded-*`` headers only from the reverse proxies ``FORWARDED_ALLOW_IPS`` names.

Behind a proxy the service sees the proxy's address, its own scheme (plain HTTP) and whatever
``Host`` the proxy sends; the client's real address, scheme and host arrive in
``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``X-Forwarded-Host``. Those make the absolute
image URLs (``https://img.example.com/files/...``), the access log's client and the login
limiter's key. Anyone can send the same headers, so they are applied (by Hypercorn's
``ProxyFixMiddleware``, the last hop only) when the connection comes from a trusted address,
and ignored otherwise: from anyone else they change nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any, cast

from hypercorn.middleware import ProxyFixMiddleware
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``FORWARDED_ALLOW_IPS=*``: every peer (only where nothing but the proxy can reach the port).
ANY: tuple[Network, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

# What a forwarded scheme and host may be; anything else is dropped, never put in a URL.
_SCHEMES = {"http", "https"}
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")


def parse_networks(value: str) -> tuple[Network, ...]:
    """``*``, or comma-separated addresses and CIDR networks (``127.0.0.1,10.0.0.0/8``).

    Raises:
        ValueError: An item is neither.
    """
    items = [item.strip() for item in value.split(",") if item.strip()]
    if items == ["*"]:
        return ANY
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _trusted(client: tuple[str, int] | None, networks: Iterable[Network]) -> bool:
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:  # a Unix socket's peer, say
        return False
    return any(address in network for network in networks)


def _last(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value the nearest proxy appended (the last one), as ProxyFixMiddleware reads it."""
    values = [
        part.strip()
        for header, value in headers
        if header.lower() == name
        for part in value.decode("latin-1").split(",")
    ]
    return values[-1] if values else None


def _sane(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without a forwarded scheme or host that cannot be part of a URL."""
    proto = _last(headers, b"x-forwarded-proto")
    host = _last(headers, b"x-forwarded-host")
    drop = set()
    if proto is not None and proto.lower() not in _SCHEMES:
        drop.add(b"x-forwarded-proto")
    if host is not None and not _HOST.match(host):
        drop.add(b"x-forwarded-host")
    return [(name, value) for name, value in headers if name.lower() not in drop]


class TrustedProxies:
    """ASGI middleware: ``ProxyFixMiddleware`` for connections from ``networks``, none for others.

    Args:
        app: The ASGI app.
        networks: The proxies' addresses; empty (the default setting) trusts no one.
    """

    def __init__(self, app: ASGIFramework, networks: tuple[Network, ...]) -> None:
        self.app = app
        self.networks = networks
        self._fixed = ProxyFixMiddleware(app, mode="legacy", trusted_hops=1)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "lifespan" and scope.get("path") == "":
            # A target with no path ("GET ?a"): h11 takes it, Hypercorn hands on an empty path,
            # and Quart indexes path[0] (a 500). This is the outermost layer: refuse it here.
            await _refuse_empty_path(scope, send)
            return
        if scope["type"] == "lifespan" or not _trusted(scope["client"], self.networks):
            await self.app(scope, receive, send)
            return
        fixed: dict[str, Any] = {**scope, "headers": _sane(list(scope["headers"]))}
        if scope["type"] == "websocket":
            # ProxyFixMiddleware would give a WebSocket the scheme ``https``; ASGI says ``wss``.
            proto = _last(fixed["headers"], b"x-forwarded-proto")
            if proto is not None:
                fixed["headers"] = [
                    (name, value)
                    for name, value in fixed["headers"]
                    if name.lower() != b"x-forwarded-proto"
                ]
                fixed["scheme"] = "wss" if proto.lower() == "https" else "ws"
        await self._fixed(cast(Scope, fixed), receive, send)


async def _refuse_empty_path(scope: Scope, send: ASGISendCallable) -> None:
    if scope["type"] == "websocket":
        # Closing before the accept is answered 403 by Hypercorn.
        await send({"type": "websocket.close", "code": 1008, "reason": "No path"})
        return
    body = b'{"detail": "The request target has no path"}'
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
