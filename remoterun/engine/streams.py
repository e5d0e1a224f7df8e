"""The engine's reach to a task beyond its own bookkeeping: each live task's hub, a client's
subscription (held here, run by another server, or ended), the controls of an attempt here or
elsewhere, and the cancel of a task this server does not hold.

A live task's hub is made on first use and lives as long as its `TaskState`; a task that no
state here holds is followed or controlled through the peers (a cluster's nodes), or, once
ended (or lost), replayed from the archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from remoterun import store
from remoterun.config import Settings
from remoterun.engine.attempt import Attempt
from remoterun.engine.hub import Subscription, TaskHub, replay_finished
from remoterun.engine.live import Engine, TaskState, Where
from remoterun.engine.peers import Peers
from remoterun.engine.queue import Queue
from remoterun.engine.recovery import Recovery
from remoterun.errors import Conflict, NotFound
from remoterun.state import FINAL, Task, TaskStatus
from remoterun.wire import task_json

Publish = Callable[[str, TaskHub], Any]  # a live task's extra subscriber (the cluster relay)


class Streams:
    """Hubs, subscriptions, controls and cancels of tasks, held here or not."""

    def __init__(self, engine: Engine, settings: Settings, db: store.Store, queue: Queue,
                 peers: Peers, recovery: Recovery, publish: Publish | None,
                 request_wait_s: float):
        self.engine, self.settings, self.db = engine, settings, db
        self.queue, self.peers, self.recovery, self.publish = queue, peers, recovery, publish
        self.request_wait_s = request_wait_s
        self.replay_slots = asyncio.Semaphore(settings.replay_readers)  # see hub.Subscription

    def hub(self, state: TaskState) -> TaskHub:
        """The task's hub, made on first use (with the publish hook's subscriber)."""
        if state.hub is None:
            task = state.task
            task_id = task.id
            state.hub = TaskHub(task, memory_bytes=self.settings.replay_memory_bytes,
                                next_seq=max(task.last_seq, task.seq_reserved) + 1,
                                flush_archive=lambda: self.start_flush(task_id))
            if self.publish is not None:
                state.hub.subscribers.add(self.publish(task_id, state.hub))
        return state.hub

    async def subscribe(self, task_id: str, since: int) -> Subscription:
        """Every frame after `since`, then live output and status, then the exit event."""
        limit, root = self.settings.client_queue_bytes, self.settings.archive_dir
        state = self.engine.tasks.get(task_id)
        if state is None:
            row = await self.db.get_task(task_id)
            if row is None:
                raise NotFound(f"no task {task_id}")
            state = self.engine.tasks.get(task_id)  # it may have been recovered while we read
            if state is None:
                if row["status"] not in FINAL:  # not held here: elsewhere, or a lost run
                    remote = self.peers.follow(row, since)
                    if remote is not None:
                        return remote
                    row = await self.recovery.reap_one(row)
                return replay_finished(row, task_json(row), since, root, limit,
                                       self.replay_slots)
        return self.hub(state).subscribe(since, root, limit, self.replay_slots)

    def attempt(self, task_id: str) -> Attempt | None:
        """The controls of the task's running (or starting) attempt, here or elsewhere."""
        state = self.engine.tasks.get(task_id)
        if state is not None and state.where is not Where.FINISHING:
            return state.attempt
        return self.peers.control(task_id) if state is None else None

    def held_attempt(self, task_id: str) -> Attempt | None:
        """The attempt of a task this server holds, if any (a control published for it)."""
        state = self.engine.tasks.get(task_id)
        return state.attempt if state is not None else None

    def live_row(self, task_id: str) -> dict[str, Any] | None:
        """The row of a task this scheduler holds (queued to finishing), else None: a copy of
        its Task's fields as last committed."""
        state = self.engine.tasks.get(task_id)
        return state.task.to_row() if state is not None else None

    def start_flush(self, task_id: str) -> Future[None] | None:
        """Start a flush of the task's current archive (whichever attempt is writing)."""
        state = self.engine.tasks.get(task_id)
        if state is None or state.attempt is None:
            return None
        return state.attempt.archive.flush()

    async def flush_archive(self, task_id: str) -> None:
        """Make what a task wrote before the call readable on disk, then return."""
        flushed = self.start_flush(task_id)
        if flushed is not None:
            await asyncio.wrap_future(flushed)

    async def cancel_elsewhere(self, task_id: str, audit_rows: list[store.Statement]
                               ) -> dict[str, Any]:
        """Cancel a task this server does not hold: unclaimed in a shared queue, or on the
        server that runs it."""
        row = await self.db.get_task(task_id)
        if row is None:
            raise NotFound(f"no task {task_id}")
        if row["status"] in FINAL:
            raise Conflict(f"task {task_id} has already ended ({row['status']})",
                           code="already_finished")
        guard = self.queue.unclaimed(row)
        if guard is not None:
            state = TaskState(Task.from_row(row), where=Where.FINISHING)
            self.hub(state)
            with contextlib.suppress(store.StaleWrite):  # claimed meanwhile: its owner cancels
                await self.engine.transition(state, TaskStatus.CANCELLED,
                                             finished_at=time.time(), run_after=None,
                                             extra=[guard, *audit_rows],
                                             within_s=self.request_wait_s)
                self.engine.finish(state)
                return state.task.to_json()
        elif audit_rows:
            await self.engine.commit(audit_rows, within_s=self.request_wait_s)
        await self.peers.cancel_elsewhere(row)
        return task_json(row)
