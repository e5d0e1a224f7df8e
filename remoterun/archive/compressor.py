"""The archive's writer thread: deflates and writes every task's segments, owned by the app.

One per server, created and shut down by the app's services context (`api/app.py`), handed to
every `TaskArchive`; never a module global, so a test's app and its thread live and die together.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from remoterun.archive.segments import Backlog, Sink
from remoterun.wire import Frame


class Compressor:
    """One thread that deflates and writes every task's archive, jobs in the order given.

    Deflating on the event loop takes it ~0.5 ms per 64 KiB with zlib at level 1: time taken
    from every other task and client. ISA-L, zlib and file writes release the GIL, so on a
    thread they overlap the loop. A single thread running jobs first in, first out keeps each
    file's writes in order.

    Frames written by every task go to the thread as one job once `batch_bytes` are gathered,
    or `gather_s` after the first of them (a flush or close hands over at once): each job, and
    each call into the deflater, costs the loop a GIL hand-back (the thread wakes, takes the GIL
    between the loop's system calls, and the loop waits to take it back), so fewer, larger jobs
    cost it less; ISA-L deflates 1 MiB in ~2 ms. A job per frame, or one per loop iteration
    (16 per MB of a stream read in 64 KiB), would cost more in hand-offs than it saves, and a
    job per task per N bytes makes every task hand over at once after each flush.

    Bytes handed over but not yet done are bounded: past `limit_bytes`, handing a batch over
    waits for the oldest jobs until under it, so output that arrives faster than the thread
    deflates slows to its pace instead of queueing without end, one batch at a time. That
    bound holds the whole loop; each writer's own `Backlog` lets the scheduler slow just the
    task that outruns the thread first (it stops reading its pipes). Call from one thread (the
    event loop's, or one with no loop); a job must not raise.
    """

    def __init__(self, limit_bytes: int = 16 * 1024 * 1024, batch_bytes: int = 1024 * 1024,
                 gather_s: float = 0.01):
        self.limit_bytes = limit_bytes
        self.batch_bytes = batch_bytes
        self.gather_s = gather_s
        self.pending_bytes = 0  # handed over, not yet done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rr-gzip")
        self._pending: deque[tuple[Future[None], int, dict[Backlog, int]]] = deque()
        self._batch: list[tuple[Sink, Frame]] = []
        self._backlogs: dict[Backlog, int] = {}  # of the batch being gathered
        self._batch_bytes = 0
        self._scheduled: asyncio.TimerHandle | None = None  # hands the batch over

    def write(self, sink: Sink, frame: Frame, backlog: Backlog | None = None) -> None:
        """Have `sink` write the frame on the thread, after every job and frame given before;
        its bytes count in `backlog` until written."""
        self._batch.append((sink, frame))
        size = len(frame.data)
        self._batch_bytes += size
        if backlog is not None:
            backlog.bytes += size
            self._backlogs[backlog] = self._backlogs.get(backlog, 0) + size
        if self._batch_bytes >= self.batch_bytes:
            self._hand_over(block=True)
            return
        if self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: the next submit, or a full batch, hands it over
                return
            self._scheduled = loop.call_later(self.gather_s, self._hand_over, True)

    def submit(self, job: Callable[[], None]) -> Future[None]:
        """Run `job` after every job and frame given before it; its future."""
        self._hand_over(block=False)
        return self._pool.submit(job)

    def close(self) -> None:
        """Hand over what is gathered, wait for every job, and stop the thread."""
        self._hand_over(block=False)
        self._pool.shutdown(wait=True)
        self.collect()

    def _hand_over(self, block: bool) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._batch:
            return
        batch, size, backlogs = self._batch, self._batch_bytes, self._backlogs
        self._batch, self._batch_bytes, self._backlogs = [], 0, {}
        self._pending.append((self._pool.submit(_write_batch, batch), size, backlogs))
        self.pending_bytes += size
        self.collect()
        # The backpressure. At most twice this batch: a burst handed over without blocking
        # (a flush) is absorbed by the next few iterations, not all by one.
        allowance = 2 * size if block else 0
        while self.pending_bytes > self.limit_bytes and allowance > 0:
            wait([self._pending[0][0]])
            allowance -= self._forget()

    def collect(self) -> None:
        """Account for the jobs the thread has finished (their bytes leave the backlogs)."""
        while self._pending and self._pending[0][0].done():
            self._forget()

    def _forget(self) -> int:
        _, size, backlogs = self._pending.popleft()
        self.pending_bytes -= size
        for backlog, written in backlogs.items():
            backlog.bytes -= written
        return size


def _write_batch(batch: list[tuple[Sink, Frame]]) -> None:
    frames: dict[Sink, list[Frame]] = {}
    for sink, frame in batch:
        frames.setdefault(sink, []).append(frame)
    for sink, some in frames.items():  # one call per segment: fewer, larger calls to zlib
        sink(some)


