"""One archive segment on disk: its log and index gzip members, written and read back.

Segment number `n` whose first frame is `seq` is two files, each a single gzip member:
`<n>.<seq>.log.gz`, the output bytes exactly as the process wrote them (stdout and stderr
interleaved in order), and `<n>.<seq>.idx.gz`, one 21-byte little-endian record per frame,
`seq: u64, stream: u8, ts: f64 (Unix seconds), length: u32`, whose bytes are the next `length`
bytes of the log. Readers inflate a bounded piece at a time (a well-packed member cannot blow up
memory), pair records with bytes, and stop at whichever member ends first; how each ended (whole,
truncated by a crash, corrupt) is kept for `scan`, never raised.

Both members are deflated by ISA-L's igzip (`isal`, the default) or zlib (`Deflate`): either
writes standard gzip members that end the same way, so `zcat`, Python's `gzip`, these readers
and `gzjoin` take either, and one task's segments may mix them. The server's writers hand their
work to the app's compressor thread (`compressor.py`).

The archive is the server's alone: its folders are made 0700 and its files 0600 whatever the
umask (`private_folder`, `private_open`), and `make_private` tightens an archive found open.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import structlog
from isal import isal_zlib

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
COMPRESSORS = ("isal", "zlib")
FOLDER_MODE, FILE_MODE = 0o700, 0o600
log = structlog.get_logger(__name__)


def private_folder(folder: Path) -> None:
    """Make a folder and any missing parents, each 0700 (Path.mkdir gives parents the umask's
    mode)."""
    try:
        folder.mkdir(mode=FOLDER_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        private_folder(folder.parent)
        folder.mkdir(mode=FOLDER_MODE, exist_ok=True)


def private_open(path: str, flags: int) -> int:
    """An opener for open(): a file created 0600."""
    return os.open(path, flags, FILE_MODE)


def make_private(root: Path) -> int:
    """Make the archive's root (and missing parents) 0700; if the root was open to others (a folder
    that existed before the first start, an older server's), every folder under it 0700 and
    every file 0600 too. How many modes were changed. Start-up: blocking."""
    private_folder(root)
    if not stat.S_IMODE(root.stat().st_mode) & 0o077:
        return 0  # closed: nobody else reaches what is inside, whatever its modes
    changed = 0
    for folder, _, filenames in os.walk(root):  # every folder comes once as `folder`
        changed += _tighten(folder, FOLDER_MODE)
        changed += sum(_tighten(os.path.join(folder, name), FILE_MODE) for name in filenames)
    log.warning("archive_mode_tightened", path=str(root), changed=changed)
    return changed


def _tighten(path: str, mode: int) -> bool:
    """Give a path (never a link's target) `mode` if it has another; whether it did."""
    try:
        found = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(found) or stat.S_IMODE(found) == mode:
        return False
    os.chmod(path, mode)
    return True


@dataclass(frozen=True)
class Deflate:
    """How segments are compressed: the library and the level (`archive.compressor`,
    `archive.gzip_level`).

    ISA-L's igzip deflates varied log text ~3.6x as fast as zlib at level 1, at a better ratio
    (0.273 against 0.285), and releases the GIL as zlib does. Its levels are 0..3: `level`
    (zlib's 1..9) maps 1-3 to 1, 4-6 to 2, 7-9 to 3. Never 0, whose members end in a final
    block of their own rather than the sync flush and `03 00` that gzjoin relies on.
    """

    compressor: str = "isal"
    level: int = 1

    def compressobj(self, mem_level: int = 8) -> Any:
        """A gzip-member compressor (wbits 31)."""
        if self.compressor == "isal":
            return isal_zlib.compressobj((self.level + 2) // 3, zlib.DEFLATED, 31, mem_level)
        return zlib.compressobj(self.level, zlib.DEFLATED, 31, mem_level)


DEFAULT_DEFLATE = Deflate()  # the settings' defaults: ISA-L, level 1


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


def _whole_member(data: bytes, deflate: Deflate) -> bytes:
    # Ended as MemberWriter.finish ends a member (gzjoin relies on it). memLevel 6: for the
    # at most HOLD_BYTES written this way it packs as well as the default 8, whose larger
    # hash table costs zlib ~8 us to set up, twice per task.
    zip_ = deflate.compressobj(6)
    member: bytes = zip_.compress(data) + zip_.flush(zlib.Z_SYNC_FLUSH) + zip_.flush(zlib.Z_FINISH)
    return member


def write_whole(log_path: Path, frames: list[Frame], deflate: Deflate) -> int:
    """Write a complete segment of frames at once, its folder made if missing; bytes on disk.

    For a short task's output, held in memory until its end: one write per file, no buffered
    file objects, no compressor thread.
    """
    size = 0
    for path, data in ((log_path, b"".join(f.data for f in frames)),
                       (index_path(log_path), _records(frames))):
        member = _whole_member(data, deflate)
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


@dataclass
class Scan:
    """What reading a whole segment found."""

    path: Path
    first_seq: int
    frames: int = 0
    last_seq: int = 0
    raw_bytes: int = 0
    log_extra: int = 0  # log bytes no index record covers (their record was never flushed)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether both members are whole and agree."""
        return not self.problems

    @property
    def missing(self) -> bool:
        """Whether a file of the pair is missing."""
        return any(p.startswith("missing") for p in self.problems)


def scan(log_path: Path) -> Scan:
    """Read a whole segment: its frames, sizes, and anything wrong with either file."""
    parsed = parse_name(log_path.name)
    found = Scan(log_path, parsed[1] if parsed else 0)
    for path in (log_path, index_path(log_path)):
        if not path.is_file():
            found.problems.append(f"missing {path.name}")
    if found.problems:
        return found
    reader = SegmentReader(log_path)
    try:
        for frame in reader.frames():
            found.frames += 1
            found.last_seq = frame.seq
            found.raw_bytes += len(frame.data)
        found.log_extra = reader.rest_of_log()
        while reader.index.read():
            pass
    finally:
        reader.close()
    for name, inflater in (("log", reader.log), ("index", reader.index)):
        if inflater.problem:
            found.problems.append(f"{name} {inflater.problem}")
    if reader.problem:
        found.problems.append(reader.problem)
    if found.log_extra:
        found.problems.append(f"{found.log_extra} log bytes have no index record")
    return found


def rewrite(log_path: Path, deflate: Deflate) -> None:
    """Rewrite a segment as two whole members holding every frame that reads back."""
    tmp_log = log_path.with_name(log_path.name + ".tmp")
    tmp_index = log_path.with_name(index_path(log_path).name + ".tmp")
    log, index = MemberWriter(tmp_log, deflate), MemberWriter(tmp_index, deflate)
    reader = SegmentReader(log_path)
    try:
        try:
            for frame in reader.frames():
                write_frame(log, index, frame)
        finally:
            reader.close()
        log.finish()
        index.finish()
    except BaseException:  # a full disk: leave the segment as it was, and no temporary file
        for writer, tmp in ((log, tmp_log), (index, tmp_index)):
            with contextlib.suppress(OSError):
                writer.file.close()
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp_log, log_path)
    os.replace(tmp_index, index_path(log_path))
