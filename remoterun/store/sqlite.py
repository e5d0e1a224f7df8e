"""The embedded store: peewee models on SQLite (WAL); reads through aiosqlite, writes on the loop.

The models and every statement's SQL come from `schema` (peewee, rendered in SQLite's dialect)
and the reads from `queries`; this module only runs them. We execute them ourselves, since
peewee's own connection handling is synchronous and an async ORM layered on top of it would add
a dependency for what peewee's renderer already gives us.

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

A locked, read-only or full database. The writer never waits for a lock (`busy_timeout=0`: a
wait would stall the event loop): a write that meets one raises `DatabaseBusy` at once, having
changed nothing, and the caller retries it later (`scheduler.Scheduler._commit`). A disk with
no room for the log's next frames ("database or disk is full") is the same: it passes once
space is freed, so it is retried like a lock, never taken for a bug of ours (issue 25: it was,
and the ends of runs were lost while the server said it was ready).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from remoterun.store.base import DatabaseBusy, DatabaseUnavailable, Guarded, StaleWrite, Statement
from remoterun.store.queries import Queries
from remoterun.store.schema import SCHEMA_VERSION, SQLITE
from remoterun.store.statements import VERSION_QUERY, version_row

log = structlog.get_logger(__name__)


_BUSY_MESSAGES = ("locked", "readonly", "read-only", "busy", "disk I/O error", "disk is full")


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and any(m in text for m in _BUSY_MESSAGES)


class Database(Queries):
    """An aiosqlite connection for reads, a loop-side connection for writes; the reads of
    `Queries` in SQLite's dialect."""

    dialect = SQLITE

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
        # Text that is not UTF-8 (written by another program, or by hand) reads as U+FFFD
        # instead of failing the whole query: one bad row must not hide every list it is in.
        self._conn.text_factory = _text
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
        for sql in SQLITE.ddl():
            await self.conn.execute(sql)
        row = await self._one(VERSION_QUERY)
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
        if version < 3:  # version 2's tasks lack schedule and scheduled_for (issue 29)
            columns = await self.fetch_all('PRAGMA table_info("tasks")')
            for column, kind in (("schedule", "VARCHAR(255)"), ("scheduled_for", "REAL")):
                if column not in {c["name"] for c in columns}:
                    await self.conn.execute(f'ALTER TABLE "tasks" ADD COLUMN "{column}" {kind}')
        sql, params, _ = SQLITE.bind(version_row())
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
                sql, params, _ = SQLITE.bind(statement)
                cursor = writer.execute(sql, params)
                if isinstance(statement, Guarded) and cursor.rowcount != 1:
                    raise StaleWrite(sql)
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



def _text(raw: bytes) -> str:
    """A TEXT value as read: UTF-8, with any bytes that are not replaced by U+FFFD."""
    return raw.decode("utf-8", "replace")


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
