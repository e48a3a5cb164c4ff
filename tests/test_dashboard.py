"""The web page: served from package data with no external resources, and driven in a real
headless Chromium (Debian's ``chromium`` and ``chromium-driver``) against a real server.

The browser test is skipped, saying why, only where Chromium or its driver is not
installed (``.ci/run`` installs both).  It saves screenshots under ``$JOBSERVER_ARTIFACTS``
(else a temporary directory) and prints their paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobserver import dashboard
from tests.conftest import ARTIFACTS, ServerProcess, poll_value, skip_for_want_of, write_config

STATIC = Path(dashboard.__file__).parent / dashboard.STATIC_DIR
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
LAPTOP = (1366, 900)
PHONE = (390, 844)


# -- without a browser -----------------------------------------------------------------


@pytest.mark.anyio
async def test_page_and_static_files_are_served_with_a_strict_policy(make_harness: Any) -> None:
    async with make_harness() as h:
        page = await h.client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert '<script src="/static/app.js">' in page.text
        for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
            response = await h.client.get(f"/static/{name}")
            assert response.status_code == 200 and kind in response.headers["content-type"]
        missing = await h.client.get("/static/nope.js")
        assert missing.status_code == 404


def test_the_page_needs_nothing_from_outside() -> None:
    """No CDN, no external fonts, no absolute URLs: it works on a box with no internet."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} refers to another host"
        assert "@import" not in text and "@font-face" not in text, path.name


def test_static_files_are_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["jobserver"]


def test_a_task_route_may_not_shadow_the_page(tmp_path: Path) -> None:
    from jobserver import config
    from jobserver.errors import ConfigError

    for route in ("/", "/metrics", "/static/app.js"):
        path = write_config(tmp_path, tasks={"t": {"function": "sample_tasks:add", "route": route}})
        with pytest.raises(ConfigError, match="reserved"):
            config.load(path)


# -- in a real browser -----------------------------------------------------------------


def _artifacts_dir() -> Path:
    directory = Path(os.environ.get("JOBSERVER_ARTIFACTS") or tempfile.gettempdir())
    directory = directory / "jobserver-screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        skip_for_want_of(
            "chromium",
            f"Chromium or its driver is not installed ({CHROMIUM}, {CHROMEDRIVER}); "
            "install Debian's chromium and chromium-driver (.ci/run does) to run this test",
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _submit(server: ServerProcess, task: str, **args: Any) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/jobs", json={"task": task, "args": args}, timeout=10
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _state(server: ServerProcess, job_id: str) -> str:
    return str(httpx.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=5).json()["state"])


@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_an_operator_cancels_a_running_job_from_the_page(
    browser: Any, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    server = server_factory(write_config(tmp_path, scheduler={"max_jobs": 2}))
    finished = _submit(server, "add", a=2, b=3)
    broken = _submit(server, "fail", message="disk on fire")
    # A real server measures this machine: on a busy one jobs may wait for CPU a while.
    poll_value(lambda: _state(server, broken) == "failed", "the failing job to fail", 120)
    running = _submit(server, "sleep", seconds=60)
    _submit(server, "sleep", seconds=60)
    waiting = _submit(server, "sleep", seconds=60)  # max_jobs 2: it waits, with a reason
    poll_value(lambda: _state(server, running) == "running", "the job to run", 120)

    browser.get(server.url + "/")
    row = f'#running tr[data-job-id="{running}"]'
    poll_value(lambda: browser.find_elements(By.CSS_SELECTOR, row), what="the running job's row")
    reason = poll_value(
        lambda: (
            browser.find_element(
                By.CSS_SELECTOR, f'#queue tr[data-job-id="{waiting}"] .reason'
            ).text
        ),
        what="the queued job's waiting reason",
    )
    # Which reason depends on this machine's load (a real probe): max_jobs, or CPU/memory.
    assert re.search(r"max_jobs|waiting for (CPU|memory)", reason), reason
    poll_value(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'#recent tr[data-job-id="{finished}"]'),
        timeout=120,
        what="the finished job in the recent list",
    )
    gauge = browser.find_element(By.CSS_SELECTOR, "#gauge-memory .gauge-numbers").text
    assert "capacity" in gauge
    assert browser.find_element(By.ID, "connection").text == "live"

    # The failed job's detail shows its error and traceback.
    browser.find_element(By.CSS_SELECTOR, f'#recent tr[data-job-id="{broken}"]').click()
    error = poll_value(
        lambda: browser.find_element(By.ID, "detail-error").text, what="the error text"
    )
    assert "ValueError: disk on fire" in error and "Traceback" in error
    screenshots = _artifacts_dir()
    laptop = screenshots / "dashboard-laptop-detail.png"
    browser.save_screenshot(str(laptop))

    # Cancel the running job from its detail panel.
    browser.find_element(By.CSS_SELECTOR, row).click()
    poll_value(
        lambda: browser.find_element(By.ID, "detail-state").text == "running",
        what="the detail to show the running job",
    )
    browser.find_element(By.ID, "detail-cancel").click()
    poll_value(
        lambda: browser.find_element(By.ID, "detail-state").text == "cancelled",
        timeout=30,
        what="the job to end cancelled on the page",
    )
    assert _state(server, running) == "cancelled"
    poll_value(
        lambda: browser.find_elements(
            By.CSS_SELECTOR, f'#recent tr[data-job-id="{running}"] .state.cancelled'
        ),
        what="the cancelled job in the recent list",
    )
    cancelled = screenshots / "dashboard-cancelled.png"
    browser.save_screenshot(str(cancelled))

    # Retry puts the cancelled job back in the queue as a new attempt.
    browser.find_element(By.ID, "detail-retry").click()
    message = poll_value(
        lambda: (
            browser.find_element(By.ID, "detail-action-result").text
            if "retried" in browser.find_element(By.ID, "detail-action-result").text
            else None
        ),
        what="the retry button's answer",
    )
    assert message == f"retried as {running}"
    assert _state(server, running) in {"queued", "running"}
    browser.find_element(By.ID, "detail-cancel").click()
    poll_value(lambda: _state(server, running) == "cancelled", what="the retried job cancelled")

    browser.find_element(By.ID, "detail-close").click()
    # A phone's viewport (a desktop window cannot be made this narrow).
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True},
    )
    poll_value(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#running tbody tr"),
        what="the other running job at phone width",
    )
    width = browser.execute_script("return document.documentElement.scrollWidth")
    phone = screenshots / "dashboard-phone.png"
    browser.save_screenshot(str(phone))
    assert width <= PHONE[0] + 1, f"the page scrolls sideways on a phone ({width}px)"
    for path in (laptop, cancelled, phone):
        assert path.stat().st_size > 10_000
        print(f"screenshot: {path}")
        ARTIFACTS.append(path)


@pytest.mark.integration
@pytest.mark.browser
def test_the_page_shows_progress_and_sends_the_token_from_session_storage(
    browser: Any, make_server_with_recorder: Any
) -> None:
    """The token typed once is kept in sessionStorage and sent as a Bearer header."""
    from selenium.webdriver.common.by import By

    url, seen = make_server_with_recorder
    browser.get(url + "/")
    httpx.post(f"{url}/api/v1/jobs", json={"task": "sleep", "args": {"seconds": 60}})
    # A job that reports progress gets a bar, in the running list and in its detail.
    label = poll_value(
        lambda: browser.find_element(By.CSS_SELECTOR, "#running .progress .label").text,
        what="a progress bar in the running list",
    )
    assert label == "42% · step 42 of 100"
    fill = browser.find_element(By.CSS_SELECTOR, "#running .progress .fill")
    assert fill.get_attribute("style") == "width: 42%;"
    browser.find_element(By.CSS_SELECTOR, "#running tbody tr").click()
    poll_value(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, "#detail-progress .label").text
            == "42% · step 42 of 100"
        ),
        what="the progress bar in the job's detail",
    )
    browser.find_element(By.ID, "detail-close").click()
    field = browser.find_element(By.ID, "token")
    field.send_keys("s3cret-token")
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    poll_value(lambda: "Bearer s3cret-token" in seen, what="a request with the token")
    stored = browser.execute_script("return sessionStorage.getItem('jobserver.token')")
    assert stored == "s3cret-token"
    browser.refresh()
    assert browser.find_element(By.ID, "token").get_attribute("value") == "s3cret-token"
    # A 401 from the server asks for a token instead of showing nothing.
    browser.execute_script("sessionStorage.setItem('jobserver.token', 'wrong')")
    browser.refresh()
    banner = poll_value(
        lambda: browser.find_element(By.ID, "banner").text, what="the banner asking for a token"
    )
    assert "token" in banner


PROGRESS = {"fraction": 0.42, "message": "step 42 of 100", "updated_at": "2026-11-26T00:00:00Z"}


def _with_progress(body: bytes) -> bytes:
    """Add ``PROGRESS`` to every running job in a job document or job list, as a server
    with job progress reports it (``progress`` {fraction, message, updated_at})."""
    document = json.loads(body)
    for job in document.get("jobs", [document]):
        if isinstance(job, dict) and job.get("state") == "running":
            job["progress"] = PROGRESS
    return json.dumps(document).encode()


@pytest.fixture
def make_server_with_recorder(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """The real app in a real uvicorn server, behind a tiny ASGI gate that records each
    Authorization header and answers 401 to a wrong token, as an authenticating server
    would (the server's own authentication is another piece of work).  Job documents
    for running jobs get a ``progress`` field, as a server with job progress sends."""
    import asyncio
    import threading

    import uvicorn

    from jobserver import config
    from jobserver.server import build
    from jobserver.store import migrate
    from tests.conftest import FakeProbe, free_port

    settings = config.load(write_config(tmp_path))
    migrate(settings.server.database)
    application = build(settings, probe=FakeProbe())
    seen: list[str] = []

    async def gate(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            headers = dict(scope["headers"])
            token = headers.get(b"authorization", b"").decode()
            seen.append(token)
            if token == "Bearer wrong":
                body = b'{"error":{"code":"unauthorized","message":"bad token","details":null}}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        if scope["type"] != "http" or not scope["path"].startswith("/api/v1/jobs"):
            await application.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def buffer(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            rewritten = _with_progress(bytes(body)) if start["status"] < 300 else bytes(body)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(rewritten)).encode()))
            await send(start | {"headers": headers})
            await send({"type": "http.response.body", "body": rewritten})

        await application.app(scope, receive, buffer)

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(gate, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    poll_value(lambda: server.started, what="the server to start")
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_the_page_shows_each_tasks_queue_latency(
    browser: Any, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    server = server_factory(write_config(tmp_path))
    done = [_submit(server, "add", a=n) for n in range(3)]
    for job_id in done:
        poll_value(lambda job_id=job_id: _state(server, job_id) == "succeeded", "a job", 120)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'jobserver_job_queue_wait_seconds_count{task="add"} 3.0' in metrics

    browser.get(server.url + "/")
    row = '#latency tr[data-task="add"]'
    poll_value(lambda: browser.find_elements(By.CSS_SELECTOR, row), what="the latency row")
    cells = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, f"{row} td")]
    assert cells[:2] == ["add", "3"], cells
    assert cells[2].startswith(("≤", ">")) and cells[3].startswith(("≤", ">")), cells
    bins = browser.find_elements(By.CSS_SELECTOR, f"{row} .histogram .bin")
    assert len(bins) == 13  # the 12 bucket bounds and +Inf
    assert any(b.get_attribute("style") == "height: 100%;" for b in bins)
    assert not browser.find_elements(By.CSS_SELECTOR, '#latency tr[data-task="sleep"]')
