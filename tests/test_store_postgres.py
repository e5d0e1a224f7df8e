"""The PostgreSQL store: the SQLite statements and queries, claims, fences, unavailability."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from remoterun import store
from remoterun.errors import Unavailable
from remoterun.state import TaskStatus as S
from remoterun.store import postgres as pg

pytestmark = pytest.mark.slow


def _row(num: int, script: str = "hello.sh", priority: int = 0, created: float | None = None,
         **extra):
    now = created if created is not None else time.time()
    task_id = str(uuid.uuid4())
    return {"num": num, "id": task_id, "script": script, "status": "pending", "params": "{}",
            "secret_params": "{}", "priority": priority, "timeout": None, "max_retries": 0,
            "attempt": 1, "pty": False, "interactive": False, "stdin": "", "created_at": now,
            "updated_at": now, "submitted_by": "t", "logs_path": f"x/{task_id}", **extra}


@pytest.fixture
async def db(engines):
    """An open PostgresDatabase on a fresh database."""
    _, _, url = engines
    database = pg.PostgresDatabase(url)
    await database.open()
    yield database
    await database.close()


async def _add(db, row, **place):
    insert, event = store.insert_task(row)
    await db.commit([pg.placed(insert, place.get("node"), place.get("labels")), event], 5)
    return row


async def test_statements_and_queries_run_unchanged(db):
    """insert_task, transition, update_task, segments and the list filters work as on SQLite."""
    row = await _add(db, _row(1, script="deploy/app.sh"))
    event_id = await db.commit(store.transition(row["id"], S.PENDING, S.RUNNING, 1,
                                                {"started_at": time.time()}), 5)
    assert isinstance(event_id, int) and event_id > 0
    await db.commit([store.update_task(row["id"], {"output_bytes": 3_000_000_000})], 5)
    got = await db.get_task(row["id"])
    assert got["status"] == "running" and got["output_bytes"] == 3_000_000_000
    assert [t["id"] for t in await db.list_tasks(status=None, script=None, limit=5, before=None,
                                                 q="APP")] == [row["id"]]
    for patterns, found in ((("deploy/*",), 1), (("other*",), 0), ((), 0)):
        rows = await db.list_tasks(status=None, script=None, limit=5, before=None,
                                   scripts=patterns)
        assert len(rows) == found, patterns
    assert [e["new_status"] for e in await db.events(row["id"])] == ["pending", "running"]


async def test_a_guarded_write_against_a_changed_row_changes_nothing(db):
    """A transition from a status the row no longer has raises StaleWrite, all undone."""
    row = await _add(db, _row(1))
    await db.commit(store.transition(row["id"], S.PENDING, S.CANCELLED, 1, {}), 5)
    with pytest.raises(store.StaleWrite):
        await db.commit([store.update_task(row["id"], {"pid": 5}),
                         *store.transition(row["id"], S.PENDING, S.RUNNING, 1, {})], 5)
    got = await db.get_task(row["id"])
    assert got["status"] == "cancelled" and got["pid"] is None


async def test_a_lost_node_cannot_write(db):
    """Once another node declared it lost, every write of the node fails whole (Fenced)."""
    await db.register_node("a", "e1", [], ["hello.sh"], 2, "")
    db.fence = lambda: pg.node_fence("a", "e1")
    row = await _add(db, _row(1))
    db.fence = None
    await asyncio.sleep(1.1)
    assert await db.declare_lost("a", "e1", "b", 1.0)
    assert not await db.declare_lost("a", "e1", "c", 1.0)  # exactly once
    db.fence = lambda: pg.node_fence("a", "e1")
    with pytest.raises(pg.Fenced):
        await db.commit([store.update_task(row["id"], {"pid": 9})], 5)
    assert not await db.heartbeat("a", "e1", ["hello.sh"])
    db.fence = None
    assert (await db.get_task(row["id"]))["pid"] is None


async def test_claims_follow_aged_priority_then_order(db):
    """Higher effective priority first, ties in submission order; aging lifts old tasks."""
    now = time.time()
    old_low = await _add(db, _row(1, priority=0, created=now - 120))  # aged by 2 levels
    new_high = await _add(db, _row(2, priority=1, created=now))
    new_same = await _add(db, _row(3, priority=1, created=now))
    got = await db.claim("a", ["hello.sh"], [], 3, 60.0, {}, time.time())
    assert [r["id"] for r in got] == [old_low["id"], new_high["id"], new_same["id"]]
    assert await db.claim("a", ["hello.sh"], [], 3, 60.0, {}, time.time()) == []


async def test_concurrent_claims_never_take_the_same_task(db):
    """Nodes claiming at once (SKIP LOCKED) share the tasks out, each taken once."""
    for num in range(1, 41):
        await _add(db, _row(num))
    claims = await asyncio.gather(*(db.claim(f"n{i}", ["hello.sh"], [], 5, 60.0, {},
                                             time.time()) for i in range(8)))
    ids = [r["id"] for rows in claims for r in rows]
    assert len(ids) == len(set(ids)) == 40


async def test_max_concurrency_holds_across_claimers(db):
    """A script's limit counts every node's claimed and running tasks."""
    for num in range(1, 11):
        await _add(db, _row(num, script="sleep.sh"))
    claims = await asyncio.gather(*(db.claim(f"n{i}", ["sleep.sh"], [], 4, 60.0,
                                             {"sleep.sh": 2}, time.time()) for i in range(4)))
    assert sum(len(c) for c in claims) == 2


async def test_placement_limits_who_claims(db):
    """A task pinned to a node or to labels is claimed only by a node that matches, and only
    for a script that node has."""
    pinned = await _add(db, _row(1), node="b")
    labelled = await _add(db, _row(2), labels=["gpu"])
    other = await _add(db, _row(3, script="only-on-b.sh"))
    assert await db.claim("a", ["hello.sh"], ["eu"], 5, 60.0, {}, time.time()) == []
    got = await db.claim("b", ["hello.sh", "only-on-b.sh"], ["eu", "gpu"], 5, 60.0, {},
                         time.time())
    assert {r["id"] for r in got} == {pinned["id"], labelled["id"], other["id"]}


async def test_reads_answer_503_while_postgres_is_down(db, engines):
    """Reads raise Unavailable and writes DatabaseUnavailable while the server is down; both
    work again once it is back."""
    server = engines[0]
    row = await _add(db, _row(1))
    await asyncio.to_thread(server.stop)
    try:
        with pytest.raises(Unavailable):
            await db.get_task(row["id"])
        with pytest.raises(store.DatabaseUnavailable):
            await db.commit([store.update_task(row["id"], {"pid": 1})], 0.3)
        assert db.probe_write() is not None
    finally:
        await asyncio.to_thread(server.start)
    assert (await db.get_task(row["id"]))["pid"] is None
    await db.commit([store.update_task(row["id"], {"pid": 2})], 5)
    assert (await db.get_task(row["id"]))["pid"] == 2 and db.probe_write() is None
