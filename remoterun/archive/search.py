"""Searching a task's output line by line, streamed from its segments, in pages with a cursor.

The output is inflated a frame at a time and gathered into blocks of about BLOCK_BYTES that end
at a line's end; each block is searched whole (`bytes.find`, or the regular expression with
MULTILINE), and only a candidate's own line is cut out and checked, so the cost per byte is
the C search's, not a Python loop's per line. Memory stays at a block, its frames' positions
and one line: a line longer than MAX_LINE_BYTES is searched in its first MAX_LINE_BYTES only.
A page ends at `limit` matches or, between blocks, when its time budget is spent; its cursor
names the next line to search by byte offset and line number, so the next page skips whole
closed segments without inflating them.
"""

from __future__ import annotations

import bisect
import codecs
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from remoterun.archive import segments
from remoterun.archive.segments import list_segments
from remoterun.wire import Frame

BLOCK_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 20
TEXT_BYTES = 4096  # a match's `text` is cut here


class BadCursor(ValueError):
    """A cursor this server did not make."""


@dataclass(frozen=True)
class Cursor:
    """Where a search goes on: the byte offset of a line's start and that line's number."""

    offset: int = 0
    line: int = 1

    def __str__(self) -> str:
        return f"{self.offset}.{self.line}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor a page's `next_cursor` spelled."""
        offset, _, line = text.partition(".")
        if not (offset.isdigit() and line.isdigit() and int(line) >= 1):
            raise BadCursor(text)
        return cls(int(offset), int(line))


class Matcher:
    """A case-sensitive text or a compiled regular expression, applied to bytes."""

    def __init__(self, query: str, regex: bool):
        self.text = query.encode()
        self.pattern = re.compile(self.text, re.MULTILINE) if regex else None  # re.error: bad

    def find(self, block: bytes, pos: int) -> int:
        """Where a candidate match starts in `block` from `pos`, or -1."""
        if self.pattern is None:
            return block.find(self.text, pos)
        found = self.pattern.search(block, pos)
        return -1 if found is None else found.start()

    def matches(self, line: bytes) -> bool:
        """Whether a line (without its newline) matches."""
        if self.pattern is None:
            return self.text in line
        return self.pattern.search(line) is not None


@dataclass(frozen=True)
class Match:
    """One matching line."""

    line: int
    seq: int
    offset: int
    text: str

    def to_json(self) -> dict[str, object]:
        """As PROTOCOL.md's `matches` item."""
        return {"line": self.line, "seq": self.seq, "offset": self.offset, "text": self.text}


@dataclass
class Page:
    """A page of matches and where the next page starts (None: the end of the output)."""

    matches: list[Match] = field(default_factory=list)
    next_cursor: Cursor | None = None


def line_text(line: bytes) -> str:
    """A line as `text`: without its line end, cut at TEXT_BYTES, never inside a character."""
    cut = line.rstrip(b"\n").rstrip(b"\r")[:TEXT_BYTES]
    return codecs.getincrementaldecoder("utf-8")("replace").decode(cut, final=False)


def frames_from(root: Path, logs_path: str, start: int, known_sizes: Mapping[str, int]
                ) -> Iterator[tuple[int, Frame]]:
    """(offset, frame) from byte `start` on, a frame cut if it holds `start`; closed segments
    (log path -> output bytes in `known_sizes`) wholly before `start` are not inflated."""
    offset = 0
    for _, _, path in list_segments(root / logs_path):
        size = known_sizes.get(path.relative_to(root).as_posix())
        if size is not None and offset + size <= start:
            offset += size
            continue
        try:
            reader = segments.SegmentReader(path)
        except FileNotFoundError:
            return  # pruned while we read
        try:
            for frame in reader.frames():
                end = offset + len(frame.data)
                if end > start:
                    cut = max(start - offset, 0)
                    yield offset + cut, Frame(frame.seq, frame.stream, frame.ts, frame.data[cut:])
                offset = end
        finally:
            reader.close()


@dataclass
class _Block:
    """Output gathered for searching: bytes from `start`, the frames they came from."""

    start: int
    line: int
    data: bytearray = field(default_factory=bytearray)
    offsets: list[int] = field(default_factory=list)
    frames: list[tuple[int, str]] = field(default_factory=list)  # (seq, stream) per offset
    skipping: bool = False  # inside a line past MAX_LINE_BYTES: dropping bytes to its end

    def add(self, offset: int, frame: Frame) -> None:
        """Append a frame's bytes."""
        self.offsets.append(offset)
        self.frames.append((frame.seq, frame.stream))
        self.data += frame.data

    def frame_at(self, offset: int) -> tuple[int, str]:
        """(seq, stream) of the frame holding byte `offset`."""
        return self.frames[bisect.bisect_right(self.offsets, offset) - 1]

    def drop(self, upto: int, lines: int) -> None:
        """Forget the first `upto` bytes, which held `lines` newlines."""
        del self.data[:upto]
        self.start += upto
        self.line += lines
        keep = max(bisect.bisect_right(self.offsets, self.start) - 1, 0)
        del self.offsets[:keep], self.frames[:keep]


@dataclass
class Search:
    """One page's search: the matcher, the stream kept, the page size, the deadline."""

    matcher: Matcher
    stream: str | None
    limit: int
    deadline: float
    page: Page = field(default_factory=Page)

    def block(self, block: _Block, end: int) -> int:
        """Search block.data[:end] (whole lines); the bytes done (less than `end` once full)."""
        data = bytes(block.data[:end])
        pos, counted, line = 0, 0, block.line
        while (found := self.matcher.find(data, pos)) >= 0 and found < end:
            start = data.rfind(b"\n", 0, found) + 1
            stop = data.find(b"\n", found)
            stop = end if stop < 0 else stop
            line += data.count(b"\n", counted, start)
            counted = start
            if self.matcher.matches(data[start:stop]):
                seq, stream = block.frame_at(block.start + start)
                if self.stream is None or stream == self.stream:
                    self.page.matches.append(Match(line, seq, block.start + start,
                                                   line_text(data[start:stop])))
                    if len(self.page.matches) >= self.limit:
                        return min(stop + 1, end)
            pos = stop + 1
        return end

    def full(self) -> bool:
        """Whether the page has `limit` matches."""
        return len(self.page.matches) >= self.limit


def search(root: Path, logs_path: str, ask: Search, cursor: Cursor,
           known_sizes: Mapping[str, int]) -> Page:
    """A page of the lines matching from `cursor` on. Blocking: run it in a thread."""
    block = _Block(cursor.offset, cursor.line)
    for offset, frame in frames_from(root, logs_path, cursor.offset, known_sizes):
        block.add(offset, frame)
        if block.skipping:
            skip_rest_of_line(block)
        if len(block.data) < BLOCK_BYTES:
            continue
        end = block.data.rfind(b"\n") + 1 or min(len(block.data), MAX_LINE_BYTES)
        if _step(ask, block, end) or time.monotonic() > ask.deadline:
            ask.page.next_cursor = Cursor(block.start, block.line)
            return ask.page
    if block.data and _step(ask, block, len(block.data)) and block.data and not block.skipping:
        ask.page.next_cursor = Cursor(block.start, block.line)
    return ask.page


def _step(ask: Search, block: _Block, end: int) -> bool:
    """Search a block's first `end` bytes and drop what was done; whether the page is full."""
    done = ask.block(block, end)
    whole_line = done == 0 or block.data[done - 1] == ord("\n")
    block.drop(done, block.data.count(b"\n", 0, done))
    if not whole_line:  # a line longer than MAX_LINE_BYTES: skip the rest of it
        block.skipping = True
        skip_rest_of_line(block)
    return ask.full()


def skip_rest_of_line(block: _Block) -> None:
    """Drop the bytes of the line being skipped that are held, its newline included."""
    newline = block.data.find(b"\n")
    block.drop(len(block.data) if newline < 0 else newline + 1, 0 if newline < 0 else 1)
    block.skipping = newline < 0
