"""Streams at the edges: replay boundaries, reconnect loops under flood, slow clients, PTY."""

from __future__ import annotations

import asyncio
import json
import resource

import aiohttp
from conftest import output_of, submit, wait_final, wait_for, ws_collect

from remoterun.api import SCHEDULER


def _seqs(frames):
    return [f["seq"] for f in frames if f["type"] == "output"]


async def test_replay_from_every_boundary(make_client):
    """since = 0, inside memory, at the archive/memory seam, the last seq and past the end."""
    client = await make_client(replay_memory_bytes=2000)
    task = await submit(client, "lines.py", params={"n": 400, "delay": 0.002})
    await wait_for(lambda: _hub_window(client, task["id"]), what="memory window to roll")
    hub = client.server.app[SCHEDULER].tasks[task["id"]].hub
    seam = hub.window[0].seq
    points = [0, 1, seam - 2, seam - 1, seam, seam + 1]
    results = {k: await _collect_since(client, task["id"], k) for k in points}
    done = await wait_final(client, task["id"])
    last = done["last_seq"]
    results[last] = await _collect_since(client, task["id"], last)
    results[last + 10] = await _collect_since(client, task["id"], last + 10)
    expected = "".join(f"line {i}\n" for i in range(1, 401))
    full = results[0]
    assert output_of(full) == expected and _seqs(full) == list(range(1, last + 1))
    for k, frames in results.items():
        assert _seqs(frames) == list(range(k + 1, last + 1)), k
        assert frames[-1]["type"] == "exit"


def _hub_window(client, task_id):
    state = client.server.app[SCHEDULER].tasks.get(task_id)
    hub = state.hub if state is not None else None
    return hub is not None and hub.window and hub.window[0].seq > 20


async def _collect_since(client, task_id, since):
    return await ws_collect(await client.ws_connect(f"/tasks/{task_id}/ws?since={since}"))


async def test_reconnect_loop_under_flood_loses_nothing(make_client):
    """Dropping and reconnecting with the last seq while the script floods: every byte, once."""
    client = await make_client(replay_memory_bytes=64 * 1024)
    task = await submit(client, "flood.py", params={"bytes": 20_000_000})
    received = bytearray()
    last = 0
    reconnects = 0
    finished = False
    while not finished:
        ws = await client.ws_connect(f"/tasks/{task['id']}/ws?since={last}")
        count = 0
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["type"] == "output":
                assert frame["seq"] == last + 1
                last = frame["seq"]
                received += frame["data"].encode()
                count += 1
                if count == 7:
                    break
            elif frame["type"] == "exit":
                finished = True
        await ws.close()
        reconnects += 1
    archived = await (await client.get(f"/tasks/{task['id']}/output")).read()
    assert len(archived) == 20_000_000 and bytes(received) == archived
    assert reconnects > 3


async def test_slow_client_is_closed_1013_and_memory_stays_bounded(make_client):
    """A client that never reads is closed with 1013; the task is not slowed; it resumes."""
    client = await make_client(client_queue_bytes=256 * 1024)
    task = await submit(client, "flood.py", params={"bytes": 30_000_000})
    rss_before = _rss_kb()
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws", max_msg_size=0)
    done = await wait_final(client, task["id"], timeout=30)
    assert done["status"] == "success"
    assert _rss_kb() - rss_before < 150_000  # nowhere near the 30 MB output times copies
    last, close_code = 0, None
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            if frame["type"] == "output":
                last = frame["seq"]
    close_code = ws.close_code
    assert close_code == 1013
    rest = await _collect_since(client, task["id"], last)
    assert _seqs(rest)[0] == last + 1 and rest[-1]["type"] == "exit"
    metrics = await (await client.get("/metrics")).text()
    assert "remoterun_slow_clients_closed_total 1.0" in metrics


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_pty_over_websocket(client):
    """A PTY task: output frames are `pty`, resize reaches stty, keys are typed, ^C ends it."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "stty.sh", "pty": True})
    frames: list[dict] = []

    async def until(text):
        async with asyncio.timeout(10):
            while text not in output_of(frames):
                frames.append(json.loads((await ws.receive()).data))

    await until("size 24 80")
    await ws.send_json({"type": "resize", "cols": 132, "rows": 43})
    await ws.send_json({"type": "stdin", "data": "hi there\r"})
    await until("typed: hi there size 43 132")
    await until("winch 43 132")
    await ws.send_json({"type": "stdin", "data": "\x03"})
    frames += await ws_collect(ws)
    assert {f["stream"] for f in frames if f["type"] == "output"} == {"pty"}
    exit_frame = frames[-1]
    assert exit_frame["type"] == "exit" and exit_frame["status"] == "failed"
    assert exit_frame["exit_code"] in (-2, 130)


async def test_sse_heartbeat_comments(make_client):
    """A quiet SSE stream gets comment heartbeats so proxies keep it open."""
    client = await make_client(heartbeat_s=0.1)
    task = await submit(client, "sleep.sh", params={"seconds": 1})
    response = await client.get(f"/tasks/{task['id']}/logs")
    comments = 0
    async with asyncio.timeout(10):
        async for raw in response.content:
            if raw.startswith(b": keep-alive"):
                comments += 1
                if comments == 3:
                    break
    assert comments == 3
    await client.post(f"/tasks/{task['id']}/cancel")
