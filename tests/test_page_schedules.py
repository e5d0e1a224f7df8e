"""The page's Schedules view (page/schedules.js), in Chromium: the list with next runs and the
last outcome, the cron explained as one types with its next five instants, create, pause,
run now and the slot history linking to the tasks; no CSP violation."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import ServerProcess
from playwright.sync_api import Browser, expect
from test_page import READY, WAIT_MS, browser, new_page, playwright, start_server

__all__ = ["browser", "playwright"]  # the module-scoped fixtures, shared with test_page
CONFIG = ('\n[[schedules]]\nname = "yearly"\nscript = "hello.sh"\ncron = "0 0 1 1 *"\n'
          'timezone = "Europe/Berlin"\n')


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server (auth off) with one config schedule."""
    server = start_server(tmp_path_factory.mktemp("schedules"), CONFIG)
    yield server
    server.stop()


def test_schedules_view(browser: Browser, scheduled: ServerProcess) -> None:
    """List, preview as one types, create, run now and the history's link to the task."""
    page = new_page(browser, scheduled)
    page.add_init_script("window.violations = []; document.addEventListener("
                         "'securitypolicyviolation', (e) => violations.push(e.violatedDirective))")
    try:
        page.goto("/")
        page.wait_for_function(READY, timeout=WAIT_MS)
        page.click('#views [data-view="schedules"]')
        view = page.locator("#schedules")
        expect(view).to_be_visible(timeout=WAIT_MS)
        row = view.locator('tr[data-schedule="yearly"]')
        expect(row).to_contain_text("0 0 1 1 * (Europe/Berlin)")
        expect(row).to_contain_text("config")
        page.fill(".schedule-form [name=cron]", "0 0 13 * 5")
        page.fill(".schedule-form [name=timezone]", "UTC")
        expect(view.locator(".cron-words")).to_contain_text("Friday", timeout=WAIT_MS)
        expect(view.locator(".cron-next li")).to_have_count(5)
        page.fill(".schedule-form [name=cron]", "61 * * * *")
        expect(view.locator(".cron-words")).to_contain_text("61", timeout=WAIT_MS)
        page.fill(".schedule-form [name=name]", "made")
        page.fill(".schedule-form [name=script]", "hello.sh")
        page.fill(".schedule-form [name=cron]", "0 3 * * *")
        page.click(".schedule-form button[type=submit]")
        expect(view.locator('tr[data-schedule="made"]')).to_contain_text("api", timeout=WAIT_MS)
        made = view.locator('tr[data-schedule="made"]')
        made.locator("button", has_text="Pause").click()
        expect(made).to_contain_text("paused", timeout=WAIT_MS)
        made.locator("button", has_text="Run now").click()
        expect(view.locator(".schedule-status")).to_contain_text("submitted", timeout=WAIT_MS)
        answer = page.request.post("/schedules", data={"name": "tick", "script": "hello.sh",
                                                       "every": "1s"})
        assert answer.status == 201
        deadline = time.monotonic() + WAIT_MS / 1000
        while not any(r["task_id"] for r in page.request.get("/schedules/tick/runs").json()
                      ["runs"]):
            assert time.monotonic() < deadline, "no slot of tick started"
            page.wait_for_timeout(100)
        view.locator("button", has_text="Refresh").click()
        view.locator('tr[data-schedule="tick"] button', has_text="History").click()
        link = view.locator('.schedule-history a[href^="/?task="]').first
        expect(link).to_be_visible(timeout=WAIT_MS)
        page.request.post("/schedules/tick/pause")
        assert page.evaluate("violations") == []
    finally:
        page.context.close()
