"""Peers: what the engine knows of the servers beside it, and of tasks it does not hold.

One server is `Alone`: every task in its database is its own, a running one it does not hold
was left by a dead server, and nothing guards its writes beyond the old status. A cluster node
(`cluster.node.Node`) beats, fences every write by its epoch and each task's attempt and owner,
judges silent nodes lost, and follows or controls tasks that other nodes run. The scheduler
asks its peers at those few points and nothing else differs between the modes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from remoterun import store
from remoterun.engine.attempt import Attempt
from remoterun.engine.hub import Subscription
from remoterun.engine.protect import Protection
from remoterun.errors import Conflict
from remoterun.state import Task, TaskStatus

Row = dict[str, Any]


@dataclass(frozen=True)
class Lost:
    """A run no live server holds: its row, the error it ends with, and whether its
    processes may still be on this host (to kill)."""

    row: Row
    error: str
    kill: bool


class Host(Protocol):
    """What the peers may ask of the engine it belongs to."""

    problems: dict[str, str]  # what /readyz reports: kind -> latest failure
    replay_slots: asyncio.Semaphore  # archive readers, shared with remote followers
    protection: Protection  # opened before join(): the cluster's keys derive from it

    def held_attempt(self, task_id: str) -> Attempt | None:
        """The attempt of a task this server holds, if any."""

    def kill_all(self, reason: str) -> None:
        """Stop every attempt now (SIGKILL), writing nothing of them (fenced)."""

    async def abandon(self, wait_s: float) -> bool:
        """Once every run has ended (waiting up to `wait_s`), forget every task; whether it
        did (False: some run still ends, ask again)."""

    def recover_again(self) -> None:
        """Record, in the background, what this server's previous epoch left (rejoined)."""


class Peers(Protocol):
    """The engine's view of the other servers (none, or a cluster's nodes)."""

    requests_in_order: bool  # a request's write queues behind the engine's (one server)

    @property
    def alive(self) -> bool:
        """Whether the loops join() started still run (for /readyz)."""
    orphan_interval_s: float  # how often orphans() is asked

    async def join(self, host: Host) -> None:
        """Announce this server (before recovery) and start what it runs."""

    async def close(self) -> None:
        """Stop what join() started."""

    def writable(self) -> None:
        """Unavailable (503) while this server may not write (a fenced node)."""

    async def commit_request(self, statements: list[store.Statement], within_s: float
                             ) -> int | None:
        """A request's write side by side with the engine's (when not `requests_in_order`)."""

    def track(self, task_id: str, attempt: int) -> None:
        """An attempt may start processes from now on."""

    def untrack(self, task_id: str, attempt: int) -> None:
        """The attempt ended."""

    async def leftovers(self) -> list[Lost]:
        """At start: the runs an earlier process of this server left recorded running."""

    async def orphans(self, held: Collection[str]) -> list[Lost]:
        """Runs recorded running that no live server holds (`held`: this one's)."""

    def fence(self, task: Task, new: TaskStatus) -> tuple[list[store.Statement], Row]:
        """The guards of a task's status write, and the Task's changes once it commits
        (store.StaleWrite at once if nothing this server writes may land now)."""

    def stamp(self, statements: list[store.Statement]) -> list[store.Statement]:
        """The engine's statements as this server writes them."""

    def follow(self, row: Row, since: int) -> Subscription | None:
        """A subscription to a task another server runs (None: no other server runs it)."""

    def control(self, task_id: str) -> Attempt | None:
        """The controls of a task another server runs (None: not known to run elsewhere): a
        proxy with an attempt's control methods."""

    async def cancel_elsewhere(self, row: Row) -> None:
        """Ask the server running the task to cancel it."""


class Alone:
    """One server on its own database."""

    requests_in_order = True
    alive = True  # nothing of its own runs

    def __init__(self, db: store.Store, reaper_interval_s: float):
        self.db = db
        self.orphan_interval_s = reaper_interval_s

    async def join(self, host: Host) -> None:
        """Nothing to announce."""

    async def close(self) -> None:
        """Nothing to stop."""

    def writable(self) -> None:
        """Always: one server is never fenced."""

    async def commit_request(self, statements: list[store.Statement], within_s: float
                             ) -> int | None:
        """Not used: one server's requests write in order behind its engine's."""
        return await self.db.commit(statements, within_s)

    def track(self, task_id: str, attempt: int) -> None:
        """Nothing watches a single server's runs but itself."""

    def untrack(self, task_id: str, attempt: int) -> None:
        """Nothing to forget."""

    async def leftovers(self) -> list[Lost]:
        """Every running row: no server runs while this one starts."""
        return [_stopped(row) for row in await self.db.tasks_in(TaskStatus.RUNNING)]

    async def orphans(self, held: Collection[str]) -> list[Lost]:
        """Running rows this server does not hold (a dead server's)."""
        return [_stopped(row) for row in await self.db.tasks_in(TaskStatus.RUNNING)
                if row["id"] not in held]

    def fence(self, task: Task, new: TaskStatus) -> tuple[list[store.Statement], Row]:
        """No guard beyond the old status (store.transition's own)."""
        return [], {}

    def stamp(self, statements: list[store.Statement]) -> list[store.Statement]:
        """As they are."""
        return statements

    def follow(self, row: Row, since: int) -> Subscription | None:
        """None: a task not final and not held here is a lost run."""
        return None

    def control(self, task_id: str) -> Attempt | None:
        """None: no other server runs anything."""
        return None

    async def cancel_elsewhere(self, row: Row) -> None:
        """Conflict: a task not held here has ended, or is about to be recorded so."""
        raise Conflict(f"task {row['id']} has already ended ({row['status']})",
                       code="already_finished")


def _stopped(row: Row) -> Lost:
    return Lost(row, f"the server stopped during attempt {row['attempt']}", kill=True)
