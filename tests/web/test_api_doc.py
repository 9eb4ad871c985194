"""``docs/api.md`` stays true to ``GET /openapi.json`` (which test_openapi.py keeps true to the
app): the same routes with the same statuses, the same error statuses, event types and WebSocket
close codes, every member of every type in the service's order, and only settings that exist.
And the repository stands alone: every relative link of its Markdown resolves inside it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values
from quart_trio.testing import TrioClient

ROOT = Path(__file__).parents[2]
API_DOC = ROOT / "docs" / "api.md"
OPERATION = re.compile(r"^### `(GET|POST|DELETE|PUT|PATCH) (/\S*)`$")
STATUS = re.compile(r"`(\d{3})`")
ROW_KEY = re.compile(r"^\| `([^`]+)` \|")
SETTING = re.compile(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def sections(level: str, text: str) -> dict[str, str]:
    """The document split at headings of ``level`` (``##``): heading -> body."""
    parts = re.split(rf"^{level} (.+)$", text, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def table_keys(body: str) -> list[str]:
    """The first column of a section's table rows, in order."""
    return [match[1] for line in body.splitlines() if (match := ROW_KEY.match(line))]


@pytest.fixture
def doc() -> dict[str, str]:
    return sections("##", API_DOC.read_text(encoding="utf-8"))


@pytest.fixture
async def openapi(client: TrioClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = await response.get_json()
    return document


def documented_operations(doc: dict[str, str]) -> dict[tuple[str, str], set[str]]:
    operations = {}
    for heading, body in sections("###", "### " + doc["Routes"].split("\n### ", 1)[1]).items():
        match = OPERATION.match(f"### {heading}")
        assert match, f"not a route heading: {heading!r}"
        answers = [line for line in body.splitlines() if line.startswith("Answers: ")]
        assert len(answers) == 1, f"{heading}: one `Answers:` line"
        operations[(match[1], match[2])] = set(STATUS.findall(answers[0]))
    return operations


def openapi_operations(openapi: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {
        (method.upper(), path): set(operation["responses"])
        for path, item in openapi["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    }


async def test_every_route_and_its_statuses_match_the_openapi_document(
    doc: dict[str, str], openapi: dict[str, Any]
) -> None:
    assert documented_operations(doc) == openapi_operations(openapi)


async def test_the_error_table_has_every_error_status_of_the_document(
    doc: dict[str, str], openapi: dict[str, Any]
) -> None:
    errors = {
        status
        for statuses in openapi_operations(openapi).values()
        for status in statuses
        if status >= "400"
    }
    assert "MethodNotAllowed" in openapi["components"]["responses"]  # every path's 405
    assert {key.strip("`") for key in table_keys(doc["Errors"])} == errors | {"405"}


async def test_event_types_and_close_codes_match(
    doc: dict[str, str], openapi: dict[str, Any]
) -> None:
    schemas = openapi["components"]["schemas"]
    sse = [option["properties"]["event"]["const"] for option in schemas["ServerSentEvent"]["oneOf"]]
    frames = [
        option["properties"]["type"]["const"] for option in schemas["WebSocketFrame"]["oneOf"]
    ]
    streams = doc["Event streams"]
    assert table_keys(streams.split("###", 1)[0]) == sse == frames
    websocket = sections("###", streams)["WebSocket"]
    close_codes = openapi["paths"]["/api/generate/{job_id}"]["get"]["x-websocket"]["closeCodes"]
    assert table_keys(websocket) == list(close_codes)


async def test_every_type_lists_every_member_in_order(
    doc: dict[str, str], openapi: dict[str, Any]
) -> None:
    schemas = openapi["components"]["schemas"]
    types = sections("###", doc["Types"])
    assert types, "no types"
    for heading, body in types.items():
        name = heading.strip("`")
        assert name in schemas, f"{name} is not a schema of the document"
        assert table_keys(body) == list(schemas[name]["properties"]), name
    # Every type an answer or a request body refers to is described.
    referenced = set(re.findall(r"#/components/schemas/(\w+)", str(openapi["paths"])))
    # (the webhook answer, `{"status": "accepted"}`, is written out where its route is)
    described_elsewhere = {"Error", "ValidationError", "ServerSentEvent", "WebSocketFrame"}
    described_elsewhere.add("WebhookAccepted")
    assert referenced - described_elsewhere <= {heading.strip("`") for heading in types}


def test_every_setting_named_exists() -> None:
    settings = set(dotenv_values(ROOT / ".env.example"))
    named = set(SETTING.findall(API_DOC.read_text(encoding="utf-8")))
    assert named, "no setting named"
    assert named <= settings, named - settings


def markdown_files() -> list[Path]:
    return sorted(
        path
        for pattern in ("*.md", "docs/**/*.md", "bench/*.md")
        for path in ROOT.glob(pattern)
        if ".venv" not in path.parts
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name} links outside: {target}"
        assert resolved.exists(), f"{path.name} links to a missing file: {target}"


def test_the_readme_links_the_api_reference() -> None:
    assert "](docs/api.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


#: How the notes kept beside the repository (not in it) were referred to.
OUTSIDE = re.compile(r"\.\./shared/|\b(?:STACK|STYLE|REPLICATE|API)\.md\b")


def test_no_tracked_file_refers_to_notes_outside_the_repository() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z"],  # noqa: S607 (git from PATH, as a developer runs it)
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    found = []
    for name in filter(None, listed):
        path = ROOT / name.decode()
        if path.suffix in {".png", ".ico"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__):
                found.append(f"{name.decode()}:{number}: {line.strip()}")
    assert found == []
