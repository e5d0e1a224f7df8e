"""The attempts of live tasks: each holds a worker slot from its launch until its end is
committed. A run's coroutine commits `running`, starts the process under the task's
protections (engine/launch.py), waits for its end and records it: a retry, or the end.

`Runs` changes no status itself: every change goes through its engine's one `transition`.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from typing import Any

import structlog

from remoterun import store
from remoterun.archive import next_number
from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue, MetadataError, Script
from remoterun.config import Settings
from remoterun.engine import launch
from remoterun.engine.attempt import decide
from remoterun.engine.live import Engine, TaskState, Where
from remoterun.engine.peers import Peers
from remoterun.engine.protect import Protection
from remoterun.engine.queue import Queue
from remoterun.engine.recovery import Recovery
from remoterun.engine.writes import Once
from remoterun.errors import NotFound
from remoterun.isolation.sandbox import Sandbox
from remoterun.metrics import Metrics
from remoterun.runner import RunResult
from remoterun.spawn import Children
from remoterun.state import TaskStatus

log = structlog.get_logger(__name__)
S = TaskStatus
SEQ_BLOCK = 4096  # seqs reserved per database write (see attempt.SEQ_MARGIN)


class Runs:
    """The worker slots, and the attempt that holds each."""

    def __init__(self, engine: Engine, settings: Settings, catalogue: Catalogue,
                 metrics: Metrics, compressor: Compressor, children: Children,
                 protection: Protection, sandbox: Sandbox, queue: Queue,
                 peers: Peers, recovery: Recovery, once: Once):
        self.engine = engine
        self.settings, self.catalogue, self.metrics = settings, catalogue, metrics
        self.compressor, self.children = compressor, children
        self.protection, self.sandbox, self.queue = protection, sandbox, queue
        self.peers, self.recovery, self.once = peers, recovery, once
        self.busy = 0  # worker slots held (starting, running)
        self.running: set[asyncio.Task[None]] = set()  # one per attempt

    def launch(self, state: TaskState) -> None:
        """Give the task a new attempt and a worker slot, and start its run."""
        task = state.task
        state.attempt = launch.new_attempt(
            self.settings, task, self.script(task.script), self.engine.hub(state),
            state.next_segment, self.compressor, self.children, self.metrics, self.sandbox)
        # By id: an attempt holding its state would be a cycle (state -> attempt -> state)
        # that only a full collection frees, and the hub's window of output with it.
        state.attempt.reserve = functools.partial(self._reserve, task.id)
        state.where = Where.STARTING
        state.flush_due = time.monotonic() + self.settings.flush_interval_s * random.random()
        self.busy += 1
        run = self.engine.own(self._run(state), name=f"run-{task.id}")
        self.running.add(run)
        run.add_done_callback(self.running.discard)

    def script(self, name: str) -> Script | None:
        """The script as the catalogue has it now (None: gone)."""
        try:
            return self.catalogue.resolve(name)
        except (NotFound, MetadataError):
            return None

    def _reserve(self, task_id: str) -> None:
        """Commit the next block of seqs for a running task (once at a time)."""
        state = self.engine.tasks.get(task_id)
        if state is None or state.reserving or state.attempt is None:
            return
        state.reserving = True
        attempt = state.attempt

        async def reserve() -> None:
            try:
                upto = attempt.hub.next_seq - 1 + SEQ_BLOCK
                await self.engine.commit([store.update_task(task_id, {"seq_reserved": upto})])
                state.record(state.task.evolve(seq_reserved=upto))
                attempt.seqs_reserved(upto)
            finally:
                state.reserving = False

        self.engine.own(reserve(), name=f"reserve-{task_id}")

    async def _run(self, state: TaskState) -> None:
        """One attempt, start to end; a write fenced out (another server recorded the task,
        or this node was declared lost) ends it here without a word written. The peers
        track it meanwhile (a cluster node's watchdog kills it if the node's lease lapses)."""
        task_id, number = state.task.id, state.task.attempt
        self.peers.track(task_id, number)
        with structlog.contextvars.bound_contextvars(task_id=task_id, attempt=number):
            try:
                await self._attempt(state)
            except store.StaleWrite as exc:
                self.engine.tasks.pop(task_id, None)
                log.warning("write_fenced", reason=type(exc).__name__)
            finally:
                self.peers.untrack(task_id, number)

    async def _attempt(self, state: TaskState) -> None:
        task, attempt = state.task, state.attempt
        assert attempt is not None
        if attempt.archive.first_number is None:  # recovered: list its folder off the loop
            attempt.archive.first_number = await asyncio.to_thread(
                next_number, self.settings.archive_dir, task.logs_path)
        reserved = attempt.hub.next_seq - 1 + SEQ_BLOCK
        try:
            await self.engine.transition(state, S.RUNNING, started_at=task.started_at or
                                         time.time(), run_after=None, error=None,
                                         exit_code=None, seq_reserved=reserved)
        except BaseException:  # not recorded (shutting down, fenced): it stays pending
            self._release(state)
            raise
        attempt.seq_reserved = reserved
        state.where = Where.RUNNING
        result: RunResult | None = None
        error: str | None = None
        started = time.time()
        try:
            result, error = await launch.run_attempt(attempt, self.catalogue, self.protection,
                                                     self.sandbox)
        finally:
            self.metrics.child(self.metrics.duration, task.script).observe(
                time.time() - started)
            await asyncio.shield(self._conclude_or_let_go(state, result, error))

    async def _conclude_or_let_go(self, state: TaskState, result: RunResult | None,
                                  error: str | None) -> None:
        """`_conclude`; if it raises, the task is let go instead of held (a TaskState held hides
        the task from the reaper, and it stayed running with no process: issue 25)."""
        try:
            await self._conclude(state, result, error)
        except Exception:
            log.exception("conclude_failed")
            task_id = state.task.id
            if self.engine.tasks.get(task_id) is state:
                del self.engine.tasks[task_id]
            self.engine.own(self.recovery.let_go(state), name=f"let-go-{task_id}")

    def _release(self, state: TaskState) -> None:
        """Give the worker slot back."""
        self.busy -= 1
        self.queue.ended(state.task.script)
        self.engine.wake()

    async def _conclude(self, state: TaskState, result: RunResult | None, error: str | None
                        ) -> None:
        """Record how the attempt ended; schedule a retry or finish the task."""
        task, attempt = state.task, state.attempt
        assert attempt is not None
        closing = attempt.archive.close()  # a short run's: written at once, already done
        state.where = Where.FINISHING
        self._release(state)  # the process is gone: free its slot before the write commits
        if not closing.done():  # (wrapping a done future still costs a wake-up of the loop)
            await asyncio.wrap_future(closing)
        extra = await launch.segment_rows(self.settings, attempt)
        state.next_segment = attempt.archive.next_segment
        if attempt.archive_error is not None:
            error = attempt.archive_error
            self.engine.problems["archive"] = error
            self.once.warn("archive_write_failed", task.id, error=error)
        if attempt.transient and attempt.stop_reason is None:
            await self._retry_spawn(state, error, extra)
            return
        outcome = decide(task, attempt.output_bytes, result, error, attempt.stop_reason,
                         attempt.limits.timeout_s, attempt.limit_error, attempt.retryable)
        common: dict[str, Any] = dict(exit_code=outcome.exit_code, error=outcome.error, pid=None,
                      output_bytes=attempt.output_bytes, last_seq=attempt.last_seq,
                      seq_reserved=attempt.hub.next_seq - 1)
        if outcome.retry:
            delay = launch.backoff(self.settings, task, self.script(task.script))
            await self.engine.transition(state, S.PENDING, extra=extra,
                                         attempt=task.attempt + 1,
                                         run_after=time.time() + delay, **common)
            self.metrics.child(self.metrics.retries, task.script).inc()
            self.engine.enqueue(state)
            return
        await self.engine.transition(state, outcome.status, extra=extra,
                                     finished_at=time.time(), **common)
        self.engine.finish(state)

    async def _retry_spawn(self, state: TaskState, error: str | None,
                           extra: list[store.Statement]) -> None:
        """A spawn that met a shortage of descriptors: back to pending, the same attempt (it
        never ran, so max_retries is not spent), after a growing backoff."""
        task, attempt = state.task, state.attempt
        assert attempt is not None
        state.spawn_retries += 1
        delay = min(self.settings.retry_cap_s,
                    self.settings.retry_base_s * 2 ** min(state.spawn_retries - 1, 16))
        delay *= random.uniform(0.5, 1.0)
        log.warning("spawn_retried", task_id=task.id, error=error, retry_in_s=round(delay, 3))
        await self.engine.transition(state, S.PENDING, extra=extra,
                                     run_after=time.time() + delay, error=error, pid=None,
                                     seq_reserved=attempt.hub.next_seq - 1)
        self.metrics.child(self.metrics.retries, task.script).inc()
        self.engine.enqueue(state)

