"""The page as an ops console (issue 18), in Chromium: a task's story, re-run, history paging
and filters in the URL, live rows from /events without polling, layout, keyboard, themes,
accessibility (axe-core), and the README's screenshots."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, Page, Request, expect
from test_page import (  # noqa: F401  (the module's fixtures: one Chromium, one server)
    NODE_MODULES,
    READY,
    WAIT_MS,
    browser,
    new_page,
    open_page,
    playwright,
    run,
    site,
    start_server,
    wait_status,
    wait_text,
)

AXE = NODE_MODULES / "axe-core" / "axe.min.js"
DOCS = ROOT / "docs"


@pytest.fixture
def page(browser: Browser, site: ServerProcess) -> Iterator[Page]:  # noqa: F811
    """A fresh page on the auth-off server."""
    page = new_page(browser, site)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def queue_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server where sleep.sh runs one at a time, so its other tasks wait in the queue."""
    server = start_server(tmp_path_factory.mktemp("queue"),
                          '[scripts."sleep.sh"]\nmax_concurrency = 1\n')
    yield server
    server.stop()


def utc(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def post(page: Page, script: str, **fields: Any) -> dict[str, Any]:
    """Submit a task through the API (not through the page)."""
    response = page.request.post("/tasks", data={"script": script, **fields})
    assert response.status == 201, response.text()
    return response.json()  # type: ignore[no-any-return]


def get(page: Page, path: str) -> Any:
    """GET a JSON resource through the API."""
    response = page.request.get(path)
    assert response.ok, response.text()
    return response.json()


def wait_final(page: Page, task_id: str) -> dict[str, Any]:
    """Poll the API (not the page) until the task ended."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        task = get(page, f"/tasks/{task_id}")
        if task["status"] in ("success", "failed", "timeout", "cancelled"):
            return task  # type: ignore[no-any-return]
        page.wait_for_timeout(50)
    raise AssertionError(f"task {task_id} did not end")


def row_ids(page: Page) -> list[str]:
    """The ids of the history's rows, top to bottom."""
    return list(page.eval_on_selector_all("#tasks tr", "rows => rows.map(r => r.dataset.id)"))


def serious_violations(page: Page) -> list[dict[str, Any]]:
    """What axe-core (from node_modules) finds serious or critical on the page as it is."""
    assert AXE.is_file(), "run `npm ci` first"
    # Evaluated through the DevTools protocol: the page's CSP (script-src 'self') refuses an
    # injected script tag, as it should.
    page.evaluate(AXE.read_text() + "\n;undefined")
    found = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ["violations"]});
        return r.violations.map(v => ({id: v.id, impact: v.impact,
                                        nodes: v.nodes.map(n => n.target.join(" "))}));
    }""")
    return [v for v in found if v["impact"] in ("serious", "critical")]


def shot(page: Page, name: str, tmp_path: Path) -> None:
    """A screenshot: into docs/ under `make screenshot`, else a temporary file; checked."""
    target = DOCS / name if os.environ.get("REMOTERUN_SCREENSHOT") else tmp_path / name
    page.screenshot(path=target, full_page=name.endswith("-360.png"))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5_000


def test_task_page_tells_the_whole_story(page: Page) -> None:
    """Beside the terminal: params with secrets masked, each attempt's exit code, submitter,
    priority, timeout, output size and the four downloads."""
    task = post(page, "exit.sh", params={"code": 4}, max_retries=1, priority=2, timeout=30)
    wait_final(page, task["id"])
    open_page(page, f"/?task={task['id']}")
    info = page.locator("#task-info")
    expect(info).to_be_visible()
    facts = page.locator("#task-facts")
    for text in ("failed", "2 of 2", "anonymous", "30 s", "exit code4", "output"):
        expect(facts).to_contain_text(text.replace("exit code4", "exit code"))
    expect(page.locator("#task-params")).to_contain_text("code4")
    rows = page.locator("#task-attempts tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td").nth(3)).to_have_text("4")
    expect(rows.nth(1).locator("td").nth(3)).to_have_text("4")
    links = page.locator("#task-downloads a")
    expect(links).to_have_text(["raw", "stdout", "stderr", "jsonl"])
    hrefs = [links.nth(i).get_attribute("href") for i in range(4)]
    base = f"/tasks/{task['id']}/output"
    assert hrefs == [base, f"{base}?stream=stdout", f"{base}?stream=stderr",
                     f"{base}?format=jsonl"]
    assert page.request.get(hrefs[1]).text() == "exiting with 4\nexiting with 4\n"
    secret = post(page, "schema.sh", params={"name": "bob", "token": "s3cret"})
    wait_final(page, secret["id"])
    open_page(page, f"/?task={secret['id']}")
    expect(page.locator("#task-params")).to_contain_text("token***")
    expect(page.locator("#task-info")).not_to_contain_text("s3cret")


def test_rerun_with_edited_params(page: Page) -> None:
    """Re-run puts the task's script and params in the form; edited, it runs the new params;
    a secret param is left empty to type again."""
    open_page(page)
    first = run(page, "lines.py", "n=3")
    wait_status(page, "success")
    page.select_option("#script", "hello.sh")
    page.click("#rerun")
    expect(page.locator("#script")).to_have_value("lines.py")
    expect(page.locator("#params textarea")).to_have_value("n=3")
    page.fill("#params textarea", "n=5")
    page.click("#run button[type=submit]")
    page.wait_for_url(lambda url: "task=" in url and first not in url, timeout=WAIT_MS)
    wait_text(page, "line 5")
    second = page.url.split("task=")[1].split("&")[0]
    assert get(page, f"/tasks/{second}")["params"] == {"n": "5"}
    task = post(page, "schema.sh", params={"name": "ann", "count": 4, "loud": True,
                                           "mode": "b", "token": "t0k"}, priority=3)
    open_page(page, f"/?task={task['id']}")
    wait_status(page, "success")
    page.click("#rerun")
    form = page.locator("#run")
    expect(form.locator("[name=param-name]")).to_have_value("ann")
    expect(form.locator("[name=param-count]")).to_have_value("4")
    expect(form.locator("[name=param-loud]")).to_be_checked()
    expect(form.locator("[name=param-mode] option:checked")).to_have_text("b")
    expect(form.locator("[name=param-token]")).to_have_value("")
    expect(form.locator("[name=priority]")).to_have_value("3")
    expect(page.locator("#rerun-of")).to_contain_text("token")


def test_paging_through_120_tasks(page: Page) -> None:
    """Older and Newer page through 120 tasks, each exactly once, newest first, and back."""
    since = utc(time.time() - 0.001)
    made = [post(page, "hello.sh")["id"] for _ in range(120)]
    open_page(page, f"/?since={since}")
    seen: list[list[str]] = []
    while True:
        expect(page.locator("#tasks tr").first).to_be_visible()
        seen.append(row_ids(page))
        older = page.locator("#older")
        if older.is_disabled():
            break
        top = seen[-1][0]
        older.click()
        page.wait_for_function("t => document.querySelector('#tasks tr')?.dataset.id !== t",
                               arg=top, timeout=WAIT_MS)
    assert [len(p) for p in seen] == [25, 25, 25, 25, 20]
    assert [i for p in seen for i in p] == made[::-1]
    assert "cursor=" in page.url and f"since={since}" in page.url.replace("%3A", ":")
    for expected in seen[-2::-1]:
        page.click("#newer")
        page.wait_for_function("t => document.querySelector('#tasks tr')?.dataset.id === t",
                               arg=expected[0], timeout=WAIT_MS)
        assert row_ids(page) == expected
    expect(page.locator("#newer")).to_be_disabled()


def test_filters_are_kept_in_the_url(page: Page) -> None:
    """Search, status and submitter filters go into the URL; that URL opens the same view."""
    ok = post(page, "lines.py", params={"n": 1})
    bad = post(page, "exit.sh", params={"code": 1})
    for task in (ok, bad):
        wait_final(page, task["id"])
    open_page(page)
    page.fill("#filter-q", "LINE")
    page.select_option("#filter-status", "success")
    page.fill("#filter-by", "anonymous")
    page.wait_for_url(lambda url: "submitted_by=anonymous" in url, timeout=WAIT_MS)
    assert "q=LINE" in page.url and "status=success" in page.url
    expect(page.locator(f'#tasks tr[data-id="{ok["id"]}"]')).to_have_count(1)
    expect(page.locator("#tasks tr", has_not_text="lines.py")).to_have_count(0)
    shared = page.url
    other = page.context.new_page()
    open_page(other, shared)
    expect(other.locator("#filter-q")).to_have_value("LINE")
    expect(other.locator("#filter-status")).to_have_value("success")
    expect(other.locator(f'#tasks tr[data-id="{ok["id"]}"]')).to_have_count(1)
    expect(other.locator(f'#tasks tr[data-id="{bad["id"]}"]')).to_have_count(0)
    other.fill("#filter-by", "somebody-else")
    expect(other.locator("#history-empty")).to_be_visible()
    other.click("#filter-clear")
    expect(other.locator(f'#tasks tr[data-id="{bad["id"]}"]')).to_have_count(1)
    assert "q=" not in other.url


def test_status_changes_arrive_through_events(page: Page) -> None:
    """A task submitted elsewhere appears and goes running, then success, on the page with no
    request from the page at all: the history follows /events, it does not poll."""
    open_page(page)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    asked: list[str] = []

    def record(request: Request) -> None:
        if "/events" not in request.url:
            asked.append(request.url)

    page.on("request", record)
    task = post(page, "sleep.sh", params={"seconds": 3.5})
    row = page.locator(f'#tasks tr[data-id="{task["id"]}"]')
    expect(row.locator(".status")).to_have_text("running", timeout=WAIT_MS)
    expect(row.locator(".status")).to_have_text("success", timeout=WAIT_MS)
    assert asked == []


def test_queue_position_is_shown(browser: Browser, queue_site: ServerProcess) -> None:  # noqa: F811
    """A waiting task shows its place in the queue, which moves up as the queue does."""
    page = new_page(browser, queue_site)
    try:
        running = post(page, "sleep.sh")
        first = post(page, "sleep.sh")
        second = post(page, "sleep.sh")
        open_page(page, f"/?task={second['id']}")
        expect(page.locator("#task-queue")).to_have_text("#2 in the queue", timeout=WAIT_MS)
        expect(page.locator("#task-facts")).to_contain_text("#2")
        page.request.post(f"/tasks/{first['id']}/cancel")
        expect(page.locator("#task-queue")).to_have_text("#1 in the queue", timeout=WAIT_MS)
        page.request.post(f"/tasks/{running['id']}/cancel")
        wait_status(page, "running")
        expect(page.locator("#task-queue")).to_have_text("")
        page.click("#cancel")
        wait_status(page, "cancelled")
    finally:
        page.context.close()


def test_layout_at_360_px(browser: Browser, site: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    """At 360 px nothing overflows sideways, and the form, the task and the history are all
    reachable by scrolling."""
    page = new_page(browser, site, 360, 740)
    try:
        task = post(page, "lines.py", params={"n": 3})
        wait_final(page, task["id"])
        open_page(page, f"/?task={task['id']}")
        wait_text(page, "line 3")
        widths = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        assert widths[0] <= widths[1], widths
        for selector in ("#run-button", "#rerun", "#older", f'#tasks tr[data-id="{task["id"]}"]'):
            target = page.locator(selector)
            target.scroll_into_view_if_needed()
            expect(target).to_be_in_viewport()
            box = target.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
        page.locator(f'#tasks tr[data-id="{task["id"]}"] a').first.click()
        assert page.url.endswith(f"?task={task['id']}")
        assert serious_violations(page) == []
        shot(page, "console-360.png", tmp_path)
    finally:
        page.context.close()


def submissions(page: Page, script: str) -> int:
    """How many tasks of `script` exist."""
    return len(get(page, f"/tasks?script={script}&limit=500")["tasks"])


def test_keyboard(page: Page) -> None:
    """Ctrl+Enter runs; Enter twice in a field, or Enter after clicking Run, submits once (issue
    15); Esc leaves the terminal."""
    open_page(page)
    page.select_option("#script", "schema.sh")
    field = page.locator("#run [name=param-name]")
    field.fill("kim")
    before = submissions(page, "schema.sh")
    field.press("Enter")
    page.keyboard.press("Enter")  # wherever the focus is now: the terminal, or Run disabled
    page.wait_for_url(lambda url: "task=" in url, timeout=WAIT_MS)
    wait_status(page, "success")
    page.wait_for_timeout(300)  # a duplicate, if any, would be submitted by now
    assert submissions(page, "schema.sh") == before + 1
    url = page.url
    page.click("#run-button")
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")
    page.wait_for_url(lambda now: now != url, timeout=WAIT_MS)
    wait_status(page, "success")
    page.wait_for_timeout(300)
    assert submissions(page, "schema.sh") == before + 2
    page.locator("#terminal").click()
    page.keyboard.press("Escape")
    assert page.evaluate("document.querySelector('#terminal').contains(document.activeElement)") \
        is False
    page.select_option("#script", "hello.sh")
    page.locator("#run [name=priority]").focus()
    url = page.url
    page.keyboard.press("Control+Enter")
    page.wait_for_url(lambda now: now != url, timeout=WAIT_MS)
    wait_text(page, "hello world")


def test_interactive_follows_pty(page: Page) -> None:
    """PTY checks and disables Interactive; unchecking PTY gives back the user's own choice."""
    open_page(page)
    pty, interactive = page.locator("#run [name=pty]"), page.locator("#run [name=interactive]")
    pty.check()
    expect(interactive).to_be_checked()
    expect(interactive).to_be_disabled()
    pty.uncheck()
    expect(interactive).not_to_be_checked()
    expect(interactive).to_be_enabled()
    interactive.check()
    pty.check()
    pty.uncheck()
    expect(interactive).to_be_checked()
    expect(interactive).to_be_enabled()


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_colour_scheme_and_accessibility(browser: Browser, site: ServerProcess,  # noqa: F811
                                         scheme: str, tmp_path: Path) -> None:
    """The page follows prefers-color-scheme, and axe-core finds no serious or critical
    violation in it, with a task open."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1400, "height": 860},
                                  color_scheme=scheme)
    page = context.new_page()
    try:
        task = post(page, "lines.py", params={"n": 4, "both": True})
        wait_final(page, task["id"])
        open_page(page, f"/?task={task['id']}")
        wait_text(page, "line 4")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == {"dark": "rgb(22, 24, 29)", "light": "rgb(242, 243, 245)"}[scheme]
        assert serious_violations(page) == []
    finally:
        context.close()


def test_screenshots(browser: Browser, site: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    """The README's console screenshots, dark and light: a task's story beside its terminal."""
    for scheme in ("dark", "light"):
        context = browser.new_context(base_url=site.url, color_scheme=scheme,
                                      viewport={"width": 1440, "height": 860})
        page = context.new_page()
        try:
            task = post(page, "exit.sh", params={"code": 3}, max_retries=1, priority=1)
            wait_final(page, task["id"])
            open_page(page, f"/?task={task['id']}")
            wait_status(page, "failed")
            page.wait_for_function(READY, timeout=WAIT_MS)
            expect(page.locator("#task-attempts tbody tr")).to_have_count(2)
            shot(page, f"console-{scheme}.png", tmp_path)
        finally:
            context.close()
