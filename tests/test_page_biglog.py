"""The console for a log of any size (issue 28), in Chromium: a large task opens on its last
line without downloading the whole log, scrolling up loads earlier lines down to line 1,
and Ctrl+F finds a word anywhere and jumps to it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ServerProcess
from playwright.sync_api import Browser, Page, expect
from test_page import (  # noqa: F401  (the module's fixtures: one Chromium, one server)
    WAIT_MS,
    browser,
    new_page,
    open_page,
    playwright,
    site,
    text,
    wait_text,
)

HEAP_BOUND = 150 * 1024 * 1024


@pytest.fixture
def page(browser: Browser, site: ServerProcess) -> Iterator[Page]:  # noqa: F811
    """A fresh page on the auth-off server."""
    page = new_page(browser, site)
    yield page
    page.context.close()


def finished(page: Page, script: str, **params: Any) -> str:
    """Submit through the API and wait (bounded) for the end; the task id."""
    response = page.request.post("/tasks", data={"script": script, "params": params})
    assert response.status == 201, response.text()
    task_id: str = response.json()["id"]
    deadline = time.monotonic() + 60
    while page.request.get(f"/tasks/{task_id}").json()["status"] != "success":
        assert time.monotonic() < deadline, f"task {task_id} did not succeed"
        page.wait_for_timeout(100)
    return task_id


def last_line(page: Page, task_id: str) -> str:
    """The log's last line, from a Range request of its last bytes."""
    tail = page.request.get(f"/tasks/{task_id}/output", headers={"Range": "bytes=-200"})
    return tail.text().rstrip("\n").rsplit("\n", 1)[-1]


def test_a_large_log_opens_on_its_last_line_and_finds_line_1(page: Page) -> None:
    """A 40 MB task shows its last line without the tab holding the log (line 1 is not in the
    terminal; the JS heap stays under 150 MB); Ctrl+F finds the word only line 1 holds and
    the terminal shows it."""
    word = "zebra-only-on-line-one"
    task_id = finished(page, "flood.py", bytes=40_000_000, first=word)
    downloads: list[str] = []
    page.on("request", lambda r: downloads.append(r.url) if "/output" in r.url else None)
    open_page(page, f"/?task={task_id}")
    wait_text(page, last_line(page, task_id))
    assert word not in text(page) and not downloads
    heap = page.evaluate("performance.memory.usedJSHeapSize")
    assert heap < HEAP_BOUND, heap
    page.locator("#terminal").click()
    page.keyboard.press("Control+f")
    expect(page.locator("#find-q")).to_be_focused()
    page.keyboard.type(word)
    page.keyboard.press("Enter")
    page.wait_for_function("w => visibleText().includes(w)", arg=word, timeout=WAIT_MS)
    expect(page.locator("#find-count")).to_contain_text("line 1")
    assert page.evaluate("performance.memory.usedJSHeapSize") < HEAP_BOUND
    page.click("#to-end")
    wait_text(page, last_line(page, task_id))


def test_scrolling_up_reaches_line_1(page: Page) -> None:
    """A task of 30,000 lines opens on the frames holding its last 1,000 (a frame holds up to
    64 KiB); scrolling up fetches earlier lines on demand until line 1 shows."""
    task_id = finished(page, "lines.py", n=30000)
    open_page(page, f"/?task={task_id}")
    wait_text(page, "line 30000")
    assert "\nline 1\n" not in "\n" + text(page) + "\n"
    page.locator("#terminal").hover()
    page.mouse.wheel(0, -500)  # the wheel moves a few rows; then as a drag of the scrollbar:
    deadline = time.monotonic() + 40
    while "\nline 1\n" not in "\n" + text(page) + "\n":
        assert time.monotonic() < deadline, text(page)[:200]
        page.evaluate("term.scrollToTop()")
        page.wait_for_timeout(50)
    page.evaluate("term.scrollToTop()")
    page.wait_for_function("() => visibleText().split('\\n').includes('line 1')",
                           timeout=WAIT_MS)
