"""Recovery of runs no live server holds: a dead server's, this server's before a restart, or
those of a cluster node declared lost. One path for both modes, every scan off the event loop.

`settle` kills what such a run left on this host (found by RR_TASK_ID in /proc), makes whole
the archive segments it left open, and says what its row must record; `Recovery` then writes
the end ("failed", or pending again while retries remain) through the engine's one transition
and publishes the exit event like any other end. Which runs are lost is the peers' to
say (`leftovers` at start, `orphans` on the reaper's beat); the rest is the same in both modes.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from remoterun import store
from remoterun.archive import Segment, deflate_of, recover
from remoterun.config import Settings
from remoterun.engine.live import Engine, TaskState, Where
from remoterun.engine.peers import Lost, Peers
from remoterun.engine.queue import Queue
from remoterun.isolation.sandbox import Sandbox
from remoterun.reaper import kill_left_behind
from remoterun.state import FINAL, Task, TaskStatus
from remoterun.wire import exit_event

log = structlog.get_logger(__name__)
S = TaskStatus


@dataclass
class Ending:
    """How a lost run's row ends: its next status, the fields and the segment rows."""

    status: TaskStatus
    fields: dict[str, Any]
    extra: list[store.Statement] = field(default_factory=list)


class Recovery:
    """Records the runs no live server holds, for one engine."""

    def __init__(self, engine: Engine, settings: Settings, db: store.Store, queue: Queue,
                 peers: Peers):
        self.engine, self.settings, self.db = engine, settings, db
        self.queue, self.peers = queue, peers

    async def recover(self) -> None:
        """At start: record runs an earlier server left, and hold the pending tasks again."""
        for lost in await self.peers.leftovers():
            await self.end(lost)
        for row in await self.queue.recover():
            if row["id"] not in self.engine.tasks:  # a retry's folder may hold segments
                self.engine.enqueue(TaskState(Task.from_row(row),
                                              next_segment=1 if row["attempt"] == 1 else None))
        log.info("recovered", pending=len(self.engine.tasks))

    async def sweep_work_folders(self, sandbox: Sandbox) -> None:
        """Remove the work folders a crashed server's attempts left (their finish never ran):
        those of this database's tasks, unless the task runs that attempt now (at start, after
        `recover`, none does here); a folder of a task we do not know is another server's."""
        dead = []
        for folder, task_id, attempt in await sandbox.work_folders():
            row = await self.db.get_task(task_id)
            if row is not None and (row["status"] != S.RUNNING or row["attempt"] != attempt):
                dead.append(folder)
        if dead:
            removed = await sandbox.remove_work_folders(dead)
            log.info("work_folders_swept", removed=removed, found=len(dead))

    async def let_go(self, state: TaskState) -> None:
        """Record a task whose end could not be concluded as the reaper does (unless it is
        final already), and tell its attached clients how it ended."""
        row = await self.db.get_task(state.task.id)
        if row is not None and row["status"] not in FINAL:
            row = await self.reap_one(row)
        if row is not None and state.hub is not None:
            state.record(Task.from_row(row))
            state.hub.publish(exit_event(row))

    async def reap(self) -> None:
        """Record runs no live server holds (a dead server's, a lost node's)."""
        for lost in await self.peers.orphans(self.engine.tasks.keys()):
            if lost.row["id"] not in self.engine.tasks:
                log.warning("reaped_lost_run", task_id=lost.row["id"])
                await self.end(lost)

    async def reap_one(self, row: dict[str, Any]) -> dict[str, Any]:
        """A run a reader found lost, recorded as after a crash; its row as recorded."""
        log.warning("reaped_lost_run", task_id=row["id"])
        ended = await self.end(Lost(row, f"the server stopped during attempt {row['attempt']}",
                                    kill=True))
        return ended or await self.db.get_task(row["id"]) or row

    async def end(self, lost: Lost) -> dict[str, Any] | None:
        """Record a lost run, failed or queued again, and publish its end; its row as
        recorded, or None if it is held again or another server recorded it first."""
        row = lost.row
        ending = await settle(self.settings, lost)
        if row["id"] in self.engine.tasks:  # held again meanwhile: not lost
            return None
        state = TaskState(Task.from_row(row), where=Where.FINISHING, next_segment=None)
        self.engine.hub(state)
        try:
            await self.engine.transition(state, ending.status, extra=ending.extra,
                                         **ending.fields)
        except store.StaleWrite:
            return None
        if ending.status is S.PENDING:
            self.engine.enqueue(state)
        else:
            self.engine.finish(state)
        log.warning("recovered_interrupted_run", task_id=row["id"],
                    status=str(state.task.status), error=lost.error)
        return state.task.to_row()


async def settle(settings: Settings, lost: Lost) -> Ending:
    """Kill the run's leftovers (if on this host) and finalize its archive, off the loop; the
    row's ending (a retry while `max_retries` allow, else failed)."""
    row = lost.row
    if lost.kill:
        await asyncio.to_thread(kill_left_behind, row["id"])
    found = await asyncio.to_thread(finalize_archive, settings, row)
    return ending(row, found, lost.error, time.time())


def ending(row: dict[str, Any], found: list[Segment], error: str, now: float) -> Ending:
    """The end of a lost run whose archive holds `found` (pure: decided from the row)."""
    last_seq = max([row["last_seq"], *(segment.last_seq for segment in found)])
    fields: dict[str, Any] = dict(pid=None, output_bytes=sum(s.raw_bytes for s in found),
                                  last_seq=last_seq, error=error)
    extra = [store.upsert_segment(row["id"], segment) for segment in found]
    if row["attempt"] <= row["max_retries"]:
        return Ending(S.PENDING, {**fields, "attempt": row["attempt"] + 1, "run_after": now},
                      extra)
    return Ending(S.FAILED, {**fields, "finished_at": now}, extra)


def finalize_archive(settings: Settings, row: dict[str, Any]) -> list[Segment]:
    """Make whole the segments a dead server left open, and describe them all for their rows."""
    found, scans = recover(settings.archive_dir, row["logs_path"], deflate_of(settings))
    for scan in scans:
        if not scan.complete:
            log.warning("archive_segment_finalized", task_id=row["id"], path=str(scan.path),
                        frames=scan.frames, problems=scan.problems)
    return found


def task_ids_on_host() -> set[str]:
    """The RR_TASK_ID of every process on this host that has one (a /proc scan; run it off
    the loop)."""
    found: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        found.update(v[len(b"RR_TASK_ID="):].decode() for v in env
                     if v.startswith(b"RR_TASK_ID="))
    return found
