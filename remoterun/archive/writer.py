"""Output archive: per-task gzip segments of raw output plus a frame index; rotation; read back.

A task's archive is a folder `YYYY/MM/DD/<task id>/` under the archive root (its `logs_path`),
dated by the task's creation. Its output goes to segments (see `segments.py` for the files),
rotated past `segment_max_bytes` of output or `segment_max_age_s` after the open segment was
opened. Each segment is a pair: `<n>.<seq>.log.gz`, the raw bytes as the process wrote them,
and `<n>.<seq>.idx.gz`, a 21-byte record (seq, stream, time, length) per frame.

Why a pair. Replay, `?stream=` filters and jsonl need each frame's seq, stream and time; the
plain download wants only the bytes, best as the stored gzip. Interleaving records and bytes in
one stream would mean inflating and deflating again for every gzip download (~130 MB/s of CPU at
level 1, each time); a second, raw-text gzip beside it would double the compression work and
the disk. Kept apart, the output is deflated once, the index costs ~21 bytes per frame (frames
are read-sized chunks, not lines, and pack well), `zcat *.log.gz` is the log, and `/output`
sends the stored members as they are: several segments are joined into one gzip member without
recompressing (`gzjoin.py`). The price: two files per segment, whose ends may disagree after a
crash; readers pair records with bytes and stop at whichever ends first, and `finalize` rewrites
both. A running task's open segment has no gzip end yet, so its downloads are sent uncompressed.

Writing. Deflating costs the event loop ~0.5 ms per 64 KiB with zlib at level 1 (~0.15 ms with
ISA-L, the default: `deflate.Deflate`), time taken from every other task's output and client;
both release the GIL, so the deflating and the file writes run on one compressor thread (the
app's `compressor.Compressor`), which takes the frames every task wrote in a loop iteration as
one job. One thread running jobs in order keeps each file's bytes in
order; past 16 MiB handed over and not yet written the loop waits for it (backpressure, no unbounded
queue). So the files lag the loop by what the thread has not done yet: `flush()` and `close()`
return a future done once everything written before them is on disk; readers of a running
task's archive wait for it (the hub before replay, `/output` before reading), and the
scheduler waits for `close()` before it records the end of a run.

Small outputs. Most tasks write a few lines. Until a task's output passes `HOLD_BYTES` or the
first flush asks for it, its frames stay in memory; if the task ends first, `close()` writes
the whole segment at once on the event loop (~0.1 ms: the folder, two small files), so the end
of the run does not wait for a hand-over to the compressor thread and back, which a busy loop
made ~3 ms. Past the bound, or at the first flush (every `flush_interval_s`, and whenever a
reader needs the file), the held frames go to the thread and the archive works as above.

Durability. The open segment is sync-flushed at least every `flush_interval_s` and when the task
changes state, so a SIGKILLed server loses at most what came after the last flush: the flushed
prefix of a member decompresses on its own. A truncated member is tolerated by every reader and
reported by `scan.scan`; the server finalizes the segments of the runs it recovers, and
`remoterun archive verify --repair` the rest. No fsync: a killed process loses nothing the kernel
has; a power cut may lose the last seconds, as SQLite with synchronous=NORMAL may.

A full disk. Frames are published live before the thread writes them, so those in its hands
when a write fails are lost although clients saw them; the scheduler ends the task naming the
last seq the disk kept (its `error`, and `last_seq` in its `exit` frame).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from remoterun.archive import segments
from remoterun.archive.deflate import DEFAULT_DEFLATE, Deflate
from remoterun.archive.private import private_folder
from remoterun.archive.scan import Scan, rewrite, scan
from remoterun.archive.segments import LOG_SUFFIX, Backlog, MemberWriter, Sink, list_segments
from remoterun.config import Settings
from remoterun.wire import Frame

__all__ = ["HOLD_BYTES", "Segment", "TaskArchive", "Writer", "deflate_of", "finalize",
           "logs_path_for", "next_number", "recover", "settle"]
T = TypeVar("T")


class Writer(Protocol):
    """The compressor thread as an archive uses it (`compressor.Compressor`)."""

    def write(self, sink: Sink, frame: Frame, backlog: Backlog | None = None) -> None:
        """Have `sink` write the frame on the thread, in order."""

    def submit(self, job: Callable[[], None]) -> Future[None]:
        """Run `job` on the thread after everything given before; its future."""


@dataclass
class Segment:
    """What the database records of one segment: its log file and the sizes so far."""

    path: str  # of the .log.gz, relative to the archive root
    first_seq: int
    last_seq: int = 0
    raw_bytes: int = 0  # output bytes in the segment
    gz_bytes: int = 0  # bytes on disk, log and index together
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None


def deflate_of(settings: Settings) -> Deflate:
    """How the settings have segments compressed."""
    return Deflate(settings.archive_compressor, settings.gzip_level)


def logs_path_for(task_id: str, created: float) -> str:
    """The folder, relative to the archive root, that holds a task's segments."""
    return f"{_day_folder(int(created // 86400))}/{task_id}"


@functools.lru_cache(maxsize=4)
def _day_folder(day: int) -> str:  # days since the epoch, in UTC
    return f"{datetime.fromtimestamp(day * 86400, UTC):%Y/%m/%d}"


HOLD_BYTES = 64 * 1024  # output kept in memory at a task's start, written at once if it ends


class _SegmentFiles:
    """An open segment's two gzip members; every method runs on the compressor thread.

    Only this thread adds to the segment's `gz_bytes`, and the loop only reads it, but for a
    segment whose frames were all held: `close()` writes that one whole (`segments.write_whole`).
    A failure is kept on the archive (the loop raises it from the next write) and the files are
    not written further.
    """

    def __init__(self, archive: TaskArchive, segment: Segment, path: Path):
        self.archive = archive
        self.segment = segment
        self.path = path
        self.log: MemberWriter | None = None
        self.index: MemberWriter | None = None

    def _step(self, work: Callable[[MemberWriter, MemberWriter], int]) -> None:
        if self.archive.failure is not None:
            return
        try:
            if self.log is None or self.index is None:
                private_folder(self.path.parent)
                self.log = MemberWriter(self.path, self.archive.deflate)
                self.index = MemberWriter(segments.index_path(self.path), self.archive.deflate)
            self.segment.gz_bytes += work(self.log, self.index)
        except Exception as exc:  # the thread's boundary: the loop raises it
            self.archive.failure = exc

    def write(self, frames: list[Frame]) -> None:
        """Append frames."""
        self._step(lambda log, index: segments.write_frames(log, index, frames))

    def sync(self) -> None:
        """Sync-flush both members."""
        self._step(lambda log, index: log.sync() + index.sync())

    def finish(self) -> None:
        """End both members and close the files (a job: it never raises)."""
        self._step(lambda log, index: log.finish() + index.finish())
        for writer in (self.log, self.index):
            if writer is not None:
                try:
                    writer.file.close()  # already closed unless it failed
                except OSError as exc:  # the buffered tail met a full disk
                    if self.archive.failure is None:
                        self.archive.failure = exc


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


class TaskArchive:
    """Writes one task's frames to rotating segments; not thread-safe, loop-only.

    The deflating and the file writes, the task's folder included, run on
    `compressor`'s thread, in order. `first_number` is the number its first segment takes:
    `fresh` (a task's first attempt, an empty folder) means 1; a later attempt numbers after
    the segments already there (`next_number`, found off the loop). With neither, the folder
    is listed when the first segment opens, on the caller's thread.
    """

    def __init__(self, root: Path, logs_path: str, compressor: Writer, *,
                 deflate: Deflate = DEFAULT_DEFLATE,
                 segment_max_bytes: int = 64 * 1024 * 1024,
                 segment_max_age_s: float | None = None, fresh: bool = False,
                 first_number: int | None = None):
        self.root = root
        self.logs_path = logs_path
        self.compressor = compressor
        self.folder = root / logs_path
        self.deflate = deflate
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_s = segment_max_age_s
        self.segments: list[Segment] = []
        self.dirty: list[Segment] = []  # segments whose row needs writing
        self.failure: Exception | None = None  # set by the compressor thread
        self._files: _SegmentFiles | None = None
        self._last: Future[None] | None = None  # the latest flush or close handed over
        self._next_number = 1 if fresh else first_number or 1
        self._listed = fresh or first_number is not None
        self._unflushed = False
        self._held: list[Frame] | None = []  # None once frames go to the compressor thread
        self.backlog = Backlog()  # handed to the compressor thread, not yet written
        self._held_bytes = 0

    @property
    def first_number(self) -> int | None:
        """The number the first segment takes, if known (else the folder is listed)."""
        return self._next_number if self._listed else None

    @first_number.setter
    def first_number(self, number: int | None) -> None:
        assert not self.segments, "numbering is set before the first segment"
        self._next_number, self._listed = number or 1, number is not None

    @property
    def next_segment(self) -> int:
        """The number the segment after this archive's last takes."""
        return self._next_number

    @property
    def current(self) -> Segment | None:
        """The open segment, if any."""
        return self.segments[-1] if self._files is not None else None

    def _open(self, first_seq: int) -> Segment:
        number = self._next_number
        if not self._listed:  # an earlier attempt's segments: number after them
            existing = list_segments(self.folder)
            number = max(number, existing[-1][0] + 1 if existing else 1)
            self._listed = True
        name = f"{number:06d}.{first_seq}{LOG_SUFFIX}"
        self._next_number = number + 1
        segment = Segment(path=f"{self.logs_path}/{name}", first_seq=first_seq)
        self._files = _SegmentFiles(self, segment, self.folder / name)
        self.segments.append(segment)
        self._mark(segment)
        return segment

    def _mark(self, segment: Segment) -> None:
        if segment not in self.dirty:
            self.dirty.append(segment)

    def _expired(self, segment: Segment) -> bool:
        age = self.segment_max_age_s
        return age is not None and time.time() - segment.opened_at >= age

    def _submit(self, job: Callable[[], None]) -> None:
        self._last = self.compressor.submit(job)

    def _release(self) -> None:
        """Stop holding: the held frames, then every later one, go to the compressor thread."""
        held, self._held = self._held, None
        if held and self._files is not None:
            for frame in held:
                self.compressor.write(self._files.write, frame, self.backlog)

    def write(self, frame: Frame) -> None:
        """Append one frame, rotating first if the open segment is full or old."""
        if self.failure is not None:
            raise self.failure
        segment = self.current
        if self._held is not None and (
                self._held_bytes + len(frame.data) > min(HOLD_BYTES, self.segment_max_bytes)
                or (segment is not None and self._expired(segment))):
            self._release()  # so a held segment never needs rotating
        if self._held is None and segment is not None and (
                segment.raw_bytes >= self.segment_max_bytes or self._expired(segment)):
            self._close()
            segment = None
        if segment is None:
            segment = self._open(frame.seq)
        if self._held is not None:
            self._held.append(frame)
            self._held_bytes += len(frame.data)
        else:
            assert self._files is not None
            self.compressor.write(self._files.write, frame, self.backlog)
        segment.last_seq = frame.seq
        segment.raw_bytes += len(frame.data)
        self._unflushed = True

    def flush(self) -> Future[None]:
        """Make everything written so far readable on disk; close the segment if it is old.

        Returns a future done once it is (`.result()` waits outside the loop).
        """
        self._release()
        segment = self.current
        if segment is not None and self._expired(segment):
            self._close()
        elif segment is not None and self._unflushed and self._files is not None:
            self._submit(self._files.sync)
            self._unflushed = False
            self._mark(segment)
        return self._last or _done()

    def _close(self) -> None:
        assert self._files is not None
        self._submit(self._files.finish)
        self._files = None
        self._unflushed = False
        segment = self.segments[-1]
        segment.closed_at = time.time()
        self._mark(segment)

    def close(self) -> Future[None]:
        """Finish the open segment, if any; a future done once every file is whole and closed.

        Until then the segments' `gz_bytes` may still grow: await it before recording them.
        A task whose output was all held has its segment written here and now.
        """
        held, self._held = self._held, None
        if held and self._files is not None:
            try:
                self.segments[-1].gz_bytes += segments.write_whole(self._files.path, held,
                                                                   self.deflate)
            except OSError as exc:  # as the thread would: kept, raised by the next write
                self.failure = exc
            self._files = None
            self._unflushed = False
            segment = self.segments[-1]
            segment.closed_at = time.time()
            self._mark(segment)
        if self._files is not None:
            self._close()
        return self._last or _done()

    def take_dirty(self) -> list[Segment]:
        """Segments changed since the last call, for the database."""
        dirty, self.dirty = self.dirty, []
        return dirty


# Reading ------------------------------------------------------------------------------------

def finalize(root: Path, rel_path: str, deflate: Deflate = DEFAULT_DEFLATE
             ) -> tuple[Segment, Scan]:
    """Make a segment whole, keeping every frame that reads back; describe it for its row.

    A segment missing a file is left as it is: a log without its index has no seq to replay by.
    """
    log_path = root / rel_path
    found = scan(log_path)
    opened = log_path.stat().st_mtime if log_path.exists() else time.time()
    if not found.complete and not found.missing:
        rewrite(log_path, deflate)
    pair = (log_path, segments.index_path(log_path))
    segment = Segment(path=rel_path, first_seq=found.first_seq, last_seq=found.last_seq,
                      raw_bytes=found.raw_bytes,
                      gz_bytes=sum(p.stat().st_size for p in pair if p.exists()),
                      opened_at=opened, closed_at=None if found.missing else time.time())
    return segment, found


def next_number(root: Path, logs_path: str) -> int:
    """The number a new segment of this task's folder takes: after every one there (blocking:
    call it off the event loop)."""
    existing = list_segments(root / logs_path)
    return existing[-1][0] + 1 if existing else 1


def settle(root: Path, rel_paths: list[str], deflate: Deflate = DEFAULT_DEFLATE) -> list[Segment]:
    """Describe segments as the disk really has them after a failed write, made whole where
    the disk allows (else left as they are, truncated, which every reader tolerates)."""
    found = []
    for rel_path in rel_paths:
        try:
            segment, _ = finalize(root, rel_path, deflate)
        except OSError:
            log_path = root / rel_path
            read = scan(log_path)
            pair = (log_path, segments.index_path(log_path))
            segment = Segment(path=rel_path, first_seq=read.first_seq, last_seq=read.last_seq,
                              raw_bytes=read.raw_bytes,
                              gz_bytes=sum(p.stat().st_size for p in pair if p.exists()))
        found.append(segment)
    return found


def recover(root: Path, logs_path: str, deflate: Deflate = DEFAULT_DEFLATE
            ) -> tuple[list[Segment], list[Scan]]:
    """Finalize every segment of a run a dead server left; describe them all for their rows."""
    results = [finalize(root, path.relative_to(root).as_posix(), deflate)
               for _, _, path in list_segments(root / logs_path)]
    return [segment for segment, _ in results], [found for _, found in results]
