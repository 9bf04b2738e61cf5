"""The dashboard page, driven in a real headless Chromium (playwright, no downloaded browser).

The browser comes from the system (Debian ``chromium``; ``.ci/run`` installs
it) or ``$HOUSEKEEPING_CHROMIUM``. Without playwright or a browser the browser
tests are skipped with the reason shown in pytest's summary; the tests of the
served files run regardless.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TIMEOUT, wait_for
from rest_support import ROOT, LiveServer

from rest.auth import hash_token

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
EVIL = '<img src=x onerror="window.pwned=1">&amp;<script>window.pwned=2</script>'

ANIMATORS = '''
from supervisor import Animator


class Talk(Animator):
    def execute(self, ops):
        ops.message(ops.task["args"].get("say", ""))
        return None


def register(manager):
    manager.register_animator("TALK", Talk())
'''


def find_chromium() -> str | None:
    """The browser to drive: ``$HOUSEKEEPING_CHROMIUM``, else a system Chromium."""
    configured = os.environ.get("HOUSEKEEPING_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# -- the served files (no browser needed) ----------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("dashboard")
    (folder / "talk_animators.py").write_text(ANIMATORS)
    server = LiveServer("--animators", "talk_animators:register", "--max-workers", "2",
                        cwd=folder).start()
    try:
        yield server
    finally:
        server.close()


def test_page_and_assets_are_served_with_a_strict_policy(live: LiveServer) -> None:
    for path in ("/", "/ui", "/ui/"):
        page = live.get(path)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        policy = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert '<script src="/ui/dashboard.js"' in page.text
    assert live.get("/ui/dashboard.js").headers["Content-Type"].startswith("text/javascript")
    assert live.get("/ui/dashboard.css").headers["Content-Type"].startswith("text/css")
    missing = live.get("/ui/../rest/app.py")
    assert missing.status_code == 404
    assert live.get("/ui/secrets.txt").json()["code"] == 404


def test_script_writes_data_only_as_text_and_keeps_the_token_in_the_session(
    live: LiveServer,
) -> None:
    script = live.get("/ui/dashboard.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "localStorage", "document.cookie"):
        assert sink not in script, sink
    assert "sessionStorage" in script and "textContent" in script


# -- the page in a browser ------------------------------------------------------------------


def chromium() -> Iterator[Any]:
    """A headless Chromium for a module's tests; skips them when there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the Python package playwright (pip install playwright)")
    executable = find_chromium()
    if executable is None or not Path(executable).exists():
        pytest.skip("browser tests need Chromium: apt-get install chromium "
                    "(.ci/run does), or set HOUSEKEEPING_CHROMIUM to a Chromium binary")
    driver = sync_playwright().start()
    try:
        browser = driver.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        driver.stop()


def browser_page(browser: Any, height: int) -> Iterator[Any]:
    """A tab of ``browser`` 1280 pixels wide; fails the test if the page raised."""
    context = browser.new_context(viewport={"width": 1280, "height": height})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT * 1000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    yield from browser_page(browser, 720)


def row_of(task_id: str) -> str:
    """The CSS selector of a task's row."""
    return f'#task-rows tr[data-id="{task_id}"]'


def _bar_width(page: Any, task_id: str) -> float:
    width = page.eval_on_selector(f"{row_of(task_id)} .fill", "node => node.style.width")
    return float(width.rstrip("%") or 0)


def test_a_task_appears_advances_and_is_canceled_from_the_page(
    live: LiveServer, page: Any
) -> None:
    page.goto(live.url + "/")
    page.wait_for_selector("body[data-connection=live]")
    page.wait_for_selector("#create-operation option[value=SLEEP]", state="attached")
    page.select_option("#create-operation", "SLEEP")
    page.fill("#create-object-id", "vol-42")
    page.fill("#create-args", '{"seconds": 30}')
    page.click("#create-submit")
    page.wait_for_function(
        "() => document.getElementById('create-status').textContent.startsWith('created ')")
    task_id = page.text_content("#create-status").split()[-1]
    page.wait_for_selector(f"{row_of(task_id)}[data-state=ACTIVE]")
    # The bar advances from the event stream alone: nothing reloads the page.
    first = wait_for(lambda: _bar_width(page, task_id))
    wait_for(lambda: _bar_width(page, task_id) > first,
             message=lambda: f"bar stuck at {first}%")
    assert page.text_content(f"{row_of(task_id)} td.object") == "vol-42"
    page.click(f"{row_of(task_id)} button.cancel")
    page.wait_for_selector(f"{row_of(task_id)}[data-state=CANCELED]")
    assert page.text_content(f"{row_of(task_id)} .state") == "CANCELED"
    assert page.is_hidden(f"{row_of(task_id)} button.cancel")
    assert live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "CANCELED"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_strings_from_tasks_are_shown_as_text(live: LiveServer, page: Any) -> None:
    created = live.post("/api/v1/tasks", json={
        "operation": "TALK", "objectId": EVIL[:128], "args": {"say": EVIL}})
    task_id = created.json()["meta"]["id"]
    wait_for(lambda: live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "SUCCEEDED")
    page.goto(live.url + "/")
    page.wait_for_selector(f"{row_of(task_id)}[data-state=SUCCEEDED]")
    messages = live.get(f"/api/v1/tasks/{task_id}").json()["messages"]
    assert page.text_content(f"{row_of(task_id)} td.message") == messages[-1]["message"]
    assert page.text_content(f"{row_of(task_id)} td.object") == EVIL[:128]
    page.fill("#token", EVIL)  # an error banner shows server text too
    page.select_option("#create-operation", "SLEEP")
    page.fill("#create-args", json.dumps({"seconds": EVIL}))
    page.click("#create-submit")
    page.wait_for_selector("#create-status.error")
    assert "400" in page.text_content("#create-status")
    assert page.evaluate("() => window.pwned") is None
    assert page.query_selector("#tasks img, #tasks script, #controls img") is None


def test_filters_by_operation_and_state(live: LiveServer, page: Any) -> None:
    talk = live.post("/api/v1/tasks", json={"operation": "TALK"}).json()["meta"]["id"]
    sleep = live.post("/api/v1/tasks",
                      json={"operation": "SLEEP", "args": {"seconds": 30}}).json()["meta"]["id"]
    try:
        page.goto(live.url + "/")
        page.wait_for_selector(row_of(sleep))
        page.wait_for_selector(f"{row_of(talk)}[data-state=SUCCEEDED]")
        page.select_option("#filter-operation", "TALK")
        assert page.is_visible(row_of(talk)) and page.is_hidden(row_of(sleep))
        page.select_option("#filter-operation", "")
        page.select_option("#filter-state", "UNFINISHED")
        assert page.is_hidden(row_of(talk)) and page.is_visible(row_of(sleep))
        page.select_option("#filter-state", "SUCCEEDED")
        assert page.is_visible(row_of(talk)) and page.is_hidden(row_of(sleep))
    finally:
        live.post(f"/api/v1/tasks/{sleep}/cancel")


def test_without_a_token_the_page_shows_401_then_works_with_one(
    browser: Any, tmp_path: Path
) -> None:
    token = "dashboard-token-123"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{
        "sha256": hash_token(token), "subject": "ops",
        "view": ["*"], "create": ["SLEEP"], "cancel": ["*"]}]}))
    server = LiveServer("--tokens", str(tokens), "--max-workers", "1").start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT * 1000)
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-connection=unauthorized]")
        banner = page.text_content("#banner")
        assert banner.startswith("401 Unauthorized: ") and "token" in banner
        page.fill("#token", token)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("body[data-connection=live]")
        assert page.is_hidden("#banner")
        created = requests.post(server.api("/api/v1/tasks"), json={"operation": "SLEEP"},
                                headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
        page.wait_for_selector(row_of(created.json()["meta"]["id"]))
        stored = page.evaluate(
            "() => [sessionStorage.getItem('housekeeping.token'), localStorage.length, "
            "document.cookie, document.getElementById('token').value]")
        assert stored == [token, 0, "", ""]
        page.reload()  # the session keeps it; a new tab would not
        page.wait_for_selector("body[data-connection=live]")
    finally:
        context.close()
        server.close()


def test_a_thousand_tasks_do_not_freeze_the_page(browser: Any) -> None:
    server = LiveServer("--max-workers", "1", "--max-streams", "2").start()
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        for _ in range(1000):
            created = server.post("/api/v1/tasks",
                                  json={"operation": "SLEEP", "args": {"seconds": 60}})
            assert created.status_code == 201
        page = context.new_page()
        page.set_default_timeout(TIMEOUT * 1000)
        page.add_init_script("""
            window.__longTasks = [];
            new PerformanceObserver((list) => {
              for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
            }).observe({type: "longtask", buffered: true});
        """)
        page.goto(server.url + "/")
        page.wait_for_function("() => document.querySelectorAll('#task-rows tr').length === 1000")
        loaded_ms = page.evaluate("() => performance.now()")
        # Frames keep coming while the running task's bar moves and ages tick.
        frames = page.evaluate("""() => new Promise((done) => {
            const gaps = []; let last = performance.now(); const end = last + 2000;
            function frame(now) {
              gaps.push(now - last); last = now;
              if (now < end) requestAnimationFrame(frame); else done(gaps);
            }
            requestAnimationFrame(frame);
        })""")
        filter_ms = page.evaluate("""() => {
            const select = document.getElementById('filter-state');
            const start = performance.now();
            select.value = 'ACTIVE';
            select.dispatchEvent(new Event('change'));
            return performance.now() - start;
        }""")
        assert page.text_content("#counts") == "1000 tasks, 1 shown"
        long_tasks = page.evaluate("() => window.__longTasks")
        measurement = {
            "tasks": 1000,
            "page_load_to_1000_rows_ms": round(loaded_ms),
            "longest_main_thread_task_ms": round(max(long_tasks, default=0)),
            "frames_in_2_s": len(frames),
            "longest_frame_gap_ms": round(max(frames)),
            "filter_1000_rows_ms": round(filter_ms, 1),
        }
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard-1000-tasks.json").write_text(json.dumps(measurement, indent=2))
        print("dashboard with 1000 tasks:", measurement, long_tasks)
        assert measurement["page_load_to_1000_rows_ms"] < 10_000, measurement
        assert measurement["longest_main_thread_task_ms"] < 1_000, measurement
        assert measurement["longest_frame_gap_ms"] < 500, measurement
        assert measurement["filter_1000_rows_ms"] < 500, measurement
    finally:
        context.close()
        server.close()
