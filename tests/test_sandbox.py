"""The bubblewrap sandbox, for real: what a task sees, may write and reach, and that nothing of
it outlives it; its environment from the allow-list (in every mode)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import TEST_SCRIPTS, make_settings, submit, wait_final, wait_for, ws_collect

from remoterun.api import SCHEDULER
from remoterun.api.app import create_app
from remoterun.config import ResourceLimits, SandboxConfig

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
BWRAP = SandboxConfig(mode="bwrap")


async def probe(client: TestClient, **params: Any) -> dict[str, Any]:
    """Run probe.py with these params; its report (the task must succeed)."""
    task = await submit(client, "probe.py", params=params)
    done = await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["status"] == "success", (done, out)
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder outside /tmp (which the sandbox replaces anyway), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rr-sandbox-", dir="/var/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def layout(aiohttp_client: Any, outside_tmp: Path) -> tuple[TestClient, Path]:
    """A server whose scripts, database, archive and config share one folder outside /tmp (the
    hard case: hiding the data must not hide the scripts), sandboxed with bwrap."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    config = outside_tmp / "config.toml"
    config.write_text("[sandbox]\nmode = \"bwrap\"\n")
    settings = make_settings(outside_tmp, sandbox=BWRAP, config_path=config,
                             work_dir=outside_tmp / "work")
    return await aiohttp_client(create_app(settings)), outside_tmp


async def test_auto_is_bwrap_here_and_says_so(client):
    """With bwrap installed, mode auto sandboxes every task with it (the default)."""
    sandbox = client.server.app[SCHEDULER].sandbox
    assert sandbox.settings.sandbox.mode == "auto" and sandbox.auto == "bwrap"
    report = await probe(client)
    assert report["pid"] < 10  # its own PID namespace


async def test_environment_is_the_allow_list(make_client, monkeypatch):
    """A task never sees the server's environment, in a sandbox or not: the allow-list, the
    config's and the script's env, RR_*; nor can it read its parent's."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-of-the-server")
    monkeypatch.setenv("REMOTERUN_TOKEN", "token-of-the-server")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    scripts = {"probe.py": {"env": {"FROM_SCRIPT": "yes", "SHARED": "script"}}}
    for mode in ("bwrap", "none"):
        client = await make_client(sandbox=SandboxConfig(mode=mode), scripts=scripts,
                                   env={"FROM_CONFIG": "1", "SHARED": "config"})
        report = await probe(client)
        env = report["env"]
        assert "AWS_SECRET_ACCESS_KEY" not in env and "REMOTERUN_TOKEN" not in env, mode
        assert env["PATH"] == os.environ["PATH"] and env["LC_TIME"] == "C.UTF-8"
        assert env["FROM_CONFIG"] == "1" and env["FROM_SCRIPT"] == "yes"
        assert env["SHARED"] == "script"  # the script's metadata over the config
        assert env["RR_TASK_ID"] and env["RR_WORKDIR"] and "TERM" not in env
        assert "aws-secret" not in report["parent_env"], mode
        assert "token-of-the-server" not in report["parent_env"], mode
        await client.close()


async def test_server_files_are_not_visible(layout):
    """Database, archive, config and work folders are not there at all, though they share a
    folder with the scripts, which are."""
    client, root = layout
    first = await probe(client)  # leaves an archive behind to look for
    assert first["env"]["HOME"] == first["env"]["RR_WORKDIR"]
    wanted = [root / "rr.db", root / "rr.db-wal", root / "archive", root / "config.toml",
              root / "work", root, root / "scripts"]
    assert all(p.exists() for p in wanted[:5]), "the server's files exist outside"
    report = await probe(client, see=":".join(map(str, wanted)))
    seen = report["see"]
    for path in wanted[:4]:
        assert seen[str(path)] is False, path
    assert seen[str(root / "work")] == [Path(report["env"]["RR_WORKDIR"]).name]
    assert seen[str(root)] == ["scripts", "work"]
    assert "probe.py" in seen[str(root / "scripts")]


async def test_writes_only_to_its_work_folder(layout):
    """It cannot write the scripts, the system or the server's folders; its work folder it
    can, and that folder is gone after the task."""
    client, root = layout
    folders = [root / "scripts", root, Path("/usr"), Path("/etc"), Path("/var/tmp"),
               Path("/root")]
    report = await probe(client, write=":".join(map(str, folders)))
    for folder in folders:
        assert report["write"][str(folder)] == "Read-only file system", folder
    # /proc/sys too, which bwrap leaves writable to uid 0 (msgmax: only its IPC namespace's,
    # should this fail)
    sysctl = await probe(client, rewrite="/proc/sys/kernel/msgmax")
    assert sysctl["rewrite"] == {"/proc/sys/kernel/msgmax": "Read-only file system"}
    report = await probe(client, write="$RR_WORKDIR:/tmp")
    assert report["write"] == {"$RR_WORKDIR": True, "/tmp": True}
    assert not await asyncio.to_thread(Path(report["env"]["RR_WORKDIR"]).exists)  # removed
    assert not await asyncio.to_thread(lambda: list((root / "scripts").glob("rr-probe-file")))


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as is for a server running as root")
async def test_run_as_runs_the_task_as_that_user(aiohttp_client, outside_tmp):
    """run_as = "nobody": the task runs as nobody (bwrap unprivileged, in a user namespace),
    its work folder its own, the server's folders still hidden."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    outside_tmp.chmod(0o755)  # the scripts must be readable by that user
    settings = make_settings(outside_tmp, sandbox=SandboxConfig(mode="bwrap", run_as="nobody"),
                             work_dir=outside_tmp / "work")
    client = await aiohttp_client(create_app(settings))
    report = await probe(client, write="$RR_WORKDIR", see=str(outside_tmp / "rr.db"))
    assert report["uid"] == pwd.getpwnam("nobody").pw_uid
    assert report["write"] == {"$RR_WORKDIR": True}
    assert report["see"] == {str(outside_tmp / "rr.db"): False}


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as is for a server running as root")
async def test_run_as_fills_its_own_disk_quota(aiohttp_client, outside_tmp):
    """disk_bytes with run_as = "nobody" and the work root outside /tmp: the quota's folders
    are that user's to write, /tmp and the work folder meet ENOSPC together, named."""
    shutil.copytree(TEST_SCRIPTS, outside_tmp / "scripts", symlinks=True)
    outside_tmp.chmod(0o755)
    settings = make_settings(outside_tmp, sandbox=SandboxConfig(mode="bwrap", run_as="nobody"),
                             work_dir=outside_tmp / "work",
                             limits=ResourceLimits(disk_bytes=4 << 20))
    client = await aiohttp_client(create_app(settings))
    task = await submit(client, "diskhog.sh", params={"files": 20})
    done = await wait_final(client, task["id"], timeout=60)
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["exit_code"] == 3 and "No space left on device" in out, (done, out)
    assert done["error"] == f"failed with no space left at the disk_bytes limit of {4 << 20} bytes"
    assert list((outside_tmp / "work").iterdir()) == []


async def test_network_false_reaches_nothing(make_client):
    """With network = false a task cannot reach even a loopback listener the test opens; with
    the default it can."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        client = await make_client(sandbox=BWRAP, scripts={
            "probe.py": {"sandbox": {"network": False}}})
        report = await probe(client, connect=f"127.0.0.1:{port}")
        assert report["connect"] is not True
        await client.close()  # one server at a time: each reaps the other's children
        client = await make_client(sandbox=BWRAP)
        report = await probe(client, connect=f"127.0.0.1:{port}")
        assert report["connect"] is True
    finally:
        listener.close()


def _marked(mark: str) -> list[int]:
    """Live processes of this machine whose command line holds `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_escaping_daemon_ends_with_its_task(make_client):
    """A daemon that drops RR_TASK_ID (setsid, double fork, env -i) is gone when its task ends:
    the PID namespace goes with the task, whatever the reaper can find."""
    client = await make_client(sandbox=BWRAP)
    mark = f"{random.randint(10**6, 10**7)}"
    task = await submit(client, "detach.sh", params={"mark": mark})
    done = await wait_final(client, task["id"])
    assert done["status"] == "success"
    await wait_for(lambda: not _marked(mark), 5, what="the daemon gone")


async def test_escaping_daemon_ends_on_cancel(make_client):
    """Cancelled while its daemon runs, nothing of the task is left."""
    client = await make_client(sandbox=BWRAP)
    mark = f"{random.randint(10**6, 10**7)}"
    task = await submit(client, "detach.sh", params={"mark": mark})
    await wait_for(lambda: _marked(mark), 5, what="the daemon started")
    await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])
    await wait_for(lambda: not _marked(mark), 5, what="the daemon gone")


async def test_signals_reach_the_script_not_bwrap(make_client):
    """A client's INT reaches the script's trap (bwrap's monitor lives on); cancel is a TERM
    that ends it as -15."""
    client = await make_client(sandbox=BWRAP)
    task = await submit(client, "trap_int.sh", interactive=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        async def said(text: str) -> bool:
            out = await (await client.get(f"/tasks/{task['id']}/output")).text()
            return text in out

        await wait_for(lambda: said("ready"), what="ready")
        await ws.send_json({"type": "signal", "signal": "INT"})
        await wait_for(lambda: said("got INT"), what="the trap")
        await client.post(f"/tasks/{task['id']}/cancel")
        frames = await ws_collect(ws)
    assert frames[-1]["type"] == "exit" and frames[-1]["status"] == "cancelled"
    assert frames[-1]["exit_code"] == -15


async def test_a_signal_sent_as_the_sandbox_starts_reaches_the_script(make_client):
    """A TERM sent the moment the attempt exists (bwrap forks the script a few ms after it
    starts; until then its first process, which ignores TERM, is the group's only member)
    is held until the script is there, and ends it: -15, not a 30 s sleep to the end."""
    client = await make_client(sandbox=BWRAP)
    scheduler = client.server.app[SCHEDULER]
    for _ in range(3):
        task = await submit(client, "sleep.sh", params={"seconds": 30})
        while (attempt := scheduler.attempt(task["id"])) is None:
            await asyncio.sleep(0)
        attempt.control("signal", signal.SIGTERM)
        ended = await wait_final(client, task["id"], timeout=10)
        assert ended["status"] == "failed" and ended["exit_code"] == -15, ended


async def test_pty_task_owns_its_terminal(make_client):
    """A PTY task in the sandbox has the terminal as its controlling terminal: its size,
    resizes, and ^C typed as a key reaching its trap."""
    client = await make_client(sandbox=BWRAP)
    task = await submit(client, "tty_size.py", pty=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await wait_for(lambda: _said(client, task["id"], "size 24 80"), what="its size")
        await ws.send_json({"type": "resize", "cols": 100, "rows": 30})
        await ws.send_json({"type": "stdin", "data": "x\r"})
        await wait_for(lambda: _said(client, task["id"], "size 30 100"), what="the resize")
        await ws.send_json({"type": "eof"})
        frames = await ws_collect(ws)
    assert frames[-1]["status"] == "success"
    task = await submit(client, "trap_int.sh", pty=True)
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        text = ""
        async with asyncio.timeout(10):
            while "ready" not in text:
                msg = await ws.receive_json()
                text += msg.get("data", "")
            await ws.send_json({"type": "stdin", "data": "\x03"})
            while "got INT" not in text:
                msg = await ws.receive_json()
                text += msg.get("data", "")
        await client.post(f"/tasks/{task['id']}/cancel")
        frames = await ws_collect(ws)
    assert frames[-1]["status"] == "cancelled"


async def _said(client: TestClient, task_id: str, text: str) -> bool:
    return text in await (await client.get(f"/tasks/{task_id}/output")).text()


async def test_exec_errors_read_as_without_a_sandbox(make_client):
    """A script without #! fails with exec format error, as the kernel says it unsandboxed
    (bwrap's execvp would run it with /bin/sh)."""
    client = await make_client(sandbox=BWRAP)
    task = await submit(client, "noshebang.sh")
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and "exec format error" in done["error"]


async def test_unavailable_mode_fails_the_task_not_the_server(make_client):
    """A script whose sandbox cannot run here (docker without an image) ends failed, saying
    why; the next task runs."""
    client = await make_client(scripts={"hello.sh": {"sandbox": {"mode": "docker"}}})
    task = await submit(client, "hello.sh")
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and "docker" in done["error"]
    task = await submit(client, "exit.sh", params={"code": 0})
    assert (await wait_final(client, task["id"]))["status"] == "success"


async def test_streams_are_exact_in_the_sandbox(make_client):
    """Output through bwrap arrives whole and in order over the WebSocket."""
    client = await make_client(sandbox=BWRAP)
    task = await submit(client, "lines.py", params={"n": 2000})
    async with client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        frames = await ws_collect(ws)
    seqs = [f["seq"] for f in frames if f["type"] == "output"]
    assert seqs == list(range(1, len(seqs) + 1))
    text = "".join(f["data"] for f in frames if f["type"] == "output")
    assert text.splitlines() == [f"line {i}" for i in range(1, 2001)]
    assert frames[-1]["status"] == "success"


def test_metadata_sandbox_keys_are_checked(tmp_path):
    """A script's sandbox, limits and env tables are validated, naming the key."""
    from remoterun.catalogue import Catalogue, MetadataError

    for meta, key in (({"sandbox": {"mode": "chroot"}}, "sandbox.mode"),
                      ({"limits": {"memory_bytes": -1}}, "limits.memory_bytes"),
                      ({"env": {"RR_TASK_ID": "x"}}, "env.RR_TASK_ID"),
                      ({"env": {"A": 1}}, "env.A")):
        settings = make_settings(tmp_path, scripts={"hello.sh": meta})
        with pytest.raises(MetadataError, match=key.replace(".", r"\.")):
            Catalogue(settings.scripts_dir, settings.scripts).resolve("hello.sh")


async def test_the_secret_key_is_hidden_wherever_it_is(aiohttp_client, outside_tmp):
    """The key that seals secret params cannot be read by a task even when it lives in a
    folder of its own that nothing else of the server's hides."""
    data, keys = outside_tmp / "data", outside_tmp / "keys"
    data.mkdir()
    keys.mkdir()
    key = keys / "rr.key"
    settings = make_settings(data, sandbox=BWRAP, secret_key_path=key,
                             work_dir=outside_tmp / "work")
    client = await aiohttp_client(create_app(settings))
    task = await submit(client, "readfile.sh", params={"path": str(key)})
    await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).read()
    secret = key.read_bytes().strip()
    assert secret, "the server made its key"
    assert secret not in out, "the task read the key"
    await client.close()
