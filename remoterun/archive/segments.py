"""One archive segment on disk: its log and index gzip members, written and read back.

Segment number `n` whose first frame is `seq` is two files, each a single gzip member:
`<n>.<seq>.log.gz`, the output bytes exactly as the process wrote them (stdout and stderr
interleaved in order), and `<n>.<seq>.idx.gz`, one 21-byte little-endian record per frame,
`seq: u64, stream: u8, ts: f64 (Unix seconds), length: u32`, whose bytes are the next `length`
bytes of the log. Readers inflate a bounded piece at a time (a well-packed member cannot blow up
memory), pair records with bytes, and stop at whichever member ends first; how each ended (whole,
truncated by a crash, corrupt) is kept for `scan`, never raised.

Both members are deflated as `deflate.Deflate` says; the server's writers hand their work to the
app's compressor thread (`compressor.py`). Files are made private (`private.py`).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from remoterun.archive.deflate import Deflate, whole_member
from remoterun.archive.private import FILE_MODE, private_folder, private_open
from remoterun.wire import Frame

RECORD = struct.Struct("<QBdI")  # an index record: seq, stream code, ts, length
STREAMS = ("stdout", "stderr", "pty")
STREAM_CODES = {name: i for i, name in enumerate(STREAMS)}
LOG_SUFFIX = ".log.gz"
INDEX_SUFFIX = ".idx.gz"
_READ_BYTES = 256 * 1024  # compressed bytes read at a time
_PIECE_BYTES = 1024 * 1024  # inflated bytes returned at a time, at most
_MAX_FRAME = 1 << 30  # a record claiming more is corrupt
_BATCH_BYTES = 64 * 1024


def index_path(log_path: Path) -> Path:
    """The frame index that goes with a segment's log file."""
    return log_path.with_name(log_path.name[: -len(LOG_SUFFIX)] + INDEX_SUFFIX)


def parse_name(name: str) -> tuple[int, int] | None:
    """(number, first seq) of a segment file name (log or index), or None if it is not one."""
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX):
        if name.endswith(suffix):
            number, _, first = name[: -len(suffix)].partition(".")
            if number.isdigit() and first.isdigit():
                return int(number), int(first)
    return None


def list_segments(folder: Path) -> list[tuple[int, int, Path]]:
    """(number, first seq, log path) of each segment in a task's folder, in order."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        parsed = parse_name(name) if name.endswith(LOG_SUFFIX) else None
        if parsed is not None:
            found.append((*parsed, folder / name))
    return sorted(found)


class MemberWriter:
    """One gzip member being written to a file; methods return the compressed bytes added.

    Small writes are gathered up to _BATCH_BYTES before they reach the compressor: a call to
    zlib costs about as much as deflating a few hundred bytes, and index records are 21.
    """

    def __init__(self, path: Path, deflate: Deflate):
        self.file: BinaryIO = open(path, "wb", opener=private_open)  # noqa: SIM115 - closed in finish()
        self.zip: Any = deflate.compressobj()
        self._batch = bytearray()

    def _put(self, out: bytes) -> int:
        if out:
            self.file.write(out)
        return len(out)

    def _drain(self) -> int:
        grown = self._put(self.zip.compress(self._batch)) if self._batch else 0
        self._batch.clear()
        return grown

    def write(self, data: bytes) -> int:
        """Compress more bytes."""
        if len(data) >= _BATCH_BYTES and not self._batch:
            return self._put(self.zip.compress(data))
        self._batch += data
        return self._drain() if len(self._batch) >= _BATCH_BYTES else 0

    def sync(self) -> int:
        """Sync-flush: everything so far decompresses from the file, even if we die now."""
        grown = self._drain() + self._put(self.zip.flush(zlib.Z_SYNC_FLUSH))
        self.file.flush()
        return grown

    def finish(self) -> int:
        """End the member and close the file."""
        # The sync flush first gives every member the same end, which gzjoin relies on.
        grown = self._drain() + self._put(self.zip.flush(zlib.Z_SYNC_FLUSH))
        grown += self._put(self.zip.flush(zlib.Z_FINISH))
        self.file.close()
        return grown



Sink = Callable[[list[Frame]], None]  # writes frames to one segment, on the compressor thread


class Backlog:
    """Bytes one writer has handed to the compressor thread that it has not written yet
    (brought up to date by the loop's next hand-over or `Compressor.collect()`)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _Inflater:
    """Reads one gzip member file back a bounded piece at a time, and notes how it ended."""

    def __init__(self, path: Path):
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        self._zip: Any = zlib.decompressobj(31)
        self._input = b""
        self.done = False
        self.problem: str | None = None  # once done: None (a whole member) or what was wrong

    def __enter__(self) -> _Inflater:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._file.close()

    def read(self) -> bytes:
        """The next inflated bytes (at most _PIECE_BYTES), or b"" at the end."""
        while not self.done:
            ended = False
            if not self._input:
                self._input = self._file.read(_READ_BYTES)
                ended = not self._input
            try:
                out = self._zip.decompress(self._input, _PIECE_BYTES)
            except zlib.error as exc:
                self._end(f"corrupt ({exc})")
                return b""
            self._input = self._zip.unconsumed_tail
            if self._zip.eof:
                trailing = self._zip.unused_data or self._file.read(1)
                self._end("data after the end of the gzip member" if trailing else None)
            elif ended and not out:
                self._end("truncated (the gzip member has no end)")
            if out:
                return bytes(out)
        return b""

    def _end(self, problem: str | None) -> None:
        self.done = True
        self.problem = problem


def open_log(log_path: Path) -> _Inflater:
    """An inflater of a segment's log alone (the raw output), a context manager."""
    return _Inflater(log_path)


class SegmentReader:
    """A segment's log and index read together, frame by frame; close() when done."""

    def __init__(self, log_path: Path):
        with contextlib.ExitStack() as stack:
            self.log = stack.enter_context(_Inflater(log_path))
            self.index = stack.enter_context(_Inflater(index_path(log_path)))
            self._stack = stack.pop_all()
        self._data = bytearray()
        self._pos = 0
        self.problem: str | None = None  # why pairing stopped early, if it did

    def frames(self) -> Iterator[Frame]:
        """Each whole frame, in order."""
        records = bytearray()
        at = 0
        while True:
            while len(records) - at < RECORD.size:
                piece = self.index.read()
                if not piece:
                    if len(records) > at:
                        self.problem = "the index ends inside a record"
                    return
                del records[:at]
                records += piece
                at = 0
            seq, code, ts, length = RECORD.unpack_from(records, at)
            at += RECORD.size
            if code >= len(STREAMS) or length > _MAX_FRAME:
                self.problem = f"corrupt index record at seq {seq}"
                return
            data = self._take(length)
            if data is None:
                self.problem = "the log ends before the index"
                return
            yield Frame(seq, STREAMS[code], ts, data)

    def _take(self, length: int) -> bytes | None:
        while len(self._data) - self._pos < length:
            piece = self.log.read()
            if not piece:
                return None
            del self._data[: self._pos]
            self._pos = 0
            self._data += piece
        out = bytes(self._data[self._pos : self._pos + length])
        self._pos += length
        return out

    def rest_of_log(self) -> int:
        """How many log bytes follow the last frame read (reads to the end)."""
        extra = len(self._data) - self._pos
        while piece := self.log.read():
            extra += len(piece)
        return extra

    def close(self) -> None:
        """Close both files."""
        self._stack.close()


def _records(frames: list[Frame]) -> bytes:
    """The index records of frames."""
    return b"".join(RECORD.pack(f.seq, STREAM_CODES[f.stream], f.ts, len(f.data))
                    for f in frames)


def write_frame(log: MemberWriter, index: MemberWriter, frame: Frame) -> int:
    """Append a frame to a segment's two members; the compressed bytes added."""
    return log.write(frame.data) + index.write(_records([frame]))


def write_frames(log: MemberWriter, index: MemberWriter, frames: list[Frame]) -> int:
    """Append frames to a segment's two members in one call to each; the compressed bytes added.

    On a thread, each call to zlib gives up the GIL and takes it back: fewer, larger calls
    mean fewer hand-offs with the event loop.
    """
    return log.write(b"".join(f.data for f in frames)) + index.write(_records(frames))



def write_whole(log_path: Path, frames: list[Frame], deflate: Deflate) -> int:
    """Write a complete segment of frames at once, its folder made if missing; bytes on disk.

    For a short task's output, held in memory until its end: one write per file, no buffered
    file objects, no compressor thread.
    """
    size = 0
    for path, data in ((log_path, b"".join(f.data for f in frames)),
                       (index_path(log_path), _records(frames))):
        member = whole_member(data, deflate)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:
            private_folder(path.parent)
            fd = os.open(path, flags, FILE_MODE)
        try:
            view = memoryview(member)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        size += len(member)
    return size

