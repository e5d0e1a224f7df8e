"""The embedded store: peewee models on SQLite (WAL); reads through aiosqlite, writes on the loop.

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

Read-your-writes. Every read is one call on aiosqlite's thread that steps its statement to the
end (`execute_fetchall`): a cursor left open between two hops keeps the connection's read
transaction, and with it a snapshot older than the writes that followed, for as long as some
cursor is open; four clients listing tasks kept one open nearly always, so a task answered 201
was not found by the next read (tests/test_faults_reads.py).

A locked or read-only database. The writer never waits for a lock (`busy_timeout=0`: a wait
would stall the event loop): a write that meets one raises `DatabaseBusy` at once, having
changed nothing, and the caller retries it later (`scheduler.Scheduler._commit`).
"""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import peewee as pw
import structlog

from remoterun.state import FINAL, TaskStatus
from remoterun.wire import rfc3339

SCHEMA_VERSION = 2  # 2: tasks.seq_reserved, task_events.exit_code
log = structlog.get_logger(__name__)

_db = pw.SqliteDatabase(None)
Statement = tuple[str, Sequence[Any]]


class Guarded(tuple[str, Sequence[Any]]):
    """A statement that must change exactly one row, or its whole transaction is undone."""

    __slots__ = ()


class StaleWrite(Exception):
    """A guarded statement changed no row: the state it was written against is gone."""


class _Base(pw.Model):
    class Meta:
        database = _db


class Task(_Base):
    """A submitted task: every field of PROTOCOL.md's task, plus what the engine needs."""

    num = pw.AutoField()  # submission order: FIFO tie-break and list cursor
    id = pw.CharField(unique=True)
    script = pw.CharField()
    params = pw.TextField(default="{}")  # JSON, secrets as "***"
    # The real values of secret params, sealed (vault.py: "rr1:..."); "{}" for none, and once
    # the task has ended.
    secret_params = pw.TextField(default="{}")
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
    # Seqs up to this may have been sent to a client: after a crash the task numbers from above
    # it, so a seq never names two frames (reserved in blocks, written ahead of their use).
    seq_reserved = pw.IntegerField(default=0)

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
    exit_code = pw.IntegerField(null=True)  # of the attempt this transition ended

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
                     before: int | None, scripts: tuple[str, ...] | None = None,
                     caller: str = "") -> list[dict[str, Any]]:
    """Audit rows newest first; `before` is the id cursor of the previous page. `scripts` (a
    token's list) keeps the rows of those scripts, and of no script only the `caller`'s own
    (its logins, its refusals): whose else logged in is no script's business."""
    query = AuditEvent.select()
    if scripts is not None:
        query = query.where(script_glob_clause(scripts, AuditEvent.script)
                            | (AuditEvent.script.is_null() & (AuditEvent.actor == caller)))
    for column, value in ((AuditEvent.actor, actor), (AuditEvent.action, action),
                          (AuditEvent.task_id, task_id)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEvent.ts >= since)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    return await db.fetch_all(*query.order_by(AuditEvent.id.desc()).limit(limit).sql())


@functools.cache
def _task_by_id_sql() -> str:
    """A task's lookup by id, built by peewee once: building it for each call took ~10% of the
    loop's time for a trivial task (REST GET and WebSocket attach each look the task up)."""
    sql, params = Task.select().where(Task.id == "").sql()
    assert params == [""], "one parameter, the id"
    return str(sql)


def script_glob_clause(patterns: tuple[str, ...], column: Any = None) -> Any:
    """A WHERE clause for tasks (or rows of `column`) whose script matches one of a token's
    fnmatch patterns
    (SQLite's GLOB has the same `*`, `?` and `[...]`, but negates with `^` where fnmatch
    uses `!`); an empty list matches nothing."""
    if not patterns:
        return pw.SQL("1 = 0")  # (SQLite and PostgreSQL alike)
    clause = None
    for pattern in patterns:
        glob = pw.Expression(column or Task.script, "GLOB", pattern.replace("[!", "[^"))
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


class DatabaseBusy(Exception):
    """A write met a lock held by another connection (or a read-only file): nothing changed."""


class DatabaseUnavailable(Exception):
    """The database stayed unwritable for longer than the caller could wait. `unsure`: a
    try of the write whose outcome is unknown (PostgreSQL's; pass it back to `commit`)."""

    def __init__(self, message: str, unsure: DatabaseBusy | None = None):
        super().__init__(message)
        self.unsure = unsure


_BUSY_MESSAGES = ("locked", "readonly", "read-only", "busy", "disk I/O error")


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and any(m in text for m in _BUSY_MESSAGES)


class Database:
    """An aiosqlite connection for reads, a loop-side connection for writes, and the queries."""

    def __init__(self, path: Path, observe_write: Callable[[float], None] | None = None):
        self.path = path
        self.observe_write = observe_write  # seconds each write() took (metrics)
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
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # made: ours alone
        await asyncio.to_thread(_private, self.path)
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "busy_timeout=5000"):
            await self.conn.execute(f"PRAGMA {pragma}")
        await self._migrate()
        self._writer = sqlite3.connect(self.path, isolation_level=None)
        # secure_delete=FAST: what a write frees (a finished task's sealed secrets) is zeroed
        # where that costs no extra I/O.
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=0",
                       "wal_autocheckpoint=0", "secure_delete=FAST"):
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
        version = int(row["value"]) if row else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            await self.conn.execute("ROLLBACK")
            raise RuntimeError(f"database schema {version} is newer than this server's "
                               f"{SCHEMA_VERSION}")
        # Each release's steps, guarded by `version < N`.
        if version < 2:  # version 1's tables lack tasks.seq_reserved and task_events.exit_code
            for table, column, kind in (("tasks", "seq_reserved", "INTEGER NOT NULL DEFAULT 0"),
                                        ("task_events", "exit_code", "INTEGER")):
                columns = await self.fetch_all(f'PRAGMA table_info("{table}")')
                if column not in {c["name"] for c in columns}:
                    await self.conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {kind}')
        sql, params = Meta.replace(key="schema_version", value=str(SCHEMA_VERSION)).sql()
        await self.conn.execute(sql, params)
        await self.conn.execute("COMMIT")

    def write(self, statements: Iterable[Statement]) -> int | None:
        """Run statements in one transaction and commit, on the loop, never waiting for a lock.

        Returns the rowid of the transaction's last INSERT (the event row's id for
        `insert_task` and `transition`, whose last statement it is). DatabaseBusy when another
        connection holds the lock or the file cannot be written: the transaction is rolled
        back, nothing changed, the caller may try again.
        """
        writer = self._writer
        assert writer is not None, "Database.open() was not awaited"
        started = time.perf_counter()
        try:
            writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise DatabaseBusy(str(exc)) from exc
        rowid: int | None = None
        try:
            for statement in statements:
                cursor = writer.execute(*statement)
                if isinstance(statement, Guarded) and cursor.rowcount != 1:
                    raise StaleWrite(statement[0])
                if cursor.lastrowid:
                    rowid = cursor.lastrowid
            writer.execute("COMMIT")
        except sqlite3.Error as exc:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            if _is_busy(exc):
                raise DatabaseBusy(str(exc)) from exc
            raise
        except BaseException:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise
        self._unchecked = True
        if self.observe_write is not None:
            self.observe_write(time.perf_counter() - started)
        return rowid

    async def commit(self, statements: Sequence[Statement], within_s: float,
                     unsure: DatabaseBusy | None = None) -> int | None:
        """`write`, tried again with a growing pause while the database is busy, for up to
        `within_s` seconds; DatabaseUnavailable after that (nothing written). `unsure` is
        PostgreSQL's: a failed SQLite write's outcome is always known (rolled back)."""
        deadline = time.monotonic() + within_s
        pause = 0.005
        while True:
            try:
                return self.write(statements)
            except DatabaseBusy as exc:
                if time.monotonic() + pause > deadline:
                    raise DatabaseUnavailable(str(exc)) from exc
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    def probe_write(self) -> str | None:
        """Whether a write could start now: None, or why not (for /readyz)."""
        writer = self._writer
        if writer is None:
            return "closed"
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("ROLLBACK")
        except sqlite3.Error as exc:
            return str(exc)
        return None

    async def checkpoint(self, truncate: bool = False) -> None:
        """Copy the write-ahead log into the database file, on aiosqlite's thread (if anything
        was written since the last time); `truncate`: and empty the log file."""
        if not self._unchecked:
            return
        self._unchecked = False
        mode = "TRUNCATE" if truncate else "PASSIVE"
        await self.conn.execute_fetchall(f"PRAGMA wal_checkpoint({mode})")

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, the statement stepped to its end in one hop (see the module's
        docstring: read-your-writes)."""
        rows = await self.conn.execute_fetchall(sql, params)
        return [dict(row) for row in rows]

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    # Queries -------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """The task row, or None."""
        return await self.fetch_one(_task_by_id_sql(), (task_id,))

    async def list_tasks(self, *, status: str | None, script: str | None, limit: int,
                         before: int | None, after: int | None = None,
                         **filters: Any) -> list[dict[str, Any]]:
        """Newest first; `before` is the `num` cursor of the previous page, `after` that of
        the next (the `limit` oldest tasks newer than it). `filters`: see `_task_filter`."""
        query = Task.select().where(_task_filter(status=status, script=script, **filters))
        if before is not None:
            query = query.where(Task.num < before)
        if after is not None:
            query = query.where(Task.num > after).order_by(Task.num).limit(limit)
            return (await self.fetch_all(*query.sql()))[::-1]
        return await self.fetch_all(*query.order_by(Task.num.desc()).limit(limit).sql())

    async def has_task(self, num: int, newer: bool, **filters: Any) -> bool:
        """Whether a task newer (else older) than `num` matches the filters: is there a page
        beyond it."""
        beyond = Task.num > num if newer else Task.num < num
        query = Task.select(Task.num).where(_task_filter(**filters) & beyond)
        return await self.fetch_one(*query.limit(1).sql()) is not None

    async def events_after(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` transitions with an id above `since`, oldest first, each with its
        task's row (the event's own columns prefixed `event_`)."""
        query = (TaskEvent.select(
            TaskEvent.id.alias("event_id"), TaskEvent.ts.alias("event_ts"),
            TaskEvent.old_status.alias("event_old_status"),
            TaskEvent.new_status.alias("event_new_status"),
            TaskEvent.attempt.alias("event_attempt"), TaskEvent.detail.alias("event_detail"),
            TaskEvent.exit_code.alias("event_exit_code"), Task)
            .join(Task, on=(Task.id == TaskEvent.task_id))
            .where(TaskEvent.id > since).order_by(TaskEvent.id).limit(limit))
        return await self.fetch_all(*query.sql())

    async def secrets_in_clear(self) -> list[dict[str, Any]]:
        """Tasks whose secret params an older server stored in clear JSON: id, status, the
        JSON (for the scheduler to seal, or drop once final)."""
        query = Task.select(Task.id, Task.status, Task.secret_params).where(
            Task.secret_params.startswith("{") & (Task.secret_params != "{}"))
        return await self.fetch_all(*query.sql())

    async def tasks_in(self, *statuses: TaskStatus) -> list[dict[str, Any]]:
        """Every task in one of the statuses, in submission order."""
        query = Task.select().where(Task.status.in_([str(s) for s in statuses]))
        return await self.fetch_all(*query.order_by(Task.num).sql())

    async def events(self, task_id: str) -> list[dict[str, Any]]:
        """A task's transitions, oldest first (their exit_code: of the attempt each ended)."""
        query = TaskEvent.select().where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        return await self.fetch_all(*query.sql())

    async def segments(self, task_id: str) -> list[dict[str, Any]]:
        """A task's archive segment rows, in order."""
        query = TaskLog.select().where(TaskLog.task_id == task_id).order_by(TaskLog.id)
        return await self.fetch_all(*query.sql())

    # Monitoring (issue 14) ---------------------------------------------------------------------

    async def live_counts(self) -> list[dict[str, Any]]:
        """Rows (script, status, n) for the tasks pending or running now."""
        n = pw.fn.COUNT(Task.num).alias("n")
        query = (Task.select(Task.script, Task.status, n)
                 .where(Task.status.in_([str(TaskStatus.PENDING), str(TaskStatus.RUNNING)]))
                 .group_by(Task.script, Task.status))
        return await self.fetch_all(*query.sql())

    async def stats_rows(self, since: float, script: str | None) -> list[dict[str, Any]]:
        """Tasks submitted at or after `since`: script, status, duration (first start to end)
        and queue wait (submission to first start), the last two null where not known."""
        duration = (Task.finished_at - Task.started_at).alias("duration")
        wait = (Task.started_at - Task.created_at).alias("wait")
        query = Task.select(Task.script, Task.status, duration, wait).where(
            Task.created_at >= since)
        if script is not None:
            query = query.where(Task.script == script)
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


def _private(path: Path) -> None:
    """Create the database file 0600 (SQLite gives its -wal and -shm files the database's
    mode), and take group and other access from one that exists. Start-up, once."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = each.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(each, stat.S_IMODE(mode) & 0o700)
                log.warning("database_mode_tightened", path=str(each), was=oct(mode & 0o777))
        except FileNotFoundError:
            continue


def _task_filter(*, status: str | None = None, script: str | None = None,
                 submitted_by: str | None = None, since: float | None = None,
                 until: float | None = None, q: str | None = None,
                 scripts: tuple[str, ...] | None = None) -> Any:
    """The WHERE clause of a task list: exact status, script and submitter, created within
    [since, until), `q` a case-insensitive substring of the script's name, and `scripts` (a
    token's list of names or globs) hiding every other script's tasks."""
    clauses: list[Any] = [Task.num > 0]
    if scripts is not None:
        clauses.append(script_glob_clause(scripts))
    for column, value in ((Task.status, status), (Task.script, script),
                          (Task.submitted_by, submitted_by)):
        if value:
            clauses.append(column == value)
    if since is not None:
        clauses.append(Task.created_at >= since)
    if until is not None:
        clauses.append(Task.created_at < until)
    if q:
        clauses.append(Task.script.contains(q))  # LIKE, its wildcards escaped
    return functools.reduce(operator.and_, clauses)


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


@functools.lru_cache(maxsize=512)
def _transition_sql(columns: tuple[str, ...]) -> str:
    return _update_sql(Task, columns, "id") + ' AND "status" = ?'


def transition(task_id: str, old: TaskStatus, new: TaskStatus, attempt: int,
               fields: dict[str, Any], detail: str | None = None) -> list[Statement]:
    """Statements that move a task to a new status and record the event; the update is
    guarded by the old status, so a final state is never overwritten."""
    now = fields.setdefault("updated_at", time.time())
    values = {"status": str(new), **fields}
    return [
        Guarded((_transition_sql(tuple(values)), [*values.values(), task_id, str(old)])),
        _insert(TaskEvent, {"task_id": task_id, "ts": now, "old_status": str(old),
                            "new_status": str(new), "attempt": attempt, "detail": detail,
                            "exit_code": fields.get("exit_code")}),
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


def delete_segment(path: str) -> Statement:
    """A statement that forgets a segment's row (an empty segment `archive verify` removed)."""
    return TaskLog.delete().where(TaskLog.path == path).sql()  # type: ignore[no-any-return]


def mark_pruned(task_id: str) -> Statement:
    """A statement that records a task's archived output as deleted by retention."""
    return TaskLog.update(pruned=True).where(TaskLog.task_id == task_id).sql()
