"""Bad input gets a clear 4xx with a ``detail``, never a 500, and changes nothing."""

from __future__ import annotations

import pytest
from quart_trio.testing import TrioClient

from actors.supervisor import Supervisor
from tests.web.helpers import bearer

VALID = {"prompt": "a lighthouse at dusk", "num_images": 5}


async def post_raw(
    client: TrioClient, token: str, data: bytes, content_type: str = "application/json"
) -> tuple[int, object]:
    headers = {**bearer(token), "Content-Type": content_type}
    response = await client.post("/api/generate", data=data, headers=headers)
    return response.status_code, await response.get_json()


def locs(body: object) -> list[list[object]]:
    assert isinstance(body, dict)
    detail = body["detail"]
    assert isinstance(detail, list)
    for item in detail:
        assert set(item) == {"loc", "msg", "type"}
        assert item["msg"]
    return [item["loc"] for item in detail]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"num_images": 5}, [["body", "prompt"]]),
        ({"prompt": "abc"}, [["body", "num_images"]]),
        ({}, [["body", "prompt"], ["body", "num_images"]]),
        ({"prompt": "ab", "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": "   ab   ", "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": "x" * 1001, "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": 123, "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": None, "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": ["abc"], "num_images": 5}, [["body", "prompt"]]),
        ({"prompt": "abc", "num_images": 4}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": 21}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": True}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": 5.0}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": "5"}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": None}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": 10**30}, [["body", "num_images"]]),
        ({"prompt": "abc", "num_images": -5}, [["body", "num_images"]]),
        ({"prompt": "a", "num_images": 100}, [["body", "prompt"], ["body", "num_images"]]),
    ],
)
async def test_invalid_create_bodies_are_422_with_locations(
    client: TrioClient, token: str, supervisor: Supervisor, body: object, expected: object
) -> None:
    response = await client.post("/api/generate", json=body, headers=bearer(token))
    assert response.status_code == 422
    assert locs(await response.get_json()) == expected
    assert supervisor.statistics().jobs_retained == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"not json",
        b'{"prompt": "abc", "num_images": NaN}',
        b'{"prompt": "abc", "num_images": Infinity}',
        b'{"prompt": "abc", "num_images": -Infinity}',
        b'{"prompt": "abc", "num_images": ' + b"9" * 5000 + b"}",
        b"[" * 100_00 + b"]" * 100_00,
        b"\xff\xfe{}",
        b'{"prompt": "abc", "num_images": 5',
    ],
)
async def test_malformed_json_is_422_as_fastapi_answers_it(
    client: TrioClient, token: str, supervisor: Supervisor, raw: bytes
) -> None:
    # The contract answers a body that is not JSON with 415 or 422; FastAPI's item: json_invalid.
    status, body = await post_raw(client, token, raw)
    assert status == 422
    assert isinstance(body, dict)
    [item] = body["detail"]
    assert item["loc"][0] == "body"
    assert item["type"] in ("json_invalid", "missing")
    assert item["msg"]
    assert supervisor.statistics().jobs_retained == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[]", [["body"]]),
        (b'"abc"', [["body"]]),
        (b"5", [["body"]]),
        (b"null", [["body"]]),
        (b'{"prompt": "ab\\ud800cd", "num_images": 5}', [["body", "prompt"]]),
        (b'{"prompt": "ab\\u0000cd", "num_images": 5}', [["body", "prompt"]]),
        (b'{"prompt": 1e400, "num_images": 5}', [["body", "prompt"]]),
        (b'{"prompt": {"a": {"b": [1, 2]}}, "num_images": 5}', [["body", "prompt"]]),
    ],
)
async def test_valid_json_of_the_wrong_shape_is_422(
    client: TrioClient, token: str, raw: bytes, expected: object
) -> None:
    status, body = await post_raw(client, token, raw)
    assert status == 422
    assert locs(body) == expected


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_wrong_content_type_is_415(client: TrioClient, token: str, content_type: str) -> None:
    status, body = await post_raw(
        client, token, b'{"prompt": "abc", "num_images": 5}', content_type
    )
    assert status == 415
    assert body == {"detail": "Content-Type must be application/json"}


async def test_body_over_the_cap_is_413_and_creates_nothing(
    client: TrioClient, token: str, supervisor: Supervisor
) -> None:
    raw = b'{"prompt": "abc", "num_images": 5, "pad": "' + b"x" * 70_000 + b'"}'
    status, body = await post_raw(client, token, raw)
    assert status == 413
    assert isinstance(body, dict)
    assert "65536" in str(body["detail"])
    assert supervisor.statistics().jobs_retained == 0


async def test_unknown_members_are_ignored_and_prompt_is_trimmed(
    client: TrioClient, token: str
) -> None:
    body = {"prompt": "  a lighthouse  ", "num_images": 5, "style": "oil", "seed": [1]}
    response = await client.post("/api/generate", json=body, headers=bearer(token))
    assert response.status_code == 200
    job_id = (await response.get_json())["job_id"]
    job = await (await client.get(f"/api/generate/{job_id}", headers=bearer(token))).get_json()
    assert job["prompt"] == "a lighthouse"


async def test_json_with_charset_and_suffix_types_is_accepted(
    client: TrioClient, token: str
) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge+json"):
        status, _ = await post_raw(
            client, token, b'{"prompt": "abc", "num_images": 5}', content_type
        )
        assert status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/generate/..%2F..%2Fetc%2Fpasswd",
        "/api/generate/" + "x" * 5000,
        "/api/generate/%F0%9F%94%A5",
        "/api/generate/%00",
        "/api/generate/'%20OR%201=1",
    ],
)
async def test_odd_job_ids_are_404(client: TrioClient, token: str, path: str) -> None:
    for suffix in ("", "/metrics", "/stream"):
        response = await client.get(path + suffix, headers=bearer(token))
        assert response.status_code == 404
        body = await response.get_json()
        assert body["detail"] in ("Job not found", "Not Found")


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_malformed_idempotency_key_is_422(client: TrioClient, token: str, key: str) -> None:
    headers = {**bearer(token), "Idempotency-Key": key}
    response = await client.post("/api/generate", json=VALID, headers=headers)
    assert response.status_code == 422
    assert locs(await response.get_json()) == [["header", "Idempotency-Key"]]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "cursor=-1", "limit=1e3"])
async def test_bad_list_parameters_are_422(client: TrioClient, token: str, query: str) -> None:
    response = await client.get(f"/api/generate?{query}", headers=bearer(token))
    assert response.status_code == 422
    assert locs(await response.get_json())[0][0] == "query"
