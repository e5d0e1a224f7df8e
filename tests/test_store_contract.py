"""The store contract: every method of `store.Store`, on a real SQLite file and a real
PostgreSQL (one server for the session, a fresh database per test), faults included."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from remoterun import store
from remoterun.errors import Unavailable
from remoterun.state import TaskStatus as S
from remoterun.store import postgres as pg

pytestmark = pytest.mark.slow


@dataclass
class Backend:
    """An open store and the means to hold its write lock from another connection."""

    name: str
    db: Any
    lock: Callable[[], contextlib.AbstractAsyncContextManager[None]]
    reopen: Callable[[], Any]


@contextlib.asynccontextmanager
async def _sqlite_lock(path: Path) -> AsyncIterator[None]:
    """Another connection in BEGIN IMMEDIATE: it holds the write lock, reads go on (WAL)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@contextlib.asynccontextmanager
async def _postgres_lock(url: str) -> AsyncIterator[None]:
    """Another connection holding EXCLUSIVE on tasks: every write waits, reads go on."""
    other = await asyncpg.connect(url)
    try:
        async with other.transaction():
            await other.execute('LOCK TABLE "tasks" IN EXCLUSIVE MODE')
            yield
    finally:
        await other.close()


@pytest.fixture(scope="session")
def postgres(pg_server: Any) -> Any:
    """The session's PostgreSQL (started once; tests/conftest.py)."""
    return pg_server


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each store, opened on a fresh database."""
    if request.param == "sqlite":
        path = tmp_path / "rr.db"
        db: Any = store.Database(path)
        made = Backend("sqlite", db, lambda: _sqlite_lock(path),
                       lambda: store.Database(path))
    else:
        server = request.getfixturevalue("postgres")
        if server.proc is None or server.proc.poll() is not None:  # a fault test stopped it
            await asyncio.to_thread(server.start)
        url = await asyncio.to_thread(server.new_database)
        db = pg.PostgresDatabase(url)
        made = Backend("postgres", db, lambda: _postgres_lock(url),
                       lambda: pg.PostgresDatabase(url))
    await db.open()
    yield made
    await db.close()


def _row(num: int, script: str = "hello.sh", **extra: Any) -> dict[str, Any]:
    now = extra.pop("created_at", time.time())
    task_id = str(uuid.uuid4())
    return {"num": num, "id": task_id, "script": script, "status": "pending", "params": "{}",
            "secret_params": "{}", "priority": 0, "timeout": None, "max_retries": 0,
            "attempt": 1, "pty": False, "interactive": False, "stdin": "", "created_at": now,
            "updated_at": now, "submitted_by": "ann", "logs_path": f"x/{task_id}", **extra}


async def _add(db: Any, row: dict[str, Any]) -> dict[str, Any]:
    await db.commit(store.insert_task(row), 5)
    return row


async def _end(db: Any, row: dict[str, Any], status: S = S.SUCCESS, **fields: Any) -> None:
    await db.commit(store.transition(row["id"], S.PENDING, S.RUNNING, 1,
                                     {"started_at": row["created_at"] + 1}), 5)
    await db.commit(store.transition(row["id"], S.RUNNING, status, 1,
                                     {"finished_at": row["created_at"] + 3, "exit_code": 0,
                                      **fields}), 5)


class _Segment:
    """What upsert_segment reads of an archive segment."""

    def __init__(self, path: str, last_seq: int, gz_bytes: int, closed: bool = False):
        self.opened_at, self.path, self.first_seq = 1.0, path, 1
        self.last_seq, self.raw_bytes, self.gz_bytes = last_seq, gz_bytes * 2, gz_bytes
        self.closed_at = 2.0 if closed else None


# What a store is -------------------------------------------------------------------------------

async def test_each_store_is_a_store_and_only_postgres_keeps_nodes(backend):
    """Both implement the Store Protocol; only PostgreSQL's is a Membership (the cluster's)."""
    assert isinstance(backend.db, store.Store)
    assert isinstance(backend.db, store.Membership) == (backend.name == "postgres")


async def test_a_second_open_of_the_same_database_migrates_nothing_and_reads_it(backend):
    """Opening an existing database again (a restart, a second node) keeps its rows."""
    row = await _add(backend.db, _row(1))
    again = backend.reopen()
    await again.open()
    try:
        assert (await again.get_task(row["id"]))["script"] == "hello.sh"
        assert await again.last_num() == 1
    finally:
        await again.close()


async def test_probe_ping_and_checkpoint_on_an_open_store(backend):
    """An open, writable store probes None, pings, and checkpoints (either way) after
    writes; a closed one probes 'closed'."""
    db = backend.db
    assert db.probe_write() is None
    await db.ping()
    await _add(db, _row(1))
    await db.checkpoint()
    await _add(db, _row(2))
    await db.checkpoint(truncate=True)
    assert [t["num"] for t in await db.tasks_in(S.PENDING)] == [1, 2]
    await db.close()
    assert db.probe_write() == "closed"
    await db.open()  # for the fixture's close


# Writes ----------------------------------------------------------------------------------------

async def test_a_commit_is_whole_and_returns_the_last_event_id(backend):
    """insert_task and transition commit together and return the event's id; every read
    sees them: get_task, events, last_num, last_event_id, tasks_in."""
    db = backend.db
    assert await db.last_num() == 0 and await db.last_event_id() == 0
    assert await db.get_task("nope") is None
    row = await _add(db, _row(7))
    event_id = await db.commit(store.transition(row["id"], S.PENDING, S.RUNNING, 1,
                                                {"started_at": 5.0, "pid": 42}), 5)
    assert isinstance(event_id, int) and event_id == await db.last_event_id()
    got = await db.get_task(row["id"])
    assert (got["status"], got["pid"], got["started_at"], got["num"]) == ("running", 42, 5.0, 7)
    assert not got["pty"] and got["params"] == "{}"
    assert await db.last_num() == 7
    events = await db.events(row["id"])
    assert [(e["old_status"], e["new_status"]) for e in events] == [
        (None, "pending"), ("pending", "running")]
    assert [t["id"] for t in await db.tasks_in(S.RUNNING, S.PENDING)] == [row["id"]]
    await db.commit([store.update_task(row["id"], {"output_bytes": 3_000_000_000})], 5)
    assert (await db.get_task(row["id"]))["output_bytes"] == 3_000_000_000


async def test_a_guarded_write_against_a_changed_row_changes_nothing(backend):
    """A transition from a status the row no longer has raises StaleWrite, all undone."""
    db = backend.db
    row = await _add(db, _row(1))
    await db.commit(store.transition(row["id"], S.PENDING, S.CANCELLED, 1, {}), 5)
    with pytest.raises(store.StaleWrite):
        await db.commit([store.update_task(row["id"], {"pid": 5}),
                         *store.transition(row["id"], S.PENDING, S.RUNNING, 1, {})], 5)
    got = await db.get_task(row["id"])
    assert got["status"] == "cancelled" and got["pid"] is None
    assert len(await db.events(row["id"])) == 2


async def test_an_unknown_column_is_refused_before_anything_runs(backend):
    """A statement naming a column the table lacks fails as a KeyError with its name."""
    with pytest.raises(KeyError, match="no column 'colour'"):
        await backend.db.commit([store.update_task("x", {"colour": "red"})], 5)


async def test_secrets_in_clear_lists_only_unsealed_json(backend):
    """Tasks whose secret_params is clear JSON (not "{}", not sealed) are listed."""
    db = backend.db
    clear = await _add(db, _row(1, secret_params='{"pw": "x"}'))
    await _add(db, _row(2, secret_params="rr1:sealed"))
    await _add(db, _row(3))
    rows = await db.secrets_in_clear()
    assert [(r["id"], r["secret_params"]) for r in rows] == [(clear["id"], '{"pw": "x"}')]


# Lists -----------------------------------------------------------------------------------------

async def test_list_tasks_filters_and_pages_both_ways(backend):
    """Status, script, submitter, time window, a case-insensitive substring, a token's globs
    (`*`, `?`, `[!...]`), and the before/after cursors with has_task, the same on both."""
    db = backend.db
    rows = [await _add(db, _row(n, script=s, created_at=100.0 + n, submitted_by=who))
            for n, s, who in ((1, "deploy/app.sh", "ann"), (2, "deploy/db.sh", "bob"),
                              (3, "report.py", "ann"), (4, "a_b.sh", "ann"))]
    await _end(db, rows[2])

    async def ids(**filters: Any) -> list[int]:
        base = {"status": None, "script": None, "limit": 10, "before": None}
        return [t["num"] for t in await db.list_tasks(**{**base, **filters})]

    assert await ids() == [4, 3, 2, 1]
    assert await ids(status="success") == [3]
    assert await ids(script="deploy/db.sh") == [2]
    assert await ids(submitted_by="bob") == [2]
    assert await ids(since=102.0, until=104.0) == [3, 2]
    assert await ids(q="APP") == [1]
    assert await ids(q="_") == [4]  # a wildcard of LIKE, matched as itself
    assert await ids(scripts=("deploy/*",)) == [2, 1]
    assert await ids(scripts=("deploy/[!a]*.sh", "?_?.sh")) == [4, 2]
    assert await ids(scripts=()) == []
    assert await ids(limit=2) == [4, 3]
    assert await ids(limit=2, before=3) == [2, 1]
    assert await ids(limit=2, after=1) == [3, 2]
    assert await db.has_task(3, True) and not await db.has_task(4, True)
    assert await db.has_task(2, False, submitted_by="ann")
    assert not await db.has_task(1, False)


async def test_events_after_joins_each_event_to_its_task(backend):
    """Transitions after an id, oldest first, each with its task's row and `event_` fields."""
    db = backend.db
    first = await _add(db, _row(1))
    second = await _add(db, _row(2))
    await _end(db, first, S.FAILED, error="boom")
    since = (await db.events(first["id"]))[0]["id"]
    got = await db.events_after(since, 10)
    assert [(e["id"], e["event_new_status"]) for e in got] == [
        (second["id"], "pending"), (first["id"], "running"), (first["id"], "failed")]
    assert got[-1]["event_exit_code"] == 0 and got[-1]["status"] == "failed"
    assert got[-1]["event_id"] == await db.last_event_id()
    assert len(await db.events_after(since, 2)) == 2


async def test_audit_rows_list_newest_first_filtered_and_paged(backend):
    """insert_audit rows come back through list_audit by actor, action, task, time, cursor."""
    db = backend.db
    for i, (actor, action) in enumerate((("ann", "submit"), ("bob", "cancel"),
                                         ("ann", "login"))):
        entry = {"actor": actor, "role": "operator", "address": "10.0.0.1", "action": action,
                 "result": "ok", "ts": 1000.0 + i}
        await db.commit([store.insert_audit(entry, task_id=f"t{i}")], 5)

    async def actions(**filters: Any) -> list[str]:
        base = {"actor": None, "action": None, "task_id": None, "since": None, "limit": 10,
                "before": None}
        return [r["action"] for r in await db.list_audit(**{**base, **filters})]

    assert await actions() == ["login", "cancel", "submit"]
    assert await actions(actor="ann") == ["login", "submit"]
    assert await actions(action="cancel") == ["cancel"]
    assert await actions(task_id="t0") == ["submit"]
    assert await actions(since=1001.0) == ["login", "cancel"]
    newest = (await db.list_audit(actor=None, action=None, task_id=None, since=None, limit=1,
                                  before=None))[0]
    assert await actions(before=newest["id"]) == ["cancel", "submit"]
    assert store.audit_json(newest)["ts"].startswith("1970-01-01T00:16:42")


async def test_hook_deliveries_are_unique_per_hook_and_list_newest_first(backend):
    """insert_delivery rows come back by hook and id; a second row of the same hook and
    delivery id undoes its whole transaction; ids without a delivery header never clash."""
    db = backend.db
    await db.commit([store.insert_delivery("deploy", "d-1", "accepted", task_id="t1")], 5)
    await db.commit([store.insert_delivery("other", "d-1", "skipped", reason="body:ref")], 5)
    for _ in range(2):
        await db.commit([store.insert_delivery("deploy", None, "skipped", reason="x")], 5)
    entry = {"actor": "hook:deploy", "action": "hook", "result": "ok"}
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await db.commit([store.insert_audit(entry, task_id="t2"),
                         store.insert_delivery("deploy", "d-1", "accepted", task_id="t2")], 5)
    assert (await db.delivery("deploy", "d-1"))["task_id"] == "t1"
    assert (await db.delivery("other", "d-1"))["reason"] == "body:ref"
    assert await db.delivery("deploy", "d-2") is None
    rows = await db.deliveries("deploy", 10)
    assert [(r["delivery_id"], r["result"]) for r in rows] == [
        (None, "skipped"), (None, "skipped"), ("d-1", "accepted")]
    assert len(await db.deliveries("deploy", 1)) == 1
    assert await db.list_audit(actor=None, action="hook", task_id=None, since=None, limit=5,
                               before=None) == []


async def test_live_counts_and_stats_rows(backend):
    """Pending and running counted by script; durations and waits of recent submissions."""
    db = backend.db
    done = await _add(db, _row(1, created_at=100.0))
    await _add(db, _row(2, created_at=200.0))
    await _add(db, _row(3, script="b.sh", created_at=300.0))
    await _end(db, done)
    counts = {(r["script"], r["status"]): r["n"] for r in await db.live_counts()}
    assert counts == {("hello.sh", "pending"): 1, ("b.sh", "pending"): 1}
    stats = sorted(await db.stats_rows(150.0, None), key=lambda r: r["script"])
    assert [(r["script"], r["duration"], r["wait"]) for r in stats] == [
        ("b.sh", None, None), ("hello.sh", None, None)]
    (ended,) = [r for r in await db.stats_rows(0.0, "hello.sh") if r["status"] == "success"]
    assert (ended["duration"], ended["wait"]) == (2.0, 1.0)


# The archive's rows ----------------------------------------------------------------------------

async def test_segment_rows_prunable_and_pruned(backend):
    """upsert_segment inserts then updates by path; segments, all_segments, task_folders,
    archive_bytes; prunable lists final tasks only (state.FINAL), earliest ended first and
    before a time; mark_pruned and delete_segment take rows out."""
    db = backend.db
    running = await _add(db, _row(1, created_at=10.0))
    old, new = await _add(db, _row(2, created_at=20.0)), await _add(db, _row(3, created_at=30.0))
    for row in (old, new):
        await _end(db, row)
    await db.commit(store.transition(running["id"], S.PENDING, S.RUNNING, 1, {}), 5)
    for row in (running, old, new):
        await db.commit([store.upsert_segment(row["id"], _Segment(f"{row['id']}/0", 5, 100))],
                        5)
    await db.commit([store.upsert_segment(old["id"], _Segment(f"{old['id']}/0", 9, 150, True)),
                     store.upsert_segment(old["id"], _Segment(f"{old['id']}/1", 12, 50))], 5)
    (first, second) = await db.segments(old["id"])
    assert (first["last_seq"], first["gz_bytes"], first["closed_at"]) == (9, 150, 2.0)
    assert second["path"].endswith("/1") and not second["pruned"]
    assert await db.archive_bytes() == 400
    assert [r["task_id"] for r in await db.prunable()] == [old["id"], new["id"]]
    assert (await db.prunable())[0]["gz_bytes"] == 200
    assert [r["task_id"] for r in await db.prunable(ended_before=25.0)] == [old["id"]]
    folders = await db.task_folders()
    assert folders[old["logs_path"]] == (old["id"], "success")
    assert {r["task_status"] for r in await db.all_segments()} == {"running", "success"}
    await db.commit([store.mark_pruned(old["id"])], 5)
    assert await db.output_pruned(old["id"]) and not await db.output_pruned(new["id"])
    assert await db.archive_bytes() == 200
    await db.commit([store.delete_segment(f"{new['id']}/0")], 5)
    assert await db.segments(new["id"]) == []
    assert [r["task_id"] for r in await db.prunable()] == []


# Faults ----------------------------------------------------------------------------------------

async def test_a_locked_database_bounds_the_commit_and_writes_nothing(backend):
    """Another connection holds the write lock: a commit gives up with DatabaseUnavailable
    after about its `within_s`, nothing written, reads answer meanwhile; once the lock goes,
    the same commit goes through."""
    db = backend.db
    row = await _add(db, _row(1))
    moved = store.transition(row["id"], S.PENDING, S.RUNNING, 1, {})
    async with backend.lock():
        began = time.monotonic()
        with pytest.raises(store.DatabaseUnavailable) as caught:
            await db.commit(moved, 0.5)
        waited = time.monotonic() - began
        assert (await db.get_task(row["id"]))["status"] == "pending"
        if backend.name == "sqlite":  # a probe tries the lock; PostgreSQL's names connections
            assert db.probe_write() is not None
    assert 0.3 < waited < 3.0, waited
    assert caught.value.unsure is None  # nothing of it can have landed
    assert await db.commit(moved, 5) == await db.last_event_id()
    assert (await db.get_task(row["id"]))["status"] == "running"
    assert len(await db.events(row["id"])) == 2


@pytest.fixture
async def pg_db(postgres: Any) -> AsyncIterator[pg.PostgresDatabase]:
    """A PostgreSQL store on a fresh database (the faults only a server has)."""
    if postgres.proc is None or postgres.proc.poll() is not None:
        await asyncio.to_thread(postgres.start)
    db = pg.PostgresDatabase(await asyncio.to_thread(postgres.new_database))
    await db.open()
    yield db
    await db.close()


async def test_an_unreachable_postgres_fails_reads_503_and_bounds_writes(pg_db, postgres):
    """PostgreSQL stopped: reads raise Unavailable (503), a commit DatabaseUnavailable
    within its bound, probe_write names the failure; all work again once it is back, and
    the failed commit left nothing."""
    row = await _add(pg_db, _row(1))
    await asyncio.to_thread(postgres.stop)
    try:
        with pytest.raises(Unavailable):
            await pg_db.get_task(row["id"])
        began = time.monotonic()
        with pytest.raises(store.DatabaseUnavailable):
            await pg_db.commit([store.update_task(row["id"], {"pid": 1})], 0.3)
        assert time.monotonic() - began < 3.0
        assert pg_db.probe_write() is not None
    finally:
        await asyncio.to_thread(postgres.start)
    assert (await pg_db.get_task(row["id"]))["pid"] is None
    await pg_db.commit([store.update_task(row["id"], {"pid": 2})], 5)
    assert (await pg_db.get_task(row["id"]))["pid"] == 2 and pg_db.probe_write() is None


async def test_a_commit_whose_answer_was_lost_is_found_not_repeated(pg_db, postgres):
    """A relay lets the COMMIT of a transition reach PostgreSQL and cuts the answer: the
    store cannot know the outcome, asks txid_status on its retry, and returns the event id
    of the try that landed; the transition is recorded once."""
    from cluster_nodes import CommitCutter

    row = await _add(pg_db, _row(1))
    url = urllib.parse.urlsplit(pg_db.url)
    cutter = await CommitCutter((url.hostname, url.port)).start()
    via = pg.PostgresDatabase(url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:"
                                                  f"{cutter.port}").geturl(), min_size=1)
    await via.open()
    try:
        cutter.cuts = 1
        event_id = await via.commit(store.transition(row["id"], S.PENDING, S.RUNNING, 1, {}),
                                    10)
        assert cutter.cut == 1
    finally:
        await via.close()
        await cutter.close()
    events = await pg_db.events(row["id"])
    assert [e["new_status"] for e in events] == ["pending", "running"]
    assert event_id == events[-1]["id"]


async def test_an_unsure_try_handed_back_is_resolved_first(pg_db, postgres):
    """DatabaseUnavailable's `unsure` passed back to commit: a try that did commit is not
    written again (its guard would call it stale) and its id is returned; one that was rolled
    back is written."""
    row = await _add(pg_db, _row(1))
    moved = store.transition(row["id"], S.PENDING, S.RUNNING, 1, {})
    landed = await pg_db.commit(moved, 5)
    xid = await pg_db.fetch_value(  # the transaction that wrote the row as it is
        'SELECT xmin::text::bigint FROM "tasks" WHERE "id" = $1', row["id"])
    assert await pg_db.commit(moved, 5, store.Unsure("cut", int(xid), landed)) == landed
    assert len(await pg_db.events(row["id"])) == 2
    other = await asyncpg.connect(pg_db.url)
    try:
        rolled_back = other.transaction()
        await rolled_back.start()
        aborted = await other.fetchval("SELECT txid_current()")
        await rolled_back.rollback()
    finally:
        await other.close()
    pid = [store.update_task(row["id"], {"pid": 7})]
    assert await pg_db.commit(pid, 5, store.Unsure("cut", int(aborted), None)) is None
    assert (await pg_db.get_task(row["id"]))["pid"] == 7
