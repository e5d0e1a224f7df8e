"""What every store is: the `Store` Protocol, its statements and the errors of its writes.

The engine and the API see a store only through this module. A `Statement` names the shape of
a write (which table, which columns) and carries its values; each store renders the shape in
its own dialect with peewee (`schema.Dialect`), so no store ever reads another's SQL. The
cluster-only calls (nodes, claims) form `Membership`, which only the PostgreSQL store has and
which the API asks for by name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from remoterun.errors import Unavailable
from remoterun.state import TaskStatus

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Statement:
    """One write: its shape, `(kind, *args)` as `schema.build` reads it, and its values."""

    shape: tuple[Hashable, ...]
    params: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Guarded(Statement):
    """A statement that must change exactly one row, or its whole transaction is undone."""


@dataclass(frozen=True, slots=True)
class Fence(Guarded):
    """A guard on this node's own row (cluster): it must still be ours and not lost."""


class StaleWrite(Exception):
    """A guarded statement changed no row: the state it was written against is gone."""


class Fenced(StaleWrite, Unavailable):
    """A write of a node that lost its lease (declared lost, or fenced by its watchdog):
    nothing was written. On a request's path it answers 503 `node_fenced`: the node joins
    again under a new epoch within a heartbeat or two."""

    code = "node_fenced"

    def __init__(self, detail: str = ""):
        super().__init__("this node lost its lease to the cluster and is joining again; "
                         "try again, or another node", retry_after_s=1.0)
        self.detail = detail  # the fence that failed


class DatabaseBusy(Exception):
    """A write met a lock held by another connection (or a read-only file, a full disk, or no
    connection could be had): nothing changed, the caller may try again."""


class Unsure(DatabaseBusy):
    """A write whose connection broke after its transaction began: it may have committed.
    `xid` names its transaction (the store can look up what became of it), `rowid` is what
    the write would have returned."""

    def __init__(self, message: str, xid: int, rowid: int | None):
        super().__init__(message)
        self.xid = xid
        self.rowid = rowid


class DatabaseUnavailable(Exception):
    """The database stayed unwritable for longer than the caller could wait. `unsure`: a
    try of the write whose outcome is unknown (pass it back to `commit`)."""

    def __init__(self, message: str, unsure: DatabaseBusy | None = None):
        super().__init__(message)
        self.unsure = unsure


@runtime_checkable
class Store(Protocol):
    """The state of every task, its events, segments and audit trail, behind named queries."""

    async def open(self) -> None:
        """Connect, create or migrate the schema."""

    async def close(self) -> None:
        """Let go of every connection."""

    async def commit(self, statements: Sequence[Statement], within_s: float,
                     unsure: DatabaseBusy | None = None) -> int | None:
        """Write the statements in one transaction, waiting at most `within_s` for a lock or
        a connection; the id of the last row inserted. StaleWrite: a guard failed, nothing
        written. DatabaseUnavailable: not written in time (`unsure`: maybe written)."""

    def probe_write(self) -> str | None:
        """Why a write could not start now, or None (for /readyz)."""

    async def checkpoint(self, truncate: bool = False) -> None:
        """Housekeeping the store wants each flush tick (SQLite: copy its log)."""

    async def ping(self) -> None:
        """Raise if the database cannot be read."""

    async def get_task(self, task_id: str) -> Row | None:
        """The task's row, or None."""

    async def last_num(self) -> int:
        """The highest submission number given (0: none)."""

    async def last_event_id(self) -> int:
        """The id of the latest transition (0: none)."""

    async def list_tasks(self, *, status: str | None, script: str | None, limit: int,
                         before: int | None, after: int | None = None,
                         **filters: Any) -> list[Row]:
        """A page of tasks, newest first, filtered."""

    async def has_task(self, num: int, newer: bool, **filters: Any) -> bool:
        """Whether a task beyond `num` matches the filters."""

    async def tasks_in(self, *statuses: TaskStatus) -> list[Row]:
        """Every task in one of the statuses, in submission order."""

    async def secrets_in_clear(self) -> list[Row]:
        """Tasks whose secret params an older server stored unsealed."""

    async def events(self, task_id: str) -> list[Row]:
        """A task's transitions, oldest first."""

    async def events_after(self, since: int, limit: int, upto: int | None = None
                           ) -> list[Row]:
        """Transitions after an id (and at most `upto`), each with its task's row."""

    async def list_audit(self, *, actor: str | None, action: str | None,
                         task_id: str | None, since: float | None, limit: int,
                         before: int | None, scripts: tuple[str, ...] | None = None,
                         caller: str = "") -> list[Row]:
        """Audit rows newest first (`scripts`: a token's list, and the `caller`'s own)."""

    async def delivery(self, hook: str, delivery_id: str) -> Row | None:
        """A hook's delivery of this id, if one was answered."""

    async def deliveries(self, hook: str, limit: int) -> list[Row]:
        """A hook's latest deliveries, newest first."""

    async def live_counts(self) -> list[Row]:
        """(script, status, n) of the tasks pending or running."""

    async def stats_rows(self, since: float, script: str | None) -> list[Row]:
        """Durations and waits of the tasks submitted since a time."""

    async def segments(self, task_id: str) -> list[Row]:
        """A task's archive segment rows, in order."""

    async def all_segments(self) -> list[Row]:
        """Every segment row with its task's status and folder."""

    async def task_folders(self) -> dict[str, tuple[str, str]]:
        """logs_path -> (task id, status) of every task."""

    async def output_pruned(self, task_id: str) -> bool:
        """Whether retention pruned the task's archived output."""

    async def archive_bytes(self) -> int:
        """Bytes of every segment not pruned."""

    async def prunable(self, ended_before: float | None = None) -> list[Row]:
        """Final tasks whose output is still archived, earliest ended first."""

    async def schedule_rows(self) -> list[Row]:
        """Every schedule kept in the database (API definitions, pauses), by name."""

    async def schedule_row(self, name: str) -> Row | None:
        """One schedule's row, or None."""

    async def slots(self, schedule: str, limit: int, before: float | None = None) -> list[Row]:
        """A schedule's slot records, newest first, older than `before`."""

    async def latest_slots(self) -> dict[str, Row]:
        """The newest slot record of every schedule that has one."""

    async def queued_slots(self) -> list[Row]:
        """Slots waiting for their schedule's previous run to end."""

    async def schedule_active(self, schedule: str) -> list[Row]:
        """The id and status of the schedule's pending or running tasks, oldest first."""


@runtime_checkable
class Membership(Protocol):
    """The cluster's nodes, as the API reads them (the PostgreSQL store only)."""

    async def nodes(self, timeout_s: float) -> list[Row]:
        """Every node known, with `alive` and `running`, by name."""


FenceMaker = Callable[[], Fence]
