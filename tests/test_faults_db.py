"""A database locked by another connection: nothing recorded that did not happen, no stall."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from conftest import submit, wait_final, wait_for, ws_collect

from remoterun.api import DB, SCHEDULER


class LoopWatch:
    """The longest the event loop went without running a 5 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.005)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def lock(path) -> sqlite3.Connection:
    """A second connection holding the write lock (as another process would)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


async def test_submit_while_locked_answers_503_json_with_retry_after(make_client, settings):
    """POST /tasks during a lock: 503 database_unavailable with Retry-After, in about 2 s, and
    the loop keeps serving meanwhile; after the lock, submissions work again."""
    client = await make_client()
    holder = lock(settings.db_path)
    try:
        with LoopWatch() as watch:
            began = time.monotonic()
            response = await client.post("/tasks", json={"script": "hello.sh"})
            waited = time.monotonic() - began
            body = await response.json()
            health = await client.get("/healthz")  # reads still answer during the lock
            ready = await (await client.get("/readyz")).json()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status == 503 and body["error"] == "database_unavailable", body
    assert response.headers["Retry-After"].isdigit() and waited < 4
    assert health.status == 200
    assert ready["status"] == "not_ready" and not ready["checks"]["database"]["ok"]
    assert watch.worst < 0.1, watch.worst
    task = await submit(client, "hello.sh")
    assert (await wait_final(client, task["id"]))["status"] == "success"


async def test_transitions_during_a_lock_wait_and_are_recorded_truthfully(make_client, settings):
    """Locked for 3 s: a run that exits 0 is recorded success and its client gets exit; a
    pending task cancelled meanwhile is cancelled; a task due to start runs after the lock."""
    client = await make_client(workers=1)
    first = await submit(client, "sleep.sh", params={"seconds": 1})
    queued = await submit(client, "hello.sh")
    doomed = await submit(client, "hello.sh", priority=-1)
    ws = await client.ws_connect(f"/tasks/{first['id']}/ws")

    async def running():
        return (await (await client.get(f"/tasks/{first['id']}")).json())["status"] == "running"

    await wait_for(running, what="the first task to run")
    holder = lock(settings.db_path)
    try:
        with LoopWatch() as watch:
            cancel = asyncio.create_task(client.post(f"/tasks/{doomed['id']}/cancel"))
            await asyncio.sleep(3)  # the sleeper ends in the lock; its end must wait
            stuck = await (await client.get(f"/tasks/{first['id']}")).json()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert stuck["status"] == "running"  # nothing recorded that the database did not take
    frames = await ws_collect(ws)
    assert frames[-1] == {"type": "exit", "status": "success", "exit_code": 0,
                          "duration": frames[-1]["duration"], "last_seq": frames[-1]["last_seq"]}
    assert (await wait_final(client, first["id"]))["status"] == "success"
    assert (await wait_final(client, queued["id"]))["status"] == "success"
    cancelled = await cancel
    assert cancelled.status in (200, 503)
    doomed_now = await (await client.get(f"/tasks/{doomed['id']}")).json()
    if cancelled.status == 200:
        assert doomed_now["status"] == "cancelled"
    else:  # the cancel could not be committed in time: the task went on as if never asked
        assert (await wait_final(client, doomed["id"]))["status"] == "success"
    events = await client.app[DB].events(first["id"])
    assert [(e["old_status"], e["new_status"]) for e in events] == [
        (None, "pending"), ("pending", "running"), ("running", "success")]
    assert watch.worst < 0.1, watch.worst


async def test_a_pending_cancel_during_a_lock_answers_503_after_the_request_wait(
        make_client, settings):
    """Cancel of a pending task while another connection holds BEGIN IMMEDIATE for 6 s: 503
    database_unavailable with Retry-After after the request wait (~2 s, as a submission), not
    once the lock goes; the task waits on as if never asked, and a cancel after the lock
    works."""
    client = await make_client(workers=1)
    blocker = await submit(client, "sleep.sh", params={"seconds": 30})
    waiting = await submit(client, "hello.sh")

    async def blocker_running():
        task = await (await client.get(f"/tasks/{blocker['id']}")).json()
        return task["status"] == "running"

    await wait_for(blocker_running, what="the blocker to run")
    holder = sqlite3.connect(settings.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    release = asyncio.get_running_loop().call_later(6, holder.execute, "ROLLBACK")
    try:
        began = time.monotonic()
        response = await client.post(f"/tasks/{waiting['id']}/cancel")
        waited = time.monotonic() - began
        body = await response.json()
    finally:
        release.cancel()
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert response.status == 503 and body["error"] == "database_unavailable", (waited, body)
    assert response.headers["Retry-After"].isdigit() and waited < 4, waited
    assert (await (await client.get(f"/tasks/{waiting['id']}")).json())["status"] == "pending"
    assert (await client.post(f"/tasks/{waiting['id']}/cancel")).status == 200
    assert (await wait_final(client, waiting["id"]))["status"] == "cancelled"
    assert (await client.post(f"/tasks/{blocker['id']}/cancel")).status == 200
    assert (await wait_final(client, blocker["id"]))["status"] == "cancelled"


async def test_a_run_whose_end_cannot_be_recorded_is_let_go(make_client, settings):
    """Another writer moves a running task to a final state under the server (its end's write,
    guarded by the old status, then raises): the engine lets the task go instead of holding
    it running; its attached client gets an exit with the recorded state, GET shows it."""
    client = await make_client()
    task = await submit(client, "lines.py", params={"n": 20, "delay": 0.05})
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    attached = asyncio.create_task(ws_collect(ws, timeout=20))

    async def running():
        return (await (await client.get(f"/tasks/{task['id']}")).json())["status"] == "running"

    await wait_for(running, what="the task to run")
    other = sqlite3.connect(settings.db_path, isolation_level=None)
    try:
        other.execute("UPDATE tasks SET status = 'cancelled', finished_at = started_at + 1 "
                      "WHERE id = ?", (task["id"],))
    finally:
        other.close()
    frames = await attached
    assert frames[-1]["type"] == "exit" and frames[-1]["status"] == "cancelled", frames[-1]
    assert (await wait_final(client, task["id"]))["status"] == "cancelled"
    assert task["id"] not in client.app[SCHEDULER].tasks
