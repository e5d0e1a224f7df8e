"""The engine of one node of a cluster: the queue is PostgreSQL's, the live output Redis's.

It is the single-node `Scheduler` with these parts replaced:
- Submissions are rows any node may claim (placement: `node`, `labels`; only nodes whose
  scripts/ has the script), with a NOTIFY that wakes idle nodes at once. Nothing waits in a
  local queue: the dispatcher claims up to its free `engine.workers` slots from the database
  (`PostgresDatabase.claim`), and a retry goes back to the cluster's queue.
- Every write carries the node's fence (its row, this process's epoch, not lost) and every
  write of a task's state the task's (this attempt, this owner, the status it had): a node that
  was declared lost and comes back changes nothing that others recorded.
- Heartbeats: each node refreshes its row; one that stays silent past `node_timeout_s` is
  declared lost by whichever node gets there first (exactly once), and its running tasks are
  recorded failed, "node X was lost during attempt N", or queued again per their retries.
- Fencing: each node's watchdog process (`cluster.watchdog`) kills the node's runs once its
  lease has gone unrenewed for half of `node_timeout_s`, before any other node may take them
  over; the node then writes nothing of them and joins again under a new epoch.
- Clients follow any task through its Redis stream (`cluster.follow`), and controls for a task
  another node runs go to it through Redis (`cluster.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
import time
import uuid
from collections import Counter
from typing import Any

import structlog

from remoterun import store
from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue, Script
from remoterun.cluster.control import KEY_PURPOSE, Action, Control, Controls
from remoterun.cluster.follow import RemoteControl, RemoteSubscription
from remoterun.cluster.relay import Relay, RelaySink
from remoterun.cluster.watchdog import Watchdog, lease_clock
from remoterun.config import Settings
from remoterun.engine.hub import Subscription, TaskHub, replay_finished
from remoterun.engine.scheduler import Scheduler, TaskState, Where, _finalize_archive
from remoterun.errors import BadRequest, Conflict, InvalidParams, NotFound, QueueFull, Unavailable
from remoterun.metrics import Metrics
from remoterun.reaper import become_subreaper, kill_left_behind
from remoterun.spawn import Children
from remoterun.state import FINAL, TaskStatus
from remoterun.store import postgres as pg
from remoterun.wire import task_json

log = structlog.get_logger(__name__)
S = TaskStatus
POLL_S = 1.0  # the dispatcher looks at the queue at least this often (a NOTIFY may be lost)
SCAN_S = 10.0  # how often the node lists its scripts/ again for its row
REQUEST_SLOW_S = 15.0  # beyond the wait for PostgreSQL, what a request's write may queue
PENDING_COUNT_S = 0.5  # engine.max_pending is checked against a count this fresh
CONTROL_RETRY_S = 1.0  # a cancel may reach the owner a moment before its claim is held
# The placement of the submission being committed (see `_commit`).
_PLACING: contextvars.ContextVar[tuple[str | None, list[str] | None] | None] = \
    contextvars.ContextVar("placing", default=None)


class ClusterScheduler(Scheduler):
    """One node's engine over the cluster's PostgreSQL queue and Redis streams."""

    db: pg.PostgresDatabase

    def __init__(self, settings: Settings, db: pg.PostgresDatabase, catalogue: Catalogue,
                 metrics: Metrics, compressor: Compressor, children: Children, relay: Relay):
        super().__init__(settings, db, catalogue, metrics, compressor, children)
        assert settings.cluster is not None
        self.cluster = settings.cluster
        self.node = settings.cluster.node
        self.epoch = uuid.uuid4().hex
        self.relay = relay
        relay.on_control = self._on_control
        self.scripts: list[str] = []
        self.limits: dict[str, int] = {}
        self.remote_rows: dict[str, dict[str, Any]] = {}  # followed here, run elsewhere
        self._followers: Counter[str] = Counter()
        self._listener: Any = None
        self._pending_n, self._pending_at = 0, -PENDING_COUNT_S
        self._healthy_since: float | None = None  # monotonic: beating since (None: not now)
        self._claim_unsure = False  # a claim failed: it may have committed all the same
        db.fence = lambda: pg.node_fence(self.node, self.epoch)
        self.watchdog = Watchdog(fence_s(self.cluster.node_timeout_s), self._on_fenced, children)

    # Life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster, record what an earlier run of this node left, start the loops."""
        await self._scan()
        sent_at = lease_clock()
        await self._register()
        self.watchdog.start(sent_at)
        vault = await self.protection.open_key()
        self.relay.controls = Controls(vault.derive(KEY_PURPOSE))
        await self._recover()
        await self.sandbox.start()
        if not become_subreaper():
            log.warning("no_subreaper", detail="double-forked daemons may outlive their task")
        await self.relay.start()
        with contextlib.suppress(*pg.CONNECTION_ERRORS):
            self._listener = await self.db.listen(self._wake.set)
        self._loops = [asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
                       asyncio.create_task(self._flush_loop(), name="archive-flusher"),
                       asyncio.create_task(self._nodes_loop(), name="node-judge"),
                       asyncio.create_task(self._lease_loop(), name="node-heartbeat")]
        log.info("node_joined", node=self.node, labels=list(self.cluster.labels),
                 scripts=len(self.scripts))

    async def close(self) -> None:
        """As a single node's close, then the listener and the relay."""
        await super().close()
        await self.watchdog.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        await self.relay.close()

    async def _scan(self) -> None:
        """The scripts this node has, and their max_concurrency (off the loop)."""
        def scan() -> tuple[list[str], dict[str, int]]:
            names = self.catalogue.names()
            limits = {}
            for name in names:
                with contextlib.suppress(NotFound):
                    limit = self.catalogue.resolve(name).max_concurrency
                    if limit is not None:
                        limits[name] = limit
            return names, limits
        self.scripts, self.limits = await asyncio.to_thread(scan)

    async def _register(self) -> None:
        url = self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}"
        await self.db.register_node(self.node, self.epoch, self.cluster.labels, self.scripts,
                                    self.settings.workers, url)

    # Writes ----------------------------------------------------------------------------------

    async def _commit(self, statements: list[store.Statement], within_s: float | None = None
                      ) -> int | None:
        """A single node's commit; a submission's carries its placement and a NOTIFY."""
        placing = _PLACING.get()
        if placing is not None:
            statements = [pg.placed(s, *placing) for s in statements]
            statements.append(pg.notify())
            _PLACING.set(None)
        if within_s is None:  # the engine's: its segment rows name this node
            return await super()._commit([pg.by_node(s, self.node) for s in statements])
        # A request's write (a submission, an audit row) need not queue behind the engine's:
        # PostgreSQL takes them side by side, and their order among this node's writes
        # tells nothing (other nodes write too).
        # It waits `within_s` for an unreachable PostgreSQL, longer for a merely busy one.
        try:
            async with asyncio.timeout(within_s + REQUEST_SLOW_S):
                return await self.db.commit(statements, within_s,
                                            lock_wait_s=within_s + REQUEST_SLOW_S)
        except (TimeoutError, store.DatabaseUnavailable) as exc:
            raise Unavailable("the database cannot be reached; try again",
                              code="database_unavailable", retry_after_s=1.0) from exc

    async def _transition(self, state: TaskState, new: TaskStatus, extra: Any = (),
                          within_s: float | None = None, **fields: Any) -> None:
        """A single node's transition, fenced by the task's attempt, owner and status; a task
        that goes back to pending is handed to the cluster's queue (no owner, a NOTIFY).
        Nothing is written while the node is fenced (it joins again first)."""
        if self.watchdog.fenced:
            raise pg.Fenced("fenced by the watchdog")
        row = state.row
        owner = row.get("owner")
        new_owner = None if new is S.PENDING else owner
        fence = [] if owner is None else [
            pg.task_fence(row["id"], row["attempt"], owner, new_owner, row["status"])]
        wake = [pg.notify()] if new is S.PENDING else []
        await super()._transition(state, new, extra=[*fence, *extra, *wake], within_s=within_s,
                                  **fields)
        row["owner"] = new_owner

    def _hub(self, state: TaskState) -> TaskHub:
        """The task's hub, with the relay among its subscribers: what it publishes goes to
        the task's Redis stream for every node's clients."""
        fresh = state.hub is None
        hub = super()._hub(state)
        if fresh:
            hub.subscribers.add(RelaySink(self.relay, state.row["id"], hub))  # type: ignore[arg-type]
        return hub

    def _enqueue(self, state: TaskState) -> None:
        """Pending tasks wait in the database, not here."""
        self.tasks.pop(state.row["id"], None)
        self._wake.set()

    # Submissions and cancels -----------------------------------------------------------------

    async def submit(self, script: Script, request: dict[str, Any], submitted_by: str,
                     audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """A single node's submit, with a cluster-wide number, bound and placement."""
        self._refuse_if_fenced()
        node, labels = request.get("node"), request.get("labels")
        await self._check_placement(script.name, node, labels)
        if await self._pending() >= self.settings.max_pending:
            raise QueueFull(f"{self.settings.max_pending} tasks are already waiting in the "
                            f"cluster (engine.max_pending)", retry_after_s=5.0)
        self._next_num = await self.db.next_num()
        token = _PLACING.set((node, None if labels is None else sorted(set(labels))))
        try:
            task = await super().submit(script, request, submitted_by, audit)
        finally:
            _PLACING.reset(token)
        return task

    async def _pending(self) -> int:
        """The cluster's waiting tasks, counted at most every PENDING_COUNT_S (a soft bound)."""
        now = time.monotonic()
        if now - self._pending_at > PENDING_COUNT_S:
            self._pending_n = await self.db.pending_count()
            self._pending_at = now
        self._pending_n += 1
        return self._pending_n - 1

    async def _check_placement(self, script: str, node: str | None,
                               labels: list[str] | None) -> None:
        """422 no_such_node unless some node known to the cluster could run it."""
        if node is None and labels is None:
            return
        if labels is not None and not all(isinstance(x, str) and x for x in labels):
            raise BadRequest("labels must be an array of non-empty strings",
                             code="invalid_request")
        wanted = set(labels or ())
        nodes = await self.db.nodes(self.cluster.node_timeout_s)
        if not any((node is None or n["name"] == node) and wanted <= set(n["labels"])
                   and script in n["scripts"] for n in nodes):
            where = f"node {node!r}" if node is not None else "no node"
            raise InvalidParams(f"{where} with labels {sorted(wanted)} and the script "
                                f"{script!r} is known to the cluster", code="no_such_node")

    async def cancel(self, task_id: str, audit: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """Cancel a task wherever it is: here, unclaimed in the queue, or on its owner."""
        self._refuse_if_fenced()
        if task_id in self.tasks:
            return await super().cancel(task_id, audit)
        row = await self.db.get_task(task_id)
        if row is None:
            raise NotFound(f"no task {task_id}")
        if row["status"] in FINAL:
            raise Conflict(f"task {task_id} has already ended ({row['status']})",
                           code="already_finished")
        audit_rows = [] if audit is None else [store.insert_audit(audit, task_id=task_id)]
        if row["status"] == S.PENDING and row["owner"] is None:
            state = TaskState(row, where=Where.FINISHING)
            self._hub(state)
            try:
                await self._transition(state, S.CANCELLED, finished_at=time.time(),
                                       run_after=None,
                                       extra=[pg.cancel_unclaimed(task_id), *audit_rows],
                                       within_s=self._request_wait())
            except store.StaleWrite:  # claimed meanwhile: its owner cancels it
                pass
            else:
                self._finish(state)
                return task_json(state.row)
        elif audit_rows:
            await self._commit(audit_rows, within_s=self._request_wait())
        await self.relay.send_control(task_id, "cancel")
        return task_json(row)

    def queue_positions(self, task_ids: Any) -> dict[str, int]:
        """Not known here: the queue is the cluster's (see docs/cluster.md)."""
        return {}

    # Streams and controls --------------------------------------------------------------------

    async def subscribe(self, task_id: str, since: int) -> Subscription:
        """Every frame after `since` of a task on any node: its stream, then its exit."""
        limit, root = self.settings.client_queue_bytes, self.settings.archive_dir
        row = await self.db.get_task(task_id)
        if row is None:
            raise NotFound(f"no task {task_id}")
        if row["status"] in FINAL:
            return replay_finished(row, task_json(row), since, root, limit, self.replay_slots)
        known = self.remote_rows.setdefault(task_id, row)
        self._followers[task_id] += 1

        def on_status(body: dict[str, Any]) -> None:
            known.update(status=body["status"], attempt=body["attempt"])

        return RemoteSubscription(
            task=task_json(row), since=since, archive_root=root, limit_bytes=limit,
            slots=self.replay_slots, relay=self.relay, get_task=self.db.get_task,
            poll_s=self.settings.flush_interval_s / 4, on_status=on_status,
            on_close=functools.partial(self._unfollow, task_id))

    def _unfollow(self, task_id: str) -> None:
        self._followers[task_id] -= 1
        if self._followers[task_id] <= 0:
            del self._followers[task_id]
            self.remote_rows.pop(task_id, None)

    def attempt(self, task_id: str) -> Any:
        """The attempt's controls: this node's own, or a proxy to the node that runs it."""
        local = super().attempt(task_id)
        if local is not None:
            return local
        row = self.remote_rows.get(task_id)
        if row is not None and row["status"] == S.RUNNING:
            return RemoteControl(row, self._send_control)
        return None

    def _send_control(self, task_id: str, method: str, args: tuple[Any, ...]) -> None:
        self._own(self.relay.send_control(task_id, method, *args), name=f"control-{task_id}")

    def _on_control(self, control: Control, tries: int = 0) -> None:
        """A verified control published by any node: act on it if the task runs here."""
        task_id, action = control.task_id, control.action
        state = self.tasks.get(task_id)
        if state is None or state.attempt is None:
            if action is Action.CANCEL and tries < CONTROL_RETRY_S / 0.05:
                asyncio.get_running_loop().call_later(
                    0.05, functools.partial(self._on_control, control, tries + 1))
            return
        if action is Action.CANCEL:
            state.attempt.request_stop("cancel")
            return
        try:
            state.attempt.control(action.value, *control.args)  # an allow-listed name
        except BadRequest as exc:  # stdin full: the sender was answered already
            log.warning("control_refused", task_id=task_id, method=str(action),
                        error=exc.message)

    # Dispatch --------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = await self._claim()
            if delay is None:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _claim(self) -> float | None:
        """Claim and start tasks for the free slots; how long to wait before looking again
        (None: at once, every slot was filled and more may wait)."""
        fenced = self.watchdog.fenced
        slots = self.settings.workers - self._busy if self.accepting and not fenced else 0
        if slots <= 0:
            return POLL_S
        now = time.time()
        held = list(self.tasks) if self._claim_unsure else None
        try:
            rows = await self.db.claim(self.node, self.scripts, self.cluster.labels, slots,
                                       self.settings.aging_s, self.limits, now, held)
            self._claim_unsure = False
        except Exception as exc:  # busy, fenced, unreachable: the next look may do better
            # A connection that broke around the COMMIT leaves the claim's outcome unknown:
            # the next claim hands back whatever this node holds in the database unawares.
            self._claim_unsure = self._claim_unsure or not isinstance(exc, pg.Fenced)
            self.problems["database"] = str(exc)
            self._log_once("claim_failed", "", error=str(exc))
            return POLL_S / 2
        self._logged.discard(("claim_failed", ""))
        for row in rows:
            state = TaskState(row, next_segment=1 if row["attempt"] == 1 else None)
            self.tasks[row["id"]] = state
            self.queue.running[row["script"]] += 1
            self._launch(state)
        if len(rows) == slots:
            return None
        try:
            due = await self.db.next_due(self.scripts, now)
        except Exception:  # the claims above stand; the next look asks again
            return POLL_S / 2
        return POLL_S if due is None else max(0.0, min(POLL_S, due - time.time()))

    async def _run(self, state: TaskState) -> None:
        """A single node's run; a write fenced out (another node recorded the task, or this
        node was declared lost) ends it here without a word written. The watchdog kills its
        processes if the node's lease lapses meanwhile."""
        task_id, attempt = state.row["id"], state.row["attempt"]
        self.watchdog.track(task_id, attempt)
        try:
            await super()._run(state)
        except store.StaleWrite as exc:
            self.tasks.pop(task_id, None)
            log.warning("write_fenced", task_id=task_id, node_lost=isinstance(exc, pg.Fenced))
        finally:
            self.watchdog.untrack(task_id, attempt)

    async def _reap_lost_runs(self) -> None:
        """Lost runs are other nodes' in a cluster: the heartbeat loop records them."""

    # Nodes -----------------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew the lease (and feed the watchdog) on a loop of its own, so that judging
        others, however slow, never delays it; after a fence, join again."""
        interval = beat_s(self.cluster.node_timeout_s)
        while True:
            await asyncio.sleep(interval)
            try:
                if self.watchdog.fenced:
                    await self._rejoin(interval)
                else:
                    await self._beat()
                self.problems.pop("database", None)
            except (store.DatabaseBusy, store.DatabaseUnavailable) as exc:
                self.problems["database"] = str(exc)
            except Exception as exc:  # the loop must go on: a later beat may succeed
                self.problems["database"] = str(exc)
                self._log_once("heartbeat_failed", "", error=str(exc))

    async def _nodes_loop(self) -> None:
        interval = beat_s(self.cluster.node_timeout_s)
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                if time.monotonic() - last_scan > SCAN_S:
                    last_scan = time.monotonic()
                    await self._scan()
                await self._judge()
            except (store.DatabaseBusy, store.DatabaseUnavailable) as exc:
                self.problems["database"] = str(exc)
            except Exception as exc:  # the loop must go on: a later look may succeed
                self.problems["database"] = str(exc)
                self._log_once("judging_failed", "", error=str(exc))

    async def _beat(self) -> None:
        sent_at = lease_clock()  # the lease runs from before the write that renews it
        try:
            alive = await self.db.heartbeat(self.node, self.epoch, self.scripts)
        except store.DatabaseBusy:
            self._healthy_since = None
            raise
        if not alive:
            self.watchdog.fence("declared lost by the cluster")
            self._healthy_since = None
            return
        self.watchdog.beat(sent_at)
        if self._listener is None or self._listener.is_closed():
            with contextlib.suppress(*pg.CONNECTION_ERRORS):
                self._listener = await self.db.listen(self._wake.set)
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()

    async def _judge(self) -> None:
        """Declare silent nodes lost and record their runs (see docs/cluster.md)."""
        # Judge others only after beating steadily for a whole timeout: when PostgreSQL was
        # away every node fell silent at once, and each needs a beat to show it is alive.
        since = self._healthy_since
        if since is None or time.monotonic() - since < self.cluster.node_timeout_s \
                or self.watchdog.fenced:
            return
        timeout = self.cluster.node_timeout_s
        for node in await self.db.silent_nodes(timeout):
            if node["name"] != self.node and await self.db.declare_lost(
                    node["name"], node["epoch"], self.node, timeout):
                log.warning("node_lost", node=node["name"], by=self.node)
        for row in await self.db.orphaned():
            await self._end_interrupted(row, f"node {row['owner']} was lost during attempt "
                                             f"{row['attempt']}", kill=False)

    def _on_fenced(self, why: str) -> None:
        """The node's lease lapsed (its watchdog fenced it) or it was declared lost: stop every
        attempt at once; nothing of them is written, and requests answer 503 until it has
        joined again."""
        log.error("node_fenced", node=self.node, why=why, running=len(self._attempts()))
        for attempt in self._attempts():
            attempt.request_stop("lost")
            if attempt.run is not None:
                attempt.run.signal(signal.SIGKILL)

    async def _rejoin(self, wait_s: float) -> None:
        """Once the fenced runs have ended (each without a write), join again as a new process
        and record what the old one left, as at a start."""
        runs = {t for t in self._owned if t.get_name().startswith("run-")}
        if runs:
            await asyncio.wait(runs, timeout=wait_s)
            if not all(t.done() for t in runs):
                return  # the next turn looks again
        self.tasks.clear()
        self.epoch = uuid.uuid4().hex
        sent_at = lease_clock()
        await self._register()
        self.watchdog.rejoined(sent_at)
        log.warning("node_rejoined", node=self.node)
        self._own(self._recover(), name="recover")  # the lease loop beats on meanwhile

    def _refuse_if_fenced(self) -> None:
        """503 `node_fenced` while the node is fenced (a request's writes would not land)."""
        if self.watchdog.fenced:
            raise pg.Fenced("fenced: joining again")

    # Recovery --------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Record the runs an earlier process of this node left, and hand back its claims."""
        for row in await self.db.owned(self.node, S.RUNNING):
            await self._end_interrupted(row, f"the server stopped during attempt "
                                             f"{row['attempt']}", kill=True)
        # Runs of this node that a survivor recorded while it was down may still have
        # processes on this host: kill those too (found by RR_TASK_ID, owned by this node).
        found = await asyncio.to_thread(_task_ids_on_host)
        if found:
            for row in await self.db.recorded_elsewhere(self.node, sorted(found)):
                await asyncio.to_thread(kill_left_behind, row["id"])
        for row in await self.db.owned(self.node, S.PENDING):
            with contextlib.suppress(store.StaleWrite):
                await self._commit([pg.task_fence(row["id"], row["attempt"], self.node, None,
                                                  S.PENDING), pg.notify()])
        log.info("recovered", node=self.node)

    async def _end_interrupted(self, row: dict[str, Any], error: str, kill: bool) -> None:
        """Record a run whose node stopped or was lost (exactly once: the write is fenced by
        its attempt and owner), or queue its retry; then tell its followers."""
        if kill:
            await asyncio.to_thread(kill_left_behind, row["id"])
        found = await asyncio.to_thread(_finalize_archive, self.settings, row)
        total = sum(segment.raw_bytes for segment in found)
        last_seq = max([row["last_seq"], *(segment.last_seq for segment in found)])
        common = dict(pid=None, output_bytes=total, last_seq=last_seq, error=error)
        extra = [store.upsert_segment(row["id"], segment) for segment in found]
        state = TaskState(row, where=Where.FINISHING, next_segment=None)
        self._hub(state)
        try:
            if row["attempt"] <= row["max_retries"]:
                await self._transition(state, S.PENDING, extra=extra, attempt=row["attempt"] + 1,
                                       run_after=time.time(), **common)
            else:
                await self._transition(state, S.FAILED, extra=extra, finished_at=time.time(),
                                       **common)
                self.tasks[row["id"]] = state
                self._finish(state)
        except store.StaleWrite:
            return  # recorded by another node meanwhile: that record stands
        log.warning("recovered_interrupted_run", task_id=row["id"], status=row["status"],
                    error=error)


def beat_s(node_timeout_s: float) -> float:
    """How often a node renews its lease: at least three beats fit in its fence time."""
    return min(node_timeout_s / 6, 2.0)


def fence_s(node_timeout_s: float) -> float:
    """How long after a renewal was sent the watchdog fences the node: half the timeout, the
    other half the margin for its own latency and clock skew (docs/cluster.md)."""
    return node_timeout_s / 2


def _task_ids_on_host() -> set[str]:
    """The RR_TASK_ID of every process on this host that has one (a /proc scan)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        found.update(v[len(b"RR_TASK_ID="):].decode() for v in env
                     if v.startswith(b"RR_TASK_ID="))
    return found
