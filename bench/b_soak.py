"""Soak: minutes of mixed tasks and followers, then the server's idle RSS, fds and children."""

from __future__ import annotations

import asyncio
import os
import random
import time

from bench import client
from bench.lib import Context, Row, progress
from bench.server import Server, children


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _mix(http: client.aiohttp.ClientSession, url: str, file: str, until: float,
               rng: random.Random) -> int:
    """One client's loop of mixed work until `until`; how many tasks it ran."""
    done = 0
    while time.monotonic() < until:
        kind = rng.random()
        if kind < 0.5:  # a trivial task, followed to its end over WebSocket
            await client.follow_submitted(http, url, "trivial.sh")
        elif kind < 0.7:  # a stream of output, followed
            task_id = await client.submit(http, url, "stream.sh", {"FILE": file, "TIMES": 1})
            await client.follow(http, url, task_id, client.cheap_frame)
        elif kind < 0.85:  # a sleeper, cancelled while a follower watches
            task_id = await client.submit(http, url, "sleep.sh", {"SECONDS": 30})
            follower = asyncio.ensure_future(client.follow(http, url, task_id,
                                                           client.cheap_frame))
            await asyncio.sleep(0.2)
            await client.cancel(http, url, task_id)
            await follower
        else:  # a follower that goes away mid-stream
            task_id = await client.submit(http, url, "stream.sh", {"FILE": file, "TIMES": 2})
            async with http.ws_connect(f"{url}/tasks/{task_id}/ws") as ws:
                await ws.receive()
        done += 1
    return done


async def soak(ctx: Context) -> list[Row]:
    """Idle RSS after a soak of mixed tasks vs the idle RSS before it."""
    seconds = ctx.size(180, 30)
    piece = ctx.scripts / "soak-piece.log"  # where a sandboxed task sees it
    piece.write_bytes(ctx.log_file.read_bytes()[: 1024 * 1024])
    async with Server(ctx, "soak", workers=8) as server, client.session() as http:
        await client.follow_submitted(http, server.url, "trivial.sh")  # warm
        await asyncio.sleep(1.0)
        before = ((server.rss_kb() or 0) / 1024, _fds(server.pid), len(children(server.pid)))
        until = time.monotonic() + seconds
        counts = await asyncio.gather(*(_mix(http, server.url, str(piece), until,
                                             random.Random(i)) for i in range(8)))
        progress(f"soak: {sum(counts)} tasks in {seconds} s")
        await asyncio.sleep(12.0)  # past the server's next heap trim (every 10 s)
        after = ((server.rss_kb() or 0) / 1024, _fds(server.pid), len(children(server.pid)))
    row = Row(f"{seconds} s soak of mixed tasks: idle RSS after", "MB", after[0], before[0],
              "idle RSS before", "within 30 MB of before", higher_is_better=False,
              notes=f"{sum(counts)} tasks (trivial, streams, cancels, followers that leave); "
                    f"fds {before[1]} -> {after[1]}, children {before[2]} -> {after[2]}")
    row.met = after[0] - before[0] <= 30 and after[1] <= before[1] + 2 and after[2] <= before[2]
    return [row]
