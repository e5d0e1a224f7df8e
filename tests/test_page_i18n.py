"""The page in English and Simplified Chinese (issue 28): every key in both dictionaries, every
key the markup and scripts use defined, the browser's language picks, the header's switch
keeps the choice."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess
from playwright.sync_api import Browser, Page, expect
from test_page import (  # noqa: F401  (the module's fixtures: one Chromium, one server)
    READY,
    WAIT_MS,
    browser,
    playwright,
    site,
)

PAGE = ROOT / "remoterun" / "page"
DOCS = ROOT / "docs"


def open_in(browser: Browser, server: ServerProcess, locale: str) -> Page:  # noqa: F811
    """The page in a fresh context whose browser language is `locale`."""
    context = browser.new_context(base_url=server.url, locale=locale,
                                  viewport={"width": 1200, "height": 760})
    page = context.new_page()
    page.goto("/")
    page.wait_for_function(READY, timeout=WAIT_MS)
    return page


@pytest.fixture
def dictionaries(browser: Browser, site: ServerProcess) -> Iterator[dict[str, dict[str, str]]]:  # noqa: F811
    """STRINGS of i18n.js as the browser loads it."""
    page = open_in(browser, site, "en-US")
    yield page.evaluate("async () => (await import('/static/i18n.js')).STRINGS")
    page.context.close()


def used_keys() -> set[str]:
    """Every key the markup (data-i18n, data-i18n-attr) and the scripts (t("...")) name."""
    html = (PAGE / "index.html").read_text()
    keys = set(re.findall(r'data-i18n="([^"]+)"', html))
    for attrs in re.findall(r'data-i18n-attr="([^"]+)"', html):
        keys |= {pair.split(":", 1)[1] for pair in attrs.split()}
    for script in set(PAGE.glob("*.js")) - {PAGE / "i18n.js"}:  # its comment shows t("key")
        keys |= set(re.findall(r'\bt\("([^"]+)"', script.read_text()))
    keys |= {f"status.{s}" for s in ("pending", "running", "success", "failed", "timeout",
                                      "cancelled")}  # t(`status.${status}`)
    return keys


def test_every_key_is_in_both_languages(dictionaries: dict[str, dict[str, str]]) -> None:
    """English and Chinese have the same keys, none empty, and every key used is defined."""
    english, chinese = dictionaries["en"], dictionaries["zh-CN"]
    assert set(english) - set(chinese) == set(), "missing in zh-CN"
    assert set(chinese) - set(english) == set(), "missing in en"
    assert all(english.values()) and all(chinese.values())
    assert used_keys() - set(english) == set(), "used but not defined"
    placeholders = {k: sorted(re.findall(r"\{\w+\}", v)) for k, v in english.items()}
    assert {k: sorted(re.findall(r"\{\w+\}", v)) for k, v in chinese.items()} == placeholders


@pytest.mark.parametrize("locale", ["zh-CN", "zh", "zh-Hans"])
def test_a_chinese_browser_gets_chinese(browser: Browser, site: ServerProcess,  # noqa: F811
                                        locale: str) -> None:
    """zh, zh-CN and zh-Hans browsers get the page in Chinese, <html lang="zh-CN">."""
    page = open_in(browser, site, locale)
    expect(page.locator("#run-button")).to_have_text("运行")
    expect(page.locator("#history-title")).to_have_text("历史")
    expect(page.locator("#cancel")).to_have_text("取消")
    expect(page.locator("#rerun")).to_have_text("重新运行")
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    page.context.close()


def test_the_switch_keeps_the_choice(browser: Browser, site: ServerProcess) -> None:  # noqa: F811
    """An English browser gets English; the header's switch turns the page Chinese, and the
    choice outlives a reload."""
    page = open_in(browser, site, "en-US")
    expect(page.locator("#run-button")).to_have_text("Run")
    page.select_option("#lang", "zh-CN")
    expect(page.locator("#run-button")).to_have_text("运行", timeout=WAIT_MS)
    page.reload()
    page.wait_for_function(READY, timeout=WAIT_MS)
    expect(page.locator("#history-title")).to_have_text("历史")
    page.select_option("#lang", "en")
    expect(page.locator("#history-title")).to_have_text("History", timeout=WAIT_MS)
    page.context.close()


def test_a_task_reads_in_chinese(browser: Browser, site: ServerProcess) -> None:  # noqa: F811
    """A finished task in a zh-CN browser: its status, facts and duration are in Chinese."""
    page = open_in(browser, site, "zh-CN")
    task = page.request.post("/tasks", data={"script": "hello.sh"}).json()
    page.goto(f"/?task={task['id']}")
    page.wait_for_function(READY, timeout=WAIT_MS)
    expect(page.locator("#task-status")).to_have_text("成功", timeout=WAIT_MS)
    expect(page.locator("#task-facts")).to_contain_text("退出码")
    expect(page.locator("#task-facts")).to_contain_text("秒")
    expect(page.locator("#tasks")).to_contain_text("成功")
    page.context.close()


@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_screenshot_of_each_locale_and_360_px(browser: Browser, site: ServerProcess,  # noqa: F811
                                              locale: str, tmp_path: Path) -> None:
    """The console with a task open in each locale (docs/console-<locale>.png under `make
    screenshot`); at 360 px wide nothing runs off the side in either."""
    page = open_in(browser, site, locale)
    task = page.request.post("/tasks", data={"script": "lines.py",
                                             "params": {"n": 12, "both": True}}).json()
    page.goto(f"/?task={task['id']}")
    page.wait_for_function(READY, timeout=WAIT_MS)
    page.wait_for_function("() => terminalText().includes('line 12')", timeout=WAIT_MS)
    folder = DOCS if os.environ.get("REMOTERUN_SCREENSHOT") else tmp_path
    target = folder / f"console-{locale}.png"
    page.screenshot(path=target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.set_viewport_size({"width": 360, "height": 760})
    page.wait_for_function("() => document.documentElement.scrollWidth <= 360", timeout=WAIT_MS)
    page.context.close()
