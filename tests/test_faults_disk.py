"""The archive's disk fills up (a small tmpfs, mounted by the test as root)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ServerProcess, submit, wait_final, wait_for, ws_collect

from remoterun.api import DB

DISK_BYTES = 8 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/archive as an 8 MiB tmpfs (the archive folder of make_settings)."""
    folder = tmp_path / "archive"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


async def test_a_full_disk_fails_the_writer_honestly_and_the_others_end(make_client, small_disk):
    """A task whose archive cannot be written ends failed naming the archive, its output up to
    the failure served with a true length; a task beside it still ends with an exit frame;
    /readyz says not ready; the server serves on."""
    client = await make_client(min_free_bytes=1024 * 1024)
    beside = await submit(client, "lines.py", params={"n": 30, "delay": 0.05})
    ws = await client.ws_connect(f"/tasks/{beside['id']}/ws")
    writer = await submit(client, "noise.py", params={"bytes": 3 * DISK_BYTES})
    done = await wait_final(client, writer["id"], timeout=30)
    assert done["status"] == "failed", done
    assert "archive" in done["error"] and "No space left" in done["error"], done["error"]
    response = await client.get(f"/tasks/{writer['id']}/output")
    body = await response.read()
    # What the disk kept of it (whole frames, as far as both files reach) and nothing more.
    assert response.status == 200 and len(body) == done["output_bytes"]
    assert response.content_length in (None, len(body))
    frames = await ws_collect(ws, timeout=30)
    assert frames[-1]["type"] == "exit"
    ready = await client.get("/readyz")
    assert ready.status == 503 and not (await ready.json())["checks"]["archive"]["ok"]
    rows = await client.app[DB].segments(writer["id"])
    assert sum(r["raw_bytes"] for r in rows) == done["output_bytes"]


async def test_sigterm_with_a_full_disk_exits_and_logs_once_per_task(tmp_path, small_disk):
    """A server whose archive disk is full still stops on SIGTERM, and says so in a few lines,
    not a traceback per read."""
    server = ServerProcess(tmp_path)
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            ids = []
            for _ in range(3):
                async with http.post(server.url + "/tasks", json={
                        "script": "noise.py", "params": {"bytes": 2 * DISK_BYTES}}) as r:
                    ids.append((await r.json())["id"])

            async def all_ended():
                for task_id in ids:
                    async with http.get(f"{server.url}/tasks/{task_id}") as r:
                        if (await r.json())["status"] in ("pending", "running"):
                            return False
                return True

            await wait_for(all_ended, timeout=45, what="the writers to end")
        code = await asyncio.to_thread(server.kill, signal.SIGTERM)
    finally:
        server.stop()
    assert code == 0
    text = server.log.read_text()
    assert text.count("archive_write_failed") <= len(ids), text[-3000:]
    assert text.count("Traceback") == 0, text[-3000:]
