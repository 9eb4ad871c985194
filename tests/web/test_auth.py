"""Login, tokens, and who may see what."""

from __future__ import annotations

import time

import jwt
import pytest
import trio
from quart_trio.testing import TrioClient

import web.auth
from tests.web.helpers import HASHER, SECRET, bearer, create_job, login
from web.auth import Authenticator
from web.errors import APIError
from web.settings import SettingsError, load_settings

CLAIMS = {"sub": "test@example.com", "iat": 1, "exp": 2**40, "type": "access"}
FORGED = jwt.encode(CLAIMS, "another-secret-that-is-long-enough-0123456789", algorithm="HS256")
HS512 = jwt.encode(CLAIMS, SECRET, algorithm="HS512")
ALG_NONE = jwt.encode(CLAIMS, "", algorithm="none")  # "" is how pyjwt types "no key"

PROTECTED = [
    ("POST", "/api/generate"),
    ("GET", "/api/generate"),
    ("GET", "/api/generate/some-id"),
    ("GET", "/api/generate/some-id/stream"),
    ("GET", "/api/generate/some-id/metrics"),
    ("DELETE", "/api/generate/some-id"),
    ("GET", "/api/status"),
]


def make_token(**overrides: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "test@example.com",
        "iat": now,
        "exp": now + 600,
        "type": "access",
    }
    claims.update(overrides)
    claims = {key: value for key, value in claims.items() if value is not None}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_login_returns_a_bearer_jwt_with_the_contract_claims(client: TrioClient) -> None:
    response = await client.post(
        "/api/auth/login", json={"email": "test@example.com", "password": "password123"}
    )
    assert response.status_code == 200
    body = await response.get_json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "test@example.com"
    assert claims["type"] == "access"
    assert claims["exp"] - claims["iat"] == 3600


async def test_email_is_case_insensitive(client: TrioClient) -> None:
    token = await login(client, "Test@Example.COM", "password123")
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "test@example.com"


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("test@example.com", "wrong"),
        ("nobody@example.com", "password123"),
        ("test@example.com", ""),
    ],
)
async def test_wrong_credentials_are_401(client: TrioClient, email: str, password: str) -> None:
    response = await client.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 401
    assert await response.get_json() == {"detail": "Invalid email or password"}


async def test_login_body_is_validated(client: TrioClient) -> None:
    response = await client.post("/api/auth/login", json={"email": "test@example.com"})
    assert response.status_code == 422
    detail = (await response.get_json())["detail"]
    assert [item["loc"] for item in detail] == [["body", "password"]]
    response = await client.post(
        "/api/auth/login", data=b"email=x", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415


async def test_repeated_failures_are_throttled_with_retry_after(
    client: TrioClient, autojump_clock: trio.testing.MockClock
) -> None:
    wrong = {"email": "test@example.com", "password": "nope"}
    for _ in range(10):
        assert (await client.post("/api/auth/login", json=wrong)).status_code == 401
    right = {"email": "test@example.com", "password": "password123"}
    response = await client.post("/api/auth/login", json=right)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    assert "detail" in await response.get_json()
    await trio.sleep(301)
    assert (await client.post("/api/auth/login", json=right)).status_code == 200


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_protected_routes_need_a_token(client: TrioClient, method: str, path: str) -> None:
    response = await client.open(path, method=method)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "detail" in await response.get_json()


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (f"Bearer {make_token(exp=int(time.time()) - 10)}", "Token has expired"),
        (f"Bearer {FORGED}", "Invalid token"),
        (f"Bearer {make_token(exp=None)}", "Invalid token"),
        (f"Bearer {make_token(type='refresh')}", "Invalid token"),
        (f"Bearer {make_token(type=None)}", "Invalid token"),
        (f"Bearer {make_token(sub='stranger@example.com')}", "Invalid token"),
        (f"Bearer {make_token(sub=42)}", "Invalid token"),
        (f"Bearer {HS512}", "Invalid token"),
        (f"Bearer {ALG_NONE}", "Invalid token"),
        ("Bearer not.a.jwt", "Invalid token"),
        ("Bearer ", "Authorization header must be 'Bearer <token>'"),
        ("Basic dGVzdDp0ZXN0", "Authorization header must be 'Bearer <token>'"),
    ],
)
async def test_bad_tokens_are_401(client: TrioClient, authorization: str, detail: str) -> None:
    for method, path in PROTECTED:
        response = await client.open(path, method=method, headers={"Authorization": authorization})
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await response.get_json() == {"detail": detail}


async def test_sse_accepts_a_query_token_but_checks_it(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token)
    bad = await client.get(f"/api/generate/{job_id}/stream?token=garbage")
    assert bad.status_code == 401
    assert bad.headers["WWW-Authenticate"] == "Bearer"
    polled = await client.get(f"/api/generate/{job_id}?token={token}")
    assert polled.status_code == 401  # only the SSE route reads ?token=


async def test_another_users_job_is_invisible(
    client: TrioClient, token: str, other_token: str
) -> None:
    job_id = await create_job(client, token)
    for method, path in [
        ("GET", f"/api/generate/{job_id}"),
        ("GET", f"/api/generate/{job_id}/metrics"),
        ("GET", f"/api/generate/{job_id}/stream"),
        ("DELETE", f"/api/generate/{job_id}"),
    ]:
        response = await client.open(path, method=method, headers=bearer(other_token))
        assert response.status_code == 404
        assert await response.get_json() == {"detail": "Job not found"}
    listing = await (await client.get("/api/generate", headers=bearer(other_token))).get_json()
    assert listing["results"] == []
    mine = await (await client.get(f"/api/generate/{job_id}", headers=bearer(token))).get_json()
    assert mine["status"] != "canceled"


def test_short_auth_secret_is_refused() -> None:
    with pytest.raises(SettingsError, match="AUTH_SECRET"):
        load_settings({"AUTH_SECRET": "too-short"})


def test_a_remembered_token_still_expires_and_a_forged_one_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = Authenticator(load_settings({"AUTH_SECRET": SECRET}), hasher=HASHER)
    now = time.time()
    token = make_token(exp=int(now) + 60)
    assert auth.verify(token) == "test@example.com"
    assert auth.verify(token) == "test@example.com"  # remembered
    with pytest.raises(APIError, match="Invalid token"):
        auth.verify(FORGED)
    monkeypatch.setattr(time, "time", lambda: now + 61)
    for _ in range(2):
        with pytest.raises(APIError, match="Token has expired"):
            auth.verify(token)


def test_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web.auth, "VERIFIED_TOKENS", 3)
    auth = Authenticator(load_settings({"AUTH_SECRET": SECRET}), hasher=HASHER)
    tokens = [make_token(iat=int(time.time()) - n) for n in range(5)]
    for token in tokens + tokens:
        assert auth.verify(token) == "test@example.com"
    assert len(auth._verified) == 3
