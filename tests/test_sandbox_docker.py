"""Docker mode for real: a task in `docker run --rm` of a locally built image streams, takes
stdin, runs in a PTY, times out and is cancelled like a plain one, its container gone after."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import submit, wait_final, wait_for, ws_collect
from debian_image import ensure_dockerd, imported

from remoterun.api import SETTINGS
from remoterun.config import ResourceLimits, SandboxConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="session")
def image() -> str:
    """The test image (debootstrapped and imported once, cached across sessions)."""
    return imported(ensure_dockerd())


@pytest.fixture
async def docker_client(make_client: Any, image: str) -> TestClient:
    """A server whose tasks run in Docker."""
    return await make_client(sandbox=SandboxConfig(mode="docker", image=image),
                             kill_grace_s=2.0)  # type: ignore[no-any-return]


def containers(task_id: str) -> list[str]:
    """Ids of this task's containers, running or not."""
    found = subprocess.run(["docker", "ps", "-aq", "--filter", f"name=rr-{task_id}-"],
                           capture_output=True, text=True, timeout=60, check=True)
    return found.stdout.split()


async def gone(task_id: str) -> None:
    """Wait until the task's containers are all removed."""
    await wait_for(lambda: asyncio.to_thread(lambda: not containers(task_id)), 30,
                   interval=0.2, what="its container removed")


async def test_streams_exactly_from_a_container(docker_client):
    """Output from the container arrives whole, in order, seq by seq."""
    task = await submit(docker_client, "lines.py", params={"n": 3000})
    async with docker_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        frames = await ws_collect(ws, timeout=60)
    seqs = [f["seq"] for f in frames if f["type"] == "output"]
    assert seqs == list(range(1, len(seqs) + 1))
    text = "".join(f["data"] for f in frames if f["type"] == "output")
    assert text.splitlines() == [f"line {i}" for i in range(1, 3001)]
    assert frames[-1]["status"] == "success" and frames[-1]["exit_code"] == 0
    await gone(task["id"])


async def test_takes_stdin(docker_client):
    """The request's stdin and a client's stdin messages reach the containerised script."""
    task = await submit(docker_client, "echo_stdin.sh", stdin="first\n", interactive=True)
    async with docker_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        await ws.send_json({"type": "stdin", "data": "second\n"})
        await ws.send_json({"type": "eof"})
        frames = await ws_collect(ws, timeout=60)
    out = "".join(f["data"] for f in frames if f["type"] == "output")
    assert "first" in out and "second" in out, out
    assert frames[-1]["status"] == "success"


async def test_runs_in_a_pty(docker_client):
    """-t: the container's terminal has the size, follows a resize, and echoes typed lines."""
    task = await submit(docker_client, "tty_size.py", pty=True)
    async with docker_client.ws_connect(f"/tasks/{task['id']}/ws") as ws:
        text = ""
        async with asyncio.timeout(60):
            while "size 24 80" not in text:
                text += (await ws.receive_json()).get("data", "")
            await ws.send_json({"type": "resize", "cols": 100, "rows": 30})
            # The client relays the SIGWINCH to the container through the daemon: type lines
            # until one reads the new size.
            while "size 30 100" not in text:
                await ws.send_json({"type": "stdin", "data": "x\r"})
                text += (await ws.receive_json()).get("data", "")
        await ws.send_json({"type": "eof"})
        frames = await ws_collect(ws, timeout=60)
    assert frames[-1]["status"] == "success"


async def test_pty_size_is_set_before_the_script_starts(docker_client):
    """A daemon older than API 1.42 ignores `docker run -t`'s console size and resizes only
    after the start: the script must still see its size from its first line (seen: `size 0 0`
    in 1 of 6 runs of the test above). Eight at once make the race likely."""
    tasks = [await submit(docker_client, "tty_size.py", pty=True) for _ in range(8)]

    async def first_line(task_id: str) -> str:
        async with docker_client.ws_connect(f"/tasks/{task_id}/ws") as ws:
            text = ""
            async with asyncio.timeout(120):
                while "\n" not in text:
                    text += (await ws.receive_json()).get("data", "")
            await ws.send_json({"type": "eof"})
            frames = await ws_collect(ws, timeout=60)
        assert frames[-1]["status"] == "success", frames[-1]
        return text.splitlines()[0].strip()

    firsts = await asyncio.gather(*(first_line(task["id"]) for task in tasks))
    assert firsts == ["size 24 80"] * len(tasks)


async def test_timeout_stops_the_container(docker_client):
    """Past its timeout the task ends `timeout`, and its container is gone."""
    task = await submit(docker_client, "sleep.sh", timeout=3)
    done = await wait_final(docker_client, task["id"], timeout=60)
    assert done["status"] == "timeout" and "timeout" in done["error"]
    await gone(task["id"])


async def test_cancel_stops_the_container(docker_client):
    """Cancelled, it ends `cancelled` with SIGTERM's code, and its container is gone."""
    task = await submit(docker_client, "sleep.sh")

    async def started() -> bool:
        out = await (await docker_client.get(f"/tasks/{task['id']}/output")).text()
        return "started" in out

    await wait_for(started, 60, what="it started")
    await docker_client.post(f"/tasks/{task['id']}/cancel")
    done = await wait_final(docker_client, task["id"], timeout=60)
    assert done["status"] == "cancelled" and done["exit_code"] == -15, done
    await gone(task["id"])


async def test_no_network_no_server_env(make_client, image, monkeypatch):
    """network = false leaves the container only loopback; the server's environment stays out
    of it; the scripts are read-only inside."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-of-the-server")
    client = await make_client(sandbox=SandboxConfig(mode="docker", image=image,
                                                     network=False))
    scripts = str(client.server.app[SETTINGS].scripts_dir.resolve())
    task = await submit(client, "probe.py", params={"see": "/sys/class/net",
                                                    "write": f"{scripts}:$RR_WORKDIR"})
    done = await wait_final(client, task["id"], timeout=60)
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["status"] == "success", (done, out)
    report = json.loads(out)
    assert report["see"]["/sys/class/net"] == ["lo"]
    assert "AWS_SECRET_ACCESS_KEY" not in report["env"] and report["env"]["RR_TASK_ID"]
    assert report["write"] == {scripts: "Read-only file system", "$RR_WORKDIR": True}


async def test_memory_limit_in_a_container(make_client, image):
    """memory_bytes is the container's --memory: a hog is killed, and the error names it."""
    client = await make_client(sandbox=SandboxConfig(mode="docker", image=image),
                               limits=ResourceLimits(memory_bytes=64 << 20))
    task = await submit(client, "memhog.py", params={"mb": 1024})
    done = await wait_final(client, task["id"], timeout=60)
    assert done["status"] == "failed" and done["exit_code"] == -9, done
    assert "memory_bytes limit of 67108864 bytes" in done["error"]
    await gone(task["id"])


async def test_disk_quota_in_a_container(make_client, image, tmp_path):
    """disk_bytes in Docker: /tmp and the work folder are one 10 MiB tmpfs (ENOSPC past it,
    the error names the limit), the container's own filesystem is read-only, so nothing it
    writes reaches the daemon's disk; under the quota, a run succeeds."""
    client = await make_client(sandbox=SandboxConfig(mode="docker", image=image),
                               limits=ResourceLimits(disk_bytes=10 << 20),
                               work_dir=tmp_path / "work")
    task = await submit(client, "diskhog.sh", params={"files": 50})
    done = await wait_final(client, task["id"], timeout=60)
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["status"] == "failed" and done["exit_code"] == 3, (done, out)
    assert "No space left on device" in out, out
    held = int(out.split("held ")[1].split()[0])
    assert 9 << 20 < held <= 10 << 20, out
    assert done["error"] == f"failed with no space left at the disk_bytes limit of {10 << 20} bytes"
    task = await submit(client, "probe.py", params={"write": "/var/tmp:/:/tmp:$RR_WORKDIR"})
    done = await wait_final(client, task["id"], timeout=60)
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["status"] == "success", (done, out)
    assert json.loads(out)["write"] == {"/var/tmp": "Read-only file system",
                                        "/": "Read-only file system", "/tmp": True,
                                        "$RR_WORKDIR": True}
    assert list((tmp_path / "work").iterdir()) == []
    await gone(task["id"])
