"""Replay memory: many clients that never read, replaying a big finished task from the archive."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

from bench import client
from bench.lib import MB, Context, Row, progress
from bench.server import Server

CONNECT_CONCURRENCY = 100


def _silent(port: int, path: str) -> socket.socket:
    """A WebSocket upgrade, then never a read (a small receive buffer: it fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


async def _until_done(http: client.aiohttp.ClientSession, url: str, task_id: str) -> None:
    while True:
        async with http.get(f"{url}/tasks/{task_id}") as response:
            if (await response.json())["status"] not in ("pending", "running"):
                return
        await asyncio.sleep(0.2)


async def replay_rss(ctx: Context, clients: int, times: int) -> tuple[float, float, float]:
    """(peak RSS while `clients` silent replays are open, idle RSS before, idle RSS after)."""
    # The default stall bound (30 s) is longer than the measurement (10 s): what is measured
    # is the bound on archive readers, not clients being closed.
    async with Server(ctx, "replay") as server, client.session() as http:
        task_id = await client.submit(http, server.url, "stream.sh",
                                      {"FILE": str(ctx.log_file), "TIMES": times})
        await _until_done(http, server.url, task_id)
        await asyncio.sleep(1.0)
        before = (server.rss_kb() or 0) / 1024
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> socket.socket:
            async with gate:
                return await asyncio.to_thread(_silent, server.port, f"/tasks/{task_id}/ws")

        began = time.perf_counter()
        sockets = await asyncio.gather(*(one() for _ in range(clients)))
        progress(f"{clients} silent replays open in {time.perf_counter() - began:.1f} s")
        peak = before
        for _ in range(20):  # 10 s with them open
            await asyncio.sleep(0.5)
            peak = max(peak, (server.rss_kb() or 0) / 1024)
        for sock in sockets:
            sock.close()
        await asyncio.sleep(12.0)  # past the server's next heap trim (every 10 s)
        after = (server.rss_kb() or 0) / 1024
    return peak, before, after


async def replay(ctx: Context) -> list[Row]:
    """Server RSS with N clients replaying a big task and not reading, and after they left."""
    clients = ctx.size(2000, 300)
    times = max(1, ctx.size(300 * MB, 30 * MB) // ctx.log_bytes)
    peak, before, after = await replay_rss(ctx, clients, times)
    size_mb = times * ctx.log_bytes / MB
    held = Row(f"{clients:,} non-reading replays of a {size_mb:.0f} MB task: server RSS", "MB",
               peak, before, "idle RSS before", "< 300 MB", higher_is_better=False,
               notes="raw sockets that upgrade and never read; stream.replay_readers = 32")
    held.met = peak < 300
    back = Row("... after they left: server RSS", "MB", after, before, "idle RSS before",
               "within 30 MB of idle", higher_is_better=False)
    back.met = after - before <= 30
    return [held, back]
