"""The web terminal page, driven in Debian's Chromium by Playwright against a server process."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, Page, Playwright, WebSocketRoute, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
NODE_MODULES = ROOT / "node_modules"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TOKENS = ('[[tokens]]\nname = "ops"\ntoken = "operator-token-0123456789"\nrole = "operator"\n'
          '[[tokens]]\nname = "watcher"\ntoken = "viewer-token-0123456789"\nrole = "viewer"\n')
WAIT_MS = 10_000
READY = "() => window.terminalText && document.querySelector('#script').options.length > 0"


def start_server(tmp_path: Path, config_text: str = "", scripts: Path | None = None
                 ) -> ServerProcess:
    """A server process that serves the page's npm packages from this checkout."""
    server = ServerProcess(tmp_path, config_text)
    if scripts is not None:
        shutil.rmtree(tmp_path / "scripts")
        shutil.copytree(scripts, tmp_path / "scripts")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REMOTERUN_NODE_MODULES", str(NODE_MODULES))
        server.start()
    return server


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Playwright's sync driver, once for the module."""
    assert (NODE_MODULES / "@xterm/xterm/lib/xterm.mjs").is_file(), "run `npm ci` first"
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium for the module; each test gets its own context."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with auth off and the test scripts."""
    server = start_server(tmp_path_factory.mktemp("page"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secure_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a token configured and the example scripts of the repository."""
    server = start_server(tmp_path_factory.mktemp("secure"), TOKENS, ROOT / "scripts")
    yield server
    server.stop()


def new_page(browser: Browser, server: ServerProcess, width: int = 1200,
             height: int = 760) -> Page:
    """A page in a fresh browser context (its own cookies) on `server`."""
    context = browser.new_context(base_url=server.url, viewport={"width": width, "height": height})
    return context.new_page()


@pytest.fixture
def page(browser: Browser, site: ServerProcess) -> Iterator[Page]:
    """A fresh page on the auth-off server."""
    page = new_page(browser, site)
    yield page
    page.context.close()


def open_page(page: Page, path: str = "/") -> None:
    """Load the page and wait until its terminal and script list are up."""
    page.goto(path)
    page.wait_for_function(READY, timeout=WAIT_MS)


def run(page: Page, script: str, params: str = "", *, pty: bool = False,
        interactive: bool = False) -> str:
    """Submit `script` from the form (free-form params as key=value lines); the task id."""
    page.select_option("#script", script)
    if params:
        page.fill("#params textarea", params)
    if pty:
        page.check("#run [name=pty]")
    if interactive:
        page.check("#run [name=interactive]")
    page.click("#run button[type=submit]")
    page.wait_for_url(re.compile(r"\?task="), timeout=WAIT_MS)
    return page.url.split("task=")[1]


def text(page: Page) -> str:
    """What the terminal shows."""
    return str(page.evaluate("terminalText()"))


def wait_text(page: Page, needle: str) -> None:
    """Wait until the terminal shows `needle`."""
    page.wait_for_function("n => terminalText().includes(n)", arg=needle, timeout=WAIT_MS)


def wait_status(page: Page, status: str) -> None:
    """Wait until the open task's status badge reads `status`."""
    expect(page.locator("#task-status")).to_have_text(status, timeout=WAIT_MS)


def assert_each_line_once(page: Page, n: int) -> None:
    """Lines `line 1` .. `line n` each appear exactly once, in order."""
    lines = [line for line in text(page).splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, n + 1)]


def test_form_submits_and_output_shows(page: Page) -> None:
    """The schema's form (enum select, checkbox, password) submits and the output is shown."""
    open_page(page)
    page.select_option("#script", "schema.sh")
    form = page.locator("#run")
    expect(form.locator("[name=param-token]")).to_have_attribute("type", "password")
    expect(form.locator("[name=param-count]")).to_have_value("2")
    expect(form.locator("[name=param-name]")).to_have_attribute("required", "")
    form.locator("[name=param-name]").fill("bob")
    form.locator("[name=param-mode]").select_option(label="b")
    form.locator("[name=param-loud]").check()
    form.locator("[name=param-token]").fill("s3cret")
    page.click("#run button[type=submit]")
    wait_text(page, "name=bob count=2 loud=true mode=b")
    wait_status(page, "success")
    expect(page.locator("#task-exit")).to_contain_text("exit 0")


def test_form_shows_the_servers_validation_errors(page: Page) -> None:
    """A param the schema rejects is reported beside its field, and nothing runs."""
    open_page(page)
    page.select_option("#script", "schema.sh")
    page.fill("#run [name=param-name]", "NOT lowercase")
    page.click("#run button[type=submit]")
    expect(page.locator('.error[data-field="params.name"]')).to_contain_text("must match")
    assert "task=" not in page.url


def test_stderr_is_red_for_pipe_tasks(page: Page) -> None:
    """stderr lines of a pipe task are drawn in red, stdout in the default colour."""
    open_page(page)
    run(page, "lines.py", "n=4\nboth=true")
    wait_status(page, "success")
    wait_text(page, "line 4")  # xterm.js parses writes asynchronously: the badge may lead
    colours = page.evaluate("""() => {
        const buffer = term.buffer.active, out = {};
        for (let i = 0; i < buffer.length; i++) {
            const line = buffer.getLine(i), cell = line.getCell(0);
            out[line.translateToString(true)] = cell.isFgDefault() ? "default" : cell.getFgColor();
        }
        return out;
    }""")
    assert colours["line 1"] == "default" and colours["line 2"] == 1
    assert colours["line 3"] == "default" and colours["line 4"] == 1


def test_typing_reaches_an_interactive_script(page: Page) -> None:
    """Keys typed in the terminal go to a pipe-interactive task; Ctrl-D ends its input."""
    open_page(page)
    run(page, "echo_stdin.sh", interactive=True)
    wait_text(page, "ready")
    page.locator("#terminal").click()
    page.keyboard.type("bobx")
    page.keyboard.press("Backspace")
    page.keyboard.press("Enter")
    wait_text(page, "got: bob")
    page.keyboard.press("Control+D")
    wait_text(page, "lines: 1")
    wait_status(page, "success")


def test_ctrl_c_interrupts_a_pipe_task(page: Page) -> None:
    """Ctrl-C in the terminal sends INT to an interactive pipe task's process group."""
    open_page(page)
    run(page, "sleep.sh", interactive=True)
    wait_text(page, "started")
    page.locator("#terminal").click()
    page.keyboard.press("Control+C")
    wait_status(page, "failed")
    expect(page.locator("#task-exit")).to_contain_text("exit SIGINT (-2)")


def test_terminal_size_follows_the_window(page: Page) -> None:
    """A PTY task sees the terminal's size, and a new one when the window is resized."""
    open_page(page)
    run(page, "stty.sh", pty=True)
    wait_text(page, "size ")
    size = page.evaluate("`${term.rows} ${term.cols}`")
    page.locator("#terminal").click()
    page.keyboard.type("a\r")
    wait_text(page, f"typed: a size {size}")
    page.set_viewport_size({"width": 900, "height": 500})
    page.wait_for_function("s => `${term.rows} ${term.cols}` !== s", arg=size, timeout=WAIT_MS)
    smaller = page.evaluate("`${term.rows} ${term.cols}`")
    # dash runs stty.sh's WINCH trap only once `read` returns, so ask for the size by typing.
    page.locator("#terminal").click()
    page.keyboard.type("b\r")
    wait_text(page, f"typed: b size {smaller}")
    page.keyboard.press("Control+D")  # in a PTY, ^D is end of input
    wait_status(page, "success")


def test_cancel_button_cancels(page: Page) -> None:
    """The cancel button stops a running task, which ends cancelled."""
    open_page(page)
    run(page, "sleep.sh")
    wait_text(page, "started")
    page.click("#cancel")
    wait_status(page, "cancelled")
    expect(page.locator("#cancel")).to_be_disabled()


def test_history_lists_filters_and_replays(page: Page) -> None:
    """A finished task is listed, filterable, and opens to replay its output from the archive."""
    open_page(page)
    task_id = run(page, "hello.sh")
    wait_status(page, "success")
    open_page(page, "/")
    row = page.locator(f'#tasks tr[data-id="{task_id}"]')
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("hello.sh")
    expect(row).to_contain_text("anonymous")
    page.select_option("#filter-status", "failed")
    expect(row).to_have_count(0)
    page.select_option("#filter-status", "success")
    page.select_option("#filter-script", "hello.sh")
    expect(page.locator("#tasks tr", has_not_text="hello.sh")).to_have_count(0)
    expect(row).to_have_count(1)
    row.click()
    wait_text(page, "hello world")
    assert page.url.endswith(f"/?task={task_id}&status=success&script=hello.sh")  # filters kept
    download = page.locator("#task-download")
    expect(download).to_have_attribute("href", f"/tasks/{task_id}/output")
    assert page.request.get(f"/tasks/{task_id}/output").text() == "hello world\n"


def test_shared_link_opens_the_task(page: Page) -> None:
    """/?task={id} opens that task's terminal, replayed."""
    open_page(page)
    task_id = run(page, "lines.py", "n=3")
    wait_status(page, "success")
    other = page.context.new_page()
    open_page(other, f"/?task={task_id}")
    wait_text(other, "line 3")
    assert_each_line_once(other, 3)
    expect(other.locator("#task-status")).to_have_text("success")


def test_reload_mid_run_resumes_without_loss(page: Page) -> None:
    """Reloading the page while a task runs shows every line exactly once."""
    open_page(page)
    run(page, "lines.py", "n=40\ndelay=0.04")
    wait_text(page, "line 5")
    page.reload()
    page.wait_for_function(READY, timeout=WAIT_MS)
    wait_status(page, "success")
    wait_text(page, "line 40")
    assert_each_line_once(page, 40)


def test_dropped_socket_reconnects_with_since(page: Page) -> None:
    """After the server side drops the socket, the page resumes with since= and loses nothing."""
    routes: list[WebSocketRoute] = []

    def proxy(route: WebSocketRoute) -> None:
        routes.append(route)
        route.connect_to_server()

    page.route_web_socket(re.compile(r"/tasks/[^/]+/ws"), proxy)
    open_page(page)
    run(page, "lines.py", "n=40\ndelay=0.04")
    wait_text(page, "line 5")
    routes[0].close(code=1011, reason="dropped by the test")
    wait_status(page, "success")
    wait_text(page, "line 40")
    assert_each_line_once(page, 40)
    resumed = [int(route.url.split("since=")[1]) for route in routes[1:]]
    assert resumed and resumed[0] > 0, [route.url for route in routes]


def test_plain_text_without_xterm(page: Page) -> None:
    """When xterm.js cannot load, output still shows as plain text."""
    page.route("**/vendor/**", lambda route: route.abort())
    open_page(page)
    run(page, "hello.sh")
    wait_status(page, "success")
    expect(page.locator("pre.plain-terminal")).to_have_text("hello world\n")


def test_plain_view_without_the_module(page: Page) -> None:
    """When the page's module cannot load, a plain view lists logs and shows ?task= as text."""
    task = page.request.post("/tasks", data={"script": "hello.sh"}).json()
    page.route("**/static/app.js", lambda route: route.abort())
    page.goto(f"/?task={task['id']}")
    expect(page.locator("#fallback-output")).to_have_text("hello world\n", timeout=WAIT_MS)
    link = page.locator(f'#fallback-tasks a[href="/tasks/{task["id"]}/output"]')
    expect(link).to_contain_text("hello.sh")
    expect(page.locator("#app")).to_be_hidden()


def test_login_with_a_token(browser: Browser, secure_site: ServerProcess) -> None:
    """With tokens configured the page asks for one, keeps its session in an HttpOnly cookie
    and the session's key (never the token) in the origin's storage."""
    page = new_page(browser, secure_site)
    try:
        page.goto("/")
        login = page.locator("#login")
        expect(login).to_be_visible()
        login.locator("[name=token]").fill("wrong")
        login.locator("button").click()
        expect(page.locator("#login-error")).to_contain_text("unknown token")
        login.locator("[name=token]").fill("operator-token-0123456789")
        login.locator("button").click()
        expect(page.locator("#who")).to_have_text("ops (operator)")
        page.wait_for_function(READY, timeout=WAIT_MS)
        run(page, "hello.sh")
        wait_text(page, "Hello, world!")
        # The token is in no storage a script reads: only the session's key (issue 26) is.
        stored = page.evaluate("JSON.stringify([{...localStorage}, {...sessionStorage}])")
        assert "operator-token" not in stored
        assert page.evaluate("Object.keys(localStorage)") == ["remoterun.sessionKey"]
        cookies = page.context.cookies()
        assert [c["httpOnly"] for c in cookies] == [True]
        page.click("#logout")
        expect(login).to_be_visible()
        assert page.evaluate("localStorage.length") == 0
        assert page.request.get("/tasks").status == 401
    finally:
        page.context.close()


def test_viewer_watches_but_does_not_run(browser: Browser, secure_site: ServerProcess) -> None:
    """A viewer token sees history and replays, with no run form and no cancel."""
    page = new_page(browser, secure_site)
    try:
        ops = {"Authorization": "Bearer operator-token-0123456789"}
        task = page.request.post("/tasks", data={"script": "hello.sh"}, headers=ops).json()
        page.goto("/")
        page.fill("#login [name=token]", "viewer-token-0123456789")
        page.click("#login button")
        expect(page.locator("#who")).to_have_text("watcher (viewer)")
        expect(page.locator("#run")).to_be_hidden()
        page.locator(f'#tasks tr[data-id="{task["id"]}"]').click()
        wait_text(page, "Hello, world!")
        expect(page.locator("#cancel")).to_be_disabled()
    finally:
        page.context.close()


def test_screenshot(browser: Browser, secure_site: ServerProcess, tmp_path: Path) -> None:
    """The README's screenshot: a logged-in operator, coloured output, a schema form, history."""
    page = new_page(browser, secure_site, 1280, 860)
    try:
        page.goto("/")
        page.fill("#login [name=token]", "operator-token-0123456789")
        page.click("#login button")
        page.wait_for_function(READY, timeout=WAIT_MS)
        run(page, "hello.sh")
        wait_status(page, "success")
        run(page, "colors.sh")
        wait_status(page, "success")
        run(page, "count.sh", "n=4\ndelay=0.02")
        wait_status(page, "success")
        page.select_option("#script", "greet.py")
        page.fill("#run [name=param-name]", "Ada")
        expect(page.locator("#tasks tr").first).to_contain_text("count.sh")
        # The suite checks the shot every run; `make screenshot` also keeps it for the README,
        # so that an ordinary test run leaves the work tree clean.
        target = SCREENSHOT if os.environ.get("REMOTERUN_SCREENSHOT") else tmp_path / "shot.png"
        target.parent.mkdir(exist_ok=True)
        page.screenshot(path=target)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert target.stat().st_size > 10_000
    finally:
        page.context.close()
