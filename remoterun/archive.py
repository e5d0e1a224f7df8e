"""Output archive: gzip segments of binary frame records, rotated by size, read back by seq.

A task's archive is a folder `YYYY/MM/DD/<task id>/` under the archive root (its `logs_path`).
It holds segments `<index>.<first seq>.rrlog.gz`: one gzip member each, written at level 1 with
a sync flush at least every `flush_interval_s` and at every state change, so that whatever was
flushed decompresses even if the server is killed mid-write.

Uncompressed, a segment is a run of records, each a 21-byte little-endian header
`seq: u64, stream: u8, ts: f64 (Unix seconds), length: u32` followed by `length` raw bytes
exactly as the process wrote them. This costs 21 bytes per frame (frames are read-sized chunks,
not lines), keeps binary output intact, and lets replay, `?stream=` filters and jsonl come
straight from the file. A truncated last record (a crash between flushes) is dropped, not fatal.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

HEADER = struct.Struct("<QBdI")
STREAMS = ("stdout", "stderr", "pty")
STREAM_CODES = {name: i for i, name in enumerate(STREAMS)}
SUFFIX = ".rrlog.gz"
_READ_BYTES = 256 * 1024


@dataclass(slots=True)
class Frame:
    """One output frame: a read-sized chunk of one stream, numbered per task."""

    seq: int
    stream: str
    ts: float
    data: bytes
    encoded: dict[str, Any] | None = None  # per-format encodings, made once for all clients


@dataclass
class Segment:
    """What the database records of one segment file."""

    path: str  # relative to the archive root
    first_seq: int
    last_seq: int = 0
    raw_bytes: int = 0
    gz_bytes: int = 0
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None


def logs_path_for(task_id: str, created: float) -> str:
    """The folder, relative to the archive root, that holds a task's segments."""
    day = datetime.fromtimestamp(created, UTC)
    return f"{day:%Y/%m/%d}/{task_id}"


def _segment_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(index, first seq, path) of each segment in a task's folder, in order."""
    found = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        index, _, first = name[: -len(SUFFIX)].partition(".")
        if index.isdigit() and first.isdigit():
            found.append((int(index), int(first), folder / name))
    return sorted(found)


class TaskArchive:
    """Writes one task's frames to rotating gzip segments; not thread-safe, loop-only."""

    def __init__(self, root: Path, logs_path: str, *, level: int = 1,
                 segment_max_bytes: int = 64 * 1024 * 1024):
        self.root = root
        self.logs_path = logs_path
        self.folder = root / logs_path
        self.level = level
        self.segment_max_bytes = segment_max_bytes
        self.segments: list[Segment] = []
        self.dirty: list[Segment] = []  # segments whose row needs writing
        self._file: BinaryIO | None = None
        self._zip: Any = None
        self._next_index = 1
        self._unflushed = False

    @property
    def current(self) -> Segment | None:
        """The open segment, if any."""
        return self.segments[-1] if self._file is not None else None

    def _open(self, first_seq: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = _segment_files(self.folder)
        index = max(self._next_index, existing[-1][0] + 1 if existing else 1)
        name = f"{index:06d}.{first_seq}{SUFFIX}"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
        self._zip = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self._next_index = index + 1
        segment = Segment(path=f"{self.logs_path}/{name}", first_seq=first_seq)
        self.segments.append(segment)
        self.dirty.append(segment)

    def write(self, frame: Frame) -> None:
        """Append one frame, rotating first if the open segment is full."""
        segment = self.current
        if segment is not None and segment.raw_bytes >= self.segment_max_bytes:
            self._close()
            segment = None
        if segment is None:
            self._open(frame.seq)
            segment = self.segments[-1]
        assert self._file is not None
        record = HEADER.pack(frame.seq, STREAM_CODES[frame.stream], frame.ts, len(frame.data))
        out = self._zip.compress(record) + self._zip.compress(frame.data)
        if out:
            self._file.write(out)
            segment.gz_bytes += len(out)
        segment.last_seq = frame.seq
        segment.raw_bytes += len(record) + len(frame.data)
        self._unflushed = True

    def flush(self) -> None:
        """Sync-flush the open segment so everything written so far is readable on disk."""
        if self._file is None or not self._unflushed:
            return
        out = self._zip.flush(zlib.Z_SYNC_FLUSH)
        self._file.write(out)
        self._file.flush()
        segment = self.segments[-1]
        segment.gz_bytes += len(out)
        if segment not in self.dirty:
            self.dirty.append(segment)
        self._unflushed = False

    def _close(self) -> None:
        assert self._file is not None
        out = self._zip.flush(zlib.Z_FINISH)
        self._file.write(out)
        self._file.close()
        self._file = None
        segment = self.segments[-1]
        segment.gz_bytes += len(out)
        segment.closed_at = time.time()
        if segment not in self.dirty:
            self.dirty.append(segment)

    def close(self) -> None:
        """Finish the open segment, if any."""
        if self._file is not None:
            self._close()

    def take_dirty(self) -> list[Segment]:
        """Segments changed since the last call, for the database."""
        dirty, self.dirty = self.dirty, []
        return dirty


def _records(path: Path) -> Iterator[Frame]:
    """Every whole record in one segment file; stops quietly at a truncated end."""
    inflater = zlib.decompressobj(31)
    buf = bytearray()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_READ_BYTES)
            if chunk:
                try:
                    buf += inflater.decompress(chunk)
                except zlib.error:
                    chunk = b""  # corrupt tail: keep what decoded before it
            pos = 0
            while len(buf) - pos >= HEADER.size:
                seq, code, ts, length = HEADER.unpack_from(buf, pos)
                end = pos + HEADER.size + length
                if end > len(buf):
                    break
                yield Frame(seq, STREAMS[code], ts, bytes(buf[pos + HEADER.size : end]))
                pos = end
            del buf[:pos]
            if not chunk:
                return


def read_frames(root: Path, logs_path: str, since: int = 0, until: int | None = None
                ) -> Iterator[Frame]:
    """Frames with since < seq (<= until), in order, from a task's segments on disk."""
    files = _segment_files(root / logs_path)
    for i, (_, first, path) in enumerate(files):
        next_first = files[i + 1][1] if i + 1 < len(files) else None
        if next_first is not None and next_first <= since + 1:
            continue  # every frame of this segment is at or below `since`
        if until is not None and first > until:
            return
        for frame in _records(path):
            if until is not None and frame.seq > until:
                return
            if frame.seq > since:
                yield frame


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


async def aread_frames(root: Path, logs_path: str, since: int = 0, until: int | None = None,
                       batch_bytes: int = 256 * 1024) -> AsyncIterator[list[Frame]]:
    """read_frames in batches, with the file reading and inflating done off the event loop."""
    gen = _batches(read_frames(root, logs_path, since, until), batch_bytes)
    while True:
        batch = await asyncio.to_thread(next, gen, None)
        if batch is None:
            return
        yield batch


def last_seq_on_disk(root: Path, logs_path: str) -> int:
    """The highest seq in a task's archive (reads only its last segment)."""
    files = _segment_files(root / logs_path)
    for _, first, path in reversed(files):
        last = 0
        for frame in _records(path):
            last = frame.seq
        if last:
            return last
        if first > 1:
            return first - 1
    return 0
