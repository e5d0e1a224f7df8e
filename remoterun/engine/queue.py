"""The queue of waiting tasks: one policy, and the Queue protocol the scheduler dispatches from.

The policy (`QueuePolicy`): a task's effective priority is its priority plus one level per
`aging_s` seconds it has waited since it was submitted, so a low-priority task behind a steady
stream of higher-priority work starts within about (difference in priority) x `aging_s`. Every
waiting task ages at the same rate, so the order between two tasks never changes while they
wait: the key `created_at / aging_s - priority` is fixed at submission. Ties run in submission
order (`num`). A task whose script is at its `max_concurrency`, or whose retry is not yet due,
is passed over without blocking the others. The limits come from the catalogue when a task
joins the queue, so they hold after a restart too.

Two queues apply it: `LocalQueue` here (a heap in this process, one server) and the cluster's
claim queue (`cluster.claims`, the same order evaluated by PostgreSQL). The scheduler sees only
the `Queue` protocol: numbering, placement and admission are return values, never state set on
the scheduler.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from remoterun import store
from remoterun.errors import QueueFull
from remoterun.state import TaskStatus

Row = dict[str, Any]


@dataclass(frozen=True)
class Placement:
    """Where a submission may run: a node's name and labels it asks for (None: anywhere)."""

    node: str | None = None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class QueuePolicy:
    """The order and the limits of the queue, as pure functions of a task's row."""

    aging_s: float
    limit_of: Callable[[str], int | None]

    def key(self, row: Row) -> tuple[float, int]:
        """The dispatch order: aged priority (lower first), then submission order."""
        if self.aging_s:
            return float(row["created_at"] / self.aging_s - row["priority"]), row["num"]
        return float(-row["priority"]), row["num"]

    @staticmethod
    def due_in(row: Row, now: float) -> float:
        """Seconds until the task may start (0: now; a retry waits for its `run_after`)."""
        run_after = row.get("run_after")
        return max(0.0, run_after - now) if run_after else 0.0

    @staticmethod
    def has_room(limit: int | None, running: int) -> bool:
        """Whether a script with `limit` (None: unlimited) and `running` tasks may start one."""
        return limit is None or running < limit


class Queue(Protocol):
    """Where pending tasks wait and where the dispatcher takes them from."""

    async def recover(self) -> list[Row]:
        """At start: the pending rows this server holds again (its queue's, or none)."""

    async def admit(self, script: str, request: dict[str, Any]) -> Placement:
        """QueueFull (or InvalidParams for a placement no node fits) unless it may join."""

    async def number(self) -> int:
        """A new submission's number (taken after every await of the submission's checks)."""

    def entry(self, insert: store.Statement, placement: Placement) -> list[store.Statement]:
        """The statements that record a submission's row in the queue."""

    def requeued(self) -> list[store.Statement]:
        """Statements written with a task's return to pending (a retry, a recovery)."""

    def put(self, row: Row) -> bool:
        """A task joined the queue; whether this process holds it while it waits."""

    def remove(self, task_id: str) -> Row | None:
        """Take a held task out (cancelled); None if it is not held here."""

    def unclaimed(self, row: Row) -> store.Statement | None:
        """For a pending task held nowhere: the guard under which it may be cancelled here."""

    async def take(self, slots: int, now: float, held: Collection[str]
                   ) -> tuple[list[Row], float | None]:
        """Up to `slots` tasks to start now; and how long to wait for a wake before looking
        again (None: until woken). `held` names the tasks this server holds."""

    def ended(self, script: str) -> None:
        """A task of `script` gave its worker slot back."""

    async def positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """The 1-based place in dispatch order of those of `task_ids` known to wait here."""

    async def start(self, wake: Callable[[], None]) -> None:
        """Begin; call `wake` whenever a task may have become claimable."""

    async def close(self) -> None:
        """Release what start() opened."""


class LocalQueue:
    """One server's queue: waiting rows in a heap, in the policy's order."""

    def __init__(self, policy: QueuePolicy, db: store.Store, max_pending: int):
        self.policy = policy
        self.db = db
        self.max_pending = max_pending
        self._heap: list[tuple[tuple[float, int], str]] = []
        self._rows: dict[str, Row] = {}
        self._limits: dict[str, int | None] = {}
        self.running: Counter[str] = Counter()  # per script, tasks holding a worker slot
        self._next_num = 1

    def __len__(self) -> int:
        return len(self._rows)

    async def recover(self) -> list[Row]:
        """Number after the highest number stored; every pending row is this server's."""
        self._next_num = await self.db.last_num() + 1
        return await self.db.tasks_in(TaskStatus.PENDING)

    async def admit(self, script: str, request: dict[str, Any]) -> Placement:
        """QueueFull past `engine.max_pending` waiting here; placement is a cluster's."""
        if len(self._rows) >= self.max_pending:
            raise QueueFull(f"{len(self._rows)} tasks are already waiting (engine.max_pending)",
                            retry_after_s=5.0)
        return Placement()

    async def number(self) -> int:
        """The next number of this server's counter (taken without an await in between)."""
        num, self._next_num = self._next_num, self._next_num + 1
        return num

    def entry(self, insert: store.Statement, placement: Placement) -> list[store.Statement]:
        """The row as built."""
        return [insert]

    def requeued(self) -> list[store.Statement]:
        """Nothing: the queue is in memory."""
        return []

    def put(self, row: Row) -> bool:
        """Queue a pending task (new, recovered, or a retry); held here."""
        self._rows[row["id"]] = row
        if row["script"] not in self._limits:
            self._limits[row["script"]] = self.policy.limit_of(row["script"])
        heapq.heappush(self._heap, (self.policy.key(row), row["id"]))
        return True

    def remove(self, task_id: str) -> Row | None:
        """Take a task out; its heap entry is skipped when met."""
        return self._rows.pop(task_id, None)

    def unclaimed(self, row: Row) -> store.Statement | None:
        """None: every pending task of one server is held by it."""
        return None

    async def take(self, slots: int, now: float, held: Collection[str] = ()
                   ) -> tuple[list[Row], float | None]:
        """The best tasks that may start now, counted as running; and the seconds until the
        next deferred retry is due."""
        chosen: list[Row] = []
        skipped: list[tuple[tuple[float, int], str]] = []
        next_due: float | None = None
        while self._heap and len(chosen) < slots:
            entry = heapq.heappop(self._heap)
            row = self._rows.get(entry[1])
            if row is None or self.policy.key(row) != entry[0]:
                continue  # cancelled, or a stale entry
            due = self.policy.due_in(row, now)
            if due > 0:
                next_due = due if next_due is None else min(next_due, due)
                skipped.append(entry)
            elif not self.policy.has_room(self._limits.get(row["script"]),
                                          self.running[row["script"]]):
                skipped.append(entry)
            else:
                del self._rows[entry[1]]
                self.running[row["script"]] += 1
                chosen.append(row)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return chosen, next_due

    def ended(self, script: str) -> None:
        """A task of `script` gave its worker slot back."""
        self.running[script] -= 1
        if self.running[script] <= 0:
            del self.running[script]

    async def positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """One pass over the heap for one task, one sort for several."""
        live = {e[1]: e for e in self._heap
                if e[1] in self._rows and self.policy.key(self._rows[e[1]]) == e[0]}
        wanted = [i for i in task_ids if i in live]
        if not wanted:
            return {}
        if len(wanted) == 1:
            mine = live[wanted[0]]
            return {wanted[0]: 1 + sum(entry < mine for entry in live.values())}
        order = {task_id: place for place, (_, task_id) in enumerate(sorted(live.values()), 1)}
        return {task_id: order[task_id] for task_id in wanted}

    async def start(self, wake: Callable[[], None]) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release."""
