"""The page's stats view (page/stats.js) in Debian's Chromium, and the README's docs/stats.png."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, expect
from test_page import TOKENS, WAIT_MS, browser, new_page, playwright, start_server

__all__ = ["browser", "playwright"]  # the module-scoped fixtures of test_page, shared here
STATS_SHOT = ROOT / "docs" / "stats.png"
OPS = {"Authorization": "Bearer operator-token-0123456789"}
MIX = [("hello.sh", {}, None)] * 5 + [("count.sh", {"n": 3, "delay": 0.1}, None)] * 3 + [
    ("count.sh", {"n": 50, "delay": 0.1}, 0.5), ("fail.sh", {}, None), ("fail.sh", {}, None),
    ("colors.sh", {}, None), ("greet.py", {"name": "Ada", "api_key": "k"}, None)]


@pytest.fixture(scope="module")
def stats_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a token and the example scripts, that has run a known mix."""
    server = start_server(tmp_path_factory.mktemp("stats"), TOKENS, ROOT / "scripts")
    ids = []
    for script, params, timeout in MIX:
        body = json.dumps({"script": script, "params": params, "timeout": timeout}).encode()
        request = urllib.request.Request(f"{server.url}/tasks", data=body, method="POST",
                                         headers={**OPS, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            ids.append(json.load(response)["id"])
    deadline = time.monotonic() + 30
    for task_id in ids:
        while True:
            request = urllib.request.Request(f"{server.url}/tasks/{task_id}", headers=OPS)
            with urllib.request.urlopen(request, timeout=10) as response:
                if json.load(response)["status"] not in ("pending", "running"):
                    break
            assert time.monotonic() < deadline, "the mix did not finish"
            time.sleep(0.05)
    yield server
    server.stop()


def log_in(page, url: str = "/") -> None:
    """Open `url` and log in as the operator."""
    page.goto(url)
    page.fill("#login [name=token]", "operator-token-0123456789")
    page.click("#login button")
    expect(page.locator("#who")).to_have_text("ops (operator)")


def test_stats_view_shows_each_script(browser: Browser, stats_site: ServerProcess) -> None:
    """The Stats button opens per-script success rates and p95 durations, as /stats says."""
    page = new_page(browser, stats_site)
    try:
        log_in(page)
        page.click("#stats-open")
        dialog = page.locator("#stats")
        expect(dialog).to_be_visible()
        rows = page.locator(".stats-table tbody tr")
        expect(rows).to_have_count(5, timeout=WAIT_MS)
        count = page.locator(".stats-table tbody tr", has_text="count.sh")
        expect(count.locator("td").nth(1)).to_have_text("4")
        expect(count.locator("td").nth(6)).to_have_text("75.0%")  # 3 of 4, one timed out
        expect(page.locator(".stats-table tbody tr", has_text="fail.sh").locator("td").nth(6)
               ).to_have_text("0.0%")
        expect(page.locator(".stats-table tbody tr", has_text="hello.sh").locator("td").nth(6)
               ).to_have_text("100%")
        assert page.locator("#stats svg rect.ok").count() == 4  # fail.sh has no green part
        assert page.locator("#stats svg text.name").all_text_contents() == [
            "colors.sh", "count.sh", "fail.sh", "greet.py", "hello.sh"]
        page.select_option("#stats-window", "1h")
        expect(page.locator("#stats")).to_have_attribute("data-loaded", "1h")
        expect(rows).to_have_count(5)
        page.click("#stats-close")
        expect(dialog).to_be_hidden()
    finally:
        page.context.close()


def test_stats_link(browser: Browser, stats_site: ServerProcess) -> None:
    """`/?view=stats` opens the view; before login it says why it has nothing."""
    page = new_page(browser, stats_site)
    try:
        page.goto("/?view=stats")
        expect(page.locator("#stats [role=alert]")).to_contain_text("token")
        page.click("#stats-close")
        page.fill("#login [name=token]", "operator-token-0123456789")
        page.click("#login button")
        expect(page.locator("#who")).to_have_text("ops (operator)")
        page.goto("/?view=stats")  # the session cookie now: the link opens the view at once
        expect(page.locator(".stats-table tbody tr")).to_have_count(5, timeout=WAIT_MS)
    finally:
        page.context.close()


def test_stats_screenshot(browser: Browser, stats_site: ServerProcess, tmp_path: Path) -> None:
    """The README's picture of the stats view (kept by `make screenshot`)."""
    page = new_page(browser, stats_site, 1100, 620)
    try:
        log_in(page)
        page.click("#stats-open")
        expect(page.locator(".stats-table tbody tr")).to_have_count(5, timeout=WAIT_MS)
        target = STATS_SHOT if os.environ.get("REMOTERUN_SCREENSHOT") else tmp_path / "stats.png"
        target.parent.mkdir(exist_ok=True)
        page.screenshot(path=target)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert target.stat().st_size > 10_000
    finally:
        page.context.close()
