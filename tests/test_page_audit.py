"""The page's audit card (page/audit.js), in Chromium: admins see the trail, others do not;
the page runs under its Content-Security-Policy without a violation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, expect
from test_page import READY, WAIT_MS, browser, new_page, playwright, start_server

__all__ = ["browser", "playwright"]  # the module-scoped fixtures, shared with test_page
CONFIG = ('[[tokens]]\nname = "boss"\ntoken = "admin-token-0123456789"\nrole = "admin"\n'
          '[[tokens]]\nname = "ops"\ntoken = "operator-token-0123456789"\nrole = "operator"\n')


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with an admin and an operator token."""
    server = start_server(tmp_path_factory.mktemp("audit"), CONFIG, ROOT / "scripts")
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


def test_admin_sees_the_audit_trail(browser: Browser, audited: ServerProcess) -> None:
    """After a submission, the admin's page lists its submit row, and filters by action."""
    ops = {"Authorization": "Bearer operator-token-0123456789"}
    page = log_in(browser, audited, "admin-token-0123456789")
    try:
        page.request.post("/tasks", data={"script": "hello.sh"}, headers=ops)
        card = page.locator("#audit")
        expect(card).to_be_visible(timeout=WAIT_MS)
        card.locator("button", has_text="Refresh").click()
        expect(card.locator("tbody tr", has_text="submit").first).to_contain_text("hello.sh")
        page.select_option("#audit-action", "login")
        expect(card.locator("tbody tr").first).to_contain_text("login")
        expect(card.locator("tbody tr", has_text="submit")).to_have_count(0)
        assert page.evaluate("violations") == []
    finally:
        page.context.close()


def test_operator_has_no_audit_card(browser: Browser, audited: ServerProcess) -> None:
    """A non-admin's page shows no audit card (and /audit would refuse it anyway)."""
    page = log_in(browser, audited, "operator-token-0123456789")
    try:
        expect(page.locator("#who")).to_have_text("ops (operator)")
        expect(page.locator("#audit")).to_have_count(0)
        assert page.evaluate("violations") == []
    finally:
        page.context.close()


def test_audit_times_are_the_browsers_local_time(browser: Browser, audited: ServerProcess) -> None:
    """In a browser at UTC+8, the audit card's "when" is that zone's local time (not ISO with
    Z); the exact UTC instant stays in the cell's title."""
    context = browser.new_context(base_url=audited.url, timezone_id="Asia/Shanghai",
                                  locale="en-US")
    page = context.new_page()
    try:
        page.goto("/")
        page.fill("#login [name=token]", "admin-token-0123456789")
        page.click("#login button")
        page.wait_for_function(READY, timeout=WAIT_MS)
        cell = page.locator("#audit tbody tr td").first
        expect(cell).to_be_visible(timeout=WAIT_MS)
        instant = cell.get_attribute("title") or ""
        assert instant.endswith("Z"), instant
        local = datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(
            timezone(timedelta(hours=8)))
        assert cell.inner_text() == local.strftime("%-m/%-d/%Y, %-I:%M:%S %p")
    finally:
        context.close()
