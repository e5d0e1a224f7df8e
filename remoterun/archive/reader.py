"""Reading an archive back: frames by seq, raw bytes by offset, the stored gzip joined, in a thread."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from remoterun.archive import gzjoin, segments
from remoterun.archive.segments import list_segments
from remoterun.wire import Frame

T = TypeVar("T")

def read_frames(root: Path, logs_path: str, since: int = 0, until: int | None = None
                ) -> Iterator[Frame]:
    """Frames with since < seq (<= until), in order, from a task's segments on disk."""
    files = list_segments(root / logs_path)
    for i, (_, first, path) in enumerate(files):
        next_first = files[i + 1][1] if i + 1 < len(files) else None
        if next_first is not None and next_first <= since + 1:
            continue  # every frame of this segment is at or below `since`
        if until is not None and first > until:
            return
        try:
            reader = segments.SegmentReader(path)
        except FileNotFoundError:
            return  # pruned while we read: a prefix, never a gap
        try:
            for frame in reader.frames():
                if until is not None and frame.seq > until:
                    return
                if frame.seq > since:
                    yield frame
        finally:
            reader.close()


def read_raw(root: Path, logs_path: str, start: int = 0, end: int | None = None,
             known_sizes: Mapping[str, int] | None = None) -> Iterator[bytes]:
    """The output bytes [start, end) as the process wrote them, from the log files alone.

    `known_sizes` (log path -> output bytes, for closed segments) lets whole segments before
    `start` be skipped without inflating them.
    """
    offset = 0
    for _, _, path in list_segments(root / logs_path):
        if end is not None and offset >= end:
            return
        size = (known_sizes or {}).get(path.relative_to(root).as_posix())
        if size is not None and offset + size <= start:
            offset += size
            continue
        try:
            log = segments.open_log(path)
        except FileNotFoundError:
            return  # pruned while we read: a prefix, never a gap
        with log:
            while piece := log.read():
                lo = max(start - offset, 0)
                hi = len(piece) if end is None else min(len(piece), end - offset)
                offset += len(piece)
                if lo < hi:
                    yield piece[lo:hi]
                if end is not None and offset >= end:
                    return


def joined_gzip(root: Path, logs_path: str, rows: list[dict[str, Any]]) -> gzjoin.Joined | None:
    """The output as one gzip member of the stored logs, if every segment's row says closed."""
    if not rows or any(row["closed_at"] is None for row in rows):
        return None
    on_disk = [p.relative_to(root).as_posix() for _, _, p in list_segments(root / logs_path)]
    if on_disk != [row["path"] for row in rows]:
        return None
    return gzjoin.join([root / row["path"] for row in rows], [row["raw_bytes"] for row in rows])


def _batches(frames: Iterator[Frame], max_bytes: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    size = 0
    for frame in frames:
        batch.append(frame)
        size += len(frame.data)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


async def in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Iterate a blocking iterator with each step off the event loop."""
    try:
        while True:
            item = await asyncio.to_thread(next, items, None)
            if item is None:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            with contextlib.suppress(ValueError):  # still running in its thread: GC closes it
                close()


async def aread_frames(root: Path, logs_path: str, since: int = 0, until: int | None = None,
                       batch_bytes: int = 256 * 1024) -> AsyncIterator[list[Frame]]:
    """read_frames in batches, with the file reading and inflating done off the event loop."""
    async for batch in in_thread(_batches(read_frames(root, logs_path, since, until),
                                          batch_bytes)):
        yield batch


# Repair -------------------------------------------------------------------------------------
