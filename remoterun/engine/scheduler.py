"""The engine: one TaskState per live task, submit, cancel, dispatch, drain; the only writer of
status.

A live task (pending and held here, running, or between the two) has exactly one `TaskState`
in `Scheduler.tasks` (engine/live.py). A task leaves the dict when its final state is
committed, and never comes back; a task in the database that no state of this server holds
is not ours.

Every status change goes through `transition`: it checks the table, commits the row and the
event together (guarded by the old status, and by whatever the peers add: a cluster
node's epoch, the task's attempt and owner), and only then publishes. The engine's commits
queue in order behind one lock and wait out a busy or unreachable database.

The scheduler is the same class on one server and on a cluster node; it is composed of parts
that `api/app.py` builds: a `Queue` (engine/queue.py; the cluster's claims), a `Peers`
(engine/peers.py; a cluster node), a `publish` hook that puts each live task's output on
the cluster's relay, the `Protection` and the `Sandbox`; and of its own parts, the same in
both modes: the runs (engine/runs.py), recovery (engine/recovery.py), upkeep
(engine/upkeep.py) and the commits (engine/writes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any

import structlog

from remoterun import store
from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue, Script
from remoterun.config import Settings
from remoterun.engine import recovery, upkeep
from remoterun.engine.attempt import Attempt
from remoterun.engine.feed import TaskFeed
from remoterun.engine.live import TaskState, Where, new_task
from remoterun.engine.peers import Peers
from remoterun.engine.protect import Protection
from remoterun.engine.queue import Queue
from remoterun.engine.runs import Runs
from remoterun.engine.streams import Publish, Streams
from remoterun.engine.writes import Once, Writes
from remoterun.errors import Conflict, IntegrityFailed, Unavailable
from remoterun.isolation.sandbox import Sandbox
from remoterun.metrics import Metrics
from remoterun.reaper import become_subreaper, tend_orphans
from remoterun.spawn import Children
from remoterun.state import FINAL, Task, TaskStatus, check_transition
from remoterun.vault import NONE
from remoterun.wire import Event, exit_event, rfc3339

log = structlog.get_logger(__name__)
S = TaskStatus
DISPATCH_RETRY_S = 0.5  # after a failed take (a claim the database refused)


class Scheduler:
    """Owns every live task: its queue slot, its attempt and its hub."""

    def __init__(self, settings: Settings, db: store.Store, catalogue: Catalogue,
                 metrics: Metrics, compressor: Compressor, children: Children, *,
                 protection: Protection, sandbox: Sandbox, queue: Queue,
                 peers: Peers, publish: Publish | None = None,
                 feed: TaskFeed | None = None):
        self.settings, self.db, self.catalogue = settings, db, catalogue
        self.metrics, self.compressor, self.children = metrics, compressor, children
        self.protection, self.sandbox = protection, sandbox
        self.queue, self.peers, self.publish = queue, peers, publish
        self.accepting = True
        self.tasks: dict[str, TaskState] = {}
        self.feed = feed or TaskFeed()  # every committed transition, for GET /events
        # Called after each committed transition (metrics, alerts: set by api/app.py); it
        # must not block or raise.
        self.on_transition: Callable[[dict[str, Any], TaskStatus, TaskStatus], None] = \
            lambda row, old, new: None
        self.problems: dict[str, str] = {}  # what /readyz reports: kind -> latest failure
        self._wake = asyncio.Event()
        self.once = Once()
        self.writes = Writes(db, peers, settings.db_retry_s, self.problems, self.once)
        self.recovery = recovery.Recovery(self, settings, db, queue, peers)
        self.streams = Streams(self, settings, db, queue, peers, self.recovery, publish,
                               self.writes.request_wait_s)
        # What the API and the peers ask of the engine about streams: the streams' answers.
        self.hub, self.subscribe, self.attempt = \
            self.streams.hub, self.streams.subscribe, self.streams.attempt
        self.held_attempt, self.flush_archive, self.live_row = \
            self.streams.held_attempt, self.streams.flush_archive, self.streams.live_row
        self.replay_slots = self.streams.replay_slots
        self.runs = Runs(self, settings, catalogue, metrics, compressor, children, protection,
                         sandbox, queue, peers, self.recovery, self.once)
        self._owned: set[asyncio.Task[None]] = set()  # small writes and controls
        self._dispatcher: asyncio.Task[None] | None = None
        self.upkeep = upkeep.Upkeep([
            upkeep.Job("flush", settings.flush_interval_s / upkeep.FLUSH_SLICES,
                       self._flush_tick),
            upkeep.Job("checkpoint", settings.flush_interval_s, self.db.checkpoint),
            upkeep.Job("reap", peers.orphan_interval_s, self.recovery.reap),
            upkeep.Job("trim", upkeep.TRIM_INTERVAL_S, upkeep.trim_memory)])

    # Life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join, record what an earlier server left, then start dispatching."""
        sealing = await self.protection.open(self.db)
        if sealing:  # an older server's secrets in clear: sealed, and no copy left in the log
            await self.commit(sealing)
            await self.db.checkpoint(truncate=True)
            log.warning("secrets_sealed", tasks=len(sealing))
        await self.peers.join(self)
        await self.recovery.recover()
        await self.sandbox.start()
        await self.recovery.sweep_work_folders(self.sandbox)
        if not become_subreaper():
            log.warning("no_subreaper", detail="double-forked daemons may outlive their task")
        await self.queue.start(self._wake.set)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatcher")
        self.upkeep.start()

    @property
    def alive(self) -> bool:
        """Whether the dispatcher, the upkeep loops and the peers' are running."""
        return self._dispatcher is not None and not self._dispatcher.done() and \
            self.upkeep.alive and self.peers.alive

    def force_stop(self) -> None:
        """Kill every running task now (a second SIGTERM/SIGINT during the drain)."""
        log.warning("shutdown_forced", running=self.runs.busy)
        self.kill_all("shutdown")

    def kill_all(self, reason: str) -> None:
        """Stop every attempt now (SIGKILL)."""
        for attempt in self._attempts():
            attempt.request_stop(reason)
            if attempt.run is not None:
                attempt.run.signal(signal.SIGKILL)

    async def abandon(self, wait_s: float) -> bool:
        """Once every run has ended (each writing nothing: fenced), forget every task; False
        while some run has not ended after `wait_s`."""
        running = set(self.runs.running)
        if running:
            await asyncio.wait(running, timeout=wait_s)
            if not all(task.done() for task in running):
                return False
        self.tasks.clear()
        return True

    def recover_again(self) -> None:
        """Record in the background what this server's previous epoch left (rejoined)."""
        self.own(self.recovery.recover(), name="recover")

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let running tasks finish for `grace_s`, then stop the rest."""
        if not self.accepting:
            return
        self.accepting = False
        self._wake.set()
        if self.runs.running:
            log.info("shutdown_draining", running=len(self.runs.running), grace_s=grace_s)
            await asyncio.wait(set(self.runs.running), timeout=grace_s)
        for attempt in self._attempts():
            attempt.request_stop("shutdown")
        if self.runs.running:
            await asyncio.wait(set(self.runs.running))
        for state in list(self.tasks.values()):
            if state.hub is not None:
                task = state.task
                state.hub.publish(Event("status", {
                    "status": str(task.status), "attempt": task.attempt,
                    "ts": rfc3339(time.time()), "error": "server shutting down"}))

    async def close(self) -> None:
        """Cancel the background loops and whatever is left, writing what can be written."""
        self.writes.closing = True
        loops = [self._dispatcher] if self._dispatcher is not None else []
        for task in [*loops, *self._owned]:
            task.cancel()
        await asyncio.gather(*loops, *self._owned, self.upkeep.close(), return_exceptions=True)
        self._dispatcher = None
        # The compressor thread must have written and closed every file before the process exits.
        await asyncio.gather(*(asyncio.wrap_future(a.archive.close()) for a in self._attempts()))
        try:
            await self._flush_tick(everything=True)
        except Exception:
            log.exception("final_flush_failed")
        await self.sandbox.close()
        await self.queue.close()
        await self.peers.close()

    def _attempts(self) -> list[Attempt]:
        return [s.attempt for s in self.tasks.values() if s.attempt is not None]

    def own(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background coroutine that close() cancels and whose exception is logged."""
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._reap_owned)
        return task

    def _reap_owned(self, task: asyncio.Task[None]) -> None:
        self._owned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(),
                      exc_info=task.exception())

    def wake(self) -> None:
        """Have the dispatcher look at the queue again."""
        self._wake.set()

    # Commits ---------------------------------------------------------------------------------

    async def commit(self, statements: list[store.Statement], within_s: float | None = None
                     ) -> int | None:
        """The engine's commit (in order, until it lands), or a request's (`within_s`)."""
        if within_s is not None:
            return await self.writes.request(statements, within_s)
        return await self.writes.engine(statements)

    async def record(self, statements: list[store.Statement]) -> None:
        """Commit what a request records beside the engine's writes (audit rows), in order
        behind them; Unavailable once the database stayed busy past a request's wait."""
        await self.commit(statements, within_s=self.writes.request_wait_s)

    async def transition(self, state: TaskState, new: TaskStatus,
                         extra: Iterable[store.Statement] = (), within_s: float | None = None,
                         **fields: Any) -> None:
        """Check, persist (with the peers' guards), then announce a status change.
        `within_s`: a request's, which gets Unavailable past it; the engine's wait."""
        task = state.task
        old = task.status
        check_transition(old, new)
        fields["updated_at"] = time.time()
        if new in FINAL and task.secret_params != NONE:
            fields["secret_params"] = NONE  # its secrets are not needed any more: dropped
        attempt = fields.get("attempt", task.attempt)
        guards, after = self.peers.fence(task, new)
        wake = self.queue.requeued() if new is S.PENDING else []
        statements = store.transition(task.id, old, new, attempt, dict(fields),
                                      detail=fields.get("error"))
        event_id = await self.commit([*guards, *extra, *wake, *statements], within_s)
        state.record(task := task.evolve(**fields, **after, status=new))
        row = task.to_row()  # the listeners' own copy
        self.feed.publish(event_id, row, str(old), fields)  # GET /events
        if state.hub is not None:
            body = {"status": str(new), "attempt": task.attempt,
                    "ts": rfc3339(fields["updated_at"])}
            if new is not S.RUNNING:
                body.update(exit_code=task.exit_code, error=task.error)
            state.hub.publish(Event("status", body))
        self.on_transition(row, old, new)

    # Submissions and cancels -----------------------------------------------------------------

    async def submit(self, script: Script, request: dict[str, Any], submitted_by: str,
                     audit: dict[str, Any] | None = None,
                     extra: Callable[[str], list[store.Statement]] | None = None
                     ) -> dict[str, Any]:
        """Create a pending task from a validated request; returns its JSON. `audit`, an audit
        entry, is written in the task's own transaction, and so are the statements `extra`
        makes for the new task's id (a hook's delivery, a schedule's slot: it and the task
        exist together; StaleWrite when one of its guards fails, and then no task exists)."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new tasks")
        self.peers.writable()
        placement = await self.queue.admit(script.name, request)
        params = script.validate(request.get("params", {}))
        try:
            await self.protection.check(script)
        except IntegrityFailed as exc:
            await self._refused(script, exc, audit)
            raise
        now = time.time()
        task_id = str(uuid.uuid4())
        shown, sealed = self.protection.seal(task_id, script, params)
        task = new_task(await self.queue.number(), task_id, script.name, request, shown,
                        sealed, submitted_by, now)
        audit_rows = [] if audit is None else [
            store.insert_audit(audit, task_id=task_id, script=script.name)]
        if extra is not None:
            audit_rows.extend(extra(task_id))
        insert, event = store.insert_task(task.to_row())
        # The event's insert last: its row id is the feed's event id.
        event_id = await self.commit([*audit_rows, *self.queue.entry(insert, placement), event],
                                      within_s=self.writes.request_wait_s)
        self.feed.publish(event_id, task.to_row(), None)  # GET /events
        self.enqueue(TaskState(task))
        self.metrics.child(self.metrics.submitted, script.name).inc()
        log.info("task_submitted", task_id=task_id, script=script.name,
                 submitted_by=submitted_by)
        return task.to_json()

    async def _refused(self, script: Script, exc: IntegrityFailed,
                       audit: dict[str, Any] | None) -> None:
        """Log and audit a submission refused by the script's integrity check."""
        log.warning("integrity_failed", script=script.name, error=exc.message)
        if audit is not None:
            await self.commit([store.insert_audit(
                {**audit, "result": exc.code, "detail": exc.message[:1000]},
                script=script.name)], within_s=self.writes.request_wait_s)

    def enqueue(self, state: TaskState) -> None:
        """The task waits: held here if the queue is this server's, else in the database."""
        state.where = Where.QUEUED
        state.attempt = None
        if self.queue.put(state.task.to_row()):
            self.tasks[state.task.id] = state
        else:
            self.tasks.pop(state.task.id, None)
        self._wake.set()

    async def cancel(self, task_id: str, audit: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """Cancel a pending or running task wherever it is; Conflict if it already ended.
        `audit` is written with the cancellation (for a running task, before it is asked)."""
        self.peers.writable()
        audit_rows = [] if audit is None else [store.insert_audit(audit, task_id=task_id)]
        state = self.tasks.get(task_id)
        if state is None:
            return await self.streams.cancel_elsewhere(task_id, audit_rows)
        if state.where is Where.FINISHING:
            raise Conflict(f"task {task_id} has already ended ({state.task.status})",
                           code="already_finished")
        if state.attempt is not None:  # starting or running: its run ends it
            if audit_rows:
                await self.commit(audit_rows, within_s=self.writes.request_wait_s)
            state.attempt.request_stop("cancel")
            return state.task.to_json()
        assert self.queue.remove(task_id) is not None
        state.where = Where.FINISHING
        try:
            await self.transition(state, S.CANCELLED, finished_at=time.time(), run_after=None,
                                  extra=audit_rows, within_s=self.writes.request_wait_s)
        except BaseException:
            self.enqueue(state)  # nothing was recorded: it waits as before
            raise
        self.finish(state)
        return state.task.to_json()

    async def queue_positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """The 1-based place in dispatch order of each of `task_ids` that waits in the queue."""
        return await self.queue.positions(task_ids) if task_ids else {}

    # Dispatch --------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            wait_s = await self._start_eligible()
            if wait_s == 0:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    async def _start_eligible(self) -> float | None:
        """Start what the queue gives for the free slots; how long to wait for a wake before
        looking again (None: until woken; 0: at once)."""
        slots = self.settings.workers - self.runs.busy if self.accepting else 0
        try:
            rows, wait_s = await self.queue.take(slots, time.time(), self.tasks.keys())
            self.once.forget("claim_failed")
        except Exception as exc:  # busy, fenced, unreachable: the next look may do better
            self.problems["database"] = str(exc)
            self.once.warn("claim_failed", "", error=str(exc))
            return DISPATCH_RETRY_S
        for row in rows:  # held here already (a local queue's), or new (claimed)
            state = self.tasks.get(row["id"]) or TaskState(
                Task.from_row(row), next_segment=1 if row["attempt"] == 1 else None)
            self.tasks[row["id"]] = state
            self.runs.launch(state)
        return wait_s

    def finish(self, state: TaskState) -> None:
        """Announce the end and forget the task: late clients replay it from the archive."""
        task = state.task
        self.tasks.pop(task.id, None)
        self.metrics.child(self.metrics.finished, task.script, str(task.status)).inc()
        if state.hub is not None:
            state.hub.publish(exit_event(task.to_row()))
        log.info("task_finished", task_id=task.id, script=task.script, status=str(task.status),
                 exit_code=task.exit_code, error=task.error, output_bytes=task.output_bytes)

    # Upkeep and recovery ---------------------------------------------------------------------

    async def _flush_tick(self, everything: bool = False) -> None:
        """Kill orphaned processes; flush the archives due and record what they made true."""
        running = {tid for tid, s in self.tasks.items() if s.where is not Where.QUEUED}
        for pid in tend_orphans(self.children, running):
            log.info("orphan_killed", pid=pid)
        await upkeep.flush(list(self.tasks.values()), self.settings.flush_interval_s,
                           self.writes, everything)
