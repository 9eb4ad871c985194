"""``GET /metrics``, ``X-Request-ID`` and JSON logs."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from quart_trio.testing import TrioClient

from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job, read_sse
from web import hypercorn_fixes
from web.logs import JsonFormatter, RequestIdFilter, configure_logging, request_id_var


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_a_scrape_shows_jobs_images_histograms_and_http_requests(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.scripts[1] = Script(latency_s=1.0, fail_times=1)
    job_id = await create_job(client, token)
    await read_sse(client, f"/api/generate/{job_id}/stream", headers=bearer(token))
    await client.get(f"/api/generate/{job_id}", headers=bearer(token))
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(await response.get_data(as_text=True))
    assert found["imagegen_jobs", (("status", "completed"),)] == 1
    assert found["imagegen_images_total", (("status", "completed"),)] == 5
    assert found["imagegen_attempts_total", ()] == 6
    assert found["imagegen_retries_total", ()] == 1
    assert found["imagegen_capacity_limit", ()] == 2
    assert found["imagegen_ttfi_seconds_count", ()] == 1
    assert found["imagegen_ttfi_seconds_sum", ()] == 1.0
    assert found["imagegen_provider_seconds_count", (("status", "completed"),)] == 5
    assert found["imagegen_subscribers", (("transport", "sse"),)] == 0
    route = (("method", "GET"), ("route", "/api/generate/<job_id>"), ("status", "200"))
    assert found["imagegen_http_requests_total", route] == 1
    assert found["imagegen_provider_calls", ()] == 6


async def test_a_scrape_counts_connection_errors_by_kind(
    client: TrioClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors = Counter({"LocalProtocolError": 2, "BusyResourceError": 1})
    monkeypatch.setattr(hypercorn_fixes, "connection_errors", errors)
    found = samples(await (await client.get("/metrics")).get_data(as_text=True))
    assert found["imagegen_connection_errors_total", (("kind", "LocalProtocolError"),)] == 2
    assert found["imagegen_connection_errors_total", (("kind", "BusyResourceError"),)] == 1


async def test_request_ids_are_echoed_or_made(client: TrioClient) -> None:
    given = await client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert given.headers["X-Request-ID"] == "trace-42"
    made = await client.get("/health", headers={"X-Request-ID": "no spaces allowed"})
    assert len(made.headers["X-Request-ID"]) == 32
    assert made.headers["X-Request-ID"] != (await client.get("/health")).headers["X-Request-ID"]


def test_json_logs_carry_the_request_id_and_extra_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "actors.job",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "job %s done",
            "args": ("j1",),
            "job_id": "j1",
            "ttfi_ms": 812,
        }
    )
    token = request_id_var.set("req-7")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "job j1 done"
    assert line["request_id"] == "req-7"
    assert (line["job_id"], line["ttfi_ms"], line["level"]) == ("j1", 812, "INFO")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_record_logged_with_exc_info_but_no_exception_stays_one_line(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", fmt)
        # What coredis does when Redis drops a connection: exc_info=True, no exception at hand.
        logging.getLogger("coredis").info("Connection closed unexpectedly!", exc_info=True)
        try:
            raise ValueError("a real one")
        except ValueError:
            logging.getLogger("actors.job").exception("job failed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert "Connection closed unexpectedly!" in lines[0]
    assert "NoneType" not in "".join(lines)
    assert "job failed" in lines[1]
    assert "ValueError: a real one" in "".join(lines[1:])  # a real traceback is kept


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_setting(fmt: str) -> None:
    from web.settings import SettingsError, load_settings  # noqa: PLC0415

    assert load_settings({"LOG_FORMAT": fmt.upper()}).log_format == fmt
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        load_settings({"LOG_FORMAT": "xml"})
