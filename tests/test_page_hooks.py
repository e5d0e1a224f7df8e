"""The page's hooks card (page/hooks.js), in Chromium: operators and admins see each hook and
its latest deliveries, viewers see no card, and no secret reaches the page."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, expect
from test_page import READY, WAIT_MS, browser, new_page, playwright, start_server

__all__ = ["browser", "playwright"]  # the module-scoped fixtures, shared with test_page
SECRET = "page-hook-secret-456"
CONFIG = ('[[tokens]]\nname = "ops"\ntoken = "operator-token-0123456789"\nrole = "operator"\n'
          '[[tokens]]\nname = "eye"\ntoken = "viewer-token-0123456789"\nrole = "viewer"\n'
          f'[[hooks]]\nname = "deploy"\nscript = "hello.sh"\nsignature = "github"\n'
          f'secrets = ["{SECRET}"]\ndelivery_header = "X-GitHub-Delivery"\n')


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with one GitHub hook, an operator and a viewer token."""
    server = start_server(tmp_path_factory.mktemp("hooks"), CONFIG, ROOT / "scripts")
    yield server
    server.stop()


def log_in(browser: Browser, server: ServerProcess, token: str):
    """A page logged in with `token`, its CSP violations collected in window.violations."""
    page = new_page(browser, server)
    page.add_init_script("window.violations = []; document.addEventListener("
                         "'securitypolicyviolation', (e) => violations.push(e.violatedDirective))")
    page.goto("/")
    page.fill("#login [name=token]", token)
    page.click("#login button")
    page.wait_for_function(READY, timeout=WAIT_MS)
    return page


def test_operator_sees_hooks_and_deliveries(browser: Browser, hooked: ServerProcess) -> None:
    """A signed delivery shows in the operator's hooks card after Refresh; no secret in it."""
    page = log_in(browser, hooked, "operator-token-0123456789")
    try:
        card = page.locator("#hooks")
        expect(card).to_be_visible(timeout=WAIT_MS)
        expect(card).to_contain_text("POST /hooks/deploy")
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        answer = page.request.post("/hooks/deploy", data=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}",
            "X-GitHub-Delivery": "page-delivery-1"})
        assert answer.status == 202
        card.locator("button", has_text="Refresh").click()
        expect(card.locator("tbody tr", has_text="page-delivery-1")).to_contain_text("accepted")
        assert SECRET not in page.content()
        assert page.evaluate("violations") == []
    finally:
        page.context.close()


def test_viewer_has_no_hooks_card(browser: Browser, hooked: ServerProcess) -> None:
    """A viewer's page shows no hooks card (GET /hooks refuses it)."""
    page = log_in(browser, hooked, "viewer-token-0123456789")
    try:
        page.wait_for_load_state("networkidle")
        expect(page.locator("#hooks")).to_have_count(0)
    finally:
        page.context.close()
