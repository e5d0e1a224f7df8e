"""`remoterun ls --watch` follows GET /events against a real server process."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
from conftest import ServerProcess


async def test_ls_watch_prints_each_transition(server: ServerProcess) -> None:
    """After the list, each transition of a new task is printed as it happens."""
    server.start()
    watcher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "remoterun", "ls", "--watch", "--url", server.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            # The watcher has connected once its follower shows in the metrics gauge.
            async with asyncio.timeout(20):
                while True:
                    async with session.get(f"{server.url}/metrics") as response:
                        if 'remoterun_stream_clients{kind="events"} 1.0' in await response.text():
                            break
                    await asyncio.sleep(0.05)
            async with session.post(f"{server.url}/tasks", json={"script": "hello.sh"}) as made:
                task = await made.json()
        assert watcher.stdout is not None
        seen = []
        async with asyncio.timeout(20):
            while "success" not in seen:
                line = (await watcher.stdout.readline()).decode()
                assert line, "the watcher ended"
                if line.startswith(task["id"]):
                    seen.append(line.split()[1])
        assert seen == ["pending", "running", "success"]
    finally:
        watcher.send_signal(signal.SIGINT)
        await watcher.wait()
