"""The cluster's queue: pending rows in PostgreSQL that any node may claim.

Nothing waits in a node's memory: a submission is a row with its placement and a NOTIFY that
wakes idle nodes; each node's dispatcher claims up to its free slots in one transaction
(`PostgresDatabase.claim`: `FOR UPDATE SKIP LOCKED`, in the order of `engine.queue.QueuePolicy`
with its `aging_s` and the per-script limits this node read from its scripts/), and a retry
goes back to the rows. See docs/cluster.md, "Claims".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from typing import Any

import structlog

from remoterun import store
from remoterun.cluster.node import Node
from remoterun.config import Settings
from remoterun.engine.queue import Placement
from remoterun.errors import BadRequest, InvalidParams, QueueFull
from remoterun.state import TaskStatus
from remoterun.store import postgres as pg

log = structlog.get_logger(__name__)
Row = dict[str, Any]
POLL_S = 1.0  # the dispatcher looks at the queue at least this often (a NOTIFY may be lost)
PENDING_COUNT_S = 0.5  # engine.max_pending is checked against a count this fresh
LISTEN_RETRY_S = 2.0  # how often a lost LISTEN connection is opened again


class ClaimQueue:
    """The queue of every node: claimed from PostgreSQL, woken by NOTIFY."""

    def __init__(self, settings: Settings, db: pg.PostgresDatabase, node: Node):
        self.settings = settings
        self.db = db
        self.node = node
        self._wake: Callable[[], None] = lambda: None
        self._listener: Any = None
        self._listened_at = -LISTEN_RETRY_S
        self._pending_n, self._pending_at = 0, -PENDING_COUNT_S
        self._unsure = False  # a claim failed: it may have committed all the same

    async def start(self, wake: Callable[[], None]) -> None:
        """LISTEN for claimable tasks."""
        self._wake = wake
        await self._listen()

    async def close(self) -> None:
        """Close the LISTEN connection."""
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listened_at = time.monotonic()
        with contextlib.suppress(*pg.CONNECTION_ERRORS):
            self._listener = await self.db.listen(self._wake)

    async def recover(self) -> list[Row]:
        """Hand back the claims an earlier process of this node had not started."""
        for row in await self.db.owned(self.node.name, TaskStatus.PENDING):
            with contextlib.suppress(store.StaleWrite):
                await self.db.commit([pg.task_fence(row["id"], row["attempt"], self.node.name,
                                                    None, TaskStatus.PENDING), pg.notify()],
                                     self.settings.db_retry_s)
        return []

    async def admit(self, script: str, request: dict[str, Any]) -> Placement:
        """The placement asked for (422 no_such_node unless some node could take it), under
        the cluster-wide bound `engine.max_pending`."""
        placement = await self._placement(script, request.get("node"), request.get("labels"))
        if await self._pending() >= self.settings.max_pending:
            raise QueueFull(f"{self.settings.max_pending} tasks are already waiting in the "
                            f"cluster (engine.max_pending)", retry_after_s=5.0)
        return placement

    async def _placement(self, script: str, node: str | None, labels: Any) -> Placement:
        if node is None and labels is None:
            return Placement()
        if labels is not None and not all(isinstance(x, str) and x for x in labels):
            raise BadRequest("labels must be an array of non-empty strings",
                             code="invalid_request")
        wanted = set(labels or ())
        nodes = await self.db.nodes(self.node.timeout_s)
        if not any((node is None or n["name"] == node) and wanted <= set(n["labels"])
                   and script in n["scripts"] for n in nodes):
            where = f"node {node!r}" if node is not None else "no node"
            raise InvalidParams(f"{where} with labels {sorted(wanted)} and the script "
                                f"{script!r} is known to the cluster", code="no_such_node")
        return Placement(node, None if labels is None else tuple(sorted(wanted)))

    async def _pending(self) -> int:
        """The cluster's waiting tasks, counted at most every PENDING_COUNT_S (a soft bound)."""
        now = time.monotonic()
        if now - self._pending_at > PENDING_COUNT_S:
            self._pending_n = await self.db.pending_count()
            self._pending_at = now
        self._pending_n += 1
        return self._pending_n - 1

    async def number(self) -> int:
        """A number from the cluster's sequence."""
        return await self.db.next_num()

    def entry(self, insert: store.Statement, placement: Placement) -> list[store.Statement]:
        """The row with its placement, and a NOTIFY for idle nodes."""
        labels = None if placement.labels is None else list(placement.labels)
        return [pg.placed(insert, placement.node, labels), pg.notify()]

    def requeued(self) -> list[store.Statement]:
        """A NOTIFY: the task is claimable again."""
        return [pg.notify()]

    def put(self, row: Row) -> bool:
        """Not held: it waits in the database for any node."""
        return False

    def remove(self, task_id: str) -> Row | None:
        """Nothing is held here."""
        return None

    def unclaimed(self, row: Row) -> store.Statement | None:
        """A pending task no node has claimed may be cancelled by any, under this guard."""
        if row["status"] == TaskStatus.PENDING and row.get("owner") is None:
            return pg.cancel_unclaimed(row["id"])
        return None

    async def take(self, slots: int, now: float, held: Collection[str]
                   ) -> tuple[list[Row], float | None]:
        """Claim up to `slots` tasks; how long to wait before looking again (0: at once, every
        slot was filled and more may wait)."""
        if time.monotonic() - self._listened_at > LISTEN_RETRY_S:
            await self._listen()
        if slots <= 0 or self.node.watchdog.fenced:
            return [], POLL_S
        try:
            rows = await self.db.claim(self.node.name, self.node.scripts, self.node.labels,
                                       slots, self.settings.aging_s, self.node.limits, now,
                                       list(held) if self._unsure else None)
        except Exception as exc:
            # A connection that broke around the COMMIT leaves the claim's outcome unknown:
            # the next claim hands back whatever this node holds in the database unawares.
            self._unsure = self._unsure or not isinstance(exc, pg.Fenced)
            raise
        self._unsure = False
        if len(rows) == slots:
            return rows, 0.0
        try:
            due = await self.db.next_due(self.node.scripts, now)
        except Exception:  # the claims above stand; the next look asks again
            return rows, POLL_S / 2
        return rows, POLL_S if due is None else max(0.0, min(POLL_S, due - time.time()))

    def ended(self, script: str) -> None:
        """Nothing to count: the claim counts the cluster's running rows."""

    async def positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """Each waiting task's place among every task no node has claimed, in the claim's
        order: one query (docs/cluster.md, "Queue position")."""
        return await self.db.queue_positions(list(task_ids), self.settings.aging_s)
