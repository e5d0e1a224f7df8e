"""The page at 360 px in Chromium: Run form, then the task, then history, then admin cards;
and the task's details say what happened (signal names, the script's timeout, no "success"
under "error"); the stats colours are all defined."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_SCRIPTS, ServerProcess
from playwright.sync_api import Browser, Page, expect
from test_page import READY, WAIT_MS, browser, new_page, playwright, start_server

__all__ = ["browser", "playwright"]  # the module-scoped fixtures, shared with test_page


def _scripts(folder: Path) -> Path:
    """The test scripts, and one whose sidecar sets a 30 s timeout."""
    shutil.copytree(TEST_SCRIPTS, folder, symlinks=True)
    (folder / "thirty.sh").write_text("#!/bin/sh\necho ok\n")
    (folder / "thirty.sh").chmod(0o755)
    (folder / "thirty.sh.toml").write_text("timeout_s = 30\n")
    return folder


@pytest.fixture(scope="module")
def narrow_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An auth-off server (its caller is an admin, so the audit card shows)."""
    root = tmp_path_factory.mktemp("narrow")
    server = start_server(root, "", _scripts(tmp_path_factory.mktemp("scripts") / "s"))
    yield server
    server.stop()


def _finished(page: Page, script: str) -> str:
    """Submit `script` through the API and wait until it ends; its id."""
    task_id = str(page.request.post("/tasks", data={"script": script}).json()["id"])
    page.wait_for_function(
        """async (id) => !["pending", "running"].includes(
             (await (await fetch(`/tasks/${id}`)).json()).status)""",
        arg=task_id, timeout=WAIT_MS, polling=100)
    return task_id


def _open_task(browser: Browser, server: ServerProcess, script: str) -> Page:
    """A 360 px page opened on a `?task=` link to a finished run of `script`."""
    page = new_page(browser, server, width=360, height=740)
    page.goto("/")
    page.wait_for_function(READY, timeout=WAIT_MS)
    task_id = _finished(page, script)
    page.goto(f"/?task={task_id}")
    page.wait_for_function(READY, timeout=WAIT_MS)
    expect(page.locator("#task-info")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#audit tbody tr").first).to_be_attached(timeout=WAIT_MS)
    return page


def _top(page: Page, selector: str) -> float:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not shown"
    return float(box["y"])


def test_order_at_360_px(browser: Browser, narrow_site: ServerProcess) -> None:
    """At 360 px a `?task=` link shows the Run form, then the task, then the history, then the
    audit card, and nothing is wider than the screen."""
    page = _open_task(browser, narrow_site, "hello.sh")
    try:
        tops = [_top(page, s) for s in ("#run", "#viewer", "#history", "#audit")]
        assert tops == sorted(tops) and len(set(tops)) == 4, tops
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
    finally:
        page.context.close()


def test_exit_by_signal_is_named(browser: Browser, narrow_site: ServerProcess) -> None:
    """A task killed by SIGTERM shows "SIGTERM (-15)" in its facts, its attempt's row and the
    task's bar."""
    page = _open_task(browser, narrow_site, "killself.sh")
    try:
        facts = page.locator("#task-facts")
        expect(facts.locator("dt:text-is('exit code') + dd")).to_have_text("SIGTERM (-15)")
        expect(page.locator("#task-attempts tbody td").nth(3)).to_have_text("SIGTERM (-15)")
        expect(page.locator("#task-exit")).to_contain_text("exit SIGTERM (-15)")
    finally:
        page.context.close()


def test_script_timeout_and_a_clean_attempt(browser: Browser, narrow_site: ServerProcess
                                            ) -> None:
    """A script whose sidecar sets 30 s shows that timeout, not "default"; a successful
    attempt's error cell is empty of "success"; --ok (the stats bars) is defined."""
    page = _open_task(browser, narrow_site, "thirty.sh")
    try:
        timeout = page.locator("#task-facts dt:text-is('timeout') + dd")
        expect(timeout).to_have_text("30 s (the script's)")
        error = page.locator("#task-attempts tbody td").nth(4)
        expect(error).to_have_text("—")
        ok = page.evaluate("getComputedStyle(document.documentElement)"
                           ".getPropertyValue('--ok').trim()")
        assert ok, "--ok is not defined"
    finally:
        page.context.close()
