"""Every task transition, to any number of `/events` followers: bounded queues, slow ones dropped.

The scheduler publishes each transition once it is committed, with the id of its `task_events`
row; publishing never awaits. Each follower has its own queue, bounded in events: a follower
that falls that far behind is dropped (its stream is cut) and resumes from the database with
`Last-Event-ID`, losing nothing, so one slow client never holds the engine or the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remoterun.wire import rfc3339, task_json

DEFAULT_QUEUE_EVENTS = 10_000


@dataclass(slots=True)
class TaskChange:
    """One committed transition: its event row's id and fields, and the task after it."""

    event_id: int
    task: dict[str, Any]
    event: dict[str, Any]
    encoded: bytes | None = None  # the wire form, made once for every follower


def event_json(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A task_events row as the API shows it (its columns named with `prefix`)."""
    return {"id": row[f"{prefix}id"], "ts": rfc3339(row[f"{prefix}ts"]),
            "old_status": row[f"{prefix}old_status"], "new_status": row[f"{prefix}new_status"],
            "attempt": row[f"{prefix}attempt"], "detail": row[f"{prefix}detail"],
            "exit_code": row[f"{prefix}exit_code"]}


def stored_change(row: dict[str, Any]) -> TaskChange:
    """A change read back from the database (a row of `Store.events_after`): the task as it
    is now, with the status and attempt the transition gave it."""
    event = event_json(row, "event_")
    task = {**task_json(row), "status": event["new_status"], "attempt": event["attempt"]}
    return TaskChange(event["id"], task, event)


class Dropped(Exception):
    """The follower fell more than its queue behind and must resume from the database."""


@dataclass(eq=False)
class Follower:
    """One `/events` client's queue of changes not yet written to it."""

    limit: int
    queue: deque[TaskChange] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    ended: bool = False
    # Called when dropped: a follower stuck writing to a client that stopped reading is cut
    # at once, not when (if ever) that write returns.
    on_drop: Callable[[], None] | None = None

    def put(self, change: TaskChange) -> bool:
        """Queue a change; False (and marked dropped) when the queue is full."""
        if len(self.queue) >= self.limit:
            self.dropped = True
            self.queue.clear()
            self.ready.set()
            if self.on_drop is not None:
                self.on_drop()
            return False
        self.queue.append(change)
        self.ready.set()
        return True

    async def take(self) -> list[TaskChange]:
        """Every queued change, waiting for one; [] once the feed closed. Dropped if dropped."""
        while not self.queue and not self.dropped and not self.ended:
            self.ready.clear()
            await self.ready.wait()
        if self.dropped:
            raise Dropped
        batch = list(self.queue)
        self.queue.clear()
        return batch


class TaskFeed:
    """Fan-out of committed transitions to the followers of `/events`."""

    def __init__(self, queue_events: int = DEFAULT_QUEUE_EVENTS):
        self.queue_events = queue_events
        self._followers: set[Follower] = set()
        self.closed = False
        # The highest event id that is final: every id at or below it is committed (and
        # delivered to the followers) or never will be; None where ids are given in commit
        # order (one server: SQLite's writes are serial). A cluster's feed moves it.
        self.frontier: int | None = None

    def publish(self, event_id: int | None, row: dict[str, Any], old_status: str | None,
                fields: dict[str, Any] | None = None) -> None:
        """Hand a committed transition to every follower: its event row's id, the task's row
        after it, and the fields the transition set (its `error` and `exit_code` are the
        event's, as db.transition records them). Never awaits; costs nothing unfollowed."""
        if event_id is None or not self._followers:
            return
        task = task_json(row)
        fields = fields or {}
        event = {"id": event_id, "ts": task["updated_at"], "old_status": old_status,
                 "new_status": task["status"], "attempt": task["attempt"],
                 "detail": fields.get("error"), "exit_code": fields.get("exit_code")}
        self.deliver(TaskChange(event_id, task, event))

    def deliver(self, change: TaskChange) -> None:
        """Hand a change to every follower (changes come in event id order)."""
        for follower in list(self._followers):
            if not follower.put(change):
                self._followers.discard(follower)

    def follow(self) -> Follower:
        """A new follower, receiving every change published from now on."""
        follower = Follower(self.queue_events)
        follower.ended = self.closed
        if not self.closed:
            self._followers.add(follower)
        return follower

    def leave(self, follower: Follower) -> None:
        """Stop delivering to a follower."""
        self._followers.discard(follower)

    def close(self) -> None:
        """End every follower's stream (the server is shutting down)."""
        self.closed = True
        for follower in self._followers:
            follower.ended = True
            follower.ready.set()
        self._followers.clear()

    @property
    def followers(self) -> int:
        """How many followers are connected."""
        return len(self._followers)
