"""Glyphs that sit low in the cell render whole in the terminal (issue 28): the pixels under
an underscore, in Chromium with DejaVu Sans Mono, are ink, not background (`latency_ms=32`
read as `latency ms=32` when the glyph was clipped at the line height)."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterator

import pytest
from conftest import ServerProcess
from playwright.sync_api import Browser, Page
from test_page import (  # noqa: F401  (the module's fixtures: one Chromium, one server)
    browser,
    new_page,
    open_page,
    playwright,
    site,
    wait_text,
)

LINES = ["latency_ms=32 p99_ms=41", "_" * 24, "gjpqy |-+ \u2502\u2500\u253c\u2514\u2518"]
INK = 90  # a pixel this far (sum of |R|, |G|, |B| differences) from the background is ink


@pytest.fixture
def page(browser: Browser, site: ServerProcess) -> Iterator[Page]:  # noqa: F811
    """A fresh page on the auth-off server."""
    page = new_page(browser, site)
    yield page
    page.context.close()


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG (Chromium's)."""
    width, height, depth, color = struct.unpack(">IIBB", png[16:26])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 4 if color == 6 else 3
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        if png[at + 4:at + 8] == b"IDAT":
            chunks.append(png[at + 8:at + 8 + length])
        at += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[x] = (line[x] + best) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def ink_in_cells(page: Page, row_text: str, first: int, last: int) -> tuple[int, float]:
    """Ink pixels in columns first..last of the terminal row showing `row_text`, read from a
    screenshot of exactly that row's cells; and the width of those cells in pixels."""
    box = page.evaluate("""([text, first, last]) => {
        const rows = [...document.querySelectorAll('.xterm-rows > div')];
        const row = rows.find((r) => r.textContent.includes(text)).getBoundingClientRect();
        const screen = document.querySelector('.xterm-screen').getBoundingClientRect();
        const cell = screen.width / term.cols;
        return {x: screen.left + first * cell, y: row.top, width: (last - first + 1) * cell,
                height: row.height, cell};
    }""", [row_text, first, last])
    clip = {k: box[k] for k in ("x", "y", "width", "height")}
    width, height, rows = png_pixels(page.screenshot(clip=clip))
    channels = len(rows[0]) // width
    background = rows[0][:3]  # the cell's top-left corner: no glyph reaches it
    ink = sum(1 for row in rows for x in range(width)
              if sum(abs(row[x * channels + c] - background[c]) for c in range(3)) > INK)
    return ink, box["width"]


def test_underscores_and_descenders_are_drawn_whole(page: Page) -> None:
    """The cells of `_` hold ink: a full line of underscores at least one pixel thick across
    most of its width, and the `_` of `latency_ms` and `p99_ms`; descenders and box drawing
    stay within their rows."""
    response = page.request.post("/tasks", data={"script": "echo_stdin.sh",
                                                 "stdin": "\n".join(LINES) + "\n"})
    task_id = response.json()["id"]
    deadline = time.monotonic() + 15
    while page.request.get(f"/tasks/{task_id}").json()["status"] != "success":
        assert time.monotonic() < deadline
        page.wait_for_timeout(50)
    open_page(page, f"/?task={task_id}")
    wait_text(page, LINES[2])
    prefix = len("got: ")
    ink, width = ink_in_cells(page, LINES[1], prefix, prefix + len(LINES[1]) - 1)
    assert ink >= 0.8 * width, (ink, width)
    for at in (LINES[0].index("_"), LINES[0].rindex("_")):
        ink, width = ink_in_cells(page, LINES[0], prefix + at, prefix + at)
        assert ink >= 0.6 * width, (at, ink, width)
