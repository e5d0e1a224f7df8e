"""The engine: one TaskState per live task, dispatch, recovery, drain; the only writer of status.

A live task (pending, running, or between the two) has exactly one `TaskState` in
`Scheduler.tasks`: where it is (queued, starting, running, finishing), its row as last committed
plus progress, its hub once anyone watches, and its current attempt. A task leaves the dict when
its final state is committed, and never comes back; a task in the database that no state of
this server holds is not ours, which is all the reaper needs to know.

Every status change goes through `_transition`: it checks the table, commits the row and the
event together (guarded by the old status, so a final state is never overwritten), and only
then publishes. Commits queue in order behind one lock; while the database is locked by another
connection or cannot be written they wait and retry without holding the event loop
(`store.Store.commit`), up to `engine.db_retry_s` for a request, and for as long as it takes
for the engine's own transitions (until shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import random
import signal
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from remoterun import store
from remoterun.archive import (
    Segment,
    TaskArchive,
    deflate_of,
    logs_path_for,
    next_number,
    recover,
    settle,
)
from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue, MetadataError, Script
from remoterun.config import Settings
from remoterun.engine.attempt import (
    Attempt,
    Limits,
    archive_failure_text,
    archive_kept_text,
    build_spec,
    decide,
)
from remoterun.engine.feed import TaskFeed
from remoterun.engine.hub import Subscription, TaskHub, replay_finished
from remoterun.engine.pending import PendingQueue
from remoterun.engine.protect import Protection
from remoterun.errors import Conflict, IntegrityFailed, NotFound, QueueFull, Unavailable
from remoterun.isolation.sandbox import Sandbox
from remoterun.metrics import Metrics
from remoterun.reaper import become_subreaper, kill_left_behind, tend_orphans
from remoterun.runner import NOT_STARTED, RunResult, SpawnError, start_problem
from remoterun.spawn import Children
from remoterun.state import FINAL, TaskStatus, check_transition
from remoterun.vault import NONE, SecretsUnavailable
from remoterun.wire import Event, exit_event, rfc3339, task_json

log = structlog.get_logger(__name__)
S = TaskStatus
FLUSH_SLICES = 8  # flush ticks per flush_interval_s, each flushing the tasks then due
SEQ_BLOCK = 4096  # seqs reserved per database write (see attempt.SEQ_MARGIN)
TRIM_INTERVAL_S = 10.0  # how often freed heap is handed back to the system
REQUEST_DB_WAIT_S = 2.0  # at most this long a request waits for a busy database, then 503


class Where(StrEnum):
    """Where a live task is."""

    QUEUED = "queued"  # pending, in the queue
    STARTING = "starting"  # taken from the queue, its running transition being committed
    RUNNING = "running"  # its attempt holds a worker slot
    FINISHING = "finishing"  # its process ended, its next state being committed


@dataclass(eq=False)
class TaskState:
    """Everything the engine knows of one live task."""

    row: dict[str, Any]
    where: Where = Where.QUEUED
    hub: TaskHub | None = None
    attempt: Attempt | None = None
    flush_due: float = 0.0  # time.monotonic() of its archive's next flush
    recorded: dict[str, Any] = field(default_factory=dict)  # progress the last flush wrote
    reserving: bool = False  # a seq reservation is being committed
    next_segment: int | None = 1  # the number its next archive segment takes (None: unknown)
    spawn_retries: int = 0  # spawns retried for a shortage of descriptors (EMFILE, ENFILE)


class Scheduler:
    """Owns every live task: its queue slot, its attempt and its hub."""

    def __init__(self, settings: Settings, db: store.Store, catalogue: Catalogue,
                 metrics: Metrics, compressor: Compressor, children: Children):
        self.settings = settings
        self.db = db
        self.catalogue = catalogue
        self.metrics = metrics
        self.compressor = compressor
        self.children = children
        self.accepting = True
        self.tasks: dict[str, TaskState] = {}
        self.queue = PendingQueue(settings.aging_s, self._limit_of)
        self.feed = TaskFeed()  # every committed transition, for GET /events
        # Called after each committed transition (metrics, alerts: set by api/app.py); it
        # must not block or raise.
        self.on_transition: Callable[[dict[str, Any], TaskStatus, TaskStatus], None] = \
            lambda row, old, new: None
        self.problems: dict[str, str] = {}  # what /readyz reports: kind -> latest failure
        self._busy = 0  # worker slots held (starting, running)
        self.replay_slots = asyncio.Semaphore(settings.replay_readers)  # see hub.Subscription
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()  # commits in order
        self._closing = False
        self._owned: set[asyncio.Task[None]] = set()  # runs and small writes
        self._loops: list[asyncio.Task[None]] = []
        self._logged: set[tuple[str, str]] = set()  # (failure kind, task) already logged
        self._next_num = 1
        # Secrets and integrity (issue 13 B); made first: it takes REMOTERUN_SECRET_KEY out
        # of the server's environment before the sandbox reads its allow-list from it.
        self.protection = Protection(settings)
        # Isolation, limits and each task's environment (the allow-list, never ours).
        self.sandbox = Sandbox(settings, children, (self.protection.key_path,))

    # Life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous server left, then start dispatching."""
        self._next_num = await self.db.last_num() + 1
        sealing = await self.protection.open(self.db)
        if sealing:  # an older server's secrets in clear: sealed, and no copy left in the log
            await self._commit(sealing)
            await self.db.checkpoint(truncate=True)
            log.warning("secrets_sealed", tasks=len(sealing))
        await self._recover()
        await self.sandbox.start()
        await self._sweep_work_folders()
        if not become_subreaper():
            log.warning("no_subreaper", detail="double-forked daemons may outlive their task")
        self._loops = [asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
                       asyncio.create_task(self._flush_loop(), name="archive-flusher")]

    @property
    def alive(self) -> bool:
        """Whether the dispatcher and the flusher are running."""
        return bool(self._loops) and not any(loop.done() for loop in self._loops)

    def force_stop(self) -> None:
        """Kill every running task now (a second SIGTERM/SIGINT during the drain)."""
        log.warning("shutdown_forced", running=self._busy)
        for attempt in self._attempts():
            attempt.request_stop("shutdown")
            if attempt.run is not None:
                attempt.run.signal(signal.SIGKILL)

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let running tasks finish for `grace_s`, then stop the rest."""
        if not self.accepting:
            return
        self.accepting = False
        self._wake.set()
        runs = {t for t in self._owned if t.get_name().startswith("run-")}
        if runs:
            log.info("shutdown_draining", running=len(runs), grace_s=grace_s)
            await asyncio.wait(runs, timeout=grace_s)
        for attempt in self._attempts():
            attempt.request_stop("shutdown")
        runs = {t for t in self._owned if t.get_name().startswith("run-")}
        if runs:
            await asyncio.wait(runs)
        for state in list(self.tasks.values()):
            if state.hub is not None:
                row = state.row
                state.hub.publish(Event("status", {
                    "status": row["status"], "attempt": row["attempt"],
                    "ts": rfc3339(time.time()), "error": "server shutting down"}))

    async def close(self) -> None:
        """Cancel the background loops and whatever is left, writing what can be written."""
        self._closing = True
        for task in [*self._loops, *self._owned]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._owned, return_exceptions=True)
        self._loops = []
        # The compressor thread must have written and closed every file before the process exits.
        await asyncio.gather(*(asyncio.wrap_future(a.archive.close()) for a in self._attempts()))
        try:
            await self._flush_tick(everything=True)
        except Exception:
            log.exception("final_flush_failed")
        await self.sandbox.close()

    def _attempts(self) -> list[Attempt]:
        return [s.attempt for s in self.tasks.values() if s.attempt is not None]

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background coroutine that close() cancels and whose exception is logged."""
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._reap_owned)

    def _reap_owned(self, task: asyncio.Task[None]) -> None:
        self._owned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(),
                      exc_info=task.exception())

    # Commits ---------------------------------------------------------------------------------

    async def _commit(self, statements: list[store.Statement], within_s: float | None = None
                      ) -> int | None:
        """Commit in order behind every earlier commit. A request (`within_s` given) gets
        Unavailable past it; the engine's own commits wait until the database is back."""
        if within_s is not None:
            try:
                async with asyncio.timeout(within_s):
                    async with self._write_lock:
                        return await self.db.commit(statements, within_s)
            except (TimeoutError, store.DatabaseUnavailable) as exc:
                raise Unavailable("the database is busy or cannot be written; try again",
                                  code="database_unavailable", retry_after_s=1.0) from exc
        async with self._write_lock:
            unsure = None  # a try whose outcome is unknown: looked up before the next
            while True:
                try:
                    rowid = await self.db.commit(statements, self.settings.db_retry_s, unsure)
                    self.problems.pop("database", None)
                    return rowid
                except store.DatabaseUnavailable as exc:
                    unsure = exc.unsure
                    self.problems["database"] = str(exc)
                    self._log_once("database_unavailable", "", error=str(exc))
                    if self._closing:
                        raise

    async def record(self, statements: list[store.Statement]) -> None:
        """Commit what a request records beside the engine's writes (audit rows), in order
        behind them; Unavailable once the database stayed busy past a request's wait."""
        await self._commit(statements, within_s=self._request_wait())

    def _log_once(self, kind: str, task_id: str, **data: Any) -> None:
        if (kind, task_id) not in self._logged:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged.add((kind, task_id))
            log.warning(kind, task_id=task_id or None, **data)

    async def _transition(self, state: TaskState, new: TaskStatus,
                          extra: Iterable[store.Statement] = (), within_s: float | None = None,
                          **fields: Any) -> None:
        """Check, persist, then announce a status change. `within_s`: a request's, which
        gets Unavailable past it (see `_commit`); the engine's own wait as long as it takes."""
        row = state.row
        old = S(row["status"])
        check_transition(old, new)
        fields["updated_at"] = time.time()
        if new in FINAL and row.get("secret_params", NONE) != NONE:
            fields["secret_params"] = NONE  # its secrets are not needed any more: dropped
        attempt = fields.get("attempt", row["attempt"])
        statements = store.transition(row["id"], old, new, attempt, dict(fields),
                                      detail=fields.get("error"))
        event_id = await self._commit([*extra, *statements], within_s)
        row.update(fields, status=str(new))
        self.feed.publish(event_id, row, str(old), fields)  # GET /events
        hub = state.hub
        if hub is not None:
            hub.task = task_json(row)
            body = {"status": str(new), "attempt": row["attempt"],
                    "ts": rfc3339(fields["updated_at"])}
            if new is not S.RUNNING:
                body.update(exit_code=row["exit_code"], error=row["error"])
            hub.publish(Event("status", body))
        self.on_transition(row, old, new)

    # Submissions -----------------------------------------------------------------------------

    async def submit(self, script: Script, request: dict[str, Any], submitted_by: str,
                     audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a pending task from a validated request; returns its JSON. `audit`, an audit
        entry, is written in the task's own transaction."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new tasks")
        if len(self.queue) >= self.settings.max_pending:
            raise QueueFull(f"{len(self.queue)} tasks are already waiting (engine.max_pending)",
                            retry_after_s=5.0)
        params = script.validate(request.get("params", {}))
        try:
            await self.protection.check(script)
        except IntegrityFailed as exc:
            await self._refused(script, exc, audit)
            raise
        now = time.time()
        task_id = str(uuid.uuid4())
        shown, sealed = self.protection.seal(task_id, script, params)
        row: dict[str, Any] = {
            "num": self._next_num, "id": task_id, "script": script.name, "status": str(S.PENDING),
            "params": shown, "secret_params": sealed,
            "priority": request.get("priority", 0), "timeout": request.get("timeout"),
            "max_retries": request.get("max_retries", 0), "attempt": 1,
            "pty": request.get("pty", False),
            "interactive": request.get("interactive", False) or request.get("pty", False),
            "stdin": request.get("stdin", ""), "created_at": now, "updated_at": now,
            "submitted_by": submitted_by, "logs_path": logs_path_for(task_id, now),
        }
        self._next_num += 1
        audit_rows = [] if audit is None else [
            store.insert_audit(audit, task_id=task_id, script=script.name)]
        # The event's insert last: its row id is the feed's event id.
        event_id = await self._commit([*audit_rows, *store.insert_task(row)],
                                      within_s=self._request_wait())
        full = {**dict.fromkeys(("exit_code", "error", "started_at", "finished_at",
                                 "run_after", "pid")), "output_bytes": 0, "last_seq": 0,
                "seq_reserved": 0, **row}
        self.feed.publish(event_id, full, None)  # GET /events
        self._enqueue(TaskState(full))
        self.metrics.child(self.metrics.submitted, script.name).inc()
        log.info("task_submitted", task_id=task_id, script=script.name,
                 submitted_by=submitted_by)
        return task_json(full)

    async def _refused(self, script: Script, exc: IntegrityFailed,
                       audit: dict[str, Any] | None) -> None:
        """Log and audit a submission refused by the script's integrity check."""
        log.warning("integrity_failed", script=script.name, error=exc.message)
        if audit is not None:
            await self._commit([store.insert_audit(
                {**audit, "result": exc.code, "detail": exc.message[:1000]},
                script=script.name)], within_s=self._request_wait())

    def _request_wait(self) -> float:
        return min(self.settings.db_retry_s, REQUEST_DB_WAIT_S)

    def _limit_of(self, script: str) -> int | None:
        try:
            return self.catalogue.resolve(script).max_concurrency
        except (NotFound, MetadataError):
            return None

    def _enqueue(self, state: TaskState) -> None:
        state.where = Where.QUEUED
        state.attempt = None
        self.tasks[state.row["id"]] = state
        self.queue.push(state.row)
        self._wake.set()

    async def cancel(self, task_id: str, audit: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """Cancel a pending or running task; Conflict if it already ended. `audit` is written
        with the cancellation (for a running task, before it is asked to stop)."""
        state = self.tasks.get(task_id)
        if state is None or state.where is Where.FINISHING:
            stored = state.row if state is not None else await self.db.get_task(task_id)
            if stored is None:
                raise NotFound(f"no task {task_id}")
            raise Conflict(f"task {task_id} has already ended ({stored['status']})",
                           code="already_finished")
        if state.attempt is not None:  # starting or running: its run ends it
            if audit is not None:
                await self._commit([store.insert_audit(audit, task_id=task_id)],
                                   within_s=self._request_wait())
            state.attempt.request_stop("cancel")
            return task_json(state.row)
        row = self.queue.remove(task_id)
        assert row is not None
        state.where = Where.FINISHING
        try:
            await self._transition(state, S.CANCELLED, finished_at=time.time(), run_after=None,
                                   extra=[] if audit is None else [
                                       store.insert_audit(audit, task_id=task_id)],
                                   within_s=self._request_wait())
        except BaseException:
            self._enqueue(state)  # nothing was recorded: it waits as before
            raise
        self._finish(state)
        return task_json(state.row)

    def queue_positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """The 1-based place in dispatch order of each of `task_ids` that waits in the queue."""
        return self.queue.positions(task_ids)

    # Streams ---------------------------------------------------------------------------------

    def attempt(self, task_id: str) -> Attempt | None:
        """The running (or starting) attempt's controls, if the task has one."""
        state = self.tasks.get(task_id)
        return state.attempt if state is not None and state.where is not Where.FINISHING \
            else None

    def live_row(self, task_id: str) -> dict[str, Any] | None:
        """The row of a task this scheduler holds (queued to finishing), else None; the
        caller only reads it."""
        state = self.tasks.get(task_id)
        return state.row if state is not None else None

    def _hub(self, state: TaskState) -> TaskHub:
        if state.hub is None:
            row = state.row
            task_id = row["id"]
            state.hub = TaskHub(task_json(row), memory_bytes=self.settings.replay_memory_bytes,
                                next_seq=max(row["last_seq"], row["seq_reserved"]) + 1,
                                flush_archive=lambda: self._start_flush(task_id))
        return state.hub

    async def require_task(self, task_id: str) -> None:
        """NotFound unless the task exists."""
        if task_id not in self.tasks and await self.db.get_task(task_id) is None:
            raise NotFound(f"no task {task_id}")

    async def subscribe(self, task_id: str, since: int) -> Subscription:
        """Every frame after `since`, then live output and status, then the exit event."""
        limit = self.settings.client_queue_bytes
        root = self.settings.archive_dir
        state = self.tasks.get(task_id)
        if state is None:
            row = await self.db.get_task(task_id)
            if row is None:
                raise NotFound(f"no task {task_id}")
            state = self.tasks.get(task_id)  # it may have been recovered while we read
            if state is None:
                if row["status"] not in FINAL:  # not ours, and not final: a lost run
                    row = await self._reap_one(row) or row
                return replay_finished(row, task_json(row), since, root, limit,
                                       self.replay_slots)
        return self._hub(state).subscribe(since, root, limit, self.replay_slots)

    def _start_flush(self, task_id: str) -> Future[None] | None:
        """Start a flush of the task's current archive (whichever attempt is writing)."""
        state = self.tasks.get(task_id)
        if state is None or state.attempt is None:
            return None
        return state.attempt.archive.flush()

    async def flush_archive(self, task_id: str) -> None:
        """Make what a task wrote before the call readable on disk, then return."""
        flushed = self._start_flush(task_id)
        if flushed is not None:
            await asyncio.wrap_future(flushed)

    # Dispatch --------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = self._start_eligible()
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _start_eligible(self) -> float | None:
        """Start tasks while slots are free; the seconds until a deferred retry is due."""
        slots = self.settings.workers - self._busy if self.accepting else 0
        if slots <= 0:
            return None
        rows, next_due = self.queue.take(slots, time.time())
        for row in rows:
            self._launch(self.tasks[row["id"]])
        return next_due

    def _launch(self, state: TaskState) -> None:
        row = state.row
        settings = self.settings
        archive = TaskArchive(settings.archive_dir, row["logs_path"], self.compressor,
                              deflate=deflate_of(settings),
                              segment_max_bytes=settings.segment_max_bytes,
                              segment_max_age_s=settings.segment_max_age_s or None,
                              first_number=state.next_segment)
        script = self._script(row["script"])
        cap = (script.extra.get("max_output_bytes") if script else None) \
            or settings.max_output_bytes or None
        limits = Limits(timeout_s=self._timeout(row, script), output_cap=cap,
                        stdin_buffer_bytes=settings.stdin_buffer_bytes,
                        read_chunk=settings.read_chunk_bytes, kill_grace_s=settings.kill_grace_s,
                        drain_grace_s=settings.drain_grace_s,
                        coalesce_s=settings.coalesce_ms / 1000)
        output_bytes = self.metrics.output_bytes
        state.attempt = Attempt(
            row, archive, self._hub(state), limits, self.children,
            on_bytes=lambda stream, n: self.metrics.child(output_bytes, stream).inc(n),
            on_paused=self.metrics.output_paused.inc, collect=self.compressor.collect,
            sandbox=self.sandbox)
        # By id: an attempt holding its state would be a cycle (state -> attempt -> state)
        # that only a full collection frees, and the hub's window of output with it.
        state.attempt.reserve = functools.partial(self._reserve, row["id"])
        state.where = Where.STARTING
        state.flush_due = time.monotonic() + settings.flush_interval_s * random.random()
        self._busy += 1
        self._own(self._run(state), name=f"run-{row['id']}")

    def _script(self, name: str) -> Script | None:
        try:
            return self.catalogue.resolve(name)
        except (NotFound, MetadataError):
            return None

    def _timeout(self, row: dict[str, Any], script: Script | None) -> float | None:
        if row["timeout"] is not None:
            return float(row["timeout"])
        if script is not None and script.timeout_s is not None:
            return float(script.timeout_s)
        return self.settings.default_timeout_s

    def _reserve(self, task_id: str) -> None:
        """Commit the next block of seqs for a running task (once at a time)."""
        state = self.tasks.get(task_id)
        if state is None or state.reserving or state.attempt is None:
            return
        state.reserving = True
        attempt = state.attempt

        async def reserve() -> None:
            try:
                upto = attempt.hub.next_seq - 1 + SEQ_BLOCK
                await self._commit([store.update_task(state.row["id"], {"seq_reserved": upto})])
                state.row["seq_reserved"] = upto
                attempt.seqs_reserved(upto)
            finally:
                state.reserving = False

        self._own(reserve(), name=f"reserve-{state.row['id']}")

    # One attempt -----------------------------------------------------------------------------

    async def _run(self, state: TaskState) -> None:
        row = state.row
        attempt = state.attempt
        assert attempt is not None
        with structlog.contextvars.bound_contextvars(task_id=row["id"], attempt=row["attempt"]):
            if attempt.archive.first_number is None:  # recovered: list its folder off the loop
                attempt.archive.first_number = await asyncio.to_thread(
                    next_number, self.settings.archive_dir, row["logs_path"])
            reserved = attempt.hub.next_seq - 1 + SEQ_BLOCK
            try:
                await self._transition(state, S.RUNNING, started_at=row["started_at"] or
                                       time.time(), run_after=None, error=None, exit_code=None,
                                       seq_reserved=reserved)
            except BaseException:  # not recorded (shutting down): it stays pending
                self._release(state)
                raise
            attempt.seq_reserved = reserved
            state.where = Where.RUNNING
            result: RunResult | None = None
            error: str | None = None
            started = time.time()
            try:
                result, error = await self._attempt(state, attempt)
            finally:
                self.metrics.child(self.metrics.duration, row["script"]).observe(
                    time.time() - started)
                await asyncio.shield(self._conclude_or_let_go(state, result, error))

    async def _attempt(self, state: TaskState, attempt: Attempt
                       ) -> tuple[RunResult | None, str | None]:
        """Start the process and wait for its end; (result, None) or (None, why not)."""
        row = state.row
        copy: Path | None = None
        try:
            if attempt.stop.done():
                raise SpawnError("cancelled before it started")
            script = self.catalogue.resolve(row["script"])
            secrets, script, copy = await self.protection.prepare(row, script)
            attempt.masker = self.protection.masker(secrets)
            policy = self.sandbox.policy(script.sandbox, script.limits, script.env)
            # A CRLF #! line or a missing interpreter: named here, since inside bwrap it would
            # read as bwrap's own "execvp: No such file" (an image has interpreters of its own).
            problem = None if policy.mode == "docker" else await asyncio.to_thread(
                start_problem, script.path)
            if problem is not None:
                attempt.retryable = False
                return RunResult(NOT_STARTED), problem
            run = await attempt.start(build_spec(row, script, self.catalogue.root, (), secrets),
                                      policy)
            row["pid"] = run.pid  # persisted by the next flush tick
            log.debug("task_started", pid=run.pid, script=row["script"])
            return await attempt.wait(), None
        except (IntegrityFailed, SecretsUnavailable, MetadataError) as exc:  # so would a retry
            attempt.retryable = False
            log.warning("attempt_refused", script=row["script"], error=str(exc))
            return None, str(exc)
        except NotFound as exc:
            return None, f"script {row['script']!r} is no longer runnable: {exc.message}"
        except SpawnError as exc:
            attempt.transient = exc.transient
            return None, str(exc)
        except Exception as exc:  # a bug of ours must not leave the task running
            log.exception("run_crashed")
            return None, f"internal error: {exc}"
        finally:
            await self.protection.discard(copy)

    async def _conclude_or_let_go(self, state: TaskState, result: RunResult | None,
                                  error: str | None) -> None:
        """`_conclude`; if it raises, the task is let go instead of held (a TaskState held hides
        the task from the reaper, and it stayed running with no process: issue 25)."""
        try:
            await self._conclude(state, result, error)
        except Exception:
            log.exception("conclude_failed")
            task_id = state.row["id"]
            if self.tasks.get(task_id) is state:
                del self.tasks[task_id]
            self._own(self._settle_let_go(state), name=f"let-go-{task_id}")

    async def _settle_let_go(self, state: TaskState) -> None:
        """Record a let-go task as the reaper does (unless it is final already), and tell its
        attached clients how it ended."""
        row = await self.db.get_task(state.row["id"])
        if row is not None and row["status"] not in FINAL:
            row = await self._reap_one(row) or row
        if row is not None and state.hub is not None:
            state.hub.task = task_json(row)
            state.hub.publish(exit_event(row))

    def _release(self, state: TaskState) -> None:
        """Give the worker slot back."""
        self._busy -= 1
        self.queue.ended(state.row["script"])
        self._wake.set()

    async def _conclude(self, state: TaskState, result: RunResult | None, error: str | None
                        ) -> None:
        """Record how the attempt ended; schedule a retry or finish the task."""
        row = state.row
        attempt = state.attempt
        assert attempt is not None
        closing = attempt.archive.close()  # a short run's: written at once, already done
        state.where = Where.FINISHING
        self._release(state)  # the process is gone: free its slot before the write commits
        if not closing.done():  # (wrapping a done future still costs a wake-up of the loop)
            await asyncio.wrap_future(closing)
        extra = await self._segment_rows(state, attempt)
        state.next_segment = attempt.archive.next_segment
        if attempt.archive_error is not None:
            error = attempt.archive_error
            self.problems["archive"] = error
            self._log_once("archive_write_failed", row["id"], error=error)
        if attempt.transient and attempt.stop_reason is None:
            await self._retry_spawn(state, error, extra)
            return
        outcome = decide(row, result, error, attempt.stop_reason, attempt.limits.timeout_s,
                         attempt.limit_error, attempt.retryable)
        common = dict(exit_code=outcome.exit_code, error=outcome.error, pid=None,
                      output_bytes=row["output_bytes"], last_seq=row["last_seq"],
                      seq_reserved=attempt.hub.next_seq - 1)
        if outcome.retry:
            await self._transition(state, S.PENDING, extra=extra, attempt=row["attempt"] + 1,
                                   run_after=time.time() + self._backoff(row), **common)
            self.metrics.child(self.metrics.retries, row["script"]).inc()
            self._enqueue(state)
            return
        await self._transition(state, outcome.status, extra=extra, finished_at=time.time(),
                               **common)
        self._finish(state)

    async def _retry_spawn(self, state: TaskState, error: str | None,
                           extra: list[store.Statement]) -> None:
        """A spawn that met a shortage of descriptors: back to pending, the same attempt (it
        never ran, so max_retries is not spent), after a growing backoff."""
        row, attempt = state.row, state.attempt
        assert attempt is not None
        state.spawn_retries += 1
        delay = min(self.settings.retry_cap_s,
                    self.settings.retry_base_s * 2 ** min(state.spawn_retries - 1, 16))
        delay *= random.uniform(0.5, 1.0)
        log.warning("spawn_retried", task_id=row["id"], error=error, retry_in_s=round(delay, 3))
        await self._transition(state, S.PENDING, extra=extra, run_after=time.time() + delay,
                               error=error, pid=None, seq_reserved=attempt.hub.next_seq - 1)
        self.metrics.child(self.metrics.retries, row["script"]).inc()
        self._enqueue(state)

    async def _segment_rows(self, state: TaskState, attempt: Attempt) -> list[store.Statement]:
        """The attempt's segment rows; after an archive failure, as the disk really has them
        (the output up to the failure), and the task's counts set from that."""
        archive = attempt.archive
        if archive.failure is None:
            return [store.upsert_segment(state.row["id"], s) for s in archive.take_dirty()]
        if attempt.archive_error is None:  # failed as the run ended: nothing stopped it
            attempt.stop_reason = "archive"
        segs = archive.segments
        found: list[Segment] = await asyncio.to_thread(
            settle, self.settings.archive_dir, [s.path for s in segs],
            deflate_of(self.settings))
        row = state.row
        row["output_bytes"] -= sum(s.raw_bytes for s in segs) - sum(s.raw_bytes for s in found)
        if segs:
            row["last_seq"] = max([segs[0].first_seq - 1,
                                   *(s.last_seq for s in found if s.raw_bytes)])
        # Frames are published before the compressor thread writes them: say which were lost.
        attempt.archive_error = archive_failure_text(archive) + archive_kept_text(
            row["last_seq"], attempt.hub.next_seq - 1)
        return [store.upsert_segment(row["id"], s) for s in found]

    def _backoff(self, row: dict[str, Any]) -> float:
        script = self._script(row["script"])
        base = self.settings.retry_base_s
        if script is not None:
            base = float(script.extra.get("retry_base_s", base))
        delay = min(self.settings.retry_cap_s, base * 2 ** (row["attempt"] - 1))
        return float(delay * random.uniform(0.5, 1.0))

    def _finish(self, state: TaskState) -> None:
        """Announce the end and forget the task: late clients replay it from the archive."""
        row = state.row
        self.tasks.pop(row["id"], None)
        self.metrics.child(self.metrics.finished, row["script"], row["status"]).inc()
        if state.hub is not None:
            state.hub.publish(exit_event(row))
        log.info("task_finished", task_id=row["id"], script=row["script"], status=row["status"],
                 exit_code=row["exit_code"], error=row["error"],
                 output_bytes=row["output_bytes"])

    # Archive flushing, orphans, lost runs ----------------------------------------------------

    async def _flush_loop(self) -> None:
        """Flush each running task's archive every `flush_interval_s`, in slices.

        Each task is due at its own time (its first flush a random part of the interval after
        its start), and the loop wakes FLUSH_SLICES times per interval to flush those due: a
        hundred tasks started together do not all sync their files (and deflate the batches
        those hold) in the same moment, which held every writer behind the compressor thread
        at once (bench latency: p99 beside 100 flooding tasks ~40 -> ~30 ms).
        """
        interval = self.settings.flush_interval_s
        last_reap = last_checkpoint = last_trim = time.monotonic()
        while True:
            await asyncio.sleep(interval / FLUSH_SLICES)
            now = time.monotonic()
            for kind, step in (("flush", self._flush_tick), ("checkpoint", self.db.checkpoint),
                               ("reap", self._reap_lost_runs), ("trim", _trim_memory)):
                if kind == "checkpoint" and now - last_checkpoint < interval:
                    continue
                if kind == "trim" and now - last_trim < TRIM_INTERVAL_S:
                    continue
                if kind == "reap" and now - last_reap < self.settings.reaper_interval_s:
                    continue
                try:
                    await step()
                    self._logged.discard((f"{kind}_failed", ""))
                except Exception as exc:
                    if (f"{kind}_failed", "") not in self._logged:
                        self._logged.add((f"{kind}_failed", ""))
                        log.error(f"{kind}_failed", exc_info=exc)
                if kind == "checkpoint":
                    last_checkpoint = now
                elif kind == "trim":
                    last_trim = now
                elif kind == "reap":
                    last_reap = now

    async def _flush_tick(self, everything: bool = False) -> None:
        running = {tid for tid, s in self.tasks.items() if s.where is not Where.QUEUED}
        for pid in tend_orphans(self.children, running):
            log.info("orphan_killed", pid=pid)
        now = time.monotonic()
        due = [s for s in self.tasks.values() if s.where is Where.RUNNING
               and s.attempt is not None and (everything or s.flush_due <= now)]
        for state in due:
            state.flush_due = now + self.settings.flush_interval_s
        # Record what is on disk: the counts as the flush is handed to the compressor thread.
        flushed = [(s, s.attempt, s.attempt.archive.flush(),
                    {k: s.row[k] for k in ("output_bytes", "last_seq", "pid")})
                   for s in due if s.attempt is not None]
        await asyncio.gather(*(asyncio.wrap_future(f) for _, _, f, _ in flushed if not f.done()))
        if self._write_lock.locked() and not everything:
            return  # the database is busy: the next tick writes it all
        statements: list[store.Statement] = []
        for state, attempt, _, counts in flushed:
            if state.attempt is not attempt or state.where is not Where.RUNNING:
                continue  # it ended meanwhile: its final write records all of this and more
            if attempt.archive.failure is not None:
                attempt.note_archive_failure()
                continue
            statements += [store.upsert_segment(state.row["id"], seg)
                           for seg in attempt.archive.take_dirty()]
            if counts == state.recorded:
                continue  # a quiet task: nothing new to write
            state.recorded = counts
            statements.append(store.update_task(state.row["id"], counts))
            if state.hub is not None:
                state.hub.task.update(output_bytes=counts["output_bytes"],
                                      last_seq=counts["last_seq"])
        if statements:
            await self._commit(statements)

    async def _reap_lost_runs(self) -> None:
        """Record tasks marked running that no state of this server holds (a dead server's)."""
        for row in await self.db.tasks_in(S.RUNNING):
            if row["id"] not in self.tasks:
                await self._reap_one(row)

    async def _reap_one(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Record one lost run as after a crash; its row as recorded, or None if it was not
        lost after all (it ended, or is ours)."""
        if row["id"] in self.tasks:
            return None
        log.warning("reaped_lost_run", task_id=row["id"])
        try:
            return await self._recover_running(row)
        except store.StaleWrite:  # it reached another state meanwhile: that one stands
            return await self.db.get_task(row["id"])

    # Recovery --------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Record runs a dead server left behind, and queue the pending tasks again."""
        for row in await self.db.tasks_in(S.RUNNING):
            await self._recover_running(row)
        for row in await self.db.tasks_in(S.PENDING):
            if row["id"] not in self.tasks:  # a retry's folder may hold segments already
                self._enqueue(TaskState(row, next_segment=1 if row["attempt"] == 1 else None))
        log.info("recovered", pending=len(self.queue))

    async def _sweep_work_folders(self) -> None:
        """Remove the work folders a crashed server's attempts left (their finish never ran):
        those of this database's tasks, unless the task runs that attempt now (at start, after
        `_recover`, none does here); a folder of a task we do not know is another server's."""
        dead = []
        for folder, task_id, attempt in await self.sandbox.work_folders():
            row = await self.db.get_task(task_id)
            if row is not None and (row["status"] != S.RUNNING or row["attempt"] != attempt):
                dead.append(folder)
        if dead:
            removed = await self.sandbox.remove_work_folders(dead)
            log.info("work_folders_swept", removed=removed, found=len(dead))

    async def _recover_running(self, row: dict[str, Any]) -> dict[str, Any]:
        kill_left_behind(row["id"])
        found = await asyncio.to_thread(_finalize_archive, self.settings, row)
        last_seq = max((segment.last_seq for segment in found), default=0)
        total = sum(segment.raw_bytes for segment in found)
        row.update(last_seq=max(last_seq, row["last_seq"]), output_bytes=total)
        error = f"the server stopped during attempt {row['attempt']}"
        common = dict(pid=None, output_bytes=total, last_seq=row["last_seq"], error=error)
        extra = [store.upsert_segment(row["id"], segment) for segment in found]
        state = TaskState(row, where=Where.FINISHING, next_segment=None)
        if row["attempt"] <= row["max_retries"]:
            await self._transition(state, S.PENDING, extra=extra, attempt=row["attempt"] + 1,
                                   run_after=time.time(), **common)
            self._enqueue(state)
        else:
            await self._transition(state, S.FAILED, extra=extra, finished_at=time.time(),
                                   **common)
            self.metrics.child(self.metrics.finished, row["script"], row["status"]).inc()
        log.warning("recovered_interrupted_run", task_id=row["id"], status=row["status"])
        return row


_LIBC = ctypes.CDLL(None) if hasattr(ctypes, "CDLL") else None


async def _trim_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), off the loop.

    Many clients that replayed and left leave their buffers freed but resident: 2,000 of
    them kept ~150 MB after they went (bench replay) without it.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        await asyncio.to_thread(trim, 0)


def _finalize_archive(settings: Settings, row: dict[str, Any]) -> list[Segment]:
    """Make whole the segments a dead server left open, and describe them all for their rows."""
    found, scans = recover(settings.archive_dir, row["logs_path"], deflate_of(settings))
    for scan in scans:
        if not scan.complete:
            log.warning("archive_segment_finalized", task_id=row["id"], path=str(scan.path),
                        frames=scan.frames, problems=scan.problems)
    return found
