"""``TrustedProxies``: forwarded headers apply from trusted peers only, and only if sane.

The end-to-end side (a real nginx, a client from another address) is tests/e2e/test_proxy.py.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from web import hypercorn_fixes
from web.proxy import ANY, TrustedProxies, parse_networks
from web.settings import SettingsError, load_settings

PROXY = parse_networks("127.0.0.1, 10.0.0.0/8")


def scope_from(client: str, headers: dict[str, str], kind: str = "http") -> Scope:
    return cast(
        Scope,
        {
            "type": kind,
            "scheme": "http" if kind == "http" else "ws",
            "client": (client, 50000),
            "headers": [(b"host", b"127.0.0.1:8080")]
            + [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        },
    )


async def seen_by_app(networks: Any, scope: Scope) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        seen.update(scope)

    async def receive() -> Any:
        raise AssertionError("not called")

    async def send(event: Any) -> None:
        raise AssertionError("not called")

    await TrustedProxies(app, networks)(scope, receive, send)
    return seen


def host_of(scope: dict[str, Any]) -> str:
    hosts: list[str] = [value.decode() for name, value in scope["headers"] if name == b"host"]
    assert len(hosts) == 1
    return hosts[0]


FORWARDED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "img.example.com",
    "X-Forwarded-For": "203.0.113.7",
}


async def test_a_trusted_proxy_sets_scheme_host_and_client() -> None:
    seen = await seen_by_app(PROXY, scope_from("10.1.2.3", FORWARDED))
    assert (seen["scheme"], host_of(seen), seen["client"][0]) == (
        "https",
        "img.example.com",
        "203.0.113.7",
    )


@pytest.mark.parametrize("networks", [(), PROXY], ids=["no-one", "not-this-peer"])
async def test_anyone_else_changes_nothing(networks: Any) -> None:
    seen = await seen_by_app(networks, scope_from("192.0.2.9", FORWARDED))
    assert (seen["scheme"], host_of(seen), seen["client"][0]) == (
        "http",
        "127.0.0.1:8080",
        "192.0.2.9",
    )


async def test_only_the_nearest_proxys_values_count() -> None:
    # A client sent its own X-Forwarded-*; the proxy appended the real ones.
    headers = {
        "X-Forwarded-Proto": "http, https",
        "X-Forwarded-Host": "evil.example, img.example.com",
        "X-Forwarded-For": "198.51.100.1, 203.0.113.7",
    }
    seen = await seen_by_app(PROXY, scope_from("127.0.0.1", headers))
    assert (seen["scheme"], host_of(seen), seen["client"][0]) == (
        "https",
        "img.example.com",
        "203.0.113.7",
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Forwarded-Proto", "javascript"),
        ("X-Forwarded-Host", "img.example.com/evil"),
        ("X-Forwarded-Host", "a b"),
        ("X-Forwarded-Host", "img.example.com:port"),
    ],
)
async def test_a_forwarded_value_that_cannot_be_in_a_url_is_dropped(
    header: str, value: str
) -> None:
    seen = await seen_by_app(PROXY, scope_from("127.0.0.1", {header: value}))
    assert (seen["scheme"], host_of(seen)) == ("http", "127.0.0.1:8080")


async def test_a_websocket_behind_tls_gets_the_wss_scheme() -> None:
    seen = await seen_by_app(PROXY, scope_from("127.0.0.1", FORWARDED, kind="websocket"))
    assert (seen["scheme"], host_of(seen)) == ("wss", "img.example.com")


async def test_a_peer_without_an_ip_address_is_not_trusted() -> None:
    seen = await seen_by_app(ANY, scope_from("unix-socket", FORWARDED))
    assert seen["scheme"] == "http"


def test_the_setting_reads_addresses_networks_and_a_star() -> None:
    assert load_settings({}).forwarded_allow_ips == ()
    assert load_settings({"FORWARDED_ALLOW_IPS": "*"}).forwarded_allow_ips == ANY
    networks = load_settings({"FORWARDED_ALLOW_IPS": "127.0.0.1, ::1,10.0.0.0/8"})
    assert [str(n) for n in networks.forwarded_allow_ips] == [
        "127.0.0.1/32",
        "::1/128",
        "10.0.0.0/8",
    ]
    with pytest.raises(SettingsError, match="FORWARDED_ALLOW_IPS"):
        load_settings({"FORWARDED_ALLOW_IPS": "localhost"})


def test_tls_files_go_together() -> None:
    with pytest.raises(SettingsError, match="TLS_CERTFILE and TLS_KEYFILE"):
        load_settings({"TLS_CERTFILE": "/etc/ssl/cert.pem"})


def test_the_scope_of_a_request_behind_a_proxy_can_be_deep_copied() -> None:
    """ProxyFixMiddleware deep-copies the scope; the cancel-on-disconnect extension that
    Hypercorn fix 13 puts in it is a live handle, copied as itself."""

    async def app(*_: object) -> None:
        raise AssertionError("not called")

    cancellable = hypercorn_fixes._CancellableApp(app)  # type: ignore[arg-type]
    scope = {"extensions": {hypercorn_fixes.CANCEL_ON_DISCONNECT: {"arm": cancellable.arm}}}
    copied = copy.deepcopy(scope)
    arm = copied["extensions"][hypercorn_fixes.CANCEL_ON_DISCONNECT]["arm"]
    arm()
    assert cancellable.armed  # the copy's arm is the request's own
