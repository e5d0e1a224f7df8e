"""This node's membership of the cluster: heartbeats, fencing, lost nodes, remote tasks.

- Every write carries the node's fence (its row, this process's epoch, not lost), and every
  write of a task's state the task's (this attempt, this owner, the status it had): a node that
  was declared lost and comes back changes nothing that others recorded.
- Heartbeats: the node refreshes its row; one that stays silent past `node_timeout_s` is
  declared lost by whichever node gets there first (exactly once), and its running tasks are
  handed to the engine's recovery as orphans, "node X was lost during attempt N".
- Fencing: each node's watchdog process (`cluster.watchdog`) kills the node's runs once its
  lease has gone unrenewed for half of `node_timeout_s`, before any other node may take them
  over; the node then writes nothing of them and joins again under a new epoch.
- Clients follow any task through its Redis stream (`cluster.follow`), and controls for a task
  another node runs go to it through Redis (`cluster.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import Counter
from collections.abc import Collection, Coroutine
from typing import Any

import structlog

from remoterun import store
from remoterun.catalogue import Catalogue
from remoterun.cluster.control import KEY_PURPOSE, Action, Control, Controls
from remoterun.cluster.events import ClusterFeed, EventTail
from remoterun.cluster.follow import RemoteControl, RemoteSubscription
from remoterun.cluster.relay import Relay
from remoterun.cluster.watchdog import Watchdog, lease_clock
from remoterun.config import Settings
from remoterun.engine.hub import Subscription
from remoterun.engine.peers import Host, Lost
from remoterun.engine.recovery import task_ids_on_host
from remoterun.errors import BadRequest, NotFound
from remoterun.reaper import kill_left_behind
from remoterun.spawn import Children
from remoterun.state import Task, TaskStatus
from remoterun.store import postgres as pg
from remoterun.wire import task_json

log = structlog.get_logger(__name__)
S = TaskStatus
Row = dict[str, Any]
SCAN_S = 10.0  # how often the node lists its scripts/ again for its row
REQUEST_SLOW_S = 15.0  # beyond a request's wait for PostgreSQL, what its write may queue
CONTROL_RETRY_S = 1.0  # a cancel may reach the owner a moment before its claim is held


class Node:
    """One node's membership: its row, its epoch, its scripts, the tasks it follows."""

    requests_in_order = False  # other nodes write too: a request's write goes side by side

    def __init__(self, settings: Settings, db: pg.PostgresDatabase, relay: Relay,
                 catalogue: Catalogue, children: Children):
        assert settings.cluster is not None
        self.settings, self.db, self.relay, self.catalogue = settings, db, relay, catalogue
        self.name = settings.cluster.node
        self.labels = list(settings.cluster.labels)
        self.timeout_s = settings.cluster.node_timeout_s
        self.orphan_interval_s = beat_s(self.timeout_s)
        self.epoch = uuid.uuid4().hex
        self.scripts: list[str] = []
        self.limits: dict[str, int] = {}
        self.remote_rows: dict[str, Row] = {}  # followed here, run elsewhere
        self._followers: Counter[str] = Counter()
        self._healthy_since: float | None = None  # monotonic: beating since (None: not now)
        self._host: Host | None = None
        self._failing: set[str] = set()  # the loops' failures logged (until they succeed)
        self._loops: list[asyncio.Task[None]] = []
        self._owned: set[asyncio.Task[None]] = set()
        db.fence = lambda: pg.node_fence(self.name, self.epoch)
        self.watchdog = Watchdog(fence_s(self.timeout_s), self._on_fenced, children)
        self.feed = ClusterFeed()  # every node's transitions, for GET /events
        self.events = EventTail(db, self.feed, relay)

    async def join(self, host: Host) -> None:
        """Register this process (its watchdog's lease from then), start the relay, the
        lease and the judging of others."""
        self._host = host
        await self._scan()
        sent_at = lease_clock()
        await self._register()
        self.watchdog.start(sent_at)
        self.relay.controls = Controls(host.protection.vault.derive(KEY_PURPOSE))
        self.relay.on_control = self._on_control
        await self.relay.start()
        self._loops = [asyncio.create_task(self._lease_loop(), name="node-heartbeat"),
                       asyncio.create_task(self._judge_loop(), name="node-judge")]
        await self.events.start()  # after the lease: it may wait for a transaction to end
        log.info("node_joined", node=self.name, labels=self.labels, scripts=len(self.scripts))

    @property
    def alive(self) -> bool:
        """Whether the lease and judging loops run."""
        return bool(self._loops) and not any(loop.done() for loop in self._loops)

    async def close(self) -> None:
        """Stop the loops and the controls in flight, then the watchdog and the relay."""
        tasks = [*self._loops, *self._owned]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.events.close()
        await self.watchdog.close()
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
        await self.db.register_node(self.name, self.epoch, self.labels, self.scripts,
                                    self.settings.workers, url)

    # The lease, fencing, and judging others ---------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew the lease (and feed the watchdog) on a loop of its own, so that judging
        others, however slow, never delays it; after a fence, join again."""
        interval = beat_s(self.timeout_s)
        while True:
            await asyncio.sleep(interval)
            await self._guarded("heartbeat_failed", self._rejoin(interval)
                                if self.watchdog.fenced else self._beat())

    async def _judge_loop(self) -> None:
        """Declare silent nodes lost (their runs go to the engine's reaper as orphans), and
        list this node's scripts again now and then."""
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(beat_s(self.timeout_s))
            if time.monotonic() - last_scan > SCAN_S:
                last_scan = time.monotonic()
                await self._guarded("judging_failed", self._scan())
            await self._guarded("judging_failed", self._judge())

    async def _guarded(self, kind: str, step: Coroutine[Any, Any, None]) -> None:
        """One step of a loop that must go on: a later one may succeed."""
        assert self._host is not None
        problems = self._host.problems
        try:
            await step
            problems.pop("database", None)
            self._failing.discard(kind)
        except (store.DatabaseBusy, store.DatabaseUnavailable) as exc:
            problems["database"] = str(exc)
        except Exception as exc:
            problems["database"] = str(exc)
            if kind not in self._failing:  # logged once until it succeeds again
                log.warning(kind, error=str(exc))
            self._failing.add(kind)

    async def _beat(self) -> None:
        sent_at = lease_clock()  # the lease runs from before the write that renews it
        try:
            alive = await self.db.heartbeat(self.name, self.epoch, self.scripts)
        except store.DatabaseBusy:
            self._healthy_since = None
            raise
        if not alive:
            self.watchdog.fence("declared lost by the cluster")
            self._healthy_since = None
            return
        self.watchdog.beat(sent_at)
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()

    def _judging(self) -> bool:
        """Judge others only after beating steadily for a whole timeout: when PostgreSQL was
        away every node fell silent at once, and each needs a beat to show it is alive."""
        since = self._healthy_since
        return since is not None and time.monotonic() - since >= self.timeout_s \
            and not self.watchdog.fenced

    async def _judge(self) -> None:
        if not self._judging():
            return
        for node in await self.db.silent_nodes(self.timeout_s):
            if node["name"] != self.name and await self.db.declare_lost(
                    node["name"], node["epoch"], self.name, self.timeout_s):
                log.warning("node_lost", node=node["name"], by=self.name)

    def _on_fenced(self, why: str) -> None:
        """The node's lease lapsed (its watchdog fenced it) or it was declared lost: stop every
        attempt at once; nothing of them is written, and requests answer 503 until it has
        joined again."""
        assert self._host is not None
        log.error("node_fenced", node=self.name, why=why)
        self._host.kill_all("lost")

    async def _rejoin(self, wait_s: float) -> None:
        """Once the fenced runs have ended (each without a write), join again as a new process
        and record what the old one left, as at a start."""
        assert self._host is not None
        if not await self._host.abandon(wait_s):
            return  # the next turn looks again
        self.epoch = uuid.uuid4().hex
        sent_at = lease_clock()
        await self._register()
        self.watchdog.rejoined(sent_at)
        log.warning("node_rejoined", node=self.name)
        self._host.recover_again()  # the lease loop beats on meanwhile

    def writable(self) -> None:
        """503 `node_fenced` while the node is fenced (a request's writes would not land)."""
        if self.watchdog.fenced:
            raise pg.Fenced("fenced: joining again")

    async def commit_request(self, statements: list[store.Statement], within_s: float
                             ) -> int | None:
        """A request's write, beside the engine's: it waits `within_s` for an unreachable
        PostgreSQL, longer for a merely busy one (a lock held by another node's write)."""
        async with asyncio.timeout(within_s + REQUEST_SLOW_S):
            return await self.db.commit(statements, within_s,
                                        lock_wait_s=within_s + REQUEST_SLOW_S)

    def track(self, task_id: str, attempt: int) -> None:
        """The watchdog kills this attempt's processes if the lease lapses."""
        self.watchdog.track(task_id, attempt)

    def untrack(self, task_id: str, attempt: int) -> None:
        """The attempt ended: nothing of it is left to kill."""
        self.watchdog.untrack(task_id, attempt)

    async def leftovers(self) -> list[Lost]:
        """The runs an earlier process of this node left; first, kill the processes on this
        host of its runs that a survivor recorded while it was down."""
        found = await asyncio.to_thread(task_ids_on_host)
        if found:
            for row in await self.db.recorded_elsewhere(self.name, sorted(found)):
                await asyncio.to_thread(kill_left_behind, row["id"])
        return [Lost(row, f"the server stopped during attempt {row['attempt']}", kill=True)
                for row in await self.db.owned(self.name, S.RUNNING)]

    async def orphans(self, held: Collection[str]) -> list[Lost]:
        """The running tasks of nodes declared lost (once this node may judge, not fenced)."""
        if not self._judging():
            return []
        return [Lost(row, f"node {row['owner']} was lost during attempt {row['attempt']}",
                     kill=False) for row in await self.db.orphaned()]

    # Writes ----------------------------------------------------------------------------------

    def fence(self, task: Task, new: TaskStatus) -> tuple[list[store.Statement], Row]:
        """Guarded by the task's attempt, owner and status; a task that goes back to pending
        is handed to the cluster's queue (no owner). Nothing is written while the node is
        fenced (it joins again first)."""
        if self.watchdog.fenced:
            raise pg.Fenced("fenced by the watchdog")
        owner = task.owner
        new_owner = None if new is S.PENDING else owner
        guards: list[store.Statement] = [] if owner is None else [
            pg.task_fence(task.id, task.attempt, owner, new_owner, str(task.status))]
        return guards, {"owner": new_owner, "clustered": True}  # a cluster's: owned

    def stamp(self, statements: list[store.Statement]) -> list[store.Statement]:
        """The engine's writes name this node (its segment rows)."""
        return [pg.by_node(s, self.name) for s in statements]

    # Tasks other nodes run -------------------------------------------------------------------

    def follow(self, row: Row, since: int) -> Subscription | None:
        """Every frame after `since` of a task another node runs: its stream, then its exit."""
        assert self._host is not None
        task_id = row["id"]
        known = self.remote_rows.setdefault(task_id, row)
        self._followers[task_id] += 1

        def on_status(body: dict[str, Any]) -> None:
            known.update(status=body["status"], attempt=body["attempt"])

        return RemoteSubscription(
            task=task_json(row), since=since, archive_root=self.settings.archive_dir,
            limit_bytes=self.settings.client_queue_bytes, slots=self._host.replay_slots,
            relay=self.relay, get_task=self.db.get_task,
            poll_s=self.settings.flush_interval_s / 4, on_status=on_status,
            on_close=functools.partial(self._unfollow, task_id))

    def _unfollow(self, task_id: str) -> None:
        self._followers[task_id] -= 1
        if self._followers[task_id] <= 0:
            del self._followers[task_id]
            self.remote_rows.pop(task_id, None)

    def control(self, task_id: str) -> Any:
        """A proxy to the node that runs a task followed here (an attempt's controls)."""
        row = self.remote_rows.get(task_id)
        if row is not None and row["status"] == S.RUNNING:
            return RemoteControl(row, self._send_control)
        return None

    def _send_control(self, task_id: str, method: str, args: tuple[Any, ...]) -> None:
        self._own(self.relay.send_control(task_id, method, *args), f"control-{task_id}")

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._reap_owned)

    def _reap_owned(self, task: asyncio.Task[None]) -> None:
        self._owned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(),
                      exc_info=task.exception())

    async def cancel_elsewhere(self, row: Row) -> None:
        """Publish the cancel for the node that runs it."""
        await self.relay.send_control(row["id"], "cancel")

    def _on_control(self, control: Control, tries: int = 0) -> None:
        """A verified control published by any node: act on it if the task runs here."""
        assert self._host is not None
        task_id, action = control.task_id, control.action
        attempt = self._host.held_attempt(task_id)
        if attempt is None:
            if action is Action.CANCEL and tries < CONTROL_RETRY_S / 0.05:
                asyncio.get_running_loop().call_later(
                    0.05, functools.partial(self._on_control, control, tries + 1))
            return
        if action is Action.CANCEL:
            attempt.request_stop("cancel")
            return
        try:
            attempt.control(action.value, *control.args)  # an allow-listed name
        except BadRequest as exc:  # stdin full: the sender was answered already
            log.warning("control_refused", task_id=task_id, method=str(action),
                        error=exc.message)


def beat_s(node_timeout_s: float) -> float:
    """How often a node renews its lease: at least three beats fit in its fence time."""
    return min(node_timeout_s / 6, 2.0)


def fence_s(node_timeout_s: float) -> float:
    """How long after a renewal was sent the watchdog fences the node: half the timeout, the
    other half the margin for its own latency and clock skew (docs/cluster.md)."""
    return node_timeout_s / 2
