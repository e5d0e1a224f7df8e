"""The engine: queue, bounded worker pool, runs, retries, recovery; the only writer of status.

Pending tasks wait in a heap ordered by effective priority, then submission number. A task's
effective priority is its priority plus one level per `aging_s` seconds it has waited since it
was submitted, so a low-priority task behind a steady stream of higher-priority work starts
within about (difference in priority) x `aging_s`. Because every waiting task ages at the same
rate, the order between two tasks never changes while they wait: the heap key
`created_at / aging_s - priority` is fixed at submission. Ties (same priority, same instant)
run in submission order.

A dispatcher loop starts the best eligible task whenever a worker slot is free; a task whose
script is at its `max_concurrency`, or whose retry is not yet due, is passed over without
blocking the others. Every transition goes through `_transition`, which checks the table,
commits the row and the event together, and only then publishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from remoterun import db as dbm
from remoterun.archive import (
    Frame,
    Segment,
    TaskArchive,
    collect_written,
    logs_path_for,
    recover,
)
from remoterun.catalogue import Catalogue, Script, param_value
from remoterun.config import Settings
from remoterun.errors import Conflict, NotFound, QueueFull, Unavailable
from remoterun.hub import Event, Subscription, TaskHub, exit_event, replay_finished
from remoterun.metrics import Metrics
from remoterun.runner import (
    Run,
    RunResult,
    RunSpec,
    SpawnError,
    become_subreaper,
    kill_task_processes,
    tend_orphans,
)
from remoterun.spawn import encode_env
from remoterun.state import TaskStatus, check_transition

log = structlog.get_logger(__name__)
FLUSH_SLICES = 8  # flush ticks per flush_interval_s, each flushing the tasks then due
# A task whose output the compressor thread is this far behind on stops being read until it
# is under BACKLOG_LOW again (looked at every BACKLOG_POLL_S), so it alone waits for the
# thread; the compressor's own bound, which holds the whole loop, is the last resort.
BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1024 * 1024
BACKLOG_POLL_S = 0.005
S = TaskStatus


@dataclass(eq=False)
class Active:
    """A task between dispatch and its final write: its run, archive and stop request."""

    row: dict[str, Any]
    archive: TaskArchive
    stop: asyncio.Future[None] = field(  # done: stop the run
        default_factory=lambda: asyncio.get_running_loop().create_future())
    stop_reason: str | None = None  # "cancel" or "shutdown"
    run: Run | None = None
    early: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    recorded: dict[str, Any] = field(default_factory=dict)  # progress the last flush wrote
    flush_due: float = 0.0  # time.monotonic() of its next flush

    def control(self, method: str, *args: Any) -> None:
        """Call a Run control (write, close_stdin, resize, signal) now, or once it has started:
        a client that saw `running` may type before the spawn has returned."""
        if self.run is None:
            self.early.append((method, args))
        else:
            getattr(self.run, method)(*args)


class Scheduler:
    """Owns every task that has not finished: its queue slot, its run and its hub."""

    def __init__(self, settings: Settings, db: dbm.Database, catalogue: Catalogue,
                 metrics: Metrics):
        self.settings = settings
        self.db = db
        self.catalogue = catalogue
        self.metrics = metrics
        self.accepting = True
        self.hubs: dict[str, TaskHub] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._pending: dict[str, dict[str, Any]] = {}
        self._active: dict[str, Active] = {}  # holding a worker slot
        self._finishing: dict[str, Active] = {}  # process ended, final state being written
        self._per_script: Counter[str] = Counter()
        self._limits: dict[str, int | None] = {}
        self._wake = asyncio.Event()
        self._runs: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._next_num = 1
        self._throttled: set[Active] = set()  # tasks whose output waits for the compressor
        self._backlog_timer: asyncio.TimerHandle | None = None
        # The server's environment, less RR_* (ours to set) and TERM (a PTY task's is ours),
        # encoded once: every task's process starts from it.
        self._inherited_pty = encode_env({k: v for k, v in os.environ.items()
                                          if not k.startswith("RR_") and k != "TERM"})
        self._inherited = encode_env({k: v for k, v in os.environ.items()
                                      if not k.startswith("RR_")})

    # Life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous server left, then start dispatching."""
        top = await self.db.fetch_one("SELECT MAX(num) AS n FROM tasks")
        self._next_num = (top["n"] or 0) + 1 if top else 1
        await self._recover()
        if not become_subreaper():
            log.warning("no_subreaper", detail="double-forked daemons may outlive their task")
        self._loops = [asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
                       asyncio.create_task(self._flush_loop(), name="archive-flusher")]

    def force_stop(self) -> None:
        """Kill every running task now (a second SIGTERM/SIGINT during the drain)."""
        log.warning("shutdown_forced", running=len(self._active))
        for active in self._active.values():
            self._request_stop(active, "shutdown")
            if active.run is not None:
                active.run.signal(signal.SIGKILL)

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let running tasks finish for `grace_s`, then stop the rest."""
        if not self.accepting:
            return
        self.accepting = False
        self._wake.set()
        if self._runs:
            log.info("shutdown_draining", running=len(self._runs), grace_s=grace_s)
            await asyncio.wait(set(self._runs), timeout=grace_s)
        for active in self._active.values():
            self._request_stop(active, "shutdown")
        if self._runs:
            await asyncio.wait(set(self._runs))
        for hub in list(self.hubs.values()):
            hub.publish(Event("status", {"status": hub.task["status"],
                                         "attempt": hub.task["attempt"],
                                         "ts": dbm.rfc3339(time.time()),
                                         "error": "server shutting down"}))

    async def close(self) -> None:
        """Cancel the background loops and any run left (after drain, there is none)."""
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
        for task in [*self._loops, *self._runs]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._runs, return_exceptions=True)
        self._loops = []
        # The compressor thread must have written and closed every file before the process exits.
        await asyncio.gather(*(asyncio.wrap_future(active.archive.close())
                               for active in [*self._active.values(), *self._finishing.values()]))
        await self._flush_tick(everything=True)

    # Submissions -----------------------------------------------------------------------------

    async def submit(self, script: Script, request: dict[str, Any], submitted_by: str,
                     audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a pending task from a validated request; returns its JSON. `audit`, an audit
        entry, is written in the task's own transaction."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new tasks")
        if len(self._pending) >= self.settings.max_pending:  # issue 12: bounded queue
            raise QueueFull(f"{len(self._pending)} tasks are already waiting", retry_after_s=5)
        params = script.validate(request.get("params", {}))
        secret = script.secret_keys
        now = time.time()
        task_id = str(uuid.uuid4())
        row: dict[str, Any] = {
            "num": self._next_num, "id": task_id, "script": script.name, "status": str(S.PENDING),
            "params": json.dumps({k: "***" if k in secret else v for k, v in params.items()}),
            "secret_params": json.dumps({k: v for k, v in params.items() if k in secret}),
            "priority": request.get("priority", 0), "timeout": request.get("timeout"),
            "max_retries": request.get("max_retries", 0), "attempt": 1,
            "pty": request.get("pty", False),
            "interactive": request.get("interactive", False) or request.get("pty", False),
            "stdin": request.get("stdin", ""), "created_at": now, "updated_at": now,
            "submitted_by": submitted_by, "logs_path": logs_path_for(task_id, now),
        }
        self._next_num += 1
        audit_rows = [] if audit is None else [
            dbm.insert_audit(audit, task_id=task_id, script=script.name)]
        await self.db.write([*dbm.insert_task(row), *audit_rows])
        full = {**dict.fromkeys(("exit_code", "error", "started_at", "finished_at",
                                 "run_after", "pid")), "output_bytes": 0, "last_seq": 0, **row}
        self._limits[script.name] = script.max_concurrency
        self._enqueue(full)
        self.metrics.child(self.metrics.submitted, script.name).inc()
        log.info("task_submitted", task_id=task_id, script=script.name,
                 submitted_by=submitted_by)
        return dbm.task_json(full)

    def _enqueue(self, row: dict[str, Any]) -> None:
        self._pending[row["id"]] = row
        aging_s = self.settings.aging_s
        key = row["created_at"] / aging_s - row["priority"] if aging_s else -row["priority"]
        heapq.heappush(self._heap, (key, row["num"], row["id"]))
        self.metrics.pending.set(len(self._pending))
        self._wake.set()

    async def cancel(self, task_id: str, audit: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """Cancel a pending or running task; Conflict if it already ended. `audit` is written
        with the cancellation (for a running task, before it is asked to stop)."""
        active = self._active.get(task_id)
        if active is not None:
            if audit is not None:
                await self.db.write([dbm.insert_audit(audit, task_id=task_id)])
            self._request_stop(active, "cancel")
            return dbm.task_json(active.row)
        if task_id in self._finishing:
            raise Conflict(f"task {task_id} has already ended", code="already_finished")
        row = self._pending.pop(task_id, None)
        if row is None:
            stored = await self.db.get_task(task_id)
            if stored is None:
                raise NotFound(f"no task {task_id}")
            raise Conflict(f"task {task_id} already ended ({stored['status']})",
                           code="already_finished")
        try:
            await self._transition(row, S.CANCELLED, finished_at=time.time(), run_after=None,
                                   extra=[] if audit is None else [
                                       dbm.insert_audit(audit, task_id=task_id)])
        except BaseException:  # nothing was written: it is still pending, and still queued
            self._pending[task_id] = row
            raise
        finally:
            self.metrics.pending.set(len(self._pending))
        self._finish(row)
        return dbm.task_json(row)

    def _request_stop(self, active: Active, reason: str) -> None:
        if active.stop_reason is None:
            active.stop_reason = reason
        if not active.stop.done():
            active.stop.set_result(None)

    # Streams ---------------------------------------------------------------------------------

    def active(self, task_id: str) -> Active | None:
        """The running task's controls, if it is running."""
        return self._active.get(task_id)

    def _hub(self, task_id: str) -> TaskHub | None:
        hub = self.hubs.get(task_id)
        if hub is not None:
            return hub
        active = self._active.get(task_id) or self._finishing.get(task_id)
        row = active.row if active else self._pending.get(task_id)
        if row is None:
            return None
        hub = TaskHub(dbm.task_json(row), memory_bytes=self.settings.replay_memory_bytes,
                      next_seq=row["last_seq"] + 1,
                      flush_archive=lambda: self._start_flush(task_id))
        self.hubs[task_id] = hub
        return hub

    async def require_task(self, task_id: str) -> None:
        """NotFound unless the task exists."""
        if task_id in self._pending or task_id in self._active or task_id in self._finishing:
            return
        if await self.db.get_task(task_id) is None:
            raise NotFound(f"no task {task_id}")

    async def subscribe(self, task_id: str, since: int) -> Subscription:
        """Every frame after `since`, then live output and status, then the exit event."""
        limit = self.settings.client_queue_bytes
        hub = self._hub(task_id)
        if hub is not None:
            return hub.subscribe(since, self.settings.archive_dir, limit)
        row = await self.db.get_task(task_id)
        if row is None:
            raise NotFound(f"no task {task_id}")
        hub = self._hub(task_id)  # it may have been enqueued while we read
        if hub is not None:
            return hub.subscribe(since, self.settings.archive_dir, limit)
        return replay_finished(row, dbm.task_json(row), since, self.settings.archive_dir, limit)

    def _start_flush(self, task_id: str) -> Future[None] | None:
        """Start a flush of the task's current archive (whichever attempt is writing)."""
        active = self._active.get(task_id) or self._finishing.get(task_id)
        return active.archive.flush() if active is not None else None

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
        skipped: list[tuple[float, int, str]] = []
        next_due: float | None = None
        now = time.time()
        while self._heap and self.accepting and len(self._active) < self.settings.workers:
            entry = heapq.heappop(self._heap)
            row = self._pending.get(entry[2])
            if row is None or row["status"] != S.PENDING:
                continue  # cancelled, or a stale entry
            limit = self._limits.get(row["script"])
            if row["run_after"] and row["run_after"] > now:
                due = row["run_after"] - now
                next_due = due if next_due is None else min(next_due, due)
                skipped.append(entry)
            elif limit is not None and self._per_script[row["script"]] >= limit:
                skipped.append(entry)
            else:
                del self._pending[entry[2]]
                self._launch(row)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        self.metrics.pending.set(len(self._pending))
        return next_due

    def _launch(self, row: dict[str, Any]) -> None:
        archive = TaskArchive(self.settings.archive_dir, row["logs_path"],
                              level=self.settings.gzip_level,
                              segment_max_bytes=self.settings.segment_max_bytes,
                              segment_max_age_s=self.settings.segment_max_age_s or None,
                              fresh=row["attempt"] == 1)
        active = self._active[row["id"]] = Active(row, archive)
        active.flush_due = time.monotonic() + self.settings.flush_interval_s * random.random()
        self._per_script[row["script"]] += 1
        self._own(self._run(active))

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    # One attempt -----------------------------------------------------------------------------

    async def _run(self, active: Active) -> None:
        row = active.row
        with structlog.contextvars.bound_contextvars(task_id=row["id"], attempt=row["attempt"]):
            result: RunResult | None = None
            error: str | None = None
            started = time.time()
            self.metrics.running.inc()
            try:
                await self._transition(row, S.RUNNING, started_at=row["started_at"] or started,
                                       run_after=None, error=None, exit_code=None)
                try:
                    run = active.run = await self._start(active)
                    row["pid"] = run.pid  # persisted by the next flush tick
                    for method, args in active.early:
                        getattr(run, method)(*args)
                    active.early.clear()
                    result = await run.wait(self._timeout(row), active.stop)
                except SpawnError as exc:
                    error = str(exc)
                except Exception as exc:  # a bug of ours must not kill the worker
                    log.exception("run_crashed")
                    error = f"internal error: {exc}"
            finally:
                self.metrics.running.dec()
                duration = self.metrics.child(self.metrics.duration, row["script"])
                duration.observe(time.time() - started)
                await asyncio.shield(self._conclude(active, result, error))

    async def _start(self, active: Active) -> Run:
        row = active.row
        if active.stop.done():
            raise SpawnError("cancelled before it started")
        try:
            script = self.catalogue.resolve(row["script"])
        except NotFound as exc:
            raise SpawnError(f"script {row['script']!r} is no longer runnable: {exc.message}"
                             ) from exc
        hub = self._hub(row["id"])
        assert hub is not None
        archive = active.archive
        cap = script.extra.get("max_output_bytes") or self.settings.max_output_bytes or None

        def on_output(stream: str, data: bytes) -> None:
            if cap is not None and row["output_bytes"] + len(data) > cap:
                data = data[: cap - row["output_bytes"]]  # keep up to the cap, drop the rest
                self._request_stop(active, "output_cap")
                if not data:
                    return
            frame: Frame = hub.frame(stream, data, time.time())
            archive.write(frame)
            hub.publish(frame)
            row["output_bytes"] += len(data)
            row["last_seq"] = frame.seq
            self.metrics.child(self.metrics.output_bytes, stream).inc(len(data))
            if archive.backlog.bytes > BACKLOG_HIGH:
                self._throttle(active)

        run = Run(self._spec(row, script), on_output, read_chunk=self.settings.read_chunk_bytes,
                  kill_grace_s=self.settings.kill_grace_s,
                  drain_grace_s=self.settings.drain_grace_s,
                  coalesce_s=self.settings.coalesce_ms / 1000)
        await run.start()
        log.debug("task_started", pid=run.pid, script=row["script"])
        return run

    def _throttle(self, active: Active) -> None:
        """Pause reading a task's output until the compressor thread has caught up with it."""
        run = active.run
        if run is None or run.paused:
            return
        run.pause()
        self.metrics.output_paused.inc()
        self._throttled.add(active)
        if self._backlog_timer is None:
            self._backlog_timer = asyncio.get_running_loop().call_later(
                BACKLOG_POLL_S, self._unthrottle)

    def _unthrottle(self) -> None:
        collect_written()
        for active in list(self._throttled):
            if active.archive.backlog.bytes <= BACKLOG_LOW or self._active.get(
                    active.row["id"]) is not active:
                self._throttled.discard(active)
                if active.run is not None:
                    active.run.resume()
        self._backlog_timer = None
        if self._throttled:
            self._backlog_timer = asyncio.get_running_loop().call_later(
                BACKLOG_POLL_S, self._unthrottle)

    def _spec(self, row: dict[str, Any], script: Script) -> RunSpec:
        params: dict[str, Any] = json.loads(row["params"])
        params.update(json.loads(row["secret_params"]))
        env = {f"RR_PARAM_{k.upper()}": param_value(v) for k, v in params.items()}
        env.update(RR_TASK_ID=row["id"], RR_ATTEMPT=str(row["attempt"]))
        if row["pty"]:
            env["TERM"] = "xterm-256color"
        cwd = self.catalogue.root
        if script.cwd is not None:
            cwd = script.cwd if script.cwd.is_absolute() else cwd / script.cwd
        return RunSpec(
            argv=[str(script.path), *(f"--{k}={param_value(v)}" for k, v in params.items())],
            env=env, cwd=cwd, pty=bool(row["pty"]), interactive=bool(row["interactive"]),
            stdin=row["stdin"].encode(),
            inherited=self._inherited_pty if row["pty"] else self._inherited,
        )

    def _timeout(self, row: dict[str, Any]) -> float | None:
        if row["timeout"] is not None:
            return float(row["timeout"])
        with contextlib.suppress(NotFound):
            script_timeout = self.catalogue.resolve(row["script"]).timeout_s
            if script_timeout is not None:
                return float(script_timeout)
        return self.settings.default_timeout_s

    async def _conclude(self, active: Active, result: RunResult | None, error: str | None
                        ) -> None:
        """Record how the attempt ended; schedule a retry or finish the task."""
        row = active.row
        now = time.time()
        closing = active.archive.close()  # a short run's: written at once, already done
        # The process is gone: free its worker slot now, not after the final write commits.
        self._finishing[row["id"]] = self._active.pop(row["id"])
        self._per_script[row["script"]] -= 1
        self._wake.set()
        status, exit_code = S.FAILED, None
        if result is not None:
            exit_code = result.exit_code
            if result.stopped == "timeout":
                status, error = S.TIMEOUT, f"killed after running past its timeout of " \
                                           f"{self._timeout(row)} s"
            elif active.stop_reason == "cancel":
                status, error = S.CANCELLED, None
            elif active.stop_reason == "shutdown":
                error = "the server shut down during the run"
            elif active.stop_reason == "output_cap":
                error = f"stopped when its output reached the cap of {row['output_bytes']} " \
                        f"bytes (max_output_bytes); the output up to the cap is kept"
            elif exit_code == 0:
                status = S.SUCCESS
        elif active.stop_reason == "cancel":
            status = S.CANCELLED
        if not closing.done():  # (wrapping a done future still costs a wake-up of the loop)
            await asyncio.wrap_future(closing)
        closing.result()  # the files whole and closed, the rows' gz_bytes exact
        extra = self._segment_statements(row, active.archive)
        try:
            if status in (S.FAILED, S.TIMEOUT) and row["attempt"] <= row["max_retries"]:
                delay = self._backoff(row)
                await self._transition(
                    row, S.PENDING, extra=extra, attempt=row["attempt"] + 1, exit_code=exit_code,
                    error=error, run_after=now + delay, pid=None,
                    output_bytes=row["output_bytes"], last_seq=row["last_seq"])
                self.metrics.child(self.metrics.retries, row["script"]).inc()
                self._enqueue(row)
                return
            await self._transition(row, status, extra=extra, exit_code=exit_code, error=error,
                                   finished_at=now, pid=None, output_bytes=row["output_bytes"],
                                   last_seq=row["last_seq"])
        finally:
            self._finishing.pop(row["id"], None)
        self._finish(row)

    def _backoff(self, row: dict[str, Any]) -> float:
        base = self.settings.retry_base_s
        with contextlib.suppress(NotFound):
            base = float(self.catalogue.resolve(row["script"]).extra.get("retry_base_s", base))
        delay = min(self.settings.retry_cap_s, base * 2 ** (row["attempt"] - 1))
        return float(delay * random.uniform(0.5, 1.0))

    def _finish(self, row: dict[str, Any]) -> None:
        """Announce the end and forget the task: late clients replay it from the archive."""
        self.metrics.child(self.metrics.finished, row["script"], row["status"]).inc()
        hub = self.hubs.pop(row["id"], None)
        if hub is not None:
            hub.publish(exit_event(row))
        log.info("task_finished", task_id=row["id"], script=row["script"], status=row["status"],
                 exit_code=row["exit_code"], error=row["error"],
                 output_bytes=row["output_bytes"])

    async def _transition(self, row: dict[str, Any], new: TaskStatus,
                          extra: list[dbm.Statement] | None = None, **fields: Any) -> None:
        """Check, persist, then announce a status change."""
        old = S(row["status"])
        check_transition(old, new)
        fields["updated_at"] = time.time()
        attempt = fields.get("attempt", row["attempt"])
        statements = dbm.transition(row["id"], old, new, attempt, dict(fields),
                                    detail=fields.get("error"))
        await self.db.write([*(extra or []), *statements])
        row.update(fields, status=str(new))
        hub = self.hubs.get(row["id"])
        if hub is not None:
            hub.task = dbm.task_json(row)
            body = {"status": str(new), "attempt": row["attempt"],
                    "ts": dbm.rfc3339(fields["updated_at"])}
            if new is not S.RUNNING:
                body.update(exit_code=row["exit_code"], error=row["error"])
            hub.publish(Event("status", body))

    # Archive bookkeeping ---------------------------------------------------------------------

    def _segment_statements(self, row: dict[str, Any], archive: TaskArchive
                            ) -> list[dbm.Statement]:
        return [dbm.upsert_segment(row["id"], seg) for seg in archive.take_dirty()]

    async def _flush_loop(self) -> None:
        """Flush each running task's archive every `flush_interval_s`, in slices.

        Each task is due at its own time (its first flush a random part of the interval after
        its start), and the loop wakes FLUSH_SLICES times per interval to flush those due: a
        hundred tasks started together do not all sync their files (and deflate the batches
        those hold) in the same moment, which held every writer behind the compressor thread
        at once (bench latency: p99 beside 100 flooding tasks ~40 -> ~30 ms).
        """
        interval = self.settings.flush_interval_s
        last_reap = last_checkpoint = time.monotonic()
        while True:
            await asyncio.sleep(interval / FLUSH_SLICES)
            try:
                await self._flush_tick()
                now = time.monotonic()
                if now - last_checkpoint >= interval:
                    last_checkpoint = now
                    await self.db.checkpoint()
                if now - last_reap >= self.settings.reaper_interval_s:
                    last_reap = now
                    await self._reap_lost_runs()
            except Exception:
                log.exception("flush_failed")

    async def _reap_lost_runs(self) -> None:
        """Record tasks marked running that no run of this server owns (their process is gone)."""
        def owned(task_id: str) -> bool:
            return task_id in self._active or task_id in self._finishing

        for row in await self.db.tasks_in(S.RUNNING):
            if owned(row["id"]):
                continue
            fresh = await self.db.get_task(row["id"])  # it may have finished while we looked
            if fresh and fresh["status"] == S.RUNNING and not owned(row["id"]):
                log.warning("reaped_lost_run", task_id=row["id"])
                await self._recover_running(fresh)

    async def _flush_tick(self, everything: bool = False) -> None:
        for pid in tend_orphans(self._active):
            log.info("orphan_killed", pid=pid)
        now = time.monotonic()
        due = [active for active in self._active.values()
               if everything or active.flush_due <= now]
        for active in due:
            active.flush_due = now + self.settings.flush_interval_s
        # Record what is on disk: the counts as the flush is handed to the compressor thread.
        flushed = [(active, active.archive.flush(),
                    {k: active.row[k] for k in ("output_bytes", "last_seq", "pid")})
                   for active in due]
        await asyncio.gather(*(asyncio.wrap_future(flush) for _, flush, _ in flushed
                               if not flush.done()))
        statements: list[dbm.Statement] = []
        for active, _, counts in flushed:
            row = active.row
            if self._active.get(row["id"]) is not active:
                continue  # it ended meanwhile: its final write records all of this and more
            statements += self._segment_statements(row, active.archive)
            if counts == active.recorded:
                continue  # a quiet task: nothing new to write
            active.recorded = counts
            statements.append(dbm.update_task(row["id"], counts))
            hub = self.hubs.get(row["id"])
            if hub is not None:
                hub.task.update(output_bytes=counts["output_bytes"], last_seq=counts["last_seq"])
        if statements:
            await self.db.write(statements)

    # Recovery --------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Record runs a dead server left behind, and queue the pending tasks again."""
        for row in await self.db.tasks_in(S.RUNNING):
            await self._recover_running(row)
        for row in await self.db.tasks_in(S.PENDING):
            if row["id"] not in self._pending:
                self._enqueue(row)
        log.info("recovered", pending=len(self._pending))

    async def _recover_running(self, row: dict[str, Any]) -> None:
        _kill_orphans(row)
        found = await asyncio.to_thread(_finalize_archive, self.settings, row)
        last_seq = max((segment.last_seq for segment in found), default=0)
        total = sum(segment.raw_bytes for segment in found)
        row.update(last_seq=max(last_seq, row["last_seq"]), output_bytes=total)
        error = f"the server stopped during attempt {row['attempt']}"
        common = dict(pid=None, output_bytes=total, last_seq=row["last_seq"], error=error)
        extra = [dbm.upsert_segment(row["id"], segment) for segment in found]
        if row["attempt"] <= row["max_retries"]:
            await self._transition(row, S.PENDING, extra=extra, attempt=row["attempt"] + 1,
                                   run_after=time.time(), **common)
            self._enqueue(row)
        else:
            await self._transition(row, S.FAILED, extra=extra, finished_at=time.time(), **common)
            self.metrics.child(self.metrics.finished, row["script"], row["status"]).inc()
        log.warning("recovered_interrupted_run", task_id=row["id"], status=row["status"])


def _finalize_archive(settings: Settings, row: dict[str, Any]) -> list[Segment]:
    """Make whole the segments a dead server left open, and describe them all for their rows."""
    found, scans = recover(settings.archive_dir, row["logs_path"], settings.gzip_level)
    for scan in scans:
        if not scan.complete:
            log.warning("archive_segment_finalized", task_id=row["id"], path=str(scan.path),
                        frames=scan.frames, problems=scan.problems)
    return found


def _kill_orphans(row: dict[str, Any]) -> None:
    """SIGKILL whatever a dead server's run of this task left behind, found by RR_TASK_ID.

    Its processes run in sessions of their own, so they outlive the server; the environment
    marks them even when their pid was never recorded (a crash within a flush interval).
    """
    kill_task_processes(row["id"], (int(e.name) for e in os.scandir("/proc") if e.name.isdigit()))
