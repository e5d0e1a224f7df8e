"""Where the last N lines of a task's output start: counted back from the end, a segment at a time.

gzip inflates forwards only, so "backwards" means: the newest segment first, each read forwards
once while keeping only its newest frames that could still hold the lines wanted (a seq, a
newline count and whether the frame ends a line: a few bytes per frame, never the data), then
those walked newest first. An older segment is opened only when the newer ones hold too few
lines, so a 1 GB log's tail costs the last segment or two, not the whole archive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from remoterun.archive import segments
from remoterun.archive.segments import list_segments

MAX_TAIL_LINES = 10_000


class FrameLines(NamedTuple):
    """What the tail needs of a frame: its seq, its newlines, whether its last byte is one."""

    seq: int
    newlines: int
    ends_line: bool


def frame_lines(seq: int, data: bytes) -> FrameLines:
    """A frame's line facts."""
    return FrameLines(seq, data.count(b"\n"), data.endswith(b"\n"))


@dataclass
class TailCount:
    """Newlines counted back from the newest frame until `lines` lines are covered.

    `since` is then the seq to attach after: the frames after it hold the last `lines` lines.
    The output's final newline ends its last line and separates nothing, so it is not counted.
    """

    lines: int
    seen: int = 0
    fed: bool = False
    since: int | None = None

    def feed(self, frame: FrameLines) -> bool:
        """Take the next older frame; whether the start of the tail is now known."""
        newlines, ends_line = frame.newlines, frame.ends_line
        if not self.fed:
            self.fed = True
            if self.lines == 0:
                self.since = frame.seq
                return True
            if ends_line:
                newlines, ends_line = newlines - 1, False
        if self.seen + newlines < self.lines:
            self.seen += newlines
            return False
        last_is_separator = ends_line and self.lines - self.seen == 1
        self.since = frame.seq if last_is_separator else frame.seq - 1
        return True

    def feed_all(self, frames: Iterable[FrameLines]) -> bool:
        """Feed frames, newest first, until the start is found; whether it was."""
        return any(self.feed(frame) for frame in frames)

    @property
    def wanted(self) -> int:
        """Newlines still to find (one more for a final newline not yet seen)."""
        return self.lines - self.seen + (0 if self.fed else 1)


def _newest_frames(log_path: Path, wanted: int, until: int | None) -> list[FrameLines]:
    """A segment's newest frames (seq <= until) that hold `wanted` newlines, oldest first."""
    kept: deque[FrameLines] = deque()
    held = 0
    try:
        reader = segments.SegmentReader(log_path)
    except FileNotFoundError:
        return []  # pruned while we read
    try:
        for frame in reader.frames():
            if until is not None and frame.seq > until:
                break
            kept.append(frame_lines(frame.seq, frame.data))
            held += kept[-1].newlines
            while len(kept) > 1 and held - kept[0].newlines >= wanted:
                held -= kept.popleft().newlines
    finally:
        reader.close()
    return list(kept)


def count_archive(root: Path, logs_path: str, count: TailCount, until: int | None = None) -> None:
    """Feed `count` the archive's frames (seq <= until) newest first, a segment at a time,
    until it has found the start. Blocking: run it in a thread."""
    for _, first, path in reversed(list_segments(root / logs_path)):
        if until is not None and first > until:
            continue
        if count.feed_all(reversed(_newest_frames(path, count.wanted, until))):
            return


def tail_since(root: Path, logs_path: str, lines: int, until: int | None = None) -> int:
    """The seq after which the archive's frames hold its last `lines` lines (0: from the start)."""
    count = TailCount(lines)
    count_archive(root, logs_path, count, until)
    return count.since or 0
