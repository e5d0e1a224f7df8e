"""Retention by age and by size, 410 after pruning, and `remoterun archive verify [--repair]`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time

from conftest import output_of, submit, wait_final, wait_for, ws_collect

from remoterun import store as dbm
from remoterun.api import DB, SETTINGS
from remoterun.archive import segments
from remoterun.archive.scan import scan


async def output_status(client, task_id: str) -> int:
    """The status code of GET /tasks/{id}/output."""
    async with client.get(f"/tasks/{task_id}/output") as response:
        return response.status


async def test_age_prunes_old_output_keeps_the_task_and_answers_410(make_client):
    """Output of a task that ended past max_age_days is deleted: row kept, /output 410,
    replay gives no output frames; a younger task's output stays."""
    client = await make_client(retention_max_age_days=1.0, retention_interval_s=0.05)
    old = await submit(client, "lines.py", params={"n": 3})
    young = await submit(client, "lines.py", params={"n": 3})
    old_done = await wait_final(client, old["id"])
    await wait_final(client, young["id"])
    db = client.app[DB]
    two_days_ago = time.time() - 2 * 86400
    db.write([dbm.update_task(old["id"], {"finished_at": two_days_ago})])

    async def gone() -> bool:
        return await output_status(client, old["id"]) == 410

    await wait_for(gone, what="old output pruned")
    body = await (await client.get(f"/tasks/{old['id']}/output")).json()
    assert body["error"] == "gone" and "retention" in body["message"]
    root = client.app[SETTINGS].archive_dir
    # Rows are marked pruned before the files go (so no reader meets a missing file): the
    # folder follows the 410 within the sweep.
    await wait_for(lambda: not (root / old_done["logs_path"]).exists(), what="folder removed")
    assert all(row["pruned"] for row in await db.segments(old["id"]))
    task = await (await client.get(f"/tasks/{old['id']}")).json()
    assert task["status"] == "success" and task["output_bytes"] == old_done["output_bytes"]
    async with client.ws_connect(f"/tasks/{old['id']}/ws") as ws:
        frames = await ws_collect(ws)
    assert [f["type"] for f in frames] == ["task", "exit"] and output_of(frames) == ""
    assert await output_status(client, young["id"]) == 200
    assert not any(row["pruned"] for row in await db.segments(young["id"]))


async def test_size_prunes_the_earliest_ended_first(make_client, tmp_path):
    """Past max_total_bytes, the earliest ended tasks go first, until the rest fits."""
    first = await make_client()
    tasks = []
    for _ in range(3):
        task = await submit(first, "flood.py", params={"bytes": 50_000})
        tasks.append(await wait_final(first, task["id"]))
    sizes = [sum(r["gz_bytes"] for r in await first.app[DB].segments(t["id"])) for t in tasks]
    await first.close()
    client = await make_client(retention_max_total_bytes=sizes[2] + sizes[1] // 2,
                               retention_interval_s=0.05)

    async def two_pruned() -> bool:
        return [await output_status(client, t["id"]) for t in tasks] == [410, 410, 200]

    await wait_for(two_pruned, what="the two earliest pruned")
    assert await client.app[DB].archive_bytes() == sizes[2]


async def test_size_never_prunes_a_running_task(make_client):
    """A running task's output is spared however full the archive; it goes once it ended."""
    client = await make_client(retention_max_total_bytes=1, retention_interval_s=0.05)
    ended = await submit(client, "hello.sh")
    await wait_final(client, ended["id"])
    running = await submit(client, "lines.py", params={"n": 30, "delay": 0.05})

    async def ended_pruned() -> bool:
        return await output_status(client, ended["id"]) == 410

    await wait_for(ended_pruned, what="the ended task pruned")
    await wait_for(lambda: client.app[DB].segments(running["id"]), what="running has output")
    assert (await (await client.get(f"/tasks/{running['id']}")).json())["status"] == "running"
    assert await output_status(client, running["id"]) == 200
    await wait_final(client, running["id"])

    async def running_pruned() -> bool:
        return await output_status(client, running["id"]) == 410

    await wait_for(running_pruned, what="pruned once ended")


async def verify(tmp_path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run `remoterun archive verify` on the test's archive and database."""
    command = [sys.executable, "-m", "remoterun", "archive", "verify", "--archive",
               str(tmp_path / "archive"), "--db", str(tmp_path / "rr.db"), *flags]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                   cwd=tmp_path, timeout=60)


async def test_verify_finds_a_deleted_file_and_a_stray_file(make_client, tmp_path):
    """verify exits 1 naming a row whose file is gone and a file no row records."""
    client = await make_client(segment_max_bytes=10_000, read_chunk_bytes=4096)
    task = await wait_final(client, (await submit(client, "flood.py",
                                                  params={"bytes": 40_000}))["id"])
    await client.close()
    assert (await verify(tmp_path)).returncode == 0
    rows = await _rows(tmp_path, task["id"])
    root = tmp_path / "archive"
    deleted = root / rows[1]["path"]
    deleted.unlink()
    stray = root / "2020/01/01/no-such-task/000001.1.log.gz"
    stray.parent.mkdir(parents=True)
    shutil.copy(root / rows[0]["path"], stray)
    result = await verify(tmp_path)
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("missing") and rows[1]["path"] in line for line in lines)
    assert any(line.startswith("stray") and "no-such-task/000001.1.log.gz" in line
               for line in lines)
    assert "2 problems" in lines[-1]


async def test_verify_repair_finalizes_what_a_crash_left_open(make_client, tmp_path):
    """--repair rewrites a truncated segment whole and corrects its row; verify then passes."""
    client = await make_client()
    task = await wait_final(client, (await submit(client, "flood.py",
                                                  params={"bytes": 200_000}))["id"])
    await client.close()
    rows = await _rows(tmp_path, task["id"])
    log_path = tmp_path / "archive" / rows[-1]["path"]
    cut = log_path.read_bytes()
    log_path.write_bytes(cut[: len(cut) // 2])
    found = await verify(tmp_path)
    assert found.returncode == 1 and "incomplete" in found.stdout and "truncated" in found.stdout
    repaired = await verify(tmp_path, "--repair")
    assert repaired.returncode == 0 and "[repaired]" in repaired.stdout, repaired.stdout
    read = await asyncio.to_thread(scan, log_path)
    after = await _rows(tmp_path, task["id"])
    assert read.complete and 0 < read.raw_bytes < 200_000
    assert (after[-1]["raw_bytes"], after[-1]["last_seq"]) == (read.raw_bytes, read.last_seq)
    clean = await verify(tmp_path)
    assert clean.returncode == 0 and "0 problems" in clean.stdout


async def _rows(tmp_path, task_id: str) -> list[dict]:
    """The task's segment rows, read through a Database of our own."""
    db = dbm.Database(tmp_path / "rr.db")
    await db.open()
    try:
        return await db.segments(task_id)
    finally:
        await db.close()


async def test_verify_repair_deletes_what_pruning_left_on_disk(make_client, tmp_path):
    """Rows marked pruned whose files a crash left behind: reported, and --repair deletes."""
    client = await make_client()
    task = await wait_final(client, (await submit(client, "hello.sh"))["id"])
    client.app[DB].write([dbm.mark_pruned(task["id"])])  # as if killed before deleting
    await client.close()
    found = await verify(tmp_path)
    assert found.returncode == 1 and "pruned_present" in found.stdout
    assert (await verify(tmp_path, "--repair")).returncode == 0
    folder = tmp_path / "archive" / task["logs_path"]
    assert await asyncio.to_thread(segments.list_segments, folder) == []
    assert (await verify(tmp_path)).returncode == 0


async def test_verify_repair_removes_an_empty_segment_cut_at_its_opening(make_client, tmp_path):
    """A kill during rotation leaves a 0-byte .log.gz, no index and an open row: verify reports
    it, --repair removes file and row, and the task's output is untouched."""
    from remoterun.archive import Segment

    client = await make_client()
    task = await wait_final(client, (await submit(client, "hello.sh"))["id"])
    folder = tmp_path / "archive" / task["logs_path"]
    cut = Segment(path=f"{task['logs_path']}/000002.2.log.gz", first_seq=2)
    (folder / "000002.2.log.gz").write_bytes(b"")
    client.app[DB].write([dbm.upsert_segment(task["id"], cut)])
    await client.close()
    found = await verify(tmp_path)
    assert found.returncode == 1 and "empty" in found.stdout, found.stdout
    assert (await verify(tmp_path, "--repair")).returncode == 0
    assert not (folder / "000002.2.log.gz").exists()
    assert (await verify(tmp_path)).returncode == 0
    assert [r["path"] for r in await _rows(tmp_path, task["id"])] == [
        f"{task['logs_path']}/{p.name}"
        for _, _, p in await asyncio.to_thread(segments.list_segments, folder)]
