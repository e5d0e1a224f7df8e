"""The archive: rotation by size and age, exact replay, crash tolerance, output cap, SIGKILL."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from conftest import output_of, submit, wait_final, wait_for, ws_collect
from hypothesis import given
from hypothesis import strategies as st

from remoterun import archive
from remoterun.api import DB
from remoterun.archive import Frame, TaskArchive, gzjoin, segments
from remoterun.archive.scan import scan


def flood_bytes(total: int) -> bytes:
    """What tests/scripts/flood.py writes for RR_PARAM_BYTES=total."""
    out = bytearray()
    i = 0
    while len(out) < total:
        out += f"{i:09d} the quick brown fox jumps over the lazy dog\n".encode()
        i += 1
    return bytes(out[:total])


def contiguous(rows: list[dict]) -> bool:
    """Whether segment rows cover seqs 1..last with no gap or overlap."""
    expected = 1
    for row in rows:
        if row["first_seq"] != expected or row["last_seq"] < row["first_seq"]:
            return False
        expected = row["last_seq"] + 1
    return True


async def test_rotation_by_size_replays_the_exact_output(make_client, tmp_path):
    """A small segment_max_bytes yields several closed segments whose replay is the output."""
    client = await make_client(segment_max_bytes=20_000, read_chunk_bytes=4096)
    task = await submit(client, "flood.py", params={"bytes": 300_000})
    done = await wait_final(client, task["id"])
    assert done["status"] == "success" and done["output_bytes"] == 300_000
    expected = flood_bytes(300_000)
    rows = await client.app[DB].segments(task["id"])
    assert len(rows) >= 5 and contiguous(rows) and rows[-1]["last_seq"] == done["last_seq"]
    assert all(r["closed_at"] and not r["pruned"] for r in rows)
    assert sum(r["raw_bytes"] for r in rows) == 300_000
    root = tmp_path / "archive"
    assert b"".join(gzip.decompress((root / r["path"]).read_bytes()) for r in rows) == expected
    frames = await asyncio.to_thread(list, archive.read_frames(root, done["logs_path"]))
    assert [f.seq for f in frames] == list(range(1, done["last_seq"] + 1))
    assert b"".join(f.data for f in frames) == expected
    assert await (await client.get(f"/tasks/{task['id']}/output")).read() == expected
    async with client.ws_connect(f"/tasks/{task['id']}/ws?since=0") as ws:
        assert output_of(await ws_collect(ws)) == expected.decode()


async def test_rotation_by_age(make_client):
    """A slow writer's segments rotate after segment_max_age_s, each one closed and exact."""
    client = await make_client(segment_max_age_s=0.3)
    task = await submit(client, "lines.py", params={"n": 15, "delay": 0.08})
    done = await wait_final(client, task["id"])
    rows = await client.app[DB].segments(task["id"])
    assert len(rows) >= 3 and contiguous(rows) and all(r["closed_at"] for r in rows)
    for row in rows:
        assert row["closed_at"] - row["created_at"] < 0.3 + 0.5  # closed at the tick after aging
    body = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert body == "".join(f"line {i}\n" for i in range(1, 16)) and done["status"] == "success"


def test_truncated_member_is_tolerated_reported_and_finalized(tmp_path, compressor):
    """A segment cut mid-member reads back to the last whole frame, is reported, and repairs."""
    root = tmp_path / "archive"
    writer = TaskArchive(root, "2026/01/01/task", compressor, segment_max_bytes=1 << 20)
    frames = [Frame(seq, random.choice(("stdout", "stderr")), time.time(), os.urandom(50) * 40)
              for seq in range(1, 201)]
    for frame in frames[:120]:
        writer.write(frame)
    writer.flush().result()  # on disk: the compressor thread has written it
    for frame in frames[120:]:
        writer.write(frame)  # not flushed: what a kill would lose
    path = root / writer.segments[0].path
    crashed = tmp_path / "crashed" / "2026/01/01/task"
    crashed.mkdir(parents=True)
    for source in (path, segments.index_path(path)):
        shutil.copy(source, crashed / source.name)
    writer.close().result()
    seen = list(archive.read_frames(tmp_path / "crashed", "2026/01/01/task"))
    assert len(seen) >= 120 and [f.data for f in seen] == [f.data for f in frames[: len(seen)]]
    found = scan(crashed / path.name)
    assert not found.complete and any("truncated" in p for p in found.problems)
    segment, _ = archive.finalize(tmp_path / "crashed", f"2026/01/01/task/{path.name}")
    after = scan(crashed / path.name)
    assert after.complete and after.frames == len(seen) == segment.last_seq
    assert segment.closed_at is not None and segment.raw_bytes == after.raw_bytes


def test_crc32_combine_matches_zlib():
    """crc32_combine(crc(a), crc(b), len(b)) is crc(a + b), as zlib computes it."""
    rng = random.Random(5)
    for _ in range(200):
        a, b = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(rng.randrange(0, 3000))
        assert gzjoin.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


async def test_output_cap_fails_the_task_and_keeps_what_was_written(make_client):
    """Past max_output_bytes the task is stopped and ends failed; the first bytes are kept."""
    client = await make_client(max_output_bytes=10_000)
    task = await submit(client, "flood.py", params={"bytes": 5_000_000})
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and "cap of 10000 bytes" in done["error"]
    assert done["output_bytes"] == 10_000
    body = await (await client.get(f"/tasks/{task['id']}/output")).read()
    assert body == flood_bytes(10_000)


async def test_output_cap_from_script_metadata(make_client, tmp_path):
    """A script's own max_output_bytes applies when the server sets none."""
    client = await make_client()
    (tmp_path / "scripts" / "flood.py.toml").write_text("max_output_bytes = 5000\n")
    task = await submit(client, "flood.py", params={"bytes": 1_000_000})
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and done["output_bytes"] == 5000
    assert "max_output_bytes" in done["error"]
    small = await submit(client, "flood.py", params={"bytes": 4000})
    assert (await wait_final(client, small["id"]))["status"] == "success"


async def _watch(url: str, frames: list[dict]) -> None:
    """Collect a task's output frames over WebSocket until the connection dies."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                if frame.pop("type") == "output":
                    frames.append(frame)


async def test_sigkill_loses_at_most_the_last_second(server, http, tmp_path):
    """SIGKILL mid-write, restart: the archive replays every frame older than a second, the
    rows are closed and match the files, and `archive verify` finds nothing wrong."""
    server.config.write_text(server.config.read_text().replace(
        "[archive]\n", "[archive]\nsegment_max_bytes = 1500\n"))
    server.start()
    async with http.post(server.url + "/tasks", json={
            "script": "lines.py", "params": {"n": 100000, "delay": 0.002}}) as response:
        task = await response.json()
    live: list[dict] = []
    watcher = asyncio.create_task(_watch(f"{server.url.replace('http', 'ws')}/tasks/"
                                         f"{task['id']}/ws", live))
    try:
        await wait_for(lambda: sum(f["data"].count("\n") for f in live) >= 800, 20,
                       what="800 lines")
        killed_at = time.time()
        server.kill(signal.SIGKILL)
        await asyncio.wait_for(watcher, 10)
    finally:
        watcher.cancel()
    server.start()
    async with http.get(f"{server.url}/tasks/{task['id']}") as response:
        after = await response.json()
    assert after["status"] == "failed" and "server stopped" in after["error"]
    async with http.get(f"{server.url}/tasks/{task['id']}/output?format=jsonl") as response:
        kept = [json.loads(line) for line in (await response.text()).splitlines()]
    text = "".join(f["data"] for f in kept)
    assert "".join(f"line {i}\n" for i in range(1, 100001)).startswith(text)
    assert after["output_bytes"] == len(text.encode()) and after["last_seq"] == kept[-1]["seq"]
    old = [f for f in live if _unix(f["ts"]) < killed_at - 1.0]
    assert old and kept[: len(old)] == old
    with sqlite3.connect(f"file:{tmp_path / 'rr.db'}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(
            "SELECT * FROM task_logs WHERE task_id = ? ORDER BY first_seq", (task["id"],))]
    assert len(rows) >= 3 and contiguous(rows) and rows[-1]["last_seq"] == after["last_seq"]
    assert all(r["closed_at"] for r in rows)
    assert sum(r["raw_bytes"] for r in rows) == after["output_bytes"]
    verify = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "remoterun", "archive", "verify", "--config",
                         str(server.config)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "0 problems" in verify.stdout and "a server is running" in verify.stdout


def _unix(ts: str) -> float:
    """An RFC 3339 time of the protocol as Unix seconds."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def test_segment_files_sort_by_number(tmp_path):
    """Segments are read in number order, whatever their names sort to as text."""
    folder = tmp_path / "t"
    folder.mkdir()
    for name in ("000010.50.log.gz", "000002.9.log.gz", "000001.1.log.gz", "x.log.gz"):
        (folder / name).write_bytes(b"")
    assert [n for n, _, _ in segments.list_segments(Path(folder))] == [1, 2, 10]


def test_small_output_is_held_then_written_whole_at_close(tmp_path, compressor):
    """A few lines stay in memory and are written, complete, when the archive closes."""
    root = tmp_path / "archive"
    writer = TaskArchive(root, "2026/01/01/small", compressor, fresh=True)
    frames = [Frame(seq, "stdout" if seq % 2 else "stderr", time.time(), b"line %d\n" % seq)
              for seq in range(1, 6)]
    for frame in frames:
        writer.write(frame)
    assert not (root / "2026/01/01/small").exists()  # nothing handed to the thread yet
    closed = writer.close()
    assert closed.done()  # written on the spot: no hand-over to wait for
    segment = writer.segments[0]
    assert segment.closed_at is not None and segment.raw_bytes == sum(len(f.data) for f in frames)
    assert segment.gz_bytes == sum(p.stat().st_size for p in (root / segment.path,
                                   segments.index_path(root / segment.path)))
    assert list(archive.read_frames(root, "2026/01/01/small")) == frames
    assert scan(root / segment.path).complete


def test_held_output_goes_to_the_thread_at_a_flush_or_past_the_bound(tmp_path, compressor):
    """A flush (a reader, the flush tick) or output past HOLD_BYTES releases what is held."""
    root = tmp_path / "archive"
    flushed = TaskArchive(root, "2026/01/01/flushed", compressor, fresh=True)
    flushed.write(Frame(1, "stdout", time.time(), b"hello\n"))
    flushed.flush().result()
    assert [f.data for f in archive.read_frames(root, "2026/01/01/flushed")] == [b"hello\n"]
    flushed.write(Frame(2, "stdout", time.time(), b"more\n"))  # not held any more
    flushed.close().result()
    assert [f.seq for f in archive.read_frames(root, "2026/01/01/flushed")] == [1, 2]

    big = TaskArchive(root, "2026/01/01/big", compressor, fresh=True)
    chunk = os.urandom(archive.HOLD_BYTES // 3)
    frames = [Frame(seq, "stdout", time.time(), chunk) for seq in range(1, 6)]
    for frame in frames:
        big.write(frame)
    compressor.submit(lambda: None).result()  # what was handed over is written
    assert (root / "2026/01/01/big").is_dir()  # released past the bound, before the close
    big.close().result()
    assert list(archive.read_frames(root, "2026/01/01/big")) == frames
    assert sum(s.raw_bytes for s in big.segments) == 5 * len(chunk)


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_logs_path_is_the_tasks_utc_creation_day(created):
    """A task's folder is YYYY/MM/DD of its creation in UTC, even at the edges of a day (the
    instant's day: not rounded into the next one, as datetime rounds to the microsecond)."""
    day = datetime.fromtimestamp(int(created), UTC)
    assert archive.logs_path_for("t", created) == f"{day:%Y/%m/%d}/t"


async def test_a_task_that_outruns_the_compressor_is_paused_not_the_server(make_client,
                                                                           monkeypatch):
    """Past its backlog bound a task's reads pause until the archive catches up; nothing is
    lost."""
    from remoterun.api import METRICS
    from remoterun.engine import attempt

    monkeypatch.setattr(attempt, "BACKLOG_HIGH", 64 * 1024)
    monkeypatch.setattr(attempt, "BACKLOG_LOW", 16 * 1024)
    client = await make_client(gzip_level=9, archive_compressor="zlib")  # easy to outrun
    total = 8_000_000
    task = await submit(client, "flood.py", params={"bytes": total})
    done = await wait_final(client, task["id"], timeout=60)
    assert done["status"] == "success" and done["output_bytes"] == total
    paused = client.app[METRICS].registry.get_sample_value("remoterun_output_paused_total")
    assert paused is not None and paused > 0
    body = await (await client.get(f"/tasks/{task['id']}/output")).read()
    assert body == flood_bytes(total)
