"""GET /events (every transition, replayed then live), GET /tasks/{id}/events, queue_position,
and the history filters of GET /tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import TOKENS, ServerProcess, make_settings, submit, wait_final, wait_for

from remoterun.api import SCHEDULER
from remoterun.api.app import create_app
from remoterun.store import Database
from remoterun.store.schema import SCHEMA_VERSION

Event = tuple[str | None, str, dict[str, Any]]


async def read_until(response: aiohttp.ClientResponse, done: Any, timeout: float = 15.0
                     ) -> list[Event]:
    """Parse SSE (id, event, data) until `done(events)` is true; fail after `timeout`."""
    events: list[Event] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while not done(events):
            raw = await response.content.readline()
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in fields:
                    events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events


def tasks_of(events: list[Event]) -> list[dict[str, Any]]:
    """The data of the `task` events."""
    return [data for _, kind, data in events if kind == "task"]


def ended(task_id: str) -> Any:
    """A `done` predicate: the task's final transition has arrived."""
    return lambda events: any(t["id"] == task_id and t["event"]["new_status"] == "success"
                              for t in tasks_of(events))


async def test_live_transitions_with_ids(client: TestClient) -> None:
    """A follower gets pending, running and success of a new task, ids increasing, status
    and event fields agreeing."""
    response = await client.get("/events")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    await read_until(response, lambda events: events and events[-1][1] == "ready")
    task = await submit(client, "hello.sh")
    events = await read_until(response, ended(task["id"]))
    mine = [(int(i or 0), d) for i, k, d in events if k == "task" and d["id"] == task["id"]]
    assert [d["status"] for _, d in mine] == ["pending", "running", "success"]
    assert [d["event"]["old_status"] for _, d in mine] == [None, "pending", "running"]
    ids = [i for i, _ in mine]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(d["event"]["id"] == i for i, d in mine)
    assert mine[-1][1]["event"]["exit_code"] == 0 and mine[-1][1]["exit_code"] == 0
    response.close()
    replay = await client.get(f"/events?since={ids[0] - 1}")
    again = tasks_of(await read_until(replay, lambda ev: ev and ev[-1][1] == "ready"))
    assert [t["event"] for t in again] == [d["event"] for _, d in mine]  # live = stored
    replay.close()


async def test_replay_since_an_id(client: TestClient) -> None:
    """`?since=ID` replays the stored transitions after ID, and Last-Event-ID wins over it."""
    first = await submit(client, "hello.sh")
    await wait_final(client, first["id"])
    second = await submit(client, "exit.sh", params={"code": 3})
    await wait_final(client, second["id"])
    response = await client.get("/events?since=0")
    events = await read_until(response, lambda ev: ev and ev[-1][1] == "ready")
    replayed = tasks_of(events)
    assert [(t["id"], t["status"]) for t in replayed] == [
        (first["id"], "pending"), (first["id"], "running"), (first["id"], "success"),
        (second["id"], "pending"), (second["id"], "running"), (second["id"], "failed")]
    assert replayed[-1]["event"]["exit_code"] == 3
    ready_id = events[-1][0]
    assert ready_id == str(replayed[-1]["event"]["id"])
    response.close()
    cut = replayed[2]["event"]["id"]
    response = await client.get("/events?since=0", headers={"Last-Event-ID": str(cut)})
    events = await read_until(response, lambda ev: ev and ev[-1][1] == "ready")
    assert [t["id"] for t in tasks_of(events)] == [second["id"]] * 3
    response.close()


async def test_bad_since(client: TestClient) -> None:
    """A since that is not a non-negative integer is a 400."""
    response = await client.get("/events?since=abc")
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_tokens_script_list_bounds_the_stream(make_client: Any) -> None:
    """A token with `scripts` sees only those scripts' transitions, replayed and live."""
    client = await make_client(tokens=TOKENS)
    admin = {"Authorization": "Bearer admin-token"}
    limited = {"Authorization": "Bearer hello-token"}
    other = await submit(client, "lines.py", params={"n": 1}, headers=admin)
    await wait_final(client, other["id"], headers=admin)
    response = await client.get("/events?since=0", headers=limited)
    replay = await read_until(response, lambda ev: ev and ev[-1][1] == "ready")
    assert tasks_of(replay) == []
    hidden = await submit(client, "lines.py", params={"n": 1}, headers=admin)
    shown = await submit(client, "hello.sh", headers=limited)
    events = await read_until(response, ended(shown["id"]))
    assert {t["script"] for t in tasks_of(events)} == {"hello.sh"}
    assert hidden["id"] not in {t["id"] for t in tasks_of(events)}
    response.close()
    everything = await client.get("/events?since=0", headers=admin)
    seen = tasks_of(await read_until(everything, ended(shown["id"])))
    assert {t["id"] for t in seen} == {other["id"], hidden["id"], shown["id"]}
    everything.close()
    assert (await client.get(f"/tasks/{other['id']}/events", headers=limited)).status == 403
    assert (await client.get("/events")).status == 401


async def test_ids_go_on_after_a_restart(aiohttp_client: Any, tmp_path: Any) -> None:
    """Event ids come from the database: after a restart they continue, and a follower that
    resumes with its last id gets exactly what happened after it."""
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    before = await submit(client, "hello.sh")
    await wait_final(client, before["id"])
    response = await client.get("/events?since=0")
    last_before = int((await read_until(response, lambda ev: ev and ev[-1][1] == "ready"))[-1][0]
                      or 0)
    response.close()
    await client.close()
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    after = await submit(client, "hello.sh")
    await wait_final(client, after["id"])
    response = await client.get("/events", headers={"Last-Event-ID": str(last_before)})
    events = await read_until(response, lambda ev: ev and ev[-1][1] == "ready")
    resumed = tasks_of(events)
    assert [t["id"] for t in resumed] == [after["id"]] * 3
    assert [t["event"]["id"] for t in resumed] == list(range(last_before + 1, last_before + 4))
    response.close()


async def test_a_slow_follower_is_dropped(make_client: Any) -> None:
    """A follower whose queue is full is cut off, and the others go on."""
    client = await make_client()
    scheduler = client.app[SCHEDULER]
    scheduler.feed.queue_events = 2
    slow = await client.get("/events")
    await read_until(slow, lambda ev: ev and ev[-1][1] == "ready")
    await wait_for(lambda: scheduler.feed.followers == 1, what="the follower")
    # The handler is parked in take(): publish three changes in one step, before it runs.
    row = {"id": "x", "script": "hello.sh", "params": "{}", "status": "pending", "priority": 0,
           "timeout": None, "max_retries": 0, "attempt": 1, "pty": False, "interactive": False,
           "exit_code": None, "error": None, "created_at": time.time(),
           "updated_at": time.time(), "started_at": None, "finished_at": None,
           "run_after": None, "submitted_by": "t", "logs_path": "p", "output_bytes": 0,
           "last_seq": 0}
    for event_id in (10**9, 10**9 + 1, 10**9 + 2):
        scheduler.feed.publish(event_id, row, None)
    assert scheduler.feed.followers == 0
    with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended: the client resumes
        async with asyncio.timeout(10):
            while await slow.content.readany():
                pass
    task = await submit(client, "hello.sh")  # the server goes on, and so do new followers
    again = await client.get("/events?since=0")
    await read_until(again, ended(task["id"]))
    again.close()


async def test_a_follower_that_stopped_reading_is_cut(make_client: Any) -> None:
    """A client that stops reading while the server writes to it is cut once its queue fills,
    even though the write it is stuck in never returns."""
    client = await make_client()
    scheduler = client.app[SCHEDULER]
    scheduler.feed.queue_events = 5
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(stalled, (client.host, client.port))
        stalled.send(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await wait_for(lambda: scheduler.feed.followers == 1, what="the follower")
        big = {"note": "x" * 100_000}  # each event ~100 kB: the socket's buffers fill at once
        for _ in range(40):
            await submit(client, "hello.sh", params=big)
            if scheduler.feed.followers == 0:
                break
        await wait_for(lambda: scheduler.feed.followers == 0, what="the follower to be cut")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionResetError):  # what was in flight, then the end
            async with asyncio.timeout(10):
                while await loop.sock_recv(stalled, 1 << 20):
                    pass
    finally:
        stalled.close()


async def test_task_events_lists_each_attempt(client: TestClient) -> None:
    """GET /tasks/{id}/events: every transition oldest first, each attempt's exit code."""
    task = await submit(client, "exit.sh", params={"code": 4}, max_retries=1)
    await wait_final(client, task["id"])
    response = await client.get(f"/tasks/{task['id']}/events")
    events = (await response.json())["events"]
    assert [(e["old_status"], e["new_status"], e["attempt"]) for e in events] == [
        (None, "pending", 1), ("pending", "running", 1), ("running", "pending", 2),
        ("pending", "running", 2), ("running", "failed", 2)]
    assert [e["exit_code"] for e in events] == [None, None, 4, None, 4]
    assert events[0]["ts"].endswith("Z")
    assert (await client.get(f"/tasks/{'0' * 8}-0000-4000-8000-{'0' * 12}/events")).status == 404


async def test_queue_position_follows_aged_priority(make_client: Any) -> None:
    """queue_position is the pending task's 1-based place in dispatch order: priority first,
    but a task that waited long enough goes before a higher-priority newcomer."""
    client = await make_client(workers=1, aging_s=0.2)
    blocker = await submit(client, "sleep.sh")
    await wait_for(lambda: _status(client, blocker["id"], "running"), what="the blocker")
    old_low = await submit(client, "hello.sh", priority=0)
    await asyncio.sleep(0.6)  # ~3 levels of ageing: more than the newcomers' 1, less than 5
    high = await submit(client, "hello.sh", priority=5)
    new_mid = await submit(client, "hello.sh", priority=1)
    order = [high["id"], old_low["id"], new_mid["id"]]
    for place, task_id in enumerate(order, 1):
        got = await (await client.get(f"/tasks/{task_id}")).json()
        assert got["queue_position"] == place, (place, got)
    listed = (await (await client.get("/tasks?status=pending")).json())["tasks"]
    assert {t["id"]: t["queue_position"] for t in listed} == {
        task_id: place for place, task_id in enumerate(order, 1)}
    running = await (await client.get(f"/tasks/{blocker['id']}")).json()
    assert "queue_position" not in running
    await client.post(f"/tasks/{high['id']}/cancel")
    got = await (await client.get(f"/tasks/{new_mid['id']}")).json()
    assert got["queue_position"] == 2
    await client.post(f"/tasks/{blocker['id']}/cancel")


async def _status(client: TestClient, task_id: str, status: str) -> bool:
    return bool((await (await client.get(f"/tasks/{task_id}")).json())["status"] == status)


async def test_list_filters_and_paging_both_ways(client: TestClient) -> None:
    """submitted_by, q, since/until filter the list; cursor pages older, after pages newer."""
    t0 = time.time()
    ids = [(await submit(client, "hello.sh"))["id"] for _ in range(5)]
    t1 = time.time()
    for task_id in ids:
        await wait_final(client, task_id)

    async def page(query: str) -> dict[str, Any]:
        response = await client.get(f"/tasks?{query}")
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body

    assert [t["id"] for t in (await page("q=ELL"))["tasks"]] == ids[::-1]
    assert (await page("q=nope"))["tasks"] == []
    assert len((await page("submitted_by=anonymous"))["tasks"]) == 5
    assert (await page("submitted_by=ops"))["tasks"] == []
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t1 + 1)) + "Z"
    assert (await page(f"since={since}"))["tasks"] == []
    assert len((await page(f"since={t0}&until={t1}"))["tasks"]) == 5
    first = await page("limit=2")
    assert [t["id"] for t in first["tasks"]] == ids[:2:-1] and first["prev_cursor"] is None
    second = await page(f"limit=2&cursor={first['next_cursor']}")
    assert [t["id"] for t in second["tasks"]] == [ids[2], ids[1]]
    third = await page(f"limit=2&cursor={second['next_cursor']}")
    assert [t["id"] for t in third["tasks"]] == [ids[0]] and third["next_cursor"] is None
    back = await page(f"limit=2&after={third['prev_cursor']}")
    assert back["tasks"] == second["tasks"] and back["next_cursor"] == second["next_cursor"]
    top = await page(f"limit=2&after={back['prev_cursor']}")
    assert [t["id"] for t in top["tasks"]] == ids[:2:-1] and top["prev_cursor"] is None
    bad = await client.get("/tasks?since=yesterday")
    assert bad.status == 400


async def test_streams_end_when_the_server_stops(server: ServerProcess) -> None:
    """SIGTERM ends every /events stream cleanly, so the server exits at once, not after
    waiting for its followers."""
    server.start()
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{server.url}/events")
        await read_until(response, lambda ev: ev and ev[-1][1] == "ready")
        started = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while await response.content.readany():
                pass
        response.close()
    assert await asyncio.to_thread(server.proc.wait, 10) == 0
    assert time.monotonic() - started < 4, "the server waited for the stream"


async def test_a_version_1_database_gains_the_exit_code_column(tmp_path: Any) -> None:
    """A database made before task_events.exit_code existed is migrated at open, its rows kept."""
    path = tmp_path / "old.db"
    db = Database(path)
    await db.open()
    await db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE task_events DROP COLUMN exit_code")
        conn.execute("INSERT INTO task_events (task_id, ts, new_status, attempt) "
                     "VALUES ('t', 1.0, 'pending', 1)")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db = Database(path)
    await db.open()
    try:
        rows = await db.events("t")
        assert [(r["new_status"], r["exit_code"]) for r in rows] == [("pending", None)]
        version = await db.fetch_one("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version == {"value": str(SCHEMA_VERSION)}  # migrated all the way
    finally:
        await db.close()


async def test_events_stream_ends_after_stream_max_s_and_resumes(make_client: Any) -> None:
    """`GET /events` ends after `server.stream_max_s` (a fuzzer or proxy never holds it for
    ever); resuming with the last id seen replays what committed in between, none twice."""
    client = await make_client(stream_max_s=0.5)
    started = time.monotonic()
    first = await client.get("/events")
    events = await read_until(first, lambda ev: ev and ev[-1][1] == "ready")
    assert await first.content.read() == b""  # the stream ends on its own
    assert time.monotonic() - started < 5
    last = events[-1][0]
    task = await submit(client, "hello.sh")
    await wait_final(client, task["id"])
    resumed = await client.get("/events", headers={"Last-Event-ID": str(last)})
    again = tasks_of(await read_until(resumed, lambda ev: ev and ev[-1][1] == "ready"))
    assert [t["status"] for t in again if t["id"] == task["id"]] == \
        ["pending", "running", "success"]
    resumed.close()
