"""The database: writes commit on the loop before they return, whole or not at all."""

from __future__ import annotations

import sqlite3
import time

import pytest

from remoterun import store as dbm
from remoterun.state import TaskStatus


def _row(num: int, task_id: str) -> dict[str, object]:
    now = time.time()
    return {"num": num, "id": task_id, "script": "hello.sh", "status": "pending",
            "params": "{}", "secret_params": "{}", "priority": 0, "timeout": None,
            "max_retries": 0, "attempt": 1, "pty": False, "interactive": False, "stdin": "",
            "created_at": now, "updated_at": now, "submitted_by": "test",
            "logs_path": f"2026/01/01/{task_id}"}


@pytest.fixture
async def database(tmp_path):
    """An open Database on a fresh file."""
    database = dbm.Database(tmp_path / "rr.db")
    await database.open()
    yield database
    await database.close()


async def test_a_write_is_committed_when_it_returns(database, tmp_path):
    """Another connection (another process, after a crash) sees a write once it returned."""
    database.write(dbm.insert_task(_row(1, "a")))
    database.write(dbm.transition("a", TaskStatus.PENDING, TaskStatus.RUNNING, 1,
                                        {"started_at": time.time()}))
    other = sqlite3.connect(tmp_path / "rr.db")
    try:
        assert other.execute("SELECT status FROM tasks WHERE id = 'a'").fetchall() == \
            [("running",)]
        assert other.execute("SELECT new_status FROM task_events WHERE task_id = 'a' "
                             "ORDER BY id").fetchall() == [("pending",), ("running",)]
    finally:
        other.close()
    assert (await database.get_task("a"))["status"] == "running"  # the reader sees it too


async def test_a_failing_write_leaves_nothing_and_the_next_one_works(database):
    """A statement that fails rolls back the statements before it in the same write."""
    database.write(dbm.insert_task(_row(1, "a")))
    moved = dbm.transition("a", TaskStatus.PENDING, TaskStatus.RUNNING, 1, {})
    with pytest.raises(sqlite3.IntegrityError):
        database.write([*moved, *dbm.insert_task(_row(2, "a"))])  # duplicate id
    assert (await database.get_task("a"))["status"] == "pending"
    assert [e["new_status"] for e in await database.events("a")] == ["pending"]
    database.write(moved)
    assert (await database.get_task("a"))["status"] == "running"


async def test_checkpoint_moves_the_log_into_the_database_file(database, tmp_path):
    """The writer never checkpoints; checkpoint() does, and the log is reused after it."""
    wal = tmp_path / "rr.db-wal"
    for i in range(1, 301):
        database.write(dbm.insert_task(_row(i, f"t{i}")))
    grown = wal.stat().st_size
    assert grown > 0
    await database.checkpoint()
    for i in range(301, 311):
        database.write(dbm.insert_task(_row(i, f"t{i}")))
    assert wal.stat().st_size <= grown  # written from its start again, not appended to
    other = sqlite3.connect(f"file:{tmp_path / 'rr.db'}?mode=ro", uri=True)
    try:
        assert other.execute("SELECT COUNT(*) FROM tasks").fetchone() == (310,)
    finally:
        other.close()
