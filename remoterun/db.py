"""Persistence: peewee models on SQLite (WAL); reads through aiosqlite, writes on the loop.

Peewee describes the schema and builds every statement (`Model.insert(...).sql()`); we execute
them ourselves, since peewee's own connection handling is synchronous and an async ORM layered
on top of it would add a dependency for what `.sql()` already gives us.

Reads (lists, lookups, the scans of retention and recovery) may take milliseconds on a large
table: aiosqlite runs them on its thread, so the event loop never waits for them.

Writes are small (a task's row and an event row per state change, segment rows) and run on the
event loop, each call one transaction on a plain `sqlite3` connection. A WAL commit with
synchronous=NORMAL appends to the log without fsync, ~40 us for a state change here, and
survives the server being killed (a power cut may lose the last commits, as it may the
archive's unsynced tail). On aiosqlite's thread a commit cost the loop more than the commit
itself, and put two thread hops in its path: under load each waited ~3 ms for the busy loop
to take the result back, three commits in every task's life (`bench/README.md`). The writer
never checkpoints (`wal_autocheckpoint=0`: a checkpoint syncs files, which may stall);
`checkpoint()` does, on aiosqlite's thread, and the scheduler calls it every flush tick.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import peewee as pw
import structlog

from remoterun.state import FINAL, TaskStatus

SCHEMA_VERSION = 1
log = structlog.get_logger(__name__)

_db = pw.SqliteDatabase(None)
Statement = tuple[str, Sequence[Any]]


class _Base(pw.Model):
    class Meta:
        database = _db


class Task(_Base):
    """A submitted task: every field of PROTOCOL.md's task, plus what the engine needs."""

    num = pw.AutoField()  # submission order: FIFO tie-break and list cursor
    id = pw.CharField(unique=True)
    script = pw.CharField()
    params = pw.TextField(default="{}")  # JSON, secrets as "***"
    secret_params = pw.TextField(default="{}")  # JSON, the real values of secret params
    status = pw.CharField(index=True)
    priority = pw.IntegerField(default=0)
    timeout = pw.FloatField(null=True)
    max_retries = pw.IntegerField(default=0)
    attempt = pw.IntegerField(default=1)
    pty = pw.BooleanField(default=False)
    interactive = pw.BooleanField(default=False)
    stdin = pw.TextField(default="")
    exit_code = pw.IntegerField(null=True)
    error = pw.TextField(null=True)
    created_at = pw.FloatField()
    updated_at = pw.FloatField()
    started_at = pw.FloatField(null=True)
    finished_at = pw.FloatField(null=True)
    run_after = pw.FloatField(null=True)
    submitted_by = pw.CharField(default="anonymous")
    logs_path = pw.CharField()
    output_bytes = pw.IntegerField(default=0)
    last_seq = pw.IntegerField(default=0)
    pid = pw.IntegerField(null=True)  # of the running attempt, to sweep its group after a crash

    class Meta:
        table_name = "tasks"
        indexes = ((("script", "num"), False),)


class TaskEvent(_Base):
    """One state transition, written in the same transaction as the task row."""

    id = pw.AutoField()
    task_id = pw.CharField(index=True)
    ts = pw.FloatField()
    old_status = pw.CharField(null=True)
    new_status = pw.CharField()
    attempt = pw.IntegerField()
    detail = pw.TextField(null=True)

    class Meta:
        table_name = "task_events"


class TaskLog(_Base):
    """One archive segment of a task's output."""

    id = pw.AutoField()
    task_id = pw.CharField(index=True)
    created_at = pw.FloatField()
    path = pw.CharField(unique=True)
    first_seq = pw.IntegerField()
    last_seq = pw.IntegerField(default=0)
    raw_bytes = pw.IntegerField(default=0)
    gz_bytes = pw.IntegerField(default=0)
    closed_at = pw.FloatField(null=True)
    pruned = pw.BooleanField(default=False)

    class Meta:
        table_name = "task_logs"


class Meta(_Base):
    """Key/value facts about the database itself, such as the schema version."""

    key = pw.CharField(primary_key=True)
    value = pw.TextField()

    class Meta:
        table_name = "meta"


# Audit trail (issue 12) --------------------------------------------------------------------

class AuditEvent(_Base):
    """Who did what, from where, with what result: written with the action it records."""

    # One index (task_id): every submit writes a row, so each index is paid on the hot path;
    # the other filters scan newest first by id, which the admin's page reads a page of.
    id = pw.AutoField()
    ts = pw.FloatField()
    actor = pw.CharField()
    role = pw.CharField(null=True)
    address = pw.CharField(null=True)
    action = pw.CharField()
    task_id = pw.CharField(null=True, index=True)
    script = pw.CharField(null=True)
    result = pw.CharField()
    detail = pw.TextField(null=True)

    class Meta:
        table_name = "audit"


AUDIT_COLUMNS = ("actor", "role", "address", "action", "task_id", "script", "result", "detail")


def insert_audit(entry: dict[str, Any], **fields: Any) -> Statement:
    """A statement that records one audit event (`fields` fill in what the action made, such
    as the new task's id)."""
    values = {key: entry.get(key) for key in AUDIT_COLUMNS}
    values.update(fields)
    values["ts"] = entry.get("ts") or time.time()
    return _insert(AuditEvent, values)


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row as `GET /audit` shows it."""
    return {"ts": rfc3339(row["ts"]), **{key: row[key] for key in AUDIT_COLUMNS}}


async def list_audit(db: Database, *, actor: str | None, action: str | None,
                     task_id: str | None, since: float | None, limit: int,
                     before: int | None) -> list[dict[str, Any]]:
    """Audit rows newest first; `before` is the id cursor of the previous page."""
    query = AuditEvent.select()
    for column, value in ((AuditEvent.actor, actor), (AuditEvent.action, action),
                          (AuditEvent.task_id, task_id)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEvent.ts >= since)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    return await db.fetch_all(*query.order_by(AuditEvent.id.desc()).limit(limit).sql())


def script_glob_clause(patterns: tuple[str, ...]) -> Any:
    """A WHERE clause for tasks whose script matches one of a token's fnmatch patterns
    (SQLite's GLOB has the same `*`, `?` and `[...]`, but negates with `^` where fnmatch
    uses `!`); an empty list matches nothing."""
    if not patterns:
        return pw.SQL("0")
    clause = None
    for pattern in patterns:
        glob = pw.Expression(Task.script, "GLOB", pattern.replace("[!", "[^"))
        clause = glob if clause is None else (clause | glob)
    return clause


MODELS: tuple[type[_Base], ...] = (Task, TaskEvent, TaskLog, Meta, AuditEvent)


def _ddl() -> list[Statement]:
    ctx = _db.get_sql_context
    out = []
    for model in MODELS:
        schema = model._schema  # type: ignore[attr-defined]  # peewee's schema manager
        out.append(ctx().sql(schema._create_table(safe=True)).query())
        out.extend(ctx().sql(index).query() for index in schema._create_indexes(safe=True))
    return out


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as PROTOCOL.md's time format (every output frame has one: the formatted
    second is reused, only the milliseconds are new)."""
    if ts is None:
        return None
    second = int(ts)
    millis = int((ts - second) * 1000)
    return f"{_second(second)}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def task_json(row: dict[str, Any]) -> dict[str, Any]:
    """A task row as REST and WebSocket show it."""
    return {
        "id": row["id"],
        "script": row["script"],
        "params": json.loads(row["params"]),
        "status": row["status"],
        "priority": row["priority"],
        "timeout": row["timeout"],
        "max_retries": row["max_retries"],
        "attempt": row["attempt"],
        "pty": bool(row["pty"]),
        "interactive": bool(row["interactive"]),
        "exit_code": row["exit_code"],
        "error": row["error"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "run_after": rfc3339(row["run_after"]),
        "submitted_by": row["submitted_by"],
        "logs_path": row["logs_path"],
        "output_bytes": row["output_bytes"],
        "last_seq": row["last_seq"],
    }


class Database:
    """An aiosqlite connection for reads, a loop-side connection for writes, and the queries."""

    def __init__(self, path: Path):
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._unchecked = False  # written since the last checkpoint

    @property
    def conn(self) -> aiosqlite.Connection:
        """The open connection."""
        assert self._conn is not None, "Database.open() was not awaited"
        return self._conn

    async def open(self) -> None:
        """Open (creating or migrating) the database and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "busy_timeout=5000"):
            await self.conn.execute(f"PRAGMA {pragma}")
        await self._migrate()
        self._writer = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=1000",
                       "wal_autocheckpoint=0"):
            self._writer.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        """Close both connections (the reader's close checkpoints the log)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _migrate(self) -> None:
        await self.conn.execute("BEGIN IMMEDIATE")
        for sql, params in _ddl():
            await self.conn.execute(sql, params)
        row = await self.fetch_one(*Meta.select(Meta.value).where(Meta.key == "schema_version")
                                   .sql())
        version = int(row["value"]) if row else 0
        if version > SCHEMA_VERSION:
            await self.conn.execute("ROLLBACK")
            raise RuntimeError(f"database schema {version} is newer than this server's "
                               f"{SCHEMA_VERSION}")
        # Later releases add their steps here, each guarded by `version < N`.
        sql, params = Meta.replace(key="schema_version", value=str(SCHEMA_VERSION)).sql()
        await self.conn.execute(sql, params)
        await self.conn.execute("COMMIT")

    async def write(self, statements: Iterable[Statement]) -> None:
        """Run statements in one transaction and commit, before returning (on the loop)."""
        writer = self._writer
        assert writer is not None, "Database.open() was not awaited"
        writer.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                writer.execute(sql, params)
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        writer.execute("COMMIT")
        self._unchecked = True

    async def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, on aiosqlite's thread (if anything
        was written since the last time)."""
        if not self._unchecked:
            return
        self._unchecked = False
        async with self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)"):
            pass

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts."""
        async with self.conn.execute(sql, params) as cursor:
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    # Queries -------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """The task row, or None."""
        return await self.fetch_one(*Task.select().where(Task.id == task_id).sql())

    async def list_tasks(self, *, status: str | None, script: str | None, limit: int,
                         before: int | None, scripts: tuple[str, ...] | None = None
                         ) -> list[dict[str, Any]]:
        """Newest first; `before` is the `num` cursor of the previous page; `scripts`, a
        token's list of names or globs, hides every other script's tasks."""
        query = Task.select()
        if scripts is not None:
            query = query.where(script_glob_clause(scripts))
        if status:
            query = query.where(Task.status == status)
        if script:
            query = query.where(Task.script == script)
        if before is not None:
            query = query.where(Task.num < before)
        return await self.fetch_all(*query.order_by(Task.num.desc()).limit(limit).sql())

    async def tasks_in(self, *statuses: TaskStatus) -> list[dict[str, Any]]:
        """Every task in one of the statuses, in submission order."""
        query = Task.select().where(Task.status.in_([str(s) for s in statuses]))
        return await self.fetch_all(*query.order_by(Task.num).sql())

    async def events(self, task_id: str) -> list[dict[str, Any]]:
        """A task's transitions, oldest first."""
        query = TaskEvent.select().where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        return await self.fetch_all(*query.sql())

    async def segments(self, task_id: str) -> list[dict[str, Any]]:
        """A task's archive segment rows, in order."""
        query = TaskLog.select().where(TaskLog.task_id == task_id).order_by(TaskLog.id)
        return await self.fetch_all(*query.sql())

    # Archive ---------------------------------------------------------------------------------

    async def output_pruned(self, task_id: str) -> bool:
        """Whether retention has pruned the task's archived output."""
        query = TaskLog.select(TaskLog.path).where((TaskLog.task_id == task_id) & TaskLog.pruned)
        return await self.fetch_one(*query.limit(1).sql()) is not None

    async def archive_bytes(self) -> int:
        """Bytes on disk of every segment not pruned (as their rows last said)."""
        total = pw.fn.COALESCE(pw.fn.SUM(TaskLog.gz_bytes), 0).alias("total")
        row = await self.fetch_one(*TaskLog.select(total).where(~TaskLog.pruned).sql())
        return int(row["total"]) if row else 0

    async def prunable(self, ended_before: float | None = None) -> list[dict[str, Any]]:
        """Ended tasks whose output is still archived, the earliest ended first, with its size.

        Rows: task_id, logs_path, ended (Unix seconds), gz_bytes. A task not yet final (running,
        or pending a retry) is never listed: its archive may still grow.
        """
        ended = pw.fn.COALESCE(Task.finished_at, Task.updated_at)
        query = (TaskLog.select(Task.id.alias("task_id"), Task.logs_path, ended.alias("ended"),
                                pw.fn.SUM(TaskLog.gz_bytes).alias("gz_bytes"))
                 .join(Task, on=(Task.id == TaskLog.task_id))
                 .where(~TaskLog.pruned & Task.status.in_([str(s) for s in FINAL]))
                 .group_by(Task.id).order_by(ended, Task.num))
        if ended_before is not None:
            query = query.where(ended < ended_before)
        return await self.fetch_all(*query.sql())

    async def all_segments(self) -> list[dict[str, Any]]:
        """Every segment row, with its task's status and logs_path (None: no such task)."""
        query = (TaskLog.select(TaskLog, Task.status.alias("task_status"),
                                Task.logs_path.alias("logs_path"))
                 .join(Task, pw.JOIN.LEFT_OUTER, on=(Task.id == TaskLog.task_id))
                 .order_by(TaskLog.task_id, TaskLog.first_seq))
        return await self.fetch_all(*query.sql())

    async def task_folders(self) -> dict[str, tuple[str, str]]:
        """logs_path -> (task id, status) of every task."""
        rows = await self.fetch_all(*Task.select(Task.id, Task.logs_path, Task.status).sql())
        return {row["logs_path"]: (row["id"], row["status"]) for row in rows}

    async def ping(self) -> None:
        """Raise if the database is not usable."""
        await self.fetch_one("SELECT 1 AS ok")


# The statements of the hot path (one task's life: submit, start, progress, end) are built
# from the models' metadata and cached by column set: building them with peewee's query
# builder cost ~0.18 ms each, as much as executing them.

def _quoted(model: type[_Base], columns: tuple[str, ...]) -> list[str]:
    known = model._meta.columns
    for column in columns:
        if column not in known:
            raise KeyError(f"{model._meta.table_name} has no column {column!r}")
    return [f'"{column}"' for column in columns]


@functools.lru_cache(maxsize=512)
def _insert_sql(model: type[_Base], columns: tuple[str, ...]) -> str:
    names = ", ".join(_quoted(model, columns))
    marks = ", ".join("?" * len(columns))
    return f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES ({marks})'


@functools.lru_cache(maxsize=512)
def _update_sql(model: type[_Base], columns: tuple[str, ...], key: str) -> str:
    sets = ", ".join(f"{name} = ?" for name in _quoted(model, columns))
    (where,) = _quoted(model, (key,))
    return f'UPDATE "{model._meta.table_name}" SET {sets} WHERE {where} = ?'


@functools.cache
def _defaults(model: type[_Base]) -> dict[str, Any]:
    return {f.column_name: f.default for f in model._meta.sorted_fields
            if f.default is not None}


def _insert(model: type[_Base], values: dict[str, Any]) -> Statement:
    values = {**_defaults(model), **values}
    columns = tuple(values)
    return _insert_sql(model, columns), list(values.values())


def _update(model: type[_Base], values: dict[str, Any], key: str, key_value: Any) -> Statement:
    columns = tuple(values)
    return _update_sql(model, columns, key), [*values.values(), key_value]


def insert_task(row: dict[str, Any]) -> list[Statement]:
    """Statements that create a task and its first event."""
    return [
        _insert(Task, row),
        _insert(TaskEvent, {"task_id": row["id"], "ts": row["created_at"], "old_status": None,
                            "new_status": row["status"], "attempt": row["attempt"]}),
    ]


def transition(task_id: str, old: TaskStatus, new: TaskStatus, attempt: int,
               fields: dict[str, Any], detail: str | None = None) -> list[Statement]:
    """Statements that move a task to a new status and record the event."""
    now = fields.setdefault("updated_at", time.time())
    return [
        _update(Task, {"status": str(new), **fields}, "id", task_id),
        _insert(TaskEvent, {"task_id": task_id, "ts": now, "old_status": str(old),
                            "new_status": str(new), "attempt": attempt, "detail": detail}),
    ]


def update_task(task_id: str, fields: dict[str, Any]) -> Statement:
    """A statement that changes task fields without a transition (progress counters)."""
    return _update(Task, fields, "id", task_id)


_SEGMENT_COLUMNS = ("task_id", "created_at", "path", "first_seq", "last_seq", "raw_bytes",
                    "gz_bytes", "closed_at", "pruned")
_SEGMENT_PROGRESS = ("last_seq", "raw_bytes", "gz_bytes", "closed_at")


@functools.cache
def _upsert_segment_sql() -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in _quoted(TaskLog, _SEGMENT_PROGRESS))
    insert = _insert_sql(TaskLog, _SEGMENT_COLUMNS)
    return f'{insert} ON CONFLICT ("path") DO UPDATE SET {updates}'


def upsert_segment(task_id: str, seg: Any) -> Statement:
    """A statement that records an archive segment (an archive.Segment) by its path."""
    return _upsert_segment_sql(), [task_id, seg.opened_at, seg.path, seg.first_seq,
                                   seg.last_seq, seg.raw_bytes, seg.gz_bytes, seg.closed_at,
                                   False]


def mark_pruned(task_id: str) -> Statement:
    """A statement that records a task's archived output as deleted by retention."""
    return TaskLog.update(pruned=True).where(TaskLog.task_id == task_id).sql()
