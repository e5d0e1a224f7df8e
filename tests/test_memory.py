"""A client that vanishes leaves nothing behind: its connection is freed when it goes, not
at the next full garbage collection (cycles kept 2,000 replays' ~90 MB: bench replay)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import aiohttp
from aiohttp import web
from conftest import make_settings, silent_ws, wait_for

from remoterun.api import SOCKETS
from remoterun.api.app import create_app
from remoterun.api.listen import GuardedSite
from remoterun.cli.serve import listen

CLIENTS = 20


def _alive(kind: type) -> int:
    """Objects of a type still in memory, garbage not yet collected included."""
    return sum(isinstance(o, kind) for o in gc.get_objects())


def _closed_transports() -> int:
    """Closed socket transports still in memory."""
    return sum(type(o).__name__ == "_SelectorSocketTransport" and o.is_closing()
               for o in gc.get_objects())


async def test_replay_clients_that_vanish_are_freed_without_a_collection(tmp_path: Path):
    """Silent replay clients that close: their sockets, requests and transports go at once."""
    settings = make_settings(tmp_path, replay_readers=4, stall_timeout_s=60.0)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    sock = listen("127.0.0.1", 0)
    site = GuardedSite(runner, settings, sock=sock)
    await site.start()
    port = sock.getsockname()[1]
    gc.collect()  # what earlier tests left is not counted
    gc.disable()  # what is measured: what refcounting frees, with no collection to help
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:  # closed first: site.open counts only ours
            async with http.post(f"{url}/tasks", json={"script": "flood.py",
                                                        "params": {"bytes": 8_000_000}}) as r:
                task_id = (await r.json())["id"]

            async def final() -> bool:
                async with http.get(f"{url}/tasks/{task_id}") as r:
                    return (await r.json())["status"] not in ("pending", "running")
            await wait_for(final, timeout=30.0, what="the task to finish")
        await wait_for(lambda: site.open == 0, what="the HTTP client to go")
        before_ws = _alive(web.WebSocketResponse)
        before_transports = _closed_transports()
        sockets = await asyncio.gather(*(asyncio.to_thread(
            silent_ws, port, f"/tasks/{task_id}/ws") for _ in range(CLIENTS)))
        app = runner.app
        await wait_for(lambda: len(app[SOCKETS]) == CLIENTS, what="every client to attach")
        for one in sockets:
            one.close()
        await wait_for(lambda: site.open == 0, what="the server to see them go")
        for _ in range(5):  # the transports' last callbacks
            await asyncio.sleep(0)
        left_ws = _alive(web.WebSocketResponse) - before_ws
        left_transports = _closed_transports() - before_transports
        assert left_ws <= 2, f"{left_ws} of {CLIENTS} vanished clients' sockets still in memory"
        assert left_transports <= 2, f"{left_transports} closed transports still in memory"
    finally:
        gc.enable()
        await runner.cleanup()
        sock.close()
