"""``/docs`` in a real browser: Swagger UI from the service's own files, under its CSP; log in and
call the API from the page with the token."""

from __future__ import annotations

import json

from playwright.sync_api import ConsoleMessage, Locator, Page, Request, expect

from tests.browser.conftest import Servers

CREDENTIALS = {"email": "test@example.com", "password": "password123"}


def open_operation(page: Page, operation_id: str) -> Locator:
    """Expands an operation (Swagger UI's ``operations-{tag}-{operationId}``) and turns on
    "Try it out"."""
    operation = page.locator(f"[id$='-{operation_id}'].opblock")
    operation.locator(".opblock-summary-control").click()
    operation.get_by_role("button", name="Try it out").click()
    return operation


def answer(operation: Locator) -> tuple[Locator, Locator]:
    """The status cell and the body of the answer the page got."""
    response = operation.locator(".live-responses-table .response").first
    return response.locator(".response-col_status"), response.locator("pre").first


def test_the_docs_page_logs_in_and_calls_the_api_with_the_token(
    page: Page, servers: Servers
) -> None:
    base = servers.fast.url
    console: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: _errors_only(message, console))
    page.on("request", lambda request: _record(request, requests))

    page.goto(f"{base}/docs")
    expect(page.locator(".info .title")).to_contain_text("imagegen-trio")
    expect(page.locator(".opblock")).to_have_count(13)

    login = open_operation(page, "login")
    login.locator("textarea.body-param__text").fill(json.dumps(CREDENTIALS))
    login.get_by_role("button", name="Execute").click()
    status, body = answer(login)
    expect(status).to_have_text("200")
    expect(body).to_contain_text("access_token")
    token = json.loads(body.inner_text())["access_token"]

    # Without the token, the page's call is refused as any other client's would be.
    jobs = open_operation(page, "getStatus")
    jobs.get_by_role("button", name="Execute").click()
    expect(answer(jobs)[0]).to_have_text("401")

    page.locator(".auth-wrapper").get_by_role("button", name="Authorize").click()
    dialog = page.locator(".modal-ux")
    bearer = dialog.locator(".auth-container").filter(has_text="bearerAuth")
    bearer.locator("input").fill(token)
    bearer.get_by_role("button", name="Apply credentials").click()
    dialog.get_by_role("button", name="Close").first.click()
    jobs.get_by_role("button", name="Execute").click()

    status, body = answer(jobs)
    expect(status).to_have_text("200")
    expect(body).to_contain_text('"uptime_s"')
    expect(jobs.locator(".curl-command")).to_contain_text(f"Authorization: Bearer {token}")
    # Every file came from the service itself (no CDN), and the CSP refused nothing.
    assert requests, "the page made no request"
    assert all(url.startswith(f"{base}/") for url in requests), requests
    assert console == [], console
    assert page.evaluate("window.localStorage.length") == 0  # the token is not kept


def _errors_only(message: ConsoleMessage, sink: list[str]) -> None:
    # A CSP refusal is an error; the 401 above is the only answer the browser reports as one.
    if message.type == "error" and "status of 401" not in message.text:
        sink.append(message.text)


def _record(request: Request, sink: list[str]) -> None:
    if not request.url.startswith("data:"):
        sink.append(request.url)


def test_the_docs_page_is_served_under_its_own_csp(page: Page, servers: Servers) -> None:
    response = page.request.get(f"{servers.fast.url}/docs")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe-eval" not in csp
    missing = page.request.get(f"{servers.fast.url}/docs/assets/index.html")
    assert missing.status == 404
