"""The calls only a cluster makes of its PostgreSQL store: nodes, claims, lost nodes, and the
statements that fence a node's writes and place its tasks (docs/cluster.md).

These queries are PostgreSQL's own (SKIP LOCKED, advisory locks, arrays, NOTIFY): no other
store has them, so they are written for it, not translated. The statements a node adds to the
engine's writes are shapes that `schema.POSTGRES` renders, like every other write.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from remoterun.store.base import Fence, Guarded, Row, Statement
from remoterun.store.schema import NOTIFY_CHANNEL
from remoterun.store.statements import SEGMENT_COLUMNS, SEGMENT_PROGRESS

NOW = "extract(epoch from clock_timestamp())"  # the database's clock: nodes' clocks may differ

# asyncpg's errors that mean "no usable connection now": the server is down, restarting,
# or ended our session; the statement did not run (or its transaction is rolled back).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError, asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError, TimeoutError,
    # A connection cut mid-operation can leave asyncpg's protocol in a state it refuses to
    # go on from ("cannot switch to state 15; another operation (2) is in progress").
    asyncpg.InternalClientError,
)


def claim_order(aging_s: float, slot: int) -> str:
    """The claim's ORDER BY (`engine.queue.QueuePolicy`: aged priority, then submission), with
    `aging_s` bound at `$slot`."""
    return f'"created_at" / ${slot} - "priority", "num"' if aging_s else '-"priority", "num"'


def _rows_changed(status: str) -> int:
    """The row count of a command tag such as 'UPDATE 1' or 'SELECT 0'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class Nodes(abc.ABC):
    """The cluster's calls (`base.Membership` and the claim queue) over a PostgreSQL store."""

    url: str

    @abc.abstractmethod
    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a statement in PostgreSQL's dialect."""

    @abc.abstractmethod
    async def fetch_value(self, sql: str, *params: Any) -> Any:
        """One value of a statement in PostgreSQL's dialect."""

    @abc.abstractmethod
    async def _transaction(self, work: Callable[[Any], Awaitable[Any]],
                           fenced: bool = True) -> Any:
        """Run `work` in one transaction (fenced by the node's epoch unless told not to)."""

    async def register_node(self, name: str, epoch: str, labels: Sequence[str],
                            scripts: Sequence[str], workers: int, url: str) -> None:
        """Join the cluster as this process (a new epoch: an earlier one's writes are fenced)."""
        async def work(conn: Any) -> None:
            await conn.execute(
                f'INSERT INTO nodes (name, epoch, labels, scripts, workers, url, started_at, '
                f'seen_at) VALUES ($1, $2, $3, $4, $5, $6, {NOW}, {NOW}) ON CONFLICT (name) DO '
                f'UPDATE SET epoch = $2, labels = $3, scripts = $4, workers = $5, url = $6, '
                f'started_at = {NOW}, seen_at = {NOW}, lost_at = NULL, lost_by = NULL',
                name, epoch, list(labels), list(scripts), workers, url)
        await self._transaction(work, fenced=False)

    async def heartbeat(self, name: str, epoch: str, scripts: Sequence[str]) -> bool:
        """Say this node is alive (and which scripts it has); False once declared lost."""
        async def work(conn: Any) -> bool:
            status = await conn.execute(
                f"UPDATE nodes SET seen_at = {NOW}, scripts = $3 WHERE name = $1 AND "
                f"epoch = $2 AND lost_at IS NULL", name, epoch, list(scripts))
            return _rows_changed(status) == 1
        return bool(await self._transaction(work, fenced=False))  # its own fence

    async def nodes(self, timeout_s: float) -> list[Row]:
        """Every node known, with `alive` (seen within timeout_s, not lost), by name."""
        rows = await self.fetch_all(
            f"SELECT n.*, {NOW} AS now, (SELECT count(*) FROM tasks t WHERE "
            f"t.owner = n.name AND t.status = 'running') AS running "
            f"FROM nodes n ORDER BY n.name")
        out = []
        for row in rows:
            item = dict(row)
            now = item.pop("now")
            item["alive"] = item["lost_at"] is None and now - item["seen_at"] < timeout_s
            out.append(item)
        return out

    async def silent_nodes(self, timeout_s: float) -> list[Row]:
        """Nodes not marked lost that have not been seen for `timeout_s`."""
        return await self.fetch_all(
            f"SELECT name, epoch FROM nodes WHERE lost_at IS NULL AND seen_at < {NOW} - $1",
            [timeout_s])

    async def declare_lost(self, name: str, epoch: str, by: str, timeout_s: float
                           ) -> bool:
        """Mark a silent node lost (once: whoever changes its row first) and hand back its
        claimed tasks that had not started; True if this call did it."""
        async def work(conn: Any) -> bool:
            status = await conn.execute(
                f"UPDATE nodes SET lost_at = {NOW}, lost_by = $3 WHERE name = $1 AND "
                f"epoch = $2 AND lost_at IS NULL AND seen_at < {NOW} - $4",
                name, epoch, by, timeout_s)
            if _rows_changed(status) != 1:
                return False
            await conn.execute("UPDATE tasks SET owner = NULL WHERE owner = $1 AND "
                               "status = 'pending'", name)
            await conn.execute(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')")
            return True
        return bool(await self._transaction(work))

    async def orphaned(self) -> list[Row]:
        """Tasks recorded running on a node marked lost: theirs to record by a survivor."""
        return await self.fetch_all(
            'SELECT t.* FROM tasks t JOIN nodes n ON n.name = t.owner '
            "WHERE t.status = 'running' AND n.lost_at IS NOT NULL ORDER BY t.num")

    async def owned(self, node: str, *statuses: str) -> list[Row]:
        """This node's tasks in the statuses (what an earlier run of it left)."""
        return await self.fetch_all(
            "SELECT * FROM tasks WHERE owner = $1 AND status = ANY($2) ORDER BY num",
            [node, list(statuses)])

    async def recorded_elsewhere(self, node: str, ids: Sequence[str]) -> list[Row]:
        """Of these tasks of this node, those no longer running in the database (a survivor
        recorded them while the node was down): their ids."""
        return await self.fetch_all(
            "SELECT id FROM tasks WHERE id = ANY($1) AND owner = $2 AND status <> 'running'",
            [list(ids), node])

    async def claim(self, node: str, scripts: Sequence[str], labels: Sequence[str],
                    slots: int, aging_s: float, limits: dict[str, int], now: float,
                    held: Sequence[str] | None = None) -> list[Row]:
        """Take up to `slots` pending tasks this node may run, best first (aged priority,
        then submission), skipping rows other nodes are claiming (SKIP LOCKED) and scripts at
        their max_concurrency across the cluster; each is marked owned by this node.

        The running count of a limited script is read under an advisory lock per script
        (taken in one order, so two nodes never wait on each other in a cycle): a second node
        claiming the same script waits for this transaction and then counts what it took.

        `held` (after a claim whose outcome is unknown: its connection broke around the
        COMMIT) names the tasks the node knows it holds: its other pending claims are handed
        back first, in the same transaction, so none stays claimed by a node that does not
        know it (nothing else would ever start it).
        """
        order = claim_order(aging_s, 7)
        mine = sorted(s for s in limits if s in set(scripts))

        async def work(conn: Any) -> list[Row]:
            if held is not None:
                await conn.execute("UPDATE tasks SET owner = NULL WHERE owner = $1 AND "
                                   "status = 'pending' AND id <> ALL($2)", node, list(held))
            room: dict[str, int] = {}
            if mine:
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(s)) FROM "
                                   "unnest($1::text[]) AS s ORDER BY hashtext(s)", mine)
                counts = dict(await conn.fetch(
                    "SELECT script, count(*) FROM tasks WHERE script = ANY($1) AND "
                    "(status = 'running' OR (status = 'pending' AND owner IS NOT NULL)) "
                    "GROUP BY script", mine))
                room = {s: limits[s] - counts.get(s, 0) for s in mine}
            full = [s for s, n in room.items() if n <= 0]
            chosen: list[Row] = []
            seen: list[int] = []
            while len(chosen) < slots:  # lock only what may be taken: others claim the rest
                rows = await conn.fetch(
                    f'SELECT * FROM tasks WHERE "status" = \'pending\' AND "owner" IS NULL AND '
                    f'("run_after" IS NULL OR "run_after" <= $1) AND "script" = ANY($2) AND '
                    f'"script" <> ALL($3) AND ("node" IS NULL OR "node" = $4) AND '
                    f'("labels" IS NULL OR "labels" <@ $5) AND "num" <> ALL($6) '
                    f'ORDER BY {order} LIMIT {slots - len(chosen)} FOR UPDATE SKIP LOCKED',
                    now, list(scripts), full, node, list(labels), seen,
                    *([aging_s] if aging_s else []))
                if not rows:
                    break
                for row in rows:
                    seen.append(row["num"])
                    script = row["script"]
                    if script in room:
                        if room[script] <= 0:
                            full.append(script)
                            continue
                        room[script] -= 1
                    chosen.append(dict(row))
            if chosen:
                await conn.execute('UPDATE tasks SET "owner" = $1 WHERE "num" = ANY($2)',
                                   node, [r["num"] for r in chosen])
            for row in chosen:
                row["owner"] = node
            return chosen
        return list(await self._transaction(work))

    async def event_frontier(self) -> tuple[int, int, int]:
        """(the highest event id drawn, a transaction id given to this read after that, the
        oldest transaction running after that): `rr_event_frontier`, cluster/events.py."""
        row = (await self.fetch_all("SELECT * FROM rr_event_frontier()"))[0]
        return int(row["drawn"]), int(row["xmax"]), int(row["xmin"])

    async def queue_positions(self, task_ids: Sequence[str], aging_s: float) -> dict[str, int]:
        """The 1-based place of each of `task_ids` that waits unclaimed, among every task
        waiting unclaimed in the cluster, in the claim's order (aged priority, then
        submission): one query, a window over the waiting rows."""
        order = claim_order(aging_s, 2)
        rows = await self.fetch_all(
            f'SELECT "id", "place" FROM (SELECT "id", row_number() OVER (ORDER BY {order}) AS '
            f'"place" FROM tasks WHERE "status" = \'pending\' AND "owner" IS NULL) AS q '
            f'WHERE "id" = ANY($1)', [list(task_ids), *([aging_s] if aging_s else [])])
        return {row["id"]: int(row["place"]) for row in rows}

    async def next_due(self, scripts: Sequence[str], now: float) -> float | None:
        """The earliest retry time after `now` of a pending task this node could run."""
        value = await self.fetch_value(
            "SELECT min(run_after) FROM tasks WHERE status = 'pending' AND owner IS NULL AND "
            "run_after > $1 AND script = ANY($2)", now, list(scripts))
        return None if value is None else float(value)

    async def pending_count(self) -> int:
        """Tasks waiting in the whole cluster."""
        return int(await self.fetch_value("SELECT count(*) FROM tasks WHERE status = 'pending'"))

    async def next_num(self) -> int:
        """A new submission number from the cluster's sequence."""
        return int(await self.fetch_value(
            "SELECT nextval(pg_get_serial_sequence('tasks', 'num'))"))

    async def listen(self, on_notify: Callable[[], None]) -> Any:
        """A connection of its own that calls `on_notify` on every NOTIFY of a claimable
        task; close it to stop."""
        conn = await asyncpg.connect(self.url)
        await conn.add_listener(NOTIFY_CHANNEL, lambda *args: on_notify())
        return conn


def node_fence(name: str, epoch: str) -> Fence:
    """The fence of every write of this node: its row names this process, not lost."""
    return Fence(("node_fence",), (name, epoch))


def task_fence(task_id: str, attempt: int, owner: str, new_owner: str | None,
               status: str) -> Guarded:
    """A guard of one task's write: still this attempt, of this owner, in this status (and
    the owner it has after the write: None hands a retry back to the cluster's queue)."""
    return Guarded(("update", "tasks", ("owner",), (("id", "="), ("attempt", "="),
                                                    ("owner", "="), ("status", "="))),
                   (new_owner, task_id, attempt, owner, status))


def cancel_unclaimed(task_id: str) -> Guarded:
    """A guard that a pending task is claimed by no node (its cancel is then ours to write)."""
    return Guarded(("update", "tasks", ("owner",), (("id", "="), ("status", "="),
                                                    ("owner", "null"))),
                   (None, task_id, "pending"))


def is_task_insert(statement: Statement) -> bool:
    """Whether a statement creates a task (a submission's, which `placed` completes)."""
    return statement.shape[:2] == ("insert", "tasks")


def placed(insert: Statement, node: str | None, labels: Sequence[str] | None) -> Statement:
    """A task's insert statement that also records where it may run (any other statement is
    given back as it is)."""
    if not is_task_insert(insert):
        return insert
    kind, table, columns = insert.shape
    return Statement((kind, table, (*columns, "node", "labels")),  # type: ignore[misc]
                     (*insert.params, node, None if labels is None else list(labels)))


def notify() -> Statement:
    """A statement that wakes every idle node (delivered when the transaction commits)."""
    return Statement(("notify",), ())


def by_node(statement: Statement, node: str) -> Statement:
    """A segment row's upsert that also names the node that wrote the segment (any other
    statement is given back as it is)."""
    if statement.shape[:2] != ("upsert", "task_logs"):
        return statement
    return Statement(("upsert", "task_logs", (*SEGMENT_COLUMNS, "node"), "path",
                      SEGMENT_PROGRESS), (*statement.params, node))
