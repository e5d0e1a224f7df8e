"""gVisor mode for real: a task in `runsc run` runs on gVisor's kernel, streams in order, takes
stdin, runs in a PTY, gets signals, times out and is cancelled like a bwrap one, sees only its
own view of the files and no network when told, and leaves no runsc process or state behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import TEST_SCRIPTS, make_settings, submit, wait_final, wait_for, ws_collect

from remoterun.api import SCHEDULER
from remoterun.api.app import create_app
from remoterun.config import ResourceLimits, SandboxConfig
from remoterun.isolation import gvisor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("runsc") is None or os.geteuid() != 0,
                                 reason="needs runsc (gVisor) and root")]
GVISOR = SandboxConfig(mode="gvisor")
KERNEL_SH = "#!/bin/sh\nuname -r\ncat /proc/version\n"


def runsc_processes(container: str = "rr-") -> list[str]:
    """Command lines of runsc processes (runsc, its Sentry and gofer) naming `container`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if Path(cmdline.split(" ", 1)[0]).name.startswith("runsc") and container in cmdline:
            found.append(cmdline)
    return found


async def nothing_left(client: TestClient, task_id: str) -> None:
    """Wait until no runsc process of the task runs and its state and bundle are gone."""
    state = client.server.app[SCHEDULER].sandbox.gvisor_state

    def clean() -> bool:
        leftovers = [*(state / "run").glob(f"rr-{task_id}-*"),
                     *(state / "bundles").glob(f"rr-{task_id}-*")]
        return not runsc_processes(f"rr-{task_id}-") and not leftovers

    await wait_for(lambda: asyncio.to_thread(clean), 30, interval=0.1,
                   what="its runsc processes and state gone")


async def output(client: TestClient, task_id: str) -> str:
    """The task's whole output so far."""
    return await (await client.get(f"/tasks/{task_id}/output")).text()


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder outside /tmp (which the sandbox replaces anyway), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rr-gvisor-", dir="/var/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def gvisor_client(aiohttp_client: Any, outside_tmp: Path) -> TestClient:
    """A server whose tasks run under gVisor; its scripts, database, archive, config and work
    folders share one folder outside /tmp (hiding the data must not hide the scripts)."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    (outside_tmp / "scripts" / "kernel.sh").write_text(KERNEL_SH)
    (outside_tmp / "scripts" / "kernel.sh").chmod(0o755)
    config = outside_tmp / "config.toml"
    config.write_text("[sandbox]\nmode = \"gvisor\"\n")
    settings = make_settings(outside_tmp, sandbox=GVISOR, config_path=config,
                             work_dir=outside_tmp / "work", kill_grace_s=2.0)
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


async def probe(client: TestClient, **params: Any) -> dict[str, Any]:
    """Run probe.py with these params; its report (the task must succeed)."""
    task = await submit(client, "probe.py", params=params)
    done = await wait_final(client, task["id"], timeout=60)
    out = await output(client, task["id"])
    assert done["status"] == "success", (done, out)
    await nothing_left(client, task["id"])
    return json.loads(out)  # type: ignore[no-any-return]


async def test_runs_on_gvisors_kernel(gvisor_client):
    """The script's kernel is gVisor's, not the host's: another release and /proc/version."""
    task = await submit(gvisor_client, "kernel.sh")
    done = await wait_final(gvisor_client, task["id"], timeout=60)
    release, version = (await output(gvisor_client, task["id"])).splitlines()[:2]
    assert done["status"] == "success", done
    assert release != platform.release(), release
    assert version != Path("/proc/version").read_text().strip() and release in version
    await nothing_left(gvisor_client, task["id"])


async def test_output_in_order_and_exit_code(gvisor_client):
    """Alternating stdout/stderr lines keep their written order and streams (as bwrap's: 10 ms
    apart); 3000 lines arrive whole; the exit code is the script's."""
    task = await submit(gvisor_client, "lines.py",
                        params={"n": 20, "both": "true", "delay": "0.01"})
    async with gvisor_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        frames = await ws_collect(ws, timeout=60)
    order = [(f["stream"], line) for f in frames if f["type"] == "output"
             for line in f["data"].splitlines()]
    assert [line for _, line in order] == [f"line {i}" for i in range(1, 21)]
    assert [s for s, _ in order] == ["stdout", "stderr"] * 10
    task = await submit(gvisor_client, "lines.py", params={"n": 3000})
    async with gvisor_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        frames = await ws_collect(ws, timeout=60)
    text = "".join(f["data"] for f in frames if f["type"] == "output")
    assert text.splitlines() == [f"line {i}" for i in range(1, 3001)]
    assert frames[-1]["status"] == "success"
    task = await submit(gvisor_client, "exit.sh", params={"code": 3})
    done = await wait_final(gvisor_client, task["id"], timeout=60)
    assert done["status"] == "failed" and done["exit_code"] == 3, done


async def test_takes_stdin(gvisor_client):
    """The request's stdin and a client's stdin messages reach the script; eof ends it."""
    task = await submit(gvisor_client, "echo_stdin.sh", stdin="first\n", interactive=True)
    async with gvisor_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await ws.send_json({"type": "stdin", "data": "second\n"})
        await ws.send_json({"type": "eof"})
        frames = await ws_collect(ws, timeout=60)
    out = "".join(f["data"] for f in frames if f["type"] == "output")
    assert "got: first" in out and "got: second" in out and "lines: 2" in out, out
    assert frames[-1]["status"] == "success"


async def test_pty_task_owns_its_terminal(gvisor_client):
    """In a PTY the script reads its size from its first line, follows a resize, and ^C
    typed as a key reaches its trap."""
    client = gvisor_client
    task = await submit(client, "tty_size.py", pty=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await wait_for(lambda: _said(client, task["id"], "size 24 80"), 60, what="its size")
        await ws.send_json({"type": "resize", "cols": 100, "rows": 30})
        await ws.send_json({"type": "stdin", "data": "x\r"})
        await wait_for(lambda: _said(client, task["id"], "size 30 100"), 30, what="the resize")
        await ws.send_json({"type": "eof"})
        frames = await ws_collect(ws, timeout=60)
    assert frames[-1]["status"] == "success"
    assert (await output(client, task["id"])).startswith("size 24 80")
    task = await submit(client, "trap_int.sh", pty=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await wait_for(lambda: _said(client, task["id"], "ready"), 60, what="ready")
        await ws.send_json({"type": "stdin", "data": "\x03"})
        await wait_for(lambda: _said(client, task["id"], "got INT"), 30, what="the trap")
        await client.post(f"/tasks/{task['id']}/cancel")
        frames = await ws_collect(ws, timeout=60)
    assert frames[-1]["status"] == "cancelled"
    await nothing_left(client, task["id"])


async def _said(client: TestClient, task_id: str, text: str) -> bool:
    return text in await output(client, task_id)


async def test_signals_reach_the_script_and_cancel_ends_it(gvisor_client):
    """A client's INT reaches the script's trap; cancel is a TERM that ends it as -15; no
    runsc process or state is left."""
    client = gvisor_client
    task = await submit(client, "trap_int.sh", interactive=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await wait_for(lambda: _said(client, task["id"], "ready"), 60, what="ready")
        await ws.send_json({"type": "signal", "signal": "INT"})
        await wait_for(lambda: _said(client, task["id"], "got INT"), 30, what="the trap")
        await client.post(f"/tasks/{task['id']}/cancel")
        frames = await ws_collect(ws, timeout=60)
    assert frames[-1]["type"] == "exit" and frames[-1]["status"] == "cancelled"
    assert frames[-1]["exit_code"] == -15
    await nothing_left(client, task["id"])


async def test_a_signal_sent_as_the_sandbox_starts_reaches_the_script(gvisor_client):
    """A TERM sent the moment the attempt exists (before runsc has started the script) is
    held until the script runs, and ends it: -15, not a 30 s sleep to the end."""
    scheduler = gvisor_client.server.app[SCHEDULER]
    task = await submit(gvisor_client, "sleep.sh", params={"seconds": 30})
    while (attempt := scheduler.attempt(task["id"])) is None:  # noqa: ASYNC110
        await asyncio.sleep(0)  # the moment it exists: no event says so
    attempt.control("signal", signal.SIGTERM)
    ended = await wait_final(gvisor_client, task["id"], timeout=20)
    assert ended["status"] == "failed" and ended["exit_code"] == -15, ended
    await nothing_left(gvisor_client, task["id"])


async def test_timeout_ends_it_and_leaves_nothing(gvisor_client):
    """Past its timeout the task ends `timeout`; nothing of it is left."""
    task = await submit(gvisor_client, "sleep.sh", timeout=2)
    done = await wait_final(gvisor_client, task["id"], timeout=60)
    assert done["status"] == "timeout" and "timeout" in done["error"]
    await nothing_left(gvisor_client, task["id"])


async def test_a_killed_runsc_leaves_nothing(gvisor_client):
    """runsc run killed outright (as when the server is): its Sentry dies with it, the state
    it left is deleted as the attempt ends."""
    task = await submit(gvisor_client, "sleep.sh")
    await wait_for(lambda: _said(gvisor_client, task["id"], "started"), 60, what="it started")
    attempt = gvisor_client.server.app[SCHEDULER].attempt(task["id"])
    assert attempt is not None and attempt.run is not None
    assert any(" run " in p for p in runsc_processes(f"rr-{task['id']}-"))
    os.kill(attempt.run.pid, signal.SIGKILL)  # runsc run itself
    done = await wait_final(gvisor_client, task["id"], timeout=60)
    assert done["status"] == "failed" and done["exit_code"] == -9, done
    await nothing_left(gvisor_client, task["id"])


def leave_a_container(state: Path, name: str, folder: Path) -> None:
    """Start a container in `state` as a server would, then kill its runsc as a killed
    server's is: its state and bundle stay behind (blocking)."""
    runsc = shutil.which("runsc")
    assert runsc is not None
    gvisor.prepare_state(runsc, state)
    gvisor.write_bundle(state, name, gvisor.spec(
        ["/bin/sleep", "1000"], {}, "/", pty=False, network=False, rlimits=[],
        mounts=gvisor.mounts(folder, str(folder), [], [], None)))
    former = subprocess.Popen(gvisor.run_argv(runsc, state, name, False),
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not gvisor.running(state, name) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        former.kill()
        former.wait()


async def test_stale_state_is_deleted_at_start(aiohttp_client, outside_tmp):
    """A container a former server left (its runsc killed, its state and bundle there) is
    deleted when a server starts."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    settings = make_settings(outside_tmp, sandbox=GVISOR, work_dir=outside_tmp / "work")
    state, name = outside_tmp / "remoterun-gvisor", "rr-00000000-0000-0000-0000-000000000000-1"
    await asyncio.to_thread(leave_a_container, state, name, outside_tmp)
    assert await asyncio.to_thread(gvisor.has_state, state, name)
    client = await aiohttp_client(create_app(settings))

    def cleaned() -> bool:
        return not list((state / "run").iterdir()) and not list((state / "bundles").iterdir())

    assert await asyncio.to_thread(cleaned)
    await wait_for(lambda: not runsc_processes(name), 10, what="its Sentry gone")
    task = await submit(client, "exit.sh", params={"code": 0})
    assert (await wait_final(client, task["id"], timeout=60))["status"] == "success"


async def test_network_false_means_no_network(gvisor_client, aiohttp_client):
    """network = false: the host's listening socket is out of reach (the sandbox has its own
    loopback alone); with network the host's network is there."""
    listener = socket.create_server(("127.0.0.1", 0))
    where = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        assert (await probe(gvisor_client, connect=where))["connect"] is True
        settings = dataclasses.replace(gvisor_client.server.app[SCHEDULER].settings,
                                       sandbox=SandboxConfig(mode="gvisor", network=False))
        await gvisor_client.close()
        client = await aiohttp_client(create_app(settings))
        report = await probe(client, connect=where, see="/proc/net/dev")
        assert report["connect"] == "Connection refused", report["connect"]
        interfaces = [line.split(":")[0].strip() for line in
                      Path("/proc/net/dev").read_text().splitlines()[2:]]
        assert interfaces != ["lo"]  # the host has more than loopback
    finally:
        listener.close()


async def test_sees_only_its_view_of_the_files(gvisor_client, outside_tmp):
    """The scripts are read-only, the system too; its work folder and /tmp are writable (the
    work folder gone after); the database, archive, config, work and state folders are not
    there at all, though they share a folder with the scripts."""
    root = outside_tmp
    first = await probe(gvisor_client)  # leaves an archive behind to look for
    assert first["env"]["HOME"] == first["env"]["RR_WORKDIR"]
    state = gvisor_client.server.app[SCHEDULER].sandbox.gvisor_state
    wanted = [root / "rr.db", root / "archive", root / "config.toml", state, root / "work"]
    assert all(p.exists() for p in wanted)
    folders = [root / "scripts", root, Path("/usr"), Path("/etc")]
    report = await probe(gvisor_client, see=":".join(map(str, [*wanted, root])),
                         write=":".join(map(str, [*folders, "$RR_WORKDIR", "/tmp"])))
    seen = report["see"]
    for path in wanted[:4]:
        assert seen[str(path)] in (False, []), path
    assert seen[str(root / "work")] == [Path(report["env"]["RR_WORKDIR"]).name]
    assert "rr.db" not in seen[str(root)] and "scripts" in seen[str(root)]
    for folder in folders:
        assert report["write"][str(folder)] == "Read-only file system", folder
    assert report["write"]["$RR_WORKDIR"] is True and report["write"]["/tmp"] is True
    assert not Path(report["env"]["RR_WORKDIR"]).exists()
    assert not list((root / "scripts").glob("rr-probe-file"))


async def test_rlimits_hold_inside(aiohttp_client, outside_tmp):
    """open_files and processes are gVisor's own rlimits: a fork past `processes` fails."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    settings = make_settings(outside_tmp, sandbox=GVISOR, work_dir=outside_tmp / "work",
                             limits=ResourceLimits(processes=5, open_files=40))
    client = await aiohttp_client(create_app(settings))
    task = await submit(client, "forks.py", params={"n": 20})
    done = await wait_final(client, task["id"], timeout=60)
    out = await output(client, task["id"])
    assert done["exit_code"] == 3 and "refused: Resource temporarily unavailable" in out, out
    task = await submit(client, "openfiles.py", params={"n": 100})
    done = await wait_final(client, task["id"], timeout=60)
    out = await output(client, task["id"])
    assert done["exit_code"] == 4 and "refused: Too many open files" in out, out


async def test_memory_limit_bounds_the_sandbox(aiohttp_client, outside_tmp):
    """memory_bytes is the memory cgroup of the whole sandbox (the Sentry holds the script's
    memory): a hog is killed, and the error names the limit."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    settings = make_settings(outside_tmp, sandbox=GVISOR, work_dir=outside_tmp / "work",
                             limits=ResourceLimits(memory_bytes=256 << 20))
    client = await aiohttp_client(create_app(settings))
    task = await submit(client, "memhog.py", params={"mb": 1024})
    done = await wait_final(client, task["id"], timeout=60)
    assert done["status"] == "failed", done
    assert "memory_bytes limit of 268435456 bytes" in done["error"], done
    await nothing_left(client, task["id"])
    task = await submit(client, "memhog.py", params={"mb": 32})
    assert (await wait_final(client, task["id"], timeout=60))["status"] == "success"
