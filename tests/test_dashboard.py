"""The web page: served from package data with no external resources, and driven in a real
headless Chromium (Debian's ``chromium`` and ``chromium-driver``) against a real server.

The browser test is skipped, saying why, only where Chromium or its driver is not
installed (``.ci/run`` installs both).  It saves screenshots under ``$JOBSERVER_ARTIFACTS``
(else a temporary directory) and prints their paths.
"""

from __future__ import annotations

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
TERMINAL = {"succeeded", "failed", "cancelled"}


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


def _submit(server: ServerProcess, task: str, token: str | None = None, **args: Any) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/jobs",
        json={"task": task, "args": args},
        headers=_bearer(token),
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _state(server: ServerProcess, job_id: str, token: str | None = None) -> str:
    response = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=_bearer(token), timeout=5)
    return str(response.json()["state"])


def _bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


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
@pytest.mark.timeout(300)
def test_a_server_with_tokens_asks_for_one_and_shows_a_tasks_real_progress(
    browser: Any, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A real server with a real tokens file: the page asks for a token, sends the one
    typed (kept in sessionStorage), and a wrong one gets the server's own 401.  The job
    reports progress with ``jobserver.progress`` from its own process."""
    from selenium.webdriver.common.by import By

    from jobserver.access import create_token

    secret = create_token(tmp_path / "tokens.json", "operator", ["admin"])
    server = server_factory(write_config(tmp_path, jobs={"progress_interval": "100ms"}))
    assert httpx.get(f"{server.url}/api/v1/jobs", timeout=5).status_code == 401
    gate = tmp_path / "gate"
    job = _submit(server, "report", secret, gate=str(gate), steps=3)

    browser.get(server.url + "/")
    # The page came without data (a page request carries no token) and says why.
    assert browser.find_element(By.ID, "connection").text == "token needed"
    assert "needs a token" in browser.find_element(By.ID, "banner").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#running tbody tr")
    field = browser.find_element(By.ID, "token")
    field.send_keys(secret)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    row = f'#running tr[data-job-id="{job}"]'
    label = poll_value(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, f"{row} .progress .label").text
            if "step 3" in browser.find_element(By.CSS_SELECTOR, f"{row} .progress .label").text
            else None
        ),
        timeout=60,
        what="the job's last progress report on the page",
    )
    assert label == "100% · step 3 of 3"
    fill = browser.find_element(By.CSS_SELECTOR, f"{row} .progress .fill")
    assert fill.get_attribute("style") == "width: 100%;"
    assert browser.find_element(By.ID, "connection").text == "live"
    assert browser.find_element(By.ID, "banner").text == ""
    browser.find_element(By.CSS_SELECTOR, row).click()
    poll_value(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, "#detail-progress .label").text
            == "100% · step 3 of 3"
        ),
        what="the progress bar in the job's detail",
    )
    browser.find_element(By.ID, "detail-close").click()
    stored = browser.execute_script("return sessionStorage.getItem('jobserver.token')")
    assert stored == secret
    browser.refresh()
    assert browser.find_element(By.ID, "token").get_attribute("value") == secret
    poll_value(lambda: browser.find_elements(By.CSS_SELECTOR, row), what="the job after a reload")

    # A wrong token: the server answers 401, and the page asks for a token.
    browser.execute_script("sessionStorage.setItem('jobserver.token', 'jst_wrong')")
    browser.refresh()
    banner = poll_value(
        lambda: browser.find_element(By.ID, "banner").text, what="the banner asking for a token"
    )
    assert banner == "The server needs a token: enter it above."
    assert browser.find_element(By.ID, "connection").text == "error 401"
    gate.write_text("go")
    poll_value(lambda: _state(server, job, secret) == "succeeded", "the job to finish", 60)


@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_the_pictures_show_the_machine_the_timeline_and_each_task(
    browser: Any, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The first paint has the jobs and the charts (every API request blocked: they came
    with the page); the timeline then shows a job that just ran; a phone's width fits."""
    from selenium.webdriver.common.by import By

    server = server_factory(write_config(tmp_path))
    done = [_submit(server, "add", a=n) for n in range(3)]
    broken = _submit(server, "fail", message="disk on fire")
    for job_id in [*done, broken]:
        poll_value(lambda job_id=job_id: _state(server, job_id) in TERMINAL, "a job", 120)
    # Admission stopped, then resumed, by a real change of the memory floor.
    system = f"{server.url}/api/v1/system"
    # A floor just below the machine's memory: above what is available, yet reachable
    # (a floor at or above the machine's memory is refused).
    floor = httpx.get(system).json()["machine"]["memory_capacity"] - 2**20
    assert httpx.patch(system, json={"scheduler": {"memory_floor": floor}}).status_code == 200
    poll_value(lambda: httpx.get(system).json()["overload"], what="admission to stop")
    assert httpx.patch(system, json={"scheduler": {"memory_floor": "1MiB"}}).status_code == 200
    poll_value(lambda: httpx.get(system).json()["overload"] is None, what="admission to resume")

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/api/*", "*/metrics"]})
    browser.get(server.url + "/")
    # No waiting: what the page shows now came with it.
    for job_id in done:
        assert browser.find_elements(By.CSS_SELECTOR, f'#recent tr[data-job-id="{job_id}"]')
    for chart in ("#chart-cpu", "#chart-memory"):
        line = browser.find_element(By.CSS_SELECTOR, f"{chart} polyline.free")
        assert len(line.get_attribute("points").split()) >= 2, chart
        assert browser.find_elements(By.CSS_SELECTOR, f"{chart} path.area.claimed"), chart
        mark = browser.find_element(By.CSS_SELECTOR, f"{chart} line.stop-mark title")
        assert "admission stopped" in mark.get_attribute("textContent")
        assert "memory floor" in mark.get_attribute("textContent")
    failed_bar = browser.find_element(By.CSS_SELECTOR, f'#timeline rect[data-job-id="{broken}"]')
    assert failed_bar.get_attribute("data-outcome") == "failed"
    hover = failed_bar.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    assert f"fail · {broken}" in hover and "attempt 1: failed" in hover
    add = '#task-charts figure[data-task="add"]'
    assert browser.find_element(By.CSS_SELECTOR, f"{add} figcaption").text.startswith(
        "add · 3 finished"
    )
    assert browser.find_elements(By.CSS_SELECTOR, f"{add} rect.throughput")
    assert browser.find_elements(By.CSS_SELECTOR, f"{add} circle.dot.p50")
    assert browser.find_elements(By.CSS_SELECTOR, '#latency tr[data-task="add"]')

    # Live: a job that runs now appears on the timeline, in its own lane while it overlaps.
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    running = _submit(server, "sleep", seconds=60)
    bar = f'#timeline rect[data-job-id="{running}"]'
    poll_value(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, bar).get_attribute("data-outcome") == "running"
        ),
        timeout=120,
        what="the running job on the timeline",
    )
    just_ran = _submit(server, "add", a=7)
    poll_value(lambda: _state(server, just_ran) in TERMINAL, "the job to run", 120)
    poll_value(
        lambda: (
            browser.find_element(
                By.CSS_SELECTOR, f'#timeline rect[data-job-id="{just_ran}"]'
            ).get_attribute("data-outcome")
            == "succeeded"
        ),
        what="the job that just ran on the timeline",
    )
    lanes = {
        element.get_attribute("y")
        for element in browser.find_elements(
            By.CSS_SELECTOR, f'{bar}, #timeline rect[data-job-id="{just_ran}"]'
        )
    }
    assert len(lanes) == 2, "two jobs that overlap in time share no lane"

    screenshots = _artifacts_dir()
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": LAPTOP[0], "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    laptop = screenshots / "dashboard-pictures-laptop.png"
    poll_value(lambda: browser.find_elements(By.CSS_SELECTOR, bar), what="redrawn charts")
    browser.save_screenshot(str(laptop))

    # A phone: nothing scrolls sideways, and every chart fits its box.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True},
    )
    poll_value(
        lambda: browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0],
        what="the page to fit a phone's width",
    )
    widest = browser.execute_script(
        "return Math.max(...[...document.querySelectorAll('svg')]"
        ".map((s) => s.getBoundingClientRect().right))"
    )
    assert widest <= PHONE[0], f"a chart reaches {widest}px on a {PHONE[0]}px screen"
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE[0], "height": height, "deviceScaleFactor": 1, "mobile": True},
    )
    phone = screenshots / "dashboard-pictures-phone.png"
    browser.save_screenshot(str(phone))
    for path in (laptop, phone):
        assert path.stat().st_size > 10_000
        print(f"screenshot: {path}")
        ARTIFACTS.append(path)


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
    # Read in one script: the table is redrawn (from the page, then every 10 s), and
    # elements found one call apart may belong to two drawings.
    cells, bins = browser.execute_script(
        "const row = document.querySelector(arguments[0]);"
        "return [[...row.querySelectorAll('td')].map((td) => td.innerText),"
        " [...row.querySelectorAll('.histogram .bin')].map((bin) => bin.getAttribute('style'))];",
        row,
    )
    assert cells[:2] == ["add", "3"], cells
    assert cells[2].startswith(("≤", ">")) and cells[3].startswith(("≤", ">")), cells
    assert len(bins) == 13  # the 12 bucket bounds and +Inf
    assert "height: 100%;" in bins, bins
    assert not browser.find_elements(By.CSS_SELECTOR, '#latency tr[data-task="sleep"]')


@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.timeout(120)
def test_the_page_lists_the_nodes_and_shows_one_die(
    browser: Any, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    from tests.conftest import postgresql_database
    from tests.test_cluster import node_config

    with postgresql_database(migrated=False) as url:
        a = server_factory(node_config(tmp_path, "a", url))
        b = server_factory(node_config(tmp_path, "b", url))
        browser.get(a.url + "/")

        def states() -> dict[str, str]:
            rows = browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
            found = {}
            for row in rows:
                cells = row.find_elements(By.TAG_NAME, "td")
                found[cells[0].text] = cells[1].text
            return found

        listed = poll_value(lambda: len(states()) == 2 and states(), "both nodes listed")
        assert sorted(state.split()[0] for state in listed.values()) == ["alive", "alive"]
        assert browser.find_element(By.ID, "nodes-card").is_displayed()
        b.process.kill()
        b.process.wait(timeout=10)
        poll_value(lambda: states().get("b") == "dead", "b shown dead")
        assert states()["a"].startswith("alive")
        shot = _artifacts_dir() / "nodes.png"
        browser.save_screenshot(str(shot))
        ARTIFACTS.append(shot)
