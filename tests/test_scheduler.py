"""The engine: priority and FIFO, per-script limits, retries with backoff, seq across attempts."""

from __future__ import annotations

import asyncio
import gc
import time

from conftest import output_of, submit, wait_final, wait_for, ws_collect

from remoterun.config import SandboxConfig
from remoterun.engine.attempt import Attempt
from remoterun.engine.hub import TaskHub
from remoterun.engine.scheduler import TaskState
from remoterun.runner import Run

UNSANDBOXED = SandboxConfig(mode="none")


async def _running(client, task_id):
    return (await (await client.get(f"/tasks/{task_id}")).json())["status"] == "running"


async def test_priority_then_fifo(make_client):
    """With the pool full, the highest priority starts first, ties in submission order."""
    client = await make_client(workers=1)
    blocker = await submit(client, "sleep.sh")
    await wait_for(lambda: _running(client, blocker["id"]), what="blocker running")
    a = await submit(client, "hello.sh")
    b = await submit(client, "hello.sh")
    c = await submit(client, "hello.sh", priority=5)
    d = await submit(client, "hello.sh", priority=1)
    e = await submit(client, "hello.sh", priority=5)
    await client.post(f"/tasks/{blocker['id']}/cancel")
    done = [await wait_final(client, t["id"]) for t in (a, b, c, d, e)]
    order = [t["id"] for t in sorted(done, key=lambda t: t["started_at"])]
    assert order == [c["id"], e["id"], d["id"], a["id"], b["id"]]


async def test_per_script_limit_does_not_block_others(make_client):
    """A script at its max_concurrency waits; other scripts' tasks still run."""
    client = await make_client(workers=4, scripts={"sleep.sh": {"max_concurrency": 1}})
    first = await submit(client, "sleep.sh")
    second = await submit(client, "sleep.sh")
    other = await submit(client, "hello.sh")
    assert (await wait_final(client, other["id"]))["status"] == "success"
    await wait_for(lambda: _running(client, first["id"]), what="first running")
    assert (await (await client.get(f"/tasks/{second['id']}")).json())["status"] == "pending"
    await client.post(f"/tasks/{first['id']}/cancel")
    await wait_for(lambda: _running(client, second["id"]), what="second running")
    await client.post(f"/tasks/{second['id']}/cancel")
    await wait_final(client, second["id"])


async def test_retries_keep_seq_and_mark_attempts(client):
    """A failing task is retried max_retries times; attempts show in status frames, seq goes on."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "exit.sh", "params": {"code": 2},
                        "max_retries": 2})
    frames = await ws_collect(ws)
    statuses = [(f["status"], f["attempt"]) for f in frames if f["type"] == "status"]
    assert statuses == [("running", 1), ("pending", 2), ("running", 2), ("pending", 3),
                        ("running", 3), ("failed", 3)]
    seqs = [f["seq"] for f in frames if f["type"] == "output"]
    assert seqs == [1, 2, 3]
    assert output_of(frames) == "exiting with 2\n" * 3
    task = await (await client.get(f"/tasks/{frames[0]['task']['id']}")).json()
    assert (task["status"], task["attempt"], task["exit_code"]) == ("failed", 3, 2)
    replay = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    assert [f["seq"] for f in replay if f["type"] == "output"] == [1, 2, 3]


async def test_retry_backoff_waits_with_run_after(make_client):
    """Between attempts the task is pending with a run_after in the future (base 0.3 s)."""
    client = await make_client(retry_base_s=0.3, retry_cap_s=5.0)
    task = await submit(client, "exit.sh", params={"code": 1}, max_retries=1)

    async def retrying():
        t = await (await client.get(f"/tasks/{task['id']}")).json()
        return t if t["attempt"] == 2 else None

    pending = await wait_for(retrying, what="retry scheduled")
    if pending["status"] == "pending":
        assert pending["run_after"] > pending["updated_at"]
    done = await wait_final(client, task["id"])
    assert done["attempt"] == 2 and done["status"] == "failed"
    gap = _seconds(done["finished_at"]) - _seconds(done["started_at"])
    assert gap >= 0.15  # at least half the base (jitter is 0.5..1.0 of it)


def _seconds(stamp):
    from datetime import datetime
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_timeout_is_retried_too(client):
    """A timed-out attempt is retried while attempts remain, and ends `timeout`."""
    task = await submit(client, "sleep.sh", timeout=0.3, max_retries=1)
    done = await wait_final(client, task["id"])
    assert (done["status"], done["attempt"]) == ("timeout", 2)


async def test_script_timeout_from_metadata(make_client):
    """A script's metadata timeout applies when the request sets none."""
    client = await make_client(scripts={"sleep.sh": {"timeout_s": 0.3}})
    task = await submit(client, "sleep.sh")
    assert (await wait_final(client, task["id"]))["status"] == "timeout"


async def test_aging_bounds_the_wait_of_low_priority(make_client):
    """A low-priority task that has waited long enough overtakes fresher higher-priority work."""
    import time

    client = await make_client(workers=1, aging_s=0.1)
    blocker = await submit(client, "sleep.sh")
    await wait_for(lambda: _running(client, blocker["id"]), what="blocker running")
    low = await submit(client, "hello.sh", priority=0)
    since = time.time()
    await wait_for(lambda: time.time() - since > 0.35, what="low to age past 3 levels")
    high = await submit(client, "hello.sh", priority=2)
    await client.post(f"/tasks/{blocker['id']}/cancel")
    low_done, high_done = await wait_final(client, low["id"]), await wait_final(client, high["id"])
    assert low_done["started_at"] < high_done["started_at"]


async def test_double_forked_daemon_is_killed(make_client):
    """A daemon that escaped the process group with setsid dies with its task (unsandboxed:
    the reaper finds it; test_sandbox.py has the sandbox's PID namespace do it)."""
    from test_runner import _alive

    client = await make_client(sandbox=UNSANDBOXED)
    task = await submit(client, "daemon.sh")
    done = await wait_final(client, task["id"])
    assert done["status"] == "success"
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    pid = int(out.split()[1])
    await wait_for(lambda: not _alive(pid), 5, what=f"daemon {pid} killed")


async def test_a_running_tasks_daemon_is_left_alone_until_the_task_ends(make_client):
    """Orphans are killed for tasks that ended, never for one still running (unsandboxed: the
    daemon's pid is the server's to see)."""
    from test_runner import _alive

    client = await make_client(flush_interval_s=0.1, sandbox=UNSANDBOXED)
    task = await submit(client, "daemon.sh", params={"stay": 1.5})
    url = f"/tasks/{task['id']}/output"

    async def daemon_pid() -> int | None:
        words = (await (await client.get(url)).text()).split()
        return int(words[1]) if len(words) > 1 else None

    pid = await wait_for(daemon_pid, 5, what="the daemon's pid")
    began = time.monotonic()
    while time.monotonic() - began < 0.5:  # several flush ticks, each looking at orphans
        assert _alive(pid), "killed while its task was still running"
        await asyncio.sleep(0.05)
    assert (await wait_final(client, task["id"]))["status"] == "success"
    await wait_for(lambda: not _alive(pid), 5, what=f"daemon {pid} killed")


async def test_reaper_records_a_lost_running_task(make_client):
    """A row marked running that no run owns is found by the reaper and recorded failed."""
    import sqlite3
    import time
    import uuid

    from remoterun.api import SETTINGS

    client = await make_client(reaper_interval_s=0.2)
    task = await submit(client, "hello.sh")
    await wait_final(client, task["id"])
    lost = str(uuid.uuid4())
    db_path = client.server.app[SETTINGS].db_path
    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task["id"],)).fetchone()
        names = [d[0] for d in conn.execute("SELECT * FROM tasks").description]
        values = dict(zip(names, row, strict=True))
        values.update(num=None, id=lost, status="running", logs_path=f"x/{lost}",
                      created_at=time.time(), exit_code=None, finished_at=None, pid=None)
        marks = ",".join("?" * len(values))
        conn.execute(f"INSERT INTO tasks ({','.join(values)}) VALUES ({marks})",
                     list(values.values()))

    async def reaped():
        t = await (await client.get(f"/tasks/{lost}")).json()
        return t if t["status"] == "failed" else None

    found = await wait_for(reaped, what="lost run reaped")
    assert "server stopped" in found["error"]



async def test_a_finished_task_is_freed_by_reference_counting(client):
    """A task's state, attempt, run and hub (its window of output) go once it has ended and
    its followers have left, with the cycle collector off: the server's full collections are
    rare (cli._tune_gc), and each task left to them held up to replay_memory_bytes."""
    engine = (TaskState, Attempt, Run, TaskHub)
    gc.collect()
    gc.disable()
    try:
        streamed = await submit(client, "flood.py", params={"bytes": 300_000})
        frames = await ws_collect(await client.ws_connect(f"/tasks/{streamed['id']}/ws"))
        assert frames[-1]["type"] == "exit"
        sleeper = await submit(client, "sleep.sh")
        ws = await client.ws_connect(f"/tasks/{sleeper['id']}/ws")
        await ws.receive(timeout=5)
        await client.post(f"/tasks/{sleeper['id']}/cancel")
        assert (await ws_collect(ws))[-1]["status"] == "cancelled"
        ids = {streamed["id"], sleeper["id"]}

        def ours(o: object) -> bool:  # earlier tests' apps may leave objects of their own
            if isinstance(o, (TaskState, Attempt, TaskHub)):
                return o.task.id in ids
            return isinstance(o, Run) and o.spec.env.get("RR_TASK_ID") in ids

        await wait_for(lambda: not any(isinstance(o, engine) and ours(o)
                                       for o in gc.get_objects()),
                       timeout=15, what="the tasks' engine objects to be freed")
    finally:
        gc.enable()
