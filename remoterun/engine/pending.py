"""The queue of waiting tasks: aged priority, FIFO ties, per-script limits, retry delays.

A task's effective priority is its priority plus one level per `aging_s` seconds it has waited
since it was submitted, so a low-priority task behind a steady stream of higher-priority work
starts within about (difference in priority) x `aging_s`. Every waiting task ages at the same
rate, so the order between two tasks never changes while they wait: the heap key
`created_at / aging_s - priority` is fixed at submission. Ties run in submission order (`num`).

A task whose script is at its `max_concurrency`, or whose retry is not yet due, is passed over
without blocking the others. The limits are looked up when a task joins the queue (through
`limit_of`, the catalogue's), so they hold after a restart too, not only for tasks submitted
since.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

Row = dict[str, Any]


class PendingQueue:
    """Waiting task rows in dispatch order, and the per-script count of running ones."""

    def __init__(self, aging_s: float, limit_of: Callable[[str], int | None]):
        self.aging_s = aging_s
        self.limit_of = limit_of
        self._heap: list[tuple[float, int, str]] = []
        self._rows: dict[str, Row] = {}
        self._limits: dict[str, int | None] = {}
        self.running: Counter[str] = Counter()  # per script, tasks holding a worker slot

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._rows

    def _key(self, row: Row) -> float:
        if self.aging_s:
            return float(row["created_at"] / self.aging_s - row["priority"])
        return float(-row["priority"])

    def push(self, row: Row) -> None:
        """Queue a pending task (new, recovered, or a retry)."""
        self._rows[row["id"]] = row
        if row["script"] not in self._limits:
            self._limits[row["script"]] = self.limit_of(row["script"])
        heapq.heappush(self._heap, (self._key(row), row["num"], row["id"]))

    def remove(self, task_id: str) -> Row | None:
        """Take a task out (cancelled); its heap entry is skipped when met."""
        return self._rows.pop(task_id, None)

    def take(self, slots: int, now: float) -> tuple[list[Row], float | None]:
        """Up to `slots` tasks to start now, best first, counted as running; and the seconds
        until the next deferred retry is due (None: no retry waits)."""
        chosen: list[Row] = []
        skipped: list[tuple[float, int, str]] = []
        next_due: float | None = None
        while self._heap and len(chosen) < slots:
            entry = heapq.heappop(self._heap)
            row = self._rows.get(entry[2])
            if row is None or row["num"] != entry[1]:
                continue  # cancelled, or a stale entry
            limit = self._limits.get(row["script"])
            run_after = row.get("run_after")
            if run_after and run_after > now:
                due = run_after - now
                next_due = due if next_due is None else min(next_due, due)
                skipped.append(entry)
            elif limit is not None and self.running[row["script"]] >= limit:
                skipped.append(entry)
            else:
                del self._rows[entry[2]]
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

    def positions(self, task_ids: Collection[str]) -> dict[str, int]:
        """The 1-based place in dispatch order (aged priority, then submission) of each of
        `task_ids` that waits here: one pass over the heap for one task, one sort for several."""
        live = {e[2]: e for e in self._heap
                if e[2] in self._rows and self._rows[e[2]]["num"] == e[1]}
        wanted = [i for i in task_ids if i in live]
        if not wanted:
            return {}
        if len(wanted) == 1:
            mine = live[wanted[0]]
            return {wanted[0]: 1 + sum(entry < mine for entry in live.values())}
        order = {task_id: place for place, (_, _, task_id) in enumerate(sorted(live.values()), 1)}
        return {task_id: order[task_id] for task_id in wanted}
