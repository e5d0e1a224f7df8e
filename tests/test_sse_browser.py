"""A real browser's EventSource on a finished task's logs opens once and stops (the 204)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from conftest import ServerProcess
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
WATCH = """id => new Promise(done => {
  window.seen = {opens: 0, exits: 0, errors: 0};
  const source = new EventSource(`/tasks/${id}/logs`);
  source.onopen = () => seen.opens++;
  source.addEventListener("exit", () => seen.exits++);
  source.onerror = () => { seen.errors++; seen.state = source.readyState; };
  window.source = source;
  done();
})"""


@pytest.mark.slow
def test_event_source_on_a_finished_task_opens_once(tmp_path):
    """Chromium's EventSource gets task/output/exit once; its reconnect gets 204 and it closes."""
    server = ServerProcess(tmp_path)
    server.start()
    try:
        request = urllib.request.Request(
            f"{server.url}/tasks", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"script": "lines.py", "params": {"n": 2}}).encode())
        with urllib.request.urlopen(request) as response:
            task = json.loads(response.read())
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path="/usr/bin/chromium",
                                             headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"{server.url}/healthz")  # the server's origin, for same-origin SSE
                page.evaluate(WATCH, task["id"])
                # EventSource.CLOSED (2) only after the reconnect (~3 s on) was answered 204.
                page.wait_for_function("() => source.readyState === 2", timeout=20_000)
                seen = page.evaluate("seen")
            finally:
                browser.close()
        assert seen["opens"] == 1 and seen["exits"] == 1, seen
    finally:
        server.stop()
