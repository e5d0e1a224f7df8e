"""The engine's upkeep: archive flushes, database checkpoints, orphaned runs and heap trims,
each a loop of its own that the `Upkeep` owns (started together, cancelled and awaited
together; a failing step is logged once until it succeeds again, and its loop goes on)."""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import structlog

from remoterun import store
from remoterun.engine.attempt import Attempt, Progress
from remoterun.engine.live import TaskState, Where
from remoterun.engine.writes import Writes

log = structlog.get_logger(__name__)
FLUSH_SLICES = 8  # flush ticks per flush_interval_s, each flushing the tasks then due
TRIM_INTERVAL_S = 10.0  # how often freed heap is handed back to the system


@dataclass(frozen=True)
class Job:
    """One upkeep step and how often it runs."""

    name: str
    interval_s: float
    step: Callable[[], Awaitable[None]]


class Upkeep:
    """Owns one loop per job."""

    def __init__(self, jobs: Iterable[Job]):
        self.jobs = list(jobs)
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every job's loop."""
        self._loops = [asyncio.create_task(_loop(job), name=f"upkeep-{job.name}")
                       for job in self.jobs]

    @property
    def alive(self) -> bool:
        """Whether every loop runs."""
        return bool(self._loops) and not any(loop.done() for loop in self._loops)

    async def close(self) -> None:
        """Cancel the loops and wait for them."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []


async def _loop(job: Job) -> None:
    failing = False
    while True:
        await asyncio.sleep(job.interval_s)
        try:
            await job.step()
            failing = False
        except Exception as exc:
            if not failing:
                log.error(f"{job.name}_failed", exc_info=exc)
            failing = True


async def flush(states: list[TaskState], interval_s: float, writes: Writes,
                everything: bool = False) -> None:
    """Flush the archives due (or all) on the compressor thread, then commit what the
    flushes made true, unless the database is busy (the next tick writes it all)."""
    flushed = start_flushes(states, interval_s, everything)
    await asyncio.gather(*(asyncio.wrap_future(f) for _, _, f, _ in flushed if not f.done()))
    if writes.lock.locked() and not everything:
        return
    statements = flushed_rows(flushed)
    if statements:
        await writes.engine(statements)


Flushed = tuple[TaskState, Attempt, "Future[None]", Progress]


def start_flushes(states: Iterable[TaskState], interval_s: float, everything: bool
                  ) -> list[Flushed]:
    """Hand each running task's archive flush to the compressor thread, those due now (or
    all): each task is due at its own time, so tasks started together do not all sync at
    once; with the counts that flush makes true on disk."""
    now = time.monotonic()
    flushed: list[Flushed] = []
    for state in states:
        attempt = state.attempt
        if state.where is not Where.RUNNING or attempt is None:
            continue
        if everything or state.flush_due <= now:
            state.flush_due = now + interval_s
            flushed.append((state, attempt, attempt.archive.flush(), attempt.progress))
    return flushed


def flushed_rows(flushed: list[Flushed]) -> list[store.Statement]:
    """The segment rows and progress the flushes made true (of tasks still running)."""
    statements: list[store.Statement] = []
    for state, attempt, _, progress in flushed:
        if state.attempt is not attempt or state.where is not Where.RUNNING:
            continue  # it ended meanwhile: its final write records all of this and more
        if attempt.archive.failure is not None:
            attempt.note_archive_failure()
            continue
        task_id = state.task.id
        statements += [store.upsert_segment(task_id, seg)
                       for seg in attempt.archive.take_dirty()]
        if progress == state.recorded:
            continue  # a quiet task: nothing new to write
        state.recorded = progress
        counts = dict(output_bytes=progress.output_bytes, last_seq=progress.last_seq,
                      pid=progress.pid)
        statements.append(store.update_task(task_id, counts))
        state.record(state.task.evolve(**counts))
    return statements


_LIBC = ctypes.CDLL(None) if hasattr(ctypes, "CDLL") else None


async def trim_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), off the loop.

    Many clients that replayed and left leave their buffers freed but resident: 2,000 of
    them kept ~150 MB after they went (bench replay) without it.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        await asyncio.to_thread(trim, 0)
