"""A real server process killed with SIGKILL, or stopped with SIGTERM, then started again."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from conftest import ServerProcess, wait_for


def tasks_with_env(task_id: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment names this task."""
    found = []
    needle = f"RR_TASK_ID={task_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def _get(http, server, path):
    async with http.get(server.url + path) as response:
        return await response.json()


async def _post(http, server, path, body=None):
    async with http.post(server.url + path, json=body) as response:
        assert response.status in (200, 201), await response.text()
        return await response.json()


async def _text(http, server, path):
    async with http.get(server.url + path) as response:
        return await response.text()


async def test_sigkill_then_restart_recovers_truthfully(tmp_path, http):
    """After SIGKILL: cut-off runs are recorded honestly, retried where allowed, output kept,
    orphans killed, and pending tasks run."""
    server = ServerProcess(tmp_path)
    server.config.write_text(server.config.read_text().replace(
        "[engine]\n", "[engine]\nworkers = 2\n"))
    server.start()
    try:
        a = await _post(http, server, "/tasks", {"script": "lines.py",
                                                 "params": {"n": 5000, "delay": 0.005}})
        b = await _post(http, server, "/tasks", {"script": "sleep.sh", "max_retries": 1})
        c = await _post(http, server, "/tasks", {"script": "hello.sh"})

        async def enough_output():
            text = await _text(http, server, f"/tasks/{a['id']}/output")
            return text if text.count("\n") >= 40 else None

        before = await wait_for(enough_output, what="a's output")
        await wait_for(lambda: tasks_with_env(b["id"]), what="b's processes")
        assert (await _get(http, server, f"/tasks/{c['id']}"))["status"] == "pending"
        server.kill(signal.SIGKILL)
        orphans = tasks_with_env(a["id"]) + tasks_with_env(b["id"])
        if shutil.which("bwrap"):  # sandboxed (mode auto): bwrap --die-with-parent
            await wait_for(lambda: not tasks_with_env(a["id"]) + tasks_with_env(b["id"]),
                           what="the sandboxed scripts gone with their server")
        else:
            assert orphans, "the scripts outlive a SIGKILLed server until it restarts"

        server.start()
        await wait_for(lambda: not tasks_with_env(a["id"]), what="a's orphans killed")
        task_a = await _get(http, server, f"/tasks/{a['id']}")
        assert task_a["status"] == "failed" and "server stopped" in task_a["error"]
        after = await _text(http, server, f"/tasks/{a['id']}/output")
        assert after.startswith(before)
        lines = after.splitlines()
        assert lines == [f"line {i}" for i in range(1, len(lines) + 1)]
        assert task_a["output_bytes"] == len(after.encode())

        async def b_retried():
            t = await _get(http, server, f"/tasks/{b['id']}")
            return t if t["attempt"] == 2 and t["status"] == "running" else None

        await wait_for(b_retried, what="b retried")
        await wait_for(lambda: _final(http, server, c["id"]), what="c ran")
        assert (await _get(http, server, f"/tasks/{c['id']}"))["status"] == "success"
        await _post(http, server, f"/tasks/{b['id']}/cancel")
        await wait_for(lambda: _final(http, server, b["id"]), what="b cancelled")
        await wait_for(lambda: not tasks_with_env(b["id"]), what="b's processes gone")
    finally:
        server.stop()


async def _final(http, server, task_id):
    status = (await _get(http, server, f"/tasks/{task_id}"))["status"]
    return status in ("success", "failed", "timeout", "cancelled")


async def test_sigterm_drains_then_exits_zero(tmp_path, http):
    """SIGTERM: running tasks get the grace period, the rest are stopped and recorded, exit 0."""
    server = ServerProcess(tmp_path)
    server.start()
    try:
        quick = await _post(http, server, "/tasks", {"script": "lines.py",
                                                     "params": {"n": 10, "delay": 0.1}})
        stuck = await _post(http, server, "/tasks", {"script": "sleep.sh"})
        # quick first: it ends by itself within about a second, stuck never does
        await wait_for(lambda: tasks_with_env(quick["id"]), what="quick running")
        await wait_for(lambda: tasks_with_env(stuck["id"]), what="stuck running")
        assert server.kill(signal.SIGTERM) == 0
        await wait_for(lambda: not tasks_with_env(stuck["id"]), 5, what="stuck killed")
        server.start()
        done = await _get(http, server, f"/tasks/{quick['id']}")
        assert done["status"] == "success"
        stopped = await _get(http, server, f"/tasks/{stuck['id']}")
        assert stopped["status"] == "failed" and "shut down" in stopped["error"]
    finally:
        server.stop()


async def test_drain_refuses_submissions_and_second_signal_forces(tmp_path, http):
    """While draining, submissions get 503; a second SIGTERM kills running tasks; exit 0."""
    server = ServerProcess(tmp_path)
    server.config.write_text(server.config.read_text().replace(
        "shutdown_grace_s = 2.0", "shutdown_grace_s = 60.0"))
    server.start()
    try:
        stuck = await _post(http, server, "/tasks", {"script": "sleep.sh"})
        await wait_for(lambda: tasks_with_env(stuck["id"]), what="stuck running")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)

        async def refused():
            async with http.post(server.url + "/tasks", json={"script": "hello.sh"}) as r:
                return r.status == 503 and (await r.json())["error"] == "shutting_down"

        await wait_for(refused, what="503 while draining")
        assert server.proc.poll() is None  # still draining: the grace is 60 s
        assert server.kill(signal.SIGTERM) == 0
        await wait_for(lambda: not tasks_with_env(stuck["id"]), 5, what="stuck killed")
        server.start()
        stopped = await _get(http, server, f"/tasks/{stuck['id']}")
        assert stopped["status"] == "failed" and "shut down" in stopped["error"]
    finally:
        server.stop()


async def test_sigkill_during_a_storm_of_short_tasks_loses_no_accepted_task(tmp_path, http):
    """Every task answered 201 before a SIGKILL is there after the restart and ends, its output
    whole where it succeeded: writes commit before they are answered, short outputs included."""
    import asyncio

    server = ServerProcess(tmp_path)
    server.config.write_text(server.config.read_text().replace(
        "[engine]\n", "[engine]\nworkers = 8\n"))
    server.start()
    accepted: list[str] = []

    async def submitter() -> None:
        while True:
            task = await _post(http, server, "/tasks", {"script": "hello.sh"})
            accepted.append(task["id"])

    loops = [asyncio.create_task(submitter()) for _ in range(4)]
    try:
        await wait_for(lambda: len(accepted) >= 150, 30, what="150 accepted tasks")
        server.kill(signal.SIGKILL)
        await asyncio.gather(*loops, return_exceptions=True)  # they fail: the server is gone
        server.start()
        for task_id in accepted:
            await wait_for(lambda tid=task_id: _final(http, server, tid), 30,
                           what=f"{task_id} ended")
            task = await _get(http, server, f"/tasks/{task_id}")
            assert task["status"] in ("success", "failed"), task
            if task["status"] == "success":
                assert await _text(http, server, f"/tasks/{task_id}/output") == "hello world\n"
            else:
                assert "server stopped" in task["error"]
    finally:
        for loop in loops:
            loop.cancel()
        server.stop()


async def test_seqs_never_repeat_after_a_crash(tmp_path, http):
    """A follower saw seqs the archive did not keep yet when the server was SIGKILLed: the
    retry numbers after every seq it may have seen, and `since` returns only later frames."""
    import asyncio
    import json

    server = ServerProcess(tmp_path)
    # A long flush interval: at the kill, much that was sent is not on disk yet.
    server.config.write_text(server.config.read_text().replace(
        "flush_interval_s = 0.2", "flush_interval_s = 5.0"))
    server.start()
    seen: dict[int, str] = {}
    try:
        task = await _post(http, server, "/tasks", {
            "script": "lines.py", "params": {"n": 3000, "delay": 0.002}, "max_retries": 1})
        ws = await http.ws_connect(f"{server.url.replace('http', 'ws')}/tasks/{task['id']}/ws")

        async def follow() -> None:
            async for msg in ws:
                frame = json.loads(msg.data)
                if frame["type"] == "output":
                    seen[frame["seq"]] = frame["data"]

        follower = asyncio.create_task(follow())
        await wait_for(lambda: len(seen) >= 100, what="100 frames seen")
        server.kill(signal.SIGKILL)
        await asyncio.wait_for(follower, 10)
        top = max(seen)
        server.start()

        async def retried():
            t = await _get(http, server, f"/tasks/{task['id']}")
            return t if t["attempt"] == 2 and t["status"] in ("running", "success") else None

        await wait_for(retried, 20, what="attempt 2")
        url = f"{server.url.replace('http', 'ws')}/tasks/{task['id']}/ws?since={top}"
        later = []
        async with http.ws_connect(url) as again:
            async for msg in again:
                frame = json.loads(msg.data)
                if frame["type"] == "output":
                    later.append(frame)
        assert later and all(f["seq"] > top for f in later)
        async with http.get(f"{server.url}/tasks/{task['id']}/output?format=jsonl") as r:
            archived = [json.loads(line) for line in (await r.text()).splitlines()]
        by_seq = {f["seq"]: f["data"] for f in archived}
        assert len(by_seq) == len(archived)  # no seq twice in the archive
        for seq, data in seen.items():  # a seq the client saw names the same frame on disk
            assert by_seq.get(seq, data) == data, seq
    finally:
        server.stop()


def _work_folders(root: Path, task_id: str) -> list[Path]:
    """The work folders under root of the task's attempts (named '{id}-{attempt}-...')."""
    return [p for p in root.iterdir() if p.name.startswith(task_id + "-")]


async def test_a_crashed_attempts_work_folder_is_swept_at_start(tmp_path, http):
    """SIGKILL during a run leaves its work folder (its finish never ran); the next start
    removes it, but not a folder of a task this database does not know (another server's),
    nor anything a symlink named like one of ours points to."""
    server = ServerProcess(tmp_path)
    server.config.write_text(server.config.read_text().replace(
        "[paths]\n", "[paths]\nwork = \"work\"\n"))
    work = tmp_path / "work"
    server.start()
    try:
        task = await _post(http, server, "/tasks", {"script": "sleep.sh"})
        (left,) = await wait_for(lambda: _work_folders(work, task["id"]), what="its folder")
        (left / "scratch").write_text("written by the task")
        server.kill(signal.SIGKILL)
        stranger = work / "0b6c3a8e-2f0d-4a57-9d3e-5c1f2e7a9b10-1-k3j2h1g0"
        stranger.mkdir()
        precious = tmp_path / "precious"
        precious.mkdir()
        (precious / "keep").write_text("not the server's")
        (work / f"{task['id']}-7-symlink0").symlink_to(precious)
        server.start()
        await wait_for(lambda: not left.exists(), what="the crashed attempt's folder swept")
        assert stranger.is_dir() and (precious / "keep").exists()
        task_now = await _get(http, server, f"/tasks/{task['id']}")
        assert task_now["status"] == "failed" and "server stopped" in task_now["error"]
    finally:
        server.stop()
