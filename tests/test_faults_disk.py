"""The archive's disk fills up (a small tmpfs, mounted by the test as root)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ServerProcess, submit, wait_final, wait_for, ws_collect
from test_restart import tasks_with_env

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


@pytest.fixture
def db_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/dbdisk, an 8 MiB tmpfs for the database alone."""
    folder = tmp_path / "dbdisk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """A file written until its filesystem has no byte left (ENOSPC); blocking."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


async def test_a_full_database_disk_waits_then_records_the_truth(make_client, db_disk):
    """The database's disk fills while three tasks stream and 3-line tasks are submitted every
    0.3 s: /readyz names the database, a submission answers 201 or 503 with Retry-After (never
    500); once space returns every task ends as it really did (success, exit 0, all its
    output), the attached client gets its exit, and /readyz is ready again."""
    client = await make_client(db_path=db_disk / "rr.db")
    streams = [await submit(client, "lines.py", params={"n": 40, "delay": 0.05})
               for _ in range(3)]
    ws = await client.ws_connect(f"/tasks/{streams[0]['id']}/ws")
    attached = asyncio.create_task(ws_collect(ws, timeout=60))  # read on: it answers pings

    async def all_running() -> bool:
        for task in streams:
            if (await (await client.get(f"/tasks/{task['id']}")).json())["status"] != "running":
                return False
        return True

    await wait_for(all_running, what="the streaming tasks to run")
    filler = await asyncio.to_thread(fill, db_disk)
    accepted, refused = [], []
    try:
        ready = await client.get("/readyz")
        checks = (await ready.json())["checks"]
        assert ready.status == 503 and not checks["database"]["ok"], checks
        assert "No space left" in checks["database"]["error"] and checks["archive"]["ok"]
        for _ in range(8):  # a submission every 0.3 s (each refused after the 2 s wait)
            response = await client.post("/tasks", json={"script": "lines.py",
                                                          "params": {"n": 3}})
            body = await response.json()
            if response.status == 201:
                accepted.append(body["id"])
            else:
                assert response.status == 503, (response.status, body)
                assert body["error"] == "database_unavailable", body
                assert response.headers["Retry-After"].isdigit()
                refused.append(body)
            await asyncio.sleep(0.3)
        await wait_for(lambda: not any(tasks_with_env(t["id"]) for t in streams), 15,
                       what="the streaming scripts to exit")
    finally:
        await asyncio.to_thread(filler.unlink)
    assert refused, "a full database disk refused no submission"
    for task in streams:
        done = await wait_final(client, task["id"], timeout=20)
        assert (done["status"], done["exit_code"]) == ("success", 0), done
        text = await (await client.get(f"/tasks/{task['id']}/output")).text()
        assert text.splitlines() == [f"line {i}" for i in range(1, 41)]
    for task_id in accepted:
        assert (await wait_final(client, task_id, timeout=20))["status"] == "success"
    frames = await attached
    assert frames[-1]["type"] == "exit" and frames[-1]["status"] == "success", frames[-1]
    events = await client.app[DB].events(streams[0]["id"])
    assert [e["new_status"] for e in events] == ["pending", "running", "success"]
    assert (await client.get("/readyz")).status == 200
