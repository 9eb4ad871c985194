"""``GET /openapi.json`` stays true: the app's routes are the document's, the document is valid
OpenAPI 3.1, and real answers (bodies, statuses, headers) validate against it with no member the
document does not name.

Left out of the comparison of routes: ``web.openapi.UNDOCUMENTED_ROUTES`` (the web page and its
static files), and the ``HEAD`` and ``OPTIONS`` methods Quart and quart-cors add to every route.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator
from quart import Response
from quart_trio import QuartTrio
from quart_trio.testing import TrioClient

from actors.messages import ImageStatus, JobStatus
from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job, read_sse
from tests.web.test_ws import read_ws
from web import schemas
from web.openapi import UNDOCUMENTED_ROUTES, build_document
from web.settings import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}
JSON = "application/json"


def _template(rule: str) -> str:
    """``/files/<path:name>`` -> ``/files/{name}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _closed(node: Any) -> Any:
    """A copy where every object schema that lists properties admits no other member."""
    if isinstance(node, dict):
        closed = {key: _closed(value) for key, value in node.items()}
        if closed.get("type") == "object" and "properties" in closed:
            closed.setdefault("additionalProperties", False)
        return closed
    if isinstance(node, list):
        return [_closed(item) for item in node]
    return node


class Contract:
    """The document, and checks of real answers against it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._components = _closed(copy.deepcopy(document["components"]))
        self.checked: set[tuple[str, str, int]] = set()

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            _, kind, name = node["$ref"].removeprefix("#/").split("/")
            node = self.document["components"][kind][name]
        return node

    def validate(self, instance: object, schema: dict[str, Any]) -> None:
        """Validate with no undocumented member (``#/components/...`` refs resolve)."""
        root = {"components": self._components, "allOf": [_closed(schema)]}
        Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(
            instance
        )

    def response(self, path: str, method: str, status: int) -> dict[str, Any]:
        operation = self.document["paths"][path][method]
        responses = operation["responses"]
        assert str(status) in responses, f"{method.upper()} {path} does not document {status}"
        return self.resolve(responses[str(status)])

    async def check(
        self, response: Response, path: str, method: str, *, expect: int | None = None
    ) -> Any:
        """Check an answer of ``method path`` (a template) against the document; its JSON."""
        status = response.status_code
        if expect is not None:
            assert status == expect, await response.get_data(as_text=True)
        documented = self.response(path, method, status)
        for name, reference in documented.get("headers", {}).items():
            header = self.resolve(reference)
            if name not in response.headers:
                assert not header.get("required"), f"{status} of {path} lacks {name}"
                continue
            value: object = response.headers[name]
            if header["schema"].get("type") == "integer":
                value = int(str(value))
            self.validate(value, header["schema"])
        content = documented.get("content", {})
        body: Any = None
        if status == 204:
            assert not content
            assert await response.get_data() == b""
        else:
            assert content, f"{status} of {path} documents no body"
            mimetype = response.mimetype or ""
            media = content.get(mimetype) or content.get(mimetype.split("/")[0] + "/*")
            assert media is not None, f"{status} of {path} is {mimetype}, not {list(content)}"
            data = await response.get_data()  # read to the end (a file body closes then)
            if mimetype == JSON:
                body = json.loads(data)
                self.validate(body, media["schema"])
        self.checked.add((path, method, status))
        return body


@pytest.fixture
def document(settings: Settings) -> dict[str, Any]:
    return build_document(settings)


@pytest.fixture
def contract(document: dict[str, Any]) -> Contract:
    return Contract(document)


def app_routes(app: QuartTrio) -> Iterator[tuple[str, str]]:
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED_ROUTES:
            continue
        for method in sorted(set(rule.methods or ()) - AUTOMATIC_METHODS):
            yield _template(rule.rule), method.lower()


def documented_routes(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for path, item in document["paths"].items():
        for method in item:
            if method in HTTP_METHODS:
                yield path, method


# --- the document itself -----------------------------------------------------------------------


async def test_the_served_document_is_the_built_one(
    client: TrioClient, settings: Settings, contract: Contract
) -> None:
    response = await client.get("/openapi.json")
    body = await contract.check(response, "/openapi.json", "get", expect=200)
    assert body == json.loads(json.dumps(build_document(settings)))
    assert body["openapi"] == "3.1.0"


async def test_every_route_of_the_app_is_documented_and_nothing_else(
    app: QuartTrio, document: dict[str, Any]
) -> None:
    assert sorted(set(app_routes(app))) == sorted(set(documented_routes(document)))
    for path in UNDOCUMENTED_ROUTES:  # each one still exists: the list cannot go stale
        assert any(rule.rule == path for rule in app.url_map.iter_rules())


async def test_the_websocket_route_is_described_on_its_get(
    app: QuartTrio, document: dict[str, Any]
) -> None:
    sockets = [rule for rule in app.url_map.iter_rules() if rule.websocket]
    assert [rule.rule for rule in sockets] == ["/api/generate/<job_id>"]
    operation = document["paths"]["/api/generate/{job_id}"]["get"]
    assert "WebSocket" in operation["description"]
    assert "101" in operation["responses"]
    assert set(operation["x-websocket"]["closeCodes"]) == {
        "1000",
        "1008",
        "1009",
        "1012",
        "1013",
        "4404",
    }


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate_spec(document, cls=OpenAPIV31SpecValidator)


def test_every_ref_resolves(contract: Contract) -> None:
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(contract.document))
    assert refs
    for ref in set(refs):
        contract.resolve({"$ref": ref})


def test_wire_schemas_are_derived_from_the_attrs_classes(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    wire = [
        cls
        for cls in vars(schemas).values()
        if isinstance(cls, type) and attrs.has(cls) and cls.__module__ == schemas.__name__
    ]
    assert len(wire) >= 10
    for cls in wire:
        component = components[cls.__name__]
        names = [field.name for field in attrs.fields(cls)]
        assert list(component["properties"]) == names, cls
        assert component["required"] == names, cls
    assert components["JobStatus"]["enum"] == [status.value for status in JobStatus]
    assert components["ImageStatus"]["enum"] == [status.value for status in ImageStatus]
    results = components["JobView"]["properties"]["results"]
    assert results["items"] == {"$ref": "#/components/schemas/ResultView"}
    assert components["JobView"]["properties"]["ttfi_ms"]["type"] == ["integer", "null"]


def test_the_image_bounds_and_body_limit_are_this_servers() -> None:
    document = build_document(Settings(min_images=2, max_images=7, max_body_bytes=1000))
    num_images = document["components"]["schemas"]["CreateJobRequest"]["properties"]["num_images"]
    assert (num_images["minimum"], num_images["maximum"]) == (2, 7)
    too_large = document["components"]["responses"]["PayloadTooLarge"]["description"]
    assert "1000 bytes" in too_large


def test_protected_operations_say_so_and_document_401(document: dict[str, Any]) -> None:
    for path, method in documented_routes(document):
        operation = document["paths"][path][method]
        if path.startswith("/api/generate") or path == "/api/status":
            assert {"bearerAuth": []} in operation["security"], (path, method)
            assert operation["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}
        else:
            assert operation["security"] == [], (path, method)


# --- real answers ------------------------------------------------------------------------------


async def test_login_answers_match(client: TrioClient, contract: Contract) -> None:
    path = "/api/auth/login"
    good = {"email": "test@example.com", "password": "password123"}
    body = await contract.check(await client.post(path, json=good), path, "post", expect=200)
    assert body["token_type"] == "bearer"
    wrong = {"email": "test@example.com", "password": "nope"}
    body = await contract.check(await client.post(path, json=wrong), path, "post", expect=401)
    assert body == {"detail": "Invalid email or password"}
    missing = await client.post(path, json={"email": "test@example.com"})
    body = await contract.check(missing, path, "post", expect=422)
    assert body["detail"][0]["loc"] == ["body", "password"]
    form = await client.post(path, data="email=x", headers={"Content-Type": "text/plain"})
    await contract.check(form, path, "post", expect=415)
    broken = await client.post(path, data="{", headers={"Content-Type": JSON})
    await contract.check(broken, path, "post", expect=422)


async def test_login_throttling_answers_match(
    client: TrioClient, contract: Contract, settings: Settings
) -> None:
    path = "/api/auth/login"
    wrong = {"email": "test@example.com", "password": "nope"}
    for _ in range(settings.login_max_failures):
        await client.post(path, json=wrong)
    response = await client.post(path, json=wrong)
    await contract.check(response, path, "post", expect=429)


async def test_job_answers_match(client: TrioClient, token: str, contract: Contract) -> None:
    create = {"prompt": "a red fox in snow", "num_images": 5}
    response = await client.post("/api/generate", json=create, headers=bearer(token))
    created = await contract.check(response, "/api/generate", "post", expect=200)
    job = f"/api/generate/{created['job_id']}"
    running = await contract.check(
        await client.get(job, headers=bearer(token)), "/api/generate/{job_id}", "get", expect=200
    )
    assert running["status"] in ("pending", "running")
    await read_sse(client, f"{job}/stream", headers=bearer(token))  # until it is done
    done = await contract.check(
        await client.get(job, headers=bearer(token)), "/api/generate/{job_id}", "get", expect=200
    )
    assert done["status"] == "completed"
    assert done["results"][0]["url"].startswith("https://")
    metrics = await client.get(f"{job}/metrics", headers=bearer(token))
    await contract.check(metrics, "/api/generate/{job_id}/metrics", "get", expect=200)
    page = await client.get("/api/generate?limit=1", headers=bearer(token))
    body = await contract.check(page, "/api/generate", "get", expect=200)
    assert [summary["job_id"] for summary in body["results"]] == [created["job_id"]]
    cancel = await client.delete(job, headers=bearer(token))
    await contract.check(cancel, "/api/generate/{job_id}", "delete", expect=200)
    status = await client.get("/api/status", headers=bearer(token))
    await contract.check(status, "/api/status", "get", expect=200)


async def test_a_canceled_job_and_a_page_cursor_match(
    client: TrioClient, token: str, contract: Contract, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100.0)
    first = await create_job(client, token)
    await create_job(client, token)
    page = await client.get("/api/generate?limit=1", headers=bearer(token))
    body = await contract.check(page, "/api/generate", "get", expect=200)
    cursor = body["next_cursor"]
    assert isinstance(cursor, str)
    rest = await client.get(f"/api/generate?limit=1&cursor={cursor}", headers=bearer(token))
    body = await contract.check(rest, "/api/generate", "get", expect=200)
    assert body["results"][0]["job_id"] == first
    assert body["next_cursor"] is None
    cancel = await client.delete(f"/api/generate/{first}", headers=bearer(token))
    canceled = await contract.check(cancel, "/api/generate/{job_id}", "delete", expect=200)
    assert canceled["status"] == "canceled"
    metrics = await client.get(f"/api/generate/{first}/metrics", headers=bearer(token))
    await contract.check(metrics, "/api/generate/{job_id}/metrics", "get", expect=200)


async def test_failed_images_match(
    client: TrioClient, token: str, contract: Contract, provider: FakeProvider
) -> None:
    provider.scripts[0] = Script(permanent="the model refused")
    job_id = await create_job(client, token)
    _, _, frames = await read_sse(client, f"/api/generate/{job_id}/stream", headers=bearer(token))
    assert frames[-1]["event"] == "done"
    poll = await client.get(f"/api/generate/{job_id}", headers=bearer(token))
    body = await contract.check(poll, "/api/generate/{job_id}", "get", expect=200)
    assert body["results"][0]["status"] == "failed"
    assert body["results"][0]["error"] == "the model refused"


async def test_error_answers_of_the_job_routes_match(
    client: TrioClient, token: str, contract: Contract, settings: Settings
) -> None:
    create = "/api/generate"
    unauthorized = await client.post(create, json={"prompt": "abc", "num_images": 5})
    body = await contract.check(unauthorized, create, "post", expect=401)
    assert unauthorized.headers["WWW-Authenticate"] == "Bearer"
    assert body == {"detail": "Not authenticated"}
    forged = await client.get("/api/status", headers=bearer("not-a-jwt"))
    await contract.check(forged, "/api/status", "get", expect=401)
    invalid = await client.post(
        create, json={"prompt": " a ", "num_images": True}, headers=bearer(token)
    )
    body = await contract.check(invalid, create, "post", expect=422)
    assert [item["loc"] for item in body["detail"]] == [["body", "num_images"]]
    too_short = await client.post(
        create, json={"prompt": " a ", "num_images": 5}, headers=bearer(token)
    )
    body = await contract.check(too_short, create, "post", expect=422)
    assert body["detail"][0]["type"] == "string_too_short"
    bad_key = await client.post(
        create,
        json={"prompt": "abc", "num_images": 5},
        headers=bearer(token) | {"Idempotency-Key": ""},
    )
    await contract.check(bad_key, create, "post", expect=422)
    huge = {"prompt": "x" * settings.max_body_bytes, "num_images": 5}
    too_large = await client.post(create, json=huge, headers=bearer(token))
    await contract.check(too_large, create, "post", expect=413)
    unknown = await client.get("/api/generate/no-such-job", headers=bearer(token))
    body = await contract.check(unknown, "/api/generate/{job_id}", "get", expect=404)
    assert body == {"detail": "Job not found"}
    for path in ("/api/generate/no-such-job/metrics", "/api/generate/no-such-job/stream"):
        response = await client.get(path, headers=bearer(token))
        await contract.check(response, _template_of(path), "get", expect=404)
    gone = await client.delete("/api/generate/no-such-job", headers=bearer(token))
    await contract.check(gone, "/api/generate/{job_id}", "delete", expect=404)
    bad_limit = await client.get("/api/generate?limit=0", headers=bearer(token))
    body = await contract.check(bad_limit, "/api/generate", "get", expect=422)
    assert body["detail"][0]["loc"] == ["query", "limit"]


def _template_of(path: str) -> str:
    return re.sub(r"/api/generate/[^/]+", "/api/generate/{job_id}", path)


async def test_limits_answer_429_and_503_with_retry_after(
    client: TrioClient,
    token: str,
    *,
    other_token: str,
    contract: Contract,
    provider: FakeProvider,
    settings: Settings,
) -> None:
    provider.default = Script(latency_s=100.0)
    supervisor_settings = settings.supervisor
    for _ in range(supervisor_settings.max_active_jobs_per_user):
        await create_job(client, token, num_images=20)
    big = {"prompt": "one job too many", "num_images": 20}
    limited = await client.post("/api/generate", json=big, headers=bearer(token))
    await contract.check(limited, "/api/generate", "post", expect=429)
    busy = await client.post("/api/generate", json=big, headers=bearer(other_token))
    await contract.check(busy, "/api/generate", "post", expect=503)


async def test_a_405_matches_the_shared_response(client: TrioClient, contract: Contract) -> None:
    response = await client.put("/api/status")
    assert response.status_code == 405
    documented = contract.resolve({"$ref": "#/components/responses/MethodNotAllowed"})
    assert response.headers["Allow"]
    assert "X-Request-ID" in response.headers
    contract.validate(await response.get_json(), documented["content"][JSON]["schema"])


async def test_the_event_streams_match(client: TrioClient, token: str, contract: Contract) -> None:
    job_id = await create_job(client, token)
    path = f"/api/generate/{job_id}/stream"
    status, headers, frames = await read_sse(client, path, headers=bearer(token))
    assert status == 200
    documented = contract.response("/api/generate/{job_id}/stream", "get", 200)
    sent = {name.lower(): value for name, value in headers.items()}
    for name, header in documented["headers"].items():
        if "const" in header.get("schema", {}):
            assert sent[name.lower()] == header["schema"]["const"]
    event_schema = documented["content"]["text/event-stream"]["schema"]
    alternatives = {
        alternative["properties"]["event"]["const"]: alternative
        for alternative in contract.resolve(event_schema)["oneOf"]
    }
    assert frames[0] == {"retry": 3000}
    for frame in frames[1:]:
        # As a client's SSE parser sees the event: strings, ``data`` still JSON text.
        event = {"event": frame["event"], "id": str(frame["id"]), "data": json.dumps(frame["data"])}
        contract.validate(event, event_schema)
        contract.validate(
            frame["data"], alternatives[frame["event"]]["properties"]["data"]["contentSchema"]
        )
    assert [frame.get("event") for frame in frames[1:]] == ["progress"] * 5 + ["done"]
    resumed = await client.get(path, headers=bearer(token) | {"Last-Event-ID": "6"})
    await contract.check(resumed, "/api/generate/{job_id}/stream", "get", expect=204)
    socket_frames, code = await read_ws(client, f"/api/generate/{job_id}?token={token}")
    assert code == 1000
    frame_schema = contract.resolve({"$ref": "#/components/schemas/WebSocketFrame"})
    for socket_frame in socket_frames:
        contract.validate(socket_frame, frame_schema)


async def test_public_routes_match(
    client: TrioClient, supervisor: Supervisor, contract: Contract, settings: Settings
) -> None:
    health = await contract.check(await client.get("/health"), "/health", "get", expect=200)
    assert health["status"] == "ok"
    scrape = await client.get("/metrics")
    await contract.check(scrape, "/metrics", "get", expect=200)
    # A stored file's 200 is checked in tests/e2e/test_schemathesis.py, over real sockets: the
    # test client cancels quart-trio's file body mid-open (a ResourceWarning, not a server fault).
    missing = await client.get("/files/b.png")
    await contract.check(missing, "/files/{name}", "get", expect=404)
    webhook = await client.post("/api/webhooks/replicate", json={})
    await contract.check(webhook, "/api/webhooks/replicate", "post", expect=404)
    supervisor.begin_shutdown()
    stopping = await client.get("/health")
    body = await contract.check(stopping, "/health", "get", expect=503)
    assert body["status"] == "degraded"
