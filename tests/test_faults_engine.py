"""The engine's own failure paths: bounded stdin, limits after a restart, spawn failures."""

from __future__ import annotations

import asyncio
import os

from conftest import make_settings, silent_ws, submit, wait_final, wait_for, ws_collect

from remoterun.api import DB, SCHEDULER
from remoterun.api.app import create_app


async def test_stdin_past_the_bound_is_refused_not_buffered(make_client):
    """A task that does not read its stdin: writes past stream.stdin_buffer_bytes get an
    error frame stdin_full and the socket stays open; nothing grows without limit."""
    client = await make_client(stdin_buffer_bytes=256 * 1024)
    task = await submit(client, "sleep.sh", params={"seconds": 30}, interactive=True)
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    await wait_for(lambda: client.app[SCHEDULER].attempt(task["id"]) is not None and
                   client.app[SCHEDULER].attempt(task["id"]).run is not None, what="the run")
    chunk = "x" * 65536
    refused = None
    for _ in range(16):  # 1 MiB offered against a 256 KiB bound (plus the pipe's 64 KiB)
        await ws.send_json({"type": "stdin", "data": chunk})
    await ws.send_json({"type": "ping"})
    async for msg in ws:
        frame = msg.json()
        if frame["type"] == "error":
            refused = frame
        if frame["type"] == "pong":
            break
    assert refused is not None and refused["error"] == "stdin_full", refused
    run = client.app[SCHEDULER].attempt(task["id"]).run
    assert run.stdin_pending <= 256 * 1024
    await ws.send_json({"type": "cancel"})
    assert (await wait_final(client, task["id"]))["status"] == "cancelled"


async def test_max_concurrency_holds_after_a_restart(aiohttp_client, tmp_path):
    """Tasks left pending by a stopped server keep their script's max_concurrency when the
    next server starts (limits come from the catalogue, not from the submissions seen)."""
    limits = {"sleep.sh": {"max_concurrency": 1}}
    first = await aiohttp_client(create_app(make_settings(tmp_path, workers=0, scripts=limits)))
    ids = [(await submit(first, "sleep.sh", params={"seconds": 0.3}))["id"] for _ in range(3)]
    await first.close()
    second = await aiohttp_client(create_app(make_settings(tmp_path, workers=4, scripts=limits)))
    for task_id in ids:
        assert (await wait_final(second, task_id, timeout=20))["status"] == "success"
    spans = []  # each run's (start, end) as its transitions were recorded
    for task_id in ids:
        events = await second.app[DB].events(task_id)
        ts = {e["new_status"]: e["ts"] for e in events}
        spans.append((ts["running"], ts["success"]))
    spans.sort()
    # One after the other: a slot is given back when the process exits, a few ms before its
    # end is committed; without the limit all three would overlap for their whole 0.3 s.
    assert all(end - 0.05 <= later
               for (_, end), (later, _) in zip(spans, spans[1:], strict=False)), spans


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_nul_byte_in_a_param_is_refused_and_leaks_nothing(make_client):
    """A NUL byte in a param (once a spawn's ValueError that leaked three descriptors per
    task) is refused at submit with a 422 naming the field, however many come; the server
    runs on. (A spawn failure of any type closing its pipes: tests/test_spawn_failure.py.)"""
    client = await make_client()
    before = _open_fds()
    for _ in range(20):
        response = await client.post("/tasks", json={"script": "hello.sh",
                                                     "params": {"name": "a\x00b"}})
        body = await response.json()
        assert response.status == 422 and body["details"][0]["field"] == "params.name", body
    assert _open_fds() <= before + 2  # (a client socket may come and go)
    ok = await submit(client, "hello.sh")
    assert (await wait_final(client, ok["id"]))["status"] == "success"


async def test_replays_share_bounded_readers_and_stalled_clients_are_closed(make_client):
    """Clients that replay a big task and never read hold at most `replay_readers` archive
    readers, are closed once they took nothing for `stall_timeout_s`, and a client that
    reads still gets every byte."""
    client = await make_client(replay_readers=2, stall_timeout_s=1.0)
    total = 6_000_000
    task = await submit(client, "noise.py", params={"bytes": total})
    await wait_final(client, task["id"], timeout=30)
    silent = await asyncio.gather(*(asyncio.to_thread(
        silent_ws, client.port, f"/tasks/{task['id']}/ws") for _ in range(6)))
    try:
        slots = client.app[SCHEDULER].replay_slots
        await wait_for(lambda: slots.locked(), what="the readers taken")
        began = asyncio.get_running_loop().time()
        frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"), timeout=40)
        waited = asyncio.get_running_loop().time() - began
        got = sum(len(f["data"].encode()) for f in frames if f["type"] == "output")
        assert frames[-1]["type"] == "exit" and got > 0
        assert waited >= 1.0  # it waited its turn behind the stalled ones, however many
        await wait_for(lambda: not slots.locked(), what="every slot given back")
    finally:
        for sock in silent:
            sock.close()
