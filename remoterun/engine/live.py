"""One live task as the engine holds it: where it is, its Task, its hub and its attempt; the
Task a new submission starts as; and what the engine's parts (runs, recovery) may ask of it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from remoterun import store
from remoterun.archive import logs_path_for
from remoterun.engine.attempt import Attempt, Progress
from remoterun.engine.hub import TaskHub
from remoterun.state import Task, TaskStatus


class Where(StrEnum):
    """Where a live task is."""

    QUEUED = "queued"  # pending, in the queue
    STARTING = "starting"  # taken from the queue, its running transition being committed
    RUNNING = "running"  # its attempt holds a worker slot
    FINISHING = "finishing"  # its process ended, its next state being committed


@dataclass(eq=False)
class TaskState:
    """Everything the engine knows of one live task."""

    task: Task  # its stored fields as last committed (replaced by `record`, never changed)
    where: Where = Where.QUEUED
    hub: TaskHub | None = None
    attempt: Attempt | None = None
    flush_due: float = 0.0  # time.monotonic() of its archive's next flush
    recorded: Progress | None = None  # what the last flush wrote of its attempt's progress
    reserving: bool = False  # a seq reservation is being committed
    next_segment: int | None = 1  # the number its next archive segment takes (None: unknown)
    spawn_retries: int = 0  # spawns retried for a shortage of descriptors (EMFILE, ENFILE)

    def record(self, task: Task) -> None:
        """The task as now committed: held here, and what its hub shows new subscribers."""
        self.task = task
        if self.hub is not None:
            self.hub.task = task


def new_task(num: int, task_id: str, script: str, request: dict[str, Any], shown: str,
             sealed: str, submitted_by: str, now: float) -> Task:
    """A submission as inserted: numbered `num`, params as shown and sealed."""
    return Task(
        num=num, id=task_id, script=script, status=TaskStatus.PENDING,
        params=shown, secret_params=sealed,
        priority=request.get("priority", 0), timeout=request.get("timeout"),
        max_retries=request.get("max_retries", 0), attempt=1,
        pty=request.get("pty", False),
        interactive=request.get("interactive", False) or request.get("pty", False),
        stdin=request.get("stdin", ""), created_at=now, updated_at=now,
        submitted_by=submitted_by, logs_path=logs_path_for(task_id, now),
        schedule=request.get("schedule"), scheduled_for=request.get("scheduled_for"))


class Engine(Protocol):
    """What the runs need of the scheduler that owns them."""

    tasks: dict[str, TaskState]
    problems: dict[str, str]

    async def transition(self, state: TaskState, new: TaskStatus,
                         extra: Iterable[store.Statement] = (), within_s: float | None = None,
                         **fields: Any) -> None:
        """Check, persist, then announce a status change."""

    async def commit(self, statements: list[store.Statement], within_s: float | None = None
                     ) -> int | None:
        """The engine's commit, in order (or a request's, waiting at most `within_s`)."""

    def enqueue(self, state: TaskState) -> None:
        """The task waits again."""

    def finish(self, state: TaskState) -> None:
        """Announce the end and forget the task."""

    def hub(self, state: TaskState) -> TaskHub:
        """The task's hub (made on first use)."""

    def own(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background coroutine that close() cancels."""

    def wake(self) -> None:
        """A slot came free: the dispatcher looks again."""
