"""The web page in a real browser: log in, generate, watch, cancel, reopen, errors, phone width."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import jwt
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect

from tests.browser.conftest import AUTH_SECRET, ROOT, CuttableProxy, Servers

PHONE: ViewportSize = {"width": 390, "height": 844}
DEMO_EMAIL = "test@example.com"


def log_in(page: Page, base: str) -> None:
    page.goto(base)
    expect(page.get_by_label("Email")).to_have_value(DEMO_EMAIL)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="New job")).to_be_visible()


def generate(page: Page, prompt: str, *, num_images: int = 5, transport: str = "sse") -> str:
    """Fills the form, presses Generate and answers the new job's id."""
    previous = page.locator("#job").get_attribute("data-job-id")
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Number of images").fill(str(num_images))
    name = "WebSocket" if transport == "ws" else "Server-Sent Events"
    page.get_by_label(name).check()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "previous => { const id = document.querySelector('#job').dataset.jobId;"
        " return id && id !== previous; }",
        arg=previous,
    )
    job_id = page.locator("#job").get_attribute("data-job-id")
    assert job_id
    return job_id


def wait_loaded_images(page: Page, count: int) -> None:
    """Waits until the grid holds ``count`` images that the browser has decoded."""
    page.wait_for_function(
        "count => { const images = [...document.querySelectorAll('#grid img')];"
        " return images.length === count"
        " && images.every(image => image.complete && image.naturalWidth > 0); }",
        arg=count,
    )


def token_of(page: Page) -> str:
    token = page.evaluate("sessionStorage.getItem('imagegen.token')")
    assert isinstance(token, str)
    return token


def shown_ms(text: str) -> float:
    """A duration as the page shows it ("812 ms", "4.21 s") in milliseconds."""
    match = re.fullmatch(r"(\d+) ms|(\d+\.\d\d) s", text)
    assert match, f"not a duration: {text!r}"
    return float(match[1]) if match[1] else float(match[2]) * 1000


def screenshot_path(tmp_path: Path) -> Path:
    if os.environ.get("SAVE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        return ROOT / "docs" / "screenshot.png"
    return tmp_path / "screenshot.png"


def test_generate_watch_metrics_then_reopen_after_reload(
    page: Page, servers: Servers, tmp_path: Path
) -> None:
    base = servers.fast.url
    log_in(page, base)
    prompt = "A lighthouse on a cliff at dawn"
    job_id = generate(page, prompt)

    wait_loaded_images(page, 5)
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-status", "completed")
    expect(status).to_contain_text("5 of 5 images made")
    tiles = page.locator("#grid .tile")
    expect(tiles).to_have_count(5)
    for index in range(5):
        tile = tiles.nth(index)
        expect(tile).to_have_attribute("data-status", "completed")
        expect(tile.locator(".tile-detail")).to_contain_text("1 attempt · took ")
        alt = tile.locator("img").get_attribute("alt")
        assert alt == f"{prompt} (image {index + 1} of 5)"

    # TTFI and total time, as the API's metrics give them.
    expect(page.locator("#metric-attempts")).to_have_text("5 (0 retries)")
    metrics = httpx.get(
        f"{base}/api/generate/{job_id}/metrics",
        headers={"Authorization": f"Bearer {token_of(page)}"},
    ).json()
    assert abs(shown_ms(page.locator("#metric-ttfi").inner_text()) - metrics["ttfi_ms"]) <= 10
    assert abs(shown_ms(page.locator("#metric-total").inner_text()) - metrics["total_ms"]) <= 10
    expect(page.locator("#connection")).to_have_attribute("data-phase", "finished")
    newest = page.locator(".job-item").first
    expect(newest).to_have_attribute("data-job-id", job_id)
    expect(newest.locator(".badge")).to_have_text("Completed")

    page.screenshot(path=screenshot_path(tmp_path), full_page=True)

    # A reload keeps the session (sessionStorage); the job comes back from the list, replayed.
    page.reload()
    expect(page.get_by_role("heading", name="Earlier jobs")).to_be_visible()
    expect(page.locator("#job")).to_be_hidden()
    page.locator(f'.job-item[data-job-id="{job_id}"]').click()
    wait_loaded_images(page, 5)
    expect(status).to_have_attribute("data-status", "completed")
    expect(page.locator("#job-prompt")).to_have_text(prompt)
    expect(page.locator("#connection")).to_have_attribute("data-phase", "finished")
    # Start and finish times only travel in events: the tiles show them, so they were replayed.
    for index in range(5):
        expect(tiles.nth(index).locator(".tile-detail")).to_contain_text(" · took ")
    expect(page.locator("#metric-ttfi")).not_to_have_text("\u2013")  # the dash of "not known yet"
    expect(page.locator(f'.job-item[data-job-id="{job_id}"]')).to_have_attribute(
        "aria-current", "true"
    )


def test_too_many_jobs_is_shown_then_cancel_marks_the_job_canceled(
    page: Page, servers: Servers
) -> None:
    log_in(page, servers.slow.url)
    job_id = generate(page, "Slow mountains under snow")
    expect(page.locator("#job-status")).to_contain_text("Running: 0 of 5 images ready")
    expect(page.locator("#grid .tile[data-status=running]")).to_have_count(5)

    # This server allows one active job per user: the second is refused with Retry-After.
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#alert")).to_contain_text("Try again in 3 s.")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#generate")).to_contain_text("wait")
    expect(page.locator("#job")).to_have_attribute("data-job-id", job_id)

    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job")).to_have_attribute("data-status", "canceled")
    expect(page.locator("#job-status")).to_contain_text("Canceled after")
    expect(page.locator("#grid .tile[data-status=canceled]")).to_have_count(5)
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-phase", "finished")
    expect(page.locator(f'.job-item[data-job-id="{job_id}"] .badge')).to_have_text("Canceled")


def test_validation_errors_are_shown_next_to_their_fields(page: Page, servers: Servers) -> None:
    log_in(page, servers.slow.url)
    page.get_by_label("Prompt").fill("   ")  # three characters, none left after trimming
    page.get_by_label("Number of images").fill("50")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Prompt: String should have 3 to 1000 characters")
    expect(alert).to_contain_text("Number of images: Input should be between 5 and 20")
    expect(page.get_by_label("Prompt")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Number of images")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#num-images-error")).to_have_text("Input should be between 5 and 20")
    expect(page.get_by_label("Prompt")).to_be_focused()
    expect(page.locator("#job")).to_be_hidden()


def test_an_expired_token_goes_back_to_the_login_form(page: Page, servers: Servers) -> None:
    log_in(page, servers.slow.url)
    now = int(time.time())
    expired = jwt.encode(
        {"sub": DEMO_EMAIL, "iat": now - 7200, "exp": now - 3600, "type": "access"},
        AUTH_SECRET,
        algorithm="HS256",
    )
    # The page's own clock still believes in it: the server's 401 is what sends it back.
    page.evaluate("token => sessionStorage.setItem('imagegen.token', token)", expired)
    page.reload()
    expect(page.get_by_role("alert")).to_contain_text("Token has expired. Please log in again.")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('imagegen.token')") is None
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="New job")).to_be_visible()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_lost_connection_shows_reconnecting_and_resumes(
    page: Page, proxy: CuttableProxy, transport: str
) -> None:
    log_in(page, proxy.url)
    generate(page, "Paced waves on a long beach", transport=transport)
    wait_loaded_images(page, 1)

    proxy.cut(refuse=True)  # the server is unreachable now
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-phase", "reconnecting")
    expect(connection).to_contain_text("Connection lost. Reconnecting")
    page.get_by_role("button", name="Refresh").click()
    expect(page.get_by_role("alert")).to_contain_text("Cannot reach the server.")

    proxy.restore()
    wait_loaded_images(page, 5)
    expect(page.locator("#job-status")).to_have_attribute("data-status", "completed")
    expect(connection).to_have_attribute("data-phase", "finished")
    resume = (
        r"\r\nLast-Event-ID: ([1-9]\d*)\r\n"
        if transport == "sse"
        else r"GET /api/generate/[^ ?]+\?token=[^ &]+&last_event_id=([1-9]\d*) "
    )
    assert re.search(resume, proxy.requests(), flags=re.IGNORECASE), "no resume request"


def test_keyboard_only_with_websocket(page: Page, servers: Servers) -> None:
    page.goto(servers.fast.url)
    expect(page.get_by_label("Email")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.press("Enter")
    prompt = page.get_by_label("Prompt")
    expect(prompt).to_be_focused()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("Keyboard cats")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Number of images")).to_be_focused()
    page.keyboard.press("ArrowUp")  # 5 -> 6
    page.keyboard.press("Tab")
    expect(page.get_by_label("Server-Sent Events")).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(page.get_by_label("WebSocket")).to_be_checked()
    page.keyboard.press("Tab")
    generate_button = page.get_by_role("button", name="Generate")
    expect(generate_button).to_be_focused()
    outline = generate_button.evaluate("button => getComputedStyle(button).outlineStyle")
    assert outline == "solid", "keyboard focus must be visible"
    page.keyboard.press("Enter")
    wait_loaded_images(page, 6)
    expect(page.locator("#connection")).to_have_text("All events received over WebSocket.")
    expect(page.locator("#grid img").first).to_have_attribute("alt", "Keyboard cats (image 1 of 6)")


def test_phone_width_has_no_horizontal_scroll(browser: Browser, servers: Servers) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        page.goto(servers.fast.url)
        assert page.evaluate(overflow) == 0
        page.get_by_role("button", name="Log in").click()
        generate(page, "A very long prompt " * 20)
        wait_loaded_images(page, 5)
        expect(page.locator("#job-status")).to_have_attribute("data-status", "completed")
        assert page.evaluate(overflow) == 0
        boxes = [tile.bounding_box() for tile in page.locator("#grid .tile").all()]
        assert all(box is not None and box["x"] >= 0 for box in boxes)
        assert all(box is not None and box["x"] + box["width"] <= PHONE["width"] for box in boxes)
        rows = {round(box["y"]) for box in boxes if box is not None}
        assert len(rows) == 3, "five tiles in two columns"
    finally:
        context.close()


def test_the_page_is_served_with_its_cache_headers(servers: Servers) -> None:
    with httpx.Client(base_url=servers.fast.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset, kind in (("app.js", "javascript"), ("app.css", "text/css")):
            response = client.get(f"/static/{asset}")
            assert response.status_code == 200
            assert kind in response.headers["content-type"]
            assert response.headers["cache-control"] == "public, max-age=300"
        assert client.get("/static/..%2fapp.py").status_code == 404  # no way out of static/
        assert client.get("/static/missing.js").status_code == 404


def test_earlier_jobs_are_listed_newest_first_page_by_page(page: Page, servers: Servers) -> None:
    base = servers.fast.url
    log_in(page, base)
    headers = {"Authorization": f"Bearer {token_of(page)}"}
    with httpx.Client(base_url=base, headers=headers) as client:
        for number in range(11):  # more than a page; canceled at once, so none stays active
            job = client.post("/api/generate", json={"prompt": f"Listed {number}", "num_images": 5})
            assert client.delete(f"/api/generate/{job.json()['job_id']}").status_code == 200
        listed = client.get("/api/generate", params={"limit": 20}).json()["results"]
    page.get_by_role("button", name="Refresh").click()
    items = page.locator(".job-item")
    expect(items).to_have_count(10)
    expect(items.first.locator(".job-item-prompt")).to_have_text("Listed 10")
    page.get_by_role("button", name="Load more").click()
    expect(items).to_have_count(len(listed))
    shown = [item.get_attribute("data-job-id") for item in items.all()]
    assert shown == [job["job_id"] for job in listed]
    if len(listed) < 20:
        expect(page.get_by_role("button", name="Load more")).to_be_hidden()


def test_images_show_while_their_copies_are_pending_and_after(page: Page, servers: Servers) -> None:
    base, fake = servers.replicate.url, servers.fake_replicate
    files_answers: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda response: (
            files_answers.append((response.url, response.status))
            if "/files/" in response.url
            else None
        ),
    )
    log_in(page, base)
    fake.hold_copies(True)
    try:
        job_id = generate(page, "Copied behind the event")
        wait_loaded_images(page, 5)  # shown from Replicate: the copies are held
        sources = page.eval_on_selector_all("#grid img", "images => images.map(i => i.src)")
        held = {url: status for url, status in files_answers if url.startswith(base)}
        headers = {"Authorization": f"Bearer {token_of(page)}"}
        pending = httpx.get(f"{base}/api/status", headers=headers).json()["files"]
    finally:
        fake.hold_copies(False)

    assert sorted(sources) == sorted(f"{base}/files/{job_id}-{index}.webp" for index in range(5))
    assert held == dict.fromkeys(sources, 307)
    assert any(url.startswith(f"{fake.url}/files/") for url, _ in files_answers)
    assert pending["copies_pending"] == 5

    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/api/status", headers=headers).json()["files"]["copies_pending"]:
        assert time.monotonic() < deadline, "the copies were not made"
        time.sleep(0.05)
    files_answers.clear()
    page.reload()
    page.locator(f'.job-item[data-job-id="{job_id}"]').click()
    wait_loaded_images(page, 5)  # now from the service's own copies

    assert sorted(files_answers) == sorted((source, 200) for source in sources)
