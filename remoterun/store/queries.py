"""The named reads every store answers, each built once with peewee and rendered per dialect.

As procrastinate's manager is to its connectors: a store gives `fetch_all` (run one SQL text in
its own dialect) and its `dialect`; this class gives every read the engine and the API make,
so SQLite and PostgreSQL answer the same questions with the same query.
"""

from __future__ import annotations

import abc
import functools
import operator
from collections.abc import Sequence
from typing import Any

import peewee as pw

from remoterun.state import FINAL, TaskStatus
from remoterun.store.base import Row
from remoterun.store.schema import (
    AuditEvent,
    Dialect,
    HookDelivery,
    Schedule,
    ScheduleSlot,
    TaskEvent,
)


class Queries(abc.ABC):
    """The Store Protocol's reads over a store's `fetch_all` and `dialect`."""

    dialect: Dialect

    @abc.abstractmethod
    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one statement in this store's dialect."""

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row, or None."""
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def _rows(self, query: pw.Node) -> list[Row]:
        return await self.fetch_all(*self.dialect.render(query))

    async def _one(self, query: pw.Node) -> Row | None:
        rows = await self._rows(query)
        return rows[0] if rows else None

    async def ping(self) -> None:
        """Raise if the database cannot be read."""
        await self.fetch_one("SELECT 1 AS ok")

    # Tasks -------------------------------------------------------------------------------------

    @functools.cached_property
    def _task_by_id(self) -> str:
        # Built once per store: building it for each call took ~10% of the loop's time for a
        # trivial task (REST GET and WebSocket attach each look the task up).
        task = self.dialect.task
        sql, params = self.dialect.render(task.select().where(task.id == ""))
        assert params == [""], "one parameter, the id"
        return sql

    async def get_task(self, task_id: str) -> Row | None:
        """The task row, or None."""
        return await self.fetch_one(self._task_by_id, (task_id,))

    async def last_num(self) -> int:
        """The highest submission number given (0: none)."""
        task = self.dialect.task
        row = await self._one(task.select(pw.fn.MAX(task.num).alias("n")))
        return int(row["n"] or 0) if row else 0

    async def list_tasks(self, *, status: str | None, script: str | None, limit: int,
                         before: int | None, after: int | None = None,
                         **filters: Any) -> list[Row]:
        """Newest first; `before` is the `num` cursor of the previous page, `after` that of
        the next (the `limit` oldest tasks newer than it). `filters`: see `_task_filter`."""
        task = self.dialect.task
        query = task.select().where(self._task_filter(status=status, script=script, **filters))
        if before is not None:
            query = query.where(task.num < before)
        if after is not None:
            query = query.where(task.num > after).order_by(task.num).limit(limit)
            return (await self._rows(query))[::-1]
        return await self._rows(query.order_by(task.num.desc()).limit(limit))

    async def has_task(self, num: int, newer: bool, **filters: Any) -> bool:
        """Whether a task newer (else older) than `num` matches the filters: is there a page
        beyond it."""
        task = self.dialect.task
        beyond = task.num > num if newer else task.num < num
        query = task.select(task.num).where(self._task_filter(**filters) & beyond)
        return await self._one(query.limit(1)) is not None

    def _task_filter(self, *, status: str | None = None, script: str | None = None,
                     submitted_by: str | None = None, since: float | None = None,
                     until: float | None = None, q: str | None = None,
                     scripts: tuple[str, ...] | None = None) -> Any:
        """The WHERE clause of a task list: exact status, script and submitter, created within
        [since, until), `q` a case-insensitive substring of the script's name (LIKE on SQLite,
        ILIKE on PostgreSQL, its wildcards escaped), and `scripts` (a token's fnmatch names or
        globs) hiding every other script's tasks."""
        task = self.dialect.task
        clauses: list[Any] = [task.num > 0]
        if scripts is not None:
            clauses.append(self._glob_clause(scripts, task.script))
        for column, value in ((task.status, status), (task.script, script),
                              (task.submitted_by, submitted_by)):
            if value:
                clauses.append(column == value)
        if since is not None:
            clauses.append(task.created_at >= since)
        if until is not None:
            clauses.append(task.created_at < until)
        if q:
            clauses.append(task.script.contains(q))
        return functools.reduce(operator.and_, clauses)

    def _glob_clause(self, patterns: tuple[str, ...], column: pw.Field) -> Any:
        """Rows whose `column` (a script's name) matches one of a token's patterns (fnmatch
        negates with `[!`, GLOB and the regex with `[^`); an empty list matches nothing."""
        if not patterns:
            return pw.SQL("1 = 0")
        globs = [self.dialect.glob(column, p.replace("[!", "[^")) for p in patterns]
        return functools.reduce(operator.or_, globs)

    async def tasks_in(self, *statuses: TaskStatus) -> list[Row]:
        """Every task in one of the statuses, in submission order."""
        task = self.dialect.task
        query = task.select().where(task.status.in_([str(s) for s in statuses]))
        return await self._rows(query.order_by(task.num))

    async def secrets_in_clear(self) -> list[Row]:
        """Tasks whose secret params an older server stored in clear JSON: id, status, the
        JSON (for the scheduler to seal, or drop once final)."""
        task = self.dialect.task
        query = task.select(task.id, task.status, task.secret_params).where(
            task.secret_params.startswith("{") & (task.secret_params != "{}"))
        return await self._rows(query)

    # Events and audit ----------------------------------------------------------------------------

    async def events(self, task_id: str) -> list[Row]:
        """A task's transitions, oldest first (their exit_code: of the attempt each ended)."""
        query = TaskEvent.select().where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        return await self._rows(query)

    async def last_event_id(self) -> int:
        """The id of the latest transition (0: none)."""
        row = await self._one(TaskEvent.select(pw.fn.MAX(TaskEvent.id).alias("id")))
        return int(row["id"] or 0) if row else 0

    async def events_after(self, since: int, limit: int, upto: int | None = None
                           ) -> list[Row]:
        """Up to `limit` transitions with an id above `since` (and at most `upto`), oldest
        first, each with its task's row (the event's own columns prefixed `event_`)."""
        task = self.dialect.task
        own = [getattr(TaskEvent, c).alias(f"event_{c}") for c in
               ("id", "ts", "old_status", "new_status", "attempt", "detail", "exit_code")]
        query = (TaskEvent.select(*own, task).join(task, on=(task.id == TaskEvent.task_id))
                 .where(TaskEvent.id > since).order_by(TaskEvent.id).limit(limit))
        if upto is not None:
            query = query.where(TaskEvent.id <= upto)
        return await self._rows(query)

    async def list_audit(self, *, actor: str | None, action: str | None,
                         task_id: str | None, since: float | None, limit: int,
                         before: int | None, scripts: tuple[str, ...] | None = None,
                         caller: str = "") -> list[Row]:
        """Audit rows newest first; `before` is the id cursor of the previous page. `scripts` (a
        token's list) keeps the rows of those scripts, and of no script only the `caller`'s own
        (its logins, its refusals): whose else logged in is no script's business."""
        query = AuditEvent.select()
        if scripts is not None:
            query = query.where(self._glob_clause(scripts, AuditEvent.script)
                                | (AuditEvent.script.is_null() & (AuditEvent.actor == caller)))
        for column, value in ((AuditEvent.actor, actor), (AuditEvent.action, action),
                              (AuditEvent.task_id, task_id)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditEvent.ts >= since)
        if before is not None:
            query = query.where(AuditEvent.id < before)
        return await self._rows(query.order_by(AuditEvent.id.desc()).limit(limit))

    # Hooks (issue 30) ----------------------------------------------------------------------------

    async def delivery(self, hook: str, delivery_id: str) -> Row | None:
        """A hook's delivery of this id, if one was answered."""
        return await self._one(HookDelivery.select().where(
            (HookDelivery.hook == hook) & (HookDelivery.delivery_id == delivery_id)))

    async def deliveries(self, hook: str, limit: int) -> list[Row]:
        """A hook's latest deliveries, newest first."""
        return await self._rows(HookDelivery.select().where(HookDelivery.hook == hook)
                                .order_by(HookDelivery.id.desc()).limit(limit))

    # Monitoring (issue 14) ---------------------------------------------------------------------

    async def live_counts(self) -> list[Row]:
        """Rows (script, status, n) for the tasks pending or running now."""
        task = self.dialect.task
        n = pw.fn.COUNT(task.num).alias("n")
        query = (task.select(task.script, task.status, n)
                 .where(task.status.in_([str(TaskStatus.PENDING), str(TaskStatus.RUNNING)]))
                 .group_by(task.script, task.status))
        return await self._rows(query)

    async def stats_rows(self, since: float, script: str | None) -> list[Row]:
        """Tasks submitted at or after `since`: script, status, duration (first start to end)
        and queue wait (submission to first start), the last two null where not known."""
        task = self.dialect.task
        duration = (task.finished_at - task.started_at).alias("duration")
        wait = (task.started_at - task.created_at).alias("wait")
        query = task.select(task.script, task.status, duration, wait).where(
            task.created_at >= since)
        if script is not None:
            query = query.where(task.script == script)
        return await self._rows(query)

    # Archive ---------------------------------------------------------------------------------

    async def segments(self, task_id: str) -> list[Row]:
        """A task's archive segment rows, in order."""
        log = self.dialect.segment
        return await self._rows(log.select().where(log.task_id == task_id).order_by(log.id))

    async def output_pruned(self, task_id: str) -> bool:
        """Whether retention has pruned the task's archived output."""
        log = self.dialect.segment
        query = log.select(log.path).where((log.task_id == task_id) & log.pruned)
        return await self._one(query.limit(1)) is not None

    async def archive_bytes(self) -> int:
        """Bytes on disk of every segment not pruned (as their rows last said)."""
        log = self.dialect.segment
        total = pw.fn.COALESCE(pw.fn.SUM(log.gz_bytes), 0).alias("total")
        row = await self._one(log.select(total).where(~log.pruned))
        return int(row["total"]) if row else 0

    async def prunable(self, ended_before: float | None = None) -> list[Row]:
        """Ended tasks whose output is still archived, the earliest ended first, with its size.

        Rows: task_id, logs_path, ended (Unix seconds), gz_bytes. A task not yet final (running,
        or pending a retry) is never listed: its archive may still grow. Grouped by the task's
        key, which both dialects accept for the task's other columns.
        """
        task, log = self.dialect.task, self.dialect.segment
        ended = pw.fn.COALESCE(task.finished_at, task.updated_at)
        query = (log.select(task.id.alias("task_id"), task.logs_path, ended.alias("ended"),
                            pw.fn.SUM(log.gz_bytes).alias("gz_bytes"))
                 .join(task, on=(task.id == log.task_id))
                 .where(~log.pruned & task.status.in_([str(s) for s in FINAL]))
                 .group_by(task.num).order_by(ended, task.num))
        if ended_before is not None:
            query = query.where(ended < ended_before)
        return await self._rows(query)

    async def all_segments(self) -> list[Row]:
        """Every segment row, with its task's status and logs_path (None: no such task)."""
        task, log = self.dialect.task, self.dialect.segment
        query = (log.select(log, task.status.alias("task_status"),
                            task.logs_path.alias("logs_path"))
                 .join(task, pw.JOIN.LEFT_OUTER, on=(task.id == log.task_id))
                 .order_by(log.task_id, log.first_seq))
        return await self._rows(query)

    async def task_folders(self) -> dict[str, tuple[str, str]]:
        """logs_path -> (task id, status) of every task."""
        task = self.dialect.task
        rows = await self._rows(task.select(task.id, task.logs_path, task.status))
        return {row["logs_path"]: (row["id"], row["status"]) for row in rows}

    # Schedules (issue 29) ----------------------------------------------------------------------

    async def schedule_rows(self) -> list[Row]:
        """Every schedule kept in the database (API definitions, pauses), by name."""
        return await self._rows(Schedule.select().order_by(Schedule.name))

    async def schedule_row(self, name: str) -> Row | None:
        """One schedule's row, or None."""
        return await self._one(Schedule.select().where(Schedule.name == name))

    async def slots(self, schedule: str, limit: int, before: float | None = None) -> list[Row]:
        """A schedule's slot records, newest first, older than `before` (a page's cursor)."""
        query = ScheduleSlot.select().where(ScheduleSlot.schedule == schedule)
        if before is not None:
            query = query.where(ScheduleSlot.slot < before)
        return await self._rows(query.order_by(ScheduleSlot.slot.desc()).limit(limit))

    async def latest_slots(self) -> dict[str, Row]:
        """The newest slot record of every schedule that has one."""
        newest = (ScheduleSlot.select(ScheduleSlot.schedule, pw.fn.MAX(ScheduleSlot.slot)
                                      .alias("top")).group_by(ScheduleSlot.schedule)
                  .alias("newest"))
        query = ScheduleSlot.select().join(newest, on=(
            (ScheduleSlot.schedule == newest.c.schedule) & (ScheduleSlot.slot == newest.c.top)))
        return {row["schedule"]: row for row in await self._rows(query)}

    async def queued_slots(self) -> list[Row]:
        """Slots waiting for their schedule's previous run to end (overlap = "queue"), their
        task not started yet."""
        query = ScheduleSlot.select().where((ScheduleSlot.outcome == "queued") &
                                            ScheduleSlot.task_id.is_null())
        return await self._rows(query.order_by(ScheduleSlot.slot))

    async def schedule_active(self, schedule: str) -> list[Row]:
        """The id and status of the schedule's tasks that are pending or running, oldest
        first."""
        task = self.dialect.task
        query = task.select(task.id, task.status).where(
            (task.schedule == schedule) & task.status.in_(("pending", "running")))
        return await self._rows(query.order_by(task.num))
