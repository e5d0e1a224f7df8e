"""GET /events and queue_position across a cluster: real nodes, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import asyncpg
import pytest
from cluster_nodes import Node, get_json, make_nodes, start_all
from conftest import wait_for
from test_cluster import (
    FINAL,
    ONCE,
    _names_missing,
    add_script,
    final,
    post,
    submit,
    submit_many,
)

from remoterun.cluster.events import ClusterFeed, EventTail
from remoterun.cluster.relay import Relay
from remoterun.store.postgres import PostgresDatabase
from remoterun.store.schema import Task
from remoterun.store.statements import insert

pytestmark = pytest.mark.slow
GATE = "#!/bin/sh\nsleep 60\n"
SseEvent = tuple[int, str, dict[str, Any]]


async def sse_until(response: aiohttp.ClientResponse, done: Any, got: list[SseEvent],
                    timeout: float = 30.0) -> list[SseEvent]:
    """Parse a GET /events stream into `got` as (id, event, data) until `done(got)`."""
    fields: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while not done(got):
            raw = await response.content.readline()
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in fields:
                    got.append((int(fields.get("id", "0")), fields["event"],
                                json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return got


@pytest.fixture
async def cluster(tmp_path, engines, request):
    """Three nodes n1..n3 (started), stopped after the test; their node_timeout_s is the
    fixture's param, if it has one."""
    timeout = {"node_timeout_s": request.param} if hasattr(request, "param") else {}
    nodes = make_nodes(tmp_path, engines, 3, **timeout)
    add_script(nodes, "once.sh", ONCE)
    add_script(nodes, "gate.sh", GATE, "max_concurrency = 1\n")
    await start_all(nodes)
    yield nodes
    for node in nodes:
        node.stop()


def ready(got: list[SseEvent]) -> bool:
    """The stream's replay is over (its `ready` event came)."""
    return any(kind == "ready" for _, kind, _ in got)


def finished(task_ids: set[str]) -> Any:
    """A `done` predicate: every one of the tasks' final transitions arrived."""
    return lambda got: task_ids <= {d["id"] for _, k, d in got
                                    if k == "task" and d["status"] in FINAL}


def transitions(got: list[SseEvent]) -> list[tuple[int, str, str]]:
    """(id, task, status) of each `task` event received."""
    return [(i, d["id"], d["status"]) for i, k, d in got if k == "task"]


async def stored_events(url: str, after: int) -> list[tuple[int, str, str]]:
    """(id, task, new status) of every transition recorded after the id, by id."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, task_id, new_status FROM task_events WHERE id > $1 "
                                "ORDER BY id", after)
    finally:
        await conn.close()
    return [(r["id"], r["task_id"], r["new_status"]) for r in rows]


async def _write_events(url: str, stop: asyncio.Event, seed: int) -> None:
    """Transactions that each take their id, draw an event id, stay open a few ms (some roll
    back): commits land out of the order their ids were drawn in."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            transaction = conn.transaction()
            await transaction.start()
            await conn.fetchval("SELECT txid_current()")  # as the store's first round trip
            await conn.execute("INSERT INTO task_events (task_id, ts, new_status, attempt) "
                               "VALUES ('t', 0, 'pending', 1)")
            await asyncio.sleep(rng.random() * 0.02)
            await (transaction.rollback() if rng.random() < 0.1 else transaction.commit())
    finally:
        await conn.close()


async def test_the_frontier_delivers_every_committed_event_once_in_id_order(engines):
    """Six writers commit events out of id order for two seconds while a node's tail runs:
    its follower gets every committed event, each once, ids increasing (a snapshot's xmax as
    the bound lost thousands here: docs/cluster.md)."""
    _, redis_server, url = engines
    db = PostgresDatabase(url)
    await db.open()
    relay = Relay(redis_server.url)
    feed = ClusterFeed()
    tail = EventTail(db, feed, relay)
    await db.commit([insert(Task, {"id": "t", "num": 1, "script": "s", "status": "pending",
                                   "params": "{}", "created_at": 0, "updated_at": 0,
                                   "logs_path": "", "submitted_by": "me"})], 5)
    await tail.start()
    follower = feed.follow()
    stop = asyncio.Event()
    writers = [asyncio.create_task(_write_events(url, stop, seed)) for seed in range(6)]
    try:
        await wait_for(lambda: feed.frontier > 300, 60, what="300 events")
    finally:
        stop.set()
        await asyncio.gather(*writers)
    drawn, _, _ = await db.event_frontier()
    await wait_for(lambda: feed.frontier >= drawn, 30, what="the frontier to pass the last")
    await tail.close()
    stored = [row["id"] for row in await db.fetch_all("SELECT id FROM task_events ORDER BY id")]
    got = [change.event_id for change in follower.queue]
    await relay.redis.aclose()
    await db.close()
    assert got == stored and len(got) > 300


async def test_events_on_one_node_carry_what_another_node_runs(cluster, http):
    """A GET /events client on n2 gets, live on the one stream, pending, running and success
    of a task submitted to and run by n1, in that order, ids increasing."""
    got: list[SseEvent] = []
    async with http.get(f"{cluster[1].url}/events") as response:
        await sse_until(response, ready, got)
        task = await submit(http, cluster[0], script="hello.sh", node="n1")
        await sse_until(response, finished({task["id"]}), got)
    mine = [(i, d) for i, k, d in got if k == "task" and d["id"] == task["id"]]
    assert [d["status"] for _, d in mine] == ["pending", "running", "success"]
    assert all(d["node"] == "n1" for _, d in mine[1:])
    ids = [i for i, _ in mine]
    assert ids == sorted(set(ids)) and all(d["event"]["id"] == i for i, d in mine)


@pytest.mark.timeout(180)
async def test_events_resumed_on_another_node_arrive_exactly_once(cluster, http, engines):
    """60 tasks submitted to the three nodes at once (their commits interleave): a client
    reads /events on n3, leaves part-way, resumes with Last-Event-ID on n2; together the two
    streams hold every transition recorded, each once, in id order."""
    first: list[SseEvent] = []
    async with http.get(f"{cluster[2].url}/events") as response:
        await sse_until(response, ready, first)
        start = first[-1][0]
        submitting = asyncio.create_task(submit_many(
            http, cluster, 60, in_flight=12, script="once.sh", params={"out": "/dev/null"}))
        await sse_until(response, lambda got: len(transitions(got)) >= 50, first)
    tasks = await submitting
    rest: list[SseEvent] = []
    async with http.get(f"{cluster[1].url}/events",
                        headers={"Last-Event-ID": str(first[-1][0])}) as response:
        all_ended = finished({t["id"] for t in tasks})
        await sse_until(response, lambda got: all_ended(first + got), rest, timeout=90)
    seen = transitions(first + rest)
    ids = [i for i, _, _ in seen]
    assert ids == sorted(set(ids)), "an event came twice or out of order"
    mine = {t["id"] for t in tasks}
    stored = [e for e in await stored_events(engines[2], start) if e[1] in mine]
    assert [e for e in seen if e[1] in mine] == stored
    assert len(stored) == 3 * len(tasks)


async def test_an_event_committed_late_comes_before_every_later_id(cluster, http, engines):
    """A transaction draws an event id, then commits only after other nodes have committed
    higher ids and their task ended: a follower on n1 still receives the ids in increasing
    order, the late one in its place (never N+1 before N), and one resuming on n3 from
    before it gets the same."""
    got: list[SseEvent] = []
    conn = await asyncpg.connect(engines[2])
    try:
        async with http.get(f"{cluster[0].url}/events") as response:
            await sse_until(response, ready, got)
            start = got[-1][0]
            first = await submit(http, cluster[1], script="hello.sh", node="n2")
            await final(http, cluster[1], first["id"])
            held = conn.transaction()
            await held.start()
            late = await conn.fetchval(  # a transition of its own, in flight
                "INSERT INTO task_events (task_id, ts, old_status, new_status, attempt) "
                "VALUES ($1, 0, 'success', 'success', 1) RETURNING id", first["id"])
            after = await submit(http, cluster[2], script="hello.sh", node="n3")
            await final(http, cluster[2], after["id"])
            await held.commit()
            await sse_until(response, finished({after["id"]}), got)
    finally:
        await conn.close()
    seen = transitions(got)
    ids = [i for i, _, _ in seen]
    assert ids == sorted(set(ids)), seen
    assert late in ids and min(i for i, t, _ in seen if t == after["id"]) > late
    resumed: list[SseEvent] = []
    async with http.get(f"{cluster[2].url}/events?since={start}") as response:
        await sse_until(response, lambda g: finished({after["id"]})(g) and ready(g), resumed)
    assert transitions(resumed)[:len(seen)] == seen


@pytest.mark.timeout(180)
async def test_events_resumed_on_a_restarted_node_arrive_exactly_once(cluster, http, engines):
    """A client of n3 loses its stream when n3 stops while tasks run on n1 and n2; it resumes
    with Last-Event-ID on n3 once n3 is back: every transition recorded, each once, in id
    order."""
    first: list[SseEvent] = []
    async with http.get(f"{cluster[2].url}/events") as response:
        await sse_until(response, ready, first)
        start = first[-1][0]
        tasks = [await submit(http, cluster[i % 2], script="lines.py", node=f"n{i % 2 + 1}",
                              params={"n": 20, "delay": 0.1}) for i in range(4)]
        await sse_until(response, lambda g: "running" in {s for _, _, s in transitions(g)},
                        first)
    await asyncio.to_thread(cluster[2].stop)
    await asyncio.to_thread(cluster[2].start)
    rest: list[SseEvent] = []
    last = transitions(first)[-1][0]
    async with http.get(f"{cluster[2].url}/events",
                        headers={"Last-Event-ID": str(last)}) as response:
        all_ended = finished({t["id"] for t in tasks})
        await sse_until(response, lambda got: all_ended(first + got), rest, timeout=60)
    mine = {t["id"] for t in tasks}
    seen = [e for e in transitions(first + rest) if e[1] in mine]
    assert seen == [e for e in await stored_events(engines[2], start) if e[1] in mine]
    assert len(seen) == 3 * len(tasks)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cluster", [16.0], indirect=True)  # a lease (8 s) over the outage
async def test_events_resume_after_postgres_restarts(cluster, http, engines):
    """PostgreSQL down under a GET /events stream on n2 while a task runs on n1: the stream
    stays open, and once PostgreSQL is back it carries what was committed since, the task's
    end included, in id order, without gap or repeat."""
    got: list[SseEvent] = []
    async with http.get(f"{cluster[1].url}/events") as response:
        await sse_until(response, ready, got)
        start = got[-1][0]
        task = await submit(http, cluster[0], script="lines.py", node="n1",
                            params={"n": 30, "delay": 0.1})
        await sse_until(response, lambda g: ("running" in {s for _, _, s in transitions(g)}),
                        got)
        await asyncio.to_thread(engines[0].stop)
        try:
            await wait_for(lambda: _names_missing(http, cluster[1], "database"), 10,
                           what="/readyz to name the database")
        finally:
            await asyncio.to_thread(engines[0].start)
        await sse_until(response, finished({task["id"]}), got, timeout=60)
    assert transitions(got) == await stored_events(engines[2], start)
    assert [s for _, _, s in transitions(got)] == ["pending", "running", "success"]


async def test_queue_position_follows_the_claim_order_across_nodes(cluster, http):
    """Tasks waiting behind a script's max_concurrency of 1 have their queue_position on every
    node, in claim order (aged priority, then submission), one list read included; the next
    to start is the first in it, and the others move up."""
    head = await submit(http, cluster[0], script="gate.sh")
    await wait_for(lambda: _status(http, cluster[0], head["id"], "running"), 15)
    waiting = [await submit(http, cluster[i % 3], script="gate.sh", priority=p)
               for i, p in enumerate((0, 0, 5, 1))]
    order = [waiting[2]["id"], waiting[3]["id"], waiting[0]["id"], waiting[1]["id"]]
    try:
        for place, task_id in enumerate(order, 1):
            for node in cluster:
                got = await get_json(http, f"{node.url}/tasks/{task_id}")
                assert got.get("queue_position") == place, (node.name, place, got)
        listed = await get_json(http, f"{cluster[1].url}/tasks?status=pending")
        assert {t["id"]: t.get("queue_position") for t in listed["tasks"]} == {
            task_id: place for place, task_id in enumerate(order, 1)}
        running = await get_json(http, f"{cluster[2].url}/tasks/{head['id']}")
        assert "queue_position" not in running
        status, _ = await post(http, cluster[2], f"/tasks/{head['id']}/cancel")
        assert status == 200
        await wait_for(lambda: _status(http, cluster[0], order[0], "running"), 15)
        for place, task_id in enumerate(order[1:], 1):
            got = await get_json(http, f"{cluster[1].url}/tasks/{task_id}")
            assert got.get("queue_position") == place, (place, got)
    finally:
        for task_id in [head["id"], *order]:
            await post(http, cluster[0], f"/tasks/{task_id}/cancel")


async def _status(http: aiohttp.ClientSession, node: Node, task_id: str, status: str) -> bool:
    return (await get_json(http, f"{node.url}/tasks/{task_id}")).get("status") == status
