"""The archive's disk fills up (a small tmpfs, mounted by the test as root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
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


@contextlib.contextmanager
def tmpfs(folder: Path) -> Iterator[Path]:
    """`folder` (made here) as an 8 MiB tmpfs for the test's life, unmounted after it."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/archive as an 8 MiB tmpfs (the archive folder of make_settings)."""
    with tmpfs(tmp_path / "archive") as folder:
        yield folder


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


def _fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem is full; the file."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:  # the last partial page, byte by byte blocks
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


async def _follow(http: aiohttp.ClientSession, url: str) -> list[dict]:
    """Every JSON frame a WebSocket follower gets until the server closes it."""
    async with http.ws_connect(url) as ws:
        return await ws_collect(ws, timeout=60)


async def test_a_full_disk_mid_stream_names_the_last_archived_seq(tmp_path, small_disk):
    """The archive's disk fills (a file written beside it) while three live followers watch a
    task: the task ends failed naming the disk and the last seq the archive holds, each
    follower gets an exit frame naming that seq, every seq up to it is in
    /output?format=jsonl; once the file is gone a new task runs and is archived whole."""
    server = ServerProcess(tmp_path)
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/tasks", json={
                    "script": "lines.py", "params": {"n": 200000, "delay": 0.0005}}) as r:
                task_id = (await r.json())["id"]
            ws_url = f"{server.url}/tasks/{task_id}/ws".replace("http", "ws", 1)
            followers = [asyncio.create_task(_follow(http, ws_url)) for _ in range(3)]

            async def streamed() -> bool:
                async with http.get(f"{server.url}/tasks/{task_id}") as r:
                    return bool((await r.json())["last_seq"] > 500)

            await wait_for(streamed, timeout=20, what="the task to stream")
            filler = await asyncio.to_thread(_fill, small_disk)
            seen = await asyncio.gather(*followers)

            async def final() -> dict | None:
                async with http.get(f"{server.url}/tasks/{task_id}") as r:
                    task = await r.json()
                return task if task["status"] not in ("pending", "running") else None

            done = await wait_for(final, timeout=30, what="the task to end")
            async with http.get(f"{server.url}/tasks/{task_id}/output?format=jsonl") as r:
                archived = [json.loads(line) for line in (await r.text()).splitlines()]
            kept = [record["seq"] for record in archived]
            last = kept[-1] if kept else 0
            assert kept == list(range(1, last + 1))
            assert done["status"] == "failed" and done["last_seq"] == last, done
            assert "No space left" in done["error"] and str(small_disk) in done["error"], done
            assert f"seq {last}" in done["error"], done["error"]
            for frames in seen:
                assert frames[-1]["type"] == "exit" and frames[-1]["last_seq"] == last, \
                    frames[-1]
                live = [f["seq"] for f in frames if f["type"] == "output"]
                assert set(live) & set(range(1, last + 1)) <= set(kept)
                if live[-1] > last:  # published before the thread wrote them, and named
                    assert f"seqs {last + 1} to {live[-1]} were sent live" in done["error"]
            await asyncio.to_thread(filler.unlink)
            async with http.post(server.url + "/tasks", json={
                    "script": "lines.py", "params": {"n": 50}}) as r:
                after_id = (await r.json())["id"]

            async def after_done() -> dict | None:
                async with http.get(f"{server.url}/tasks/{after_id}") as r:
                    task = await r.json()
                return task if task["status"] not in ("pending", "running") else None

            after = await wait_for(after_done, timeout=20, what="the next task to end")
            assert after["status"] == "success", after
            async with http.get(f"{server.url}/tasks/{after_id}/output") as r:
                assert (await r.text()).count("\n") == 50
            async with http.get(server.url + "/healthz") as r:
                assert r.status == 200
    finally:
        server.stop()


@pytest.fixture
def db_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/dbdisk, an 8 MiB tmpfs for the database alone."""
    with tmpfs(tmp_path / "dbdisk") as folder:
        yield folder


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
    filler = await asyncio.to_thread(_fill, db_disk)
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
