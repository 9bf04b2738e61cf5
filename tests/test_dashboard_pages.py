"""The dashboard loads the first page of the task list and says how many more the
server has (a real headless Chromium; skipped without one, as in test_dashboard)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TIMEOUT
from rest_support import LiveServer
from test_dashboard import browser_page, chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


def test_the_page_loads_the_first_page_and_counts_the_rest(browser: Any) -> None:
    server = LiveServer("--max-workers", "1", "--max-streams", "2").start()
    try:
        for _ in range(1003):
            created = server.post("/api/v1/tasks",
                                  json={"operation": "SLEEP", "args": {"seconds": 60}})
            assert created.status_code == 201
        for page in browser_page(browser, 720):
            page.set_default_timeout(TIMEOUT * 1000)
            page.goto(server.url + "/")
            page.wait_for_function(
                "() => document.querySelectorAll('#task-rows tr').length === 1000")
            page.wait_for_selector("#not-loaded:not([hidden])")
            note = page.text_content("#not-loaded")
            assert note.startswith("3 more on the server, not loaded"), note
            assert page.text_content("#counts") == "1000 tasks, 1000 shown"
    finally:
        server.close()
