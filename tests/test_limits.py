"""Resource limits, hit for real: each ends its task `failed` with the limit named, and the
server keeps serving."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import submit, wait_final

from remoterun.api import SCHEDULER
from remoterun.config import ConfigError, ResourceLimits, SandboxConfig, parse
from remoterun.isolation.limits import Cgroups

BWRAP = SandboxConfig(mode="bwrap")
NONE = SandboxConfig(mode="none")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


def _cgroups() -> frozenset[str]:
    found = Cgroups.find()
    found.close()
    return found.controllers


needs_cgroups = pytest.mark.skipif(
    not {"pids", "memory"} <= _cgroups(), reason="needs writable cgroup v1 pids and memory")


async def run(client: TestClient, script: str, **params: Any) -> tuple[dict[str, Any], str]:
    """Run a script to its end; the task and its output."""
    task = await submit(client, script, params=params)
    done = await wait_final(client, task["id"], timeout=60)
    return done, await (await client.get(f"/tasks/{task['id']}/output")).text()


async def still_serves(client: TestClient) -> None:
    """The server runs the next task as if nothing happened."""
    done, out = await run(client, "hello.sh")
    assert done["status"] == "success" and out


@needs_bwrap
@pytest.mark.parametrize("mode", [BWRAP, NONE], ids=["bwrap", "none"])
async def test_cpu_spinner_is_killed_by_sigxcpu(make_client, mode):
    """A CPU spinner past cpu_seconds dies of SIGXCPU, named in the error."""
    client = await make_client(sandbox=mode, limits=ResourceLimits(cpu_seconds=1))
    done, out = await run(client, "spin.sh")
    assert done["status"] == "failed" and done["exit_code"] == -24, done
    assert done["error"] == "killed by SIGXCPU: cpu_seconds limit of 1 s"
    await still_serves(client)


@needs_bwrap
@pytest.mark.parametrize("mode", [BWRAP, NONE], ids=["bwrap", "none"])
async def test_file_size_hog_is_killed_by_sigxfsz(make_client, mode):
    """A file written past file_bytes: SIGXFSZ, named; the file stops at the limit."""
    client = await make_client(sandbox=mode, limits=ResourceLimits(file_bytes=1_000_000))
    done, out = await run(client, "filehog.sh", bytes=50_000_000)
    assert done["status"] == "failed" and done["exit_code"] == -25, (done, out)
    assert done["error"] == "killed by SIGXFSZ: file_bytes limit of 1000000 bytes"
    await still_serves(client)


@needs_bwrap
@needs_cgroups
async def test_memory_hog_is_killed_at_memory_bytes(make_client):
    """A task touching more than memory_bytes is ended by the OOM killer of its cgroup, and the
    error says which limit."""
    client = await make_client(sandbox=BWRAP, limits=ResourceLimits(memory_bytes=64 << 20))
    done, out = await run(client, "memhog.py", mb=1024)
    assert done["status"] == "failed" and done["exit_code"] == -9, (done, out[-200:])
    assert done["error"] == ("killed by the out-of-memory killer: memory_bytes limit of "
                             f"{64 << 20} bytes")
    assert "1024 MiB" not in out and "8 MiB" in out
    await still_serves(client)


@needs_cgroups
async def test_memory_hog_unsandboxed_is_killed_by_its_cgroup(make_client, tmp_path):
    """Without a sandbox, as root, memory_bytes is the task's memory cgroup too (not RLIMIT_AS,
    whose MemoryError ended the task with exit 1 and no error): the OOM killer ends it, the
    error names the limit, and the task's cgroup folder is gone after."""
    client = await make_client(sandbox=NONE, limits=ResourceLimits(memory_bytes=64 << 20),
                               work_dir=tmp_path / "work")
    done, out = await run(client, "memhog.py", mb=1024)
    assert done["status"] == "failed" and done["exit_code"] == -9, (done, out[-200:])
    assert done["error"] == ("killed by the out-of-memory killer: memory_bytes limit of "
                             f"{64 << 20} bytes")
    assert "MemoryError" not in out and "8 MiB" in out
    base = client.server.app[SCHEDULER].sandbox.cgroups.bases["memory"]
    assert not [p for p in base.iterdir() if p.is_dir()]
    await still_serves(client)


@needs_bwrap
@needs_cgroups
@pytest.mark.parametrize("mode", [BWRAP, NONE], ids=["bwrap", "none"])
async def test_fork_storm_is_bounded_by_processes(make_client, mode, tmp_path):
    """Forks past `processes` are refused (as root too, unsandboxed too: a pids cgroup), the
    storm's script fails, and the error names the limit."""
    client = await make_client(sandbox=mode, limits=ResourceLimits(processes=20),
                               work_dir=tmp_path / "work")
    done, out = await run(client, "forks.py", n=500)
    assert done["status"] == "failed" and done["exit_code"] == 3, (done, out)
    assert "refused" in out and "forked 500" not in out
    assert done["error"].endswith("at the processes limit of 20")
    await still_serves(client)
    done, out = await run(client, "forks.py", n=10)  # under the limit: fine
    assert done["status"] == "success", (done, out)


def quota_mounts(under: Path) -> list[str]:
    """Mount points under this folder (a task's disk quota left mounted would show here)."""
    with open("/proc/self/mounts") as fh:
        return [line.split()[1] for line in fh if line.split()[1].startswith(str(under))]


def held(out: str) -> int:
    """The bytes diskhog.sh said its files held when a write failed."""
    return int(re.search(r"held (\d+) bytes", out).group(1))  # type: ignore[union-attr]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="disk_bytes needs root (a tmpfs)")


@needs_bwrap
@needs_root
@pytest.mark.parametrize("mode", [BWRAP, NONE], ids=["bwrap", "none"])
async def test_disk_quota_bounds_work_folder_and_tmp_together(make_client, mode, tmp_path):
    """50 files of 1 MiB, in turn to /tmp (TMPDIR unsandboxed) and the work folder, with
    disk_bytes = 10 MiB: a write meets ENOSPC past 10 MiB of both together, the task fails
    naming the limit, nothing of it stays mounted or on disk; under the quota, it succeeds."""
    work = tmp_path / "work"
    client = await make_client(sandbox=mode, limits=ResourceLimits(disk_bytes=10 << 20),
                               work_dir=work)
    done, out = await run(client, "diskhog.sh", files=50)
    assert done["status"] == "failed" and done["exit_code"] == 3, (done, out)
    assert "No space left on device" in out and "wrote" not in out, out
    assert 9 << 20 < held(out) <= 10 << 20, out
    assert done["error"] == f"failed with no space left at the disk_bytes limit of {10 << 20} bytes"
    assert quota_mounts(work) == [] and list(work.iterdir()) == []
    done, out = await run(client, "diskhog.sh", files=6)
    assert done["status"] == "success" and "wrote 6 files" in out, (done, out)
    assert done["error"] is None


def mount_tmpfs(source: str, where: Path) -> None:
    """A 1 MiB tmpfs at `where` whose source names a server (remoterun-<pid>)."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", source, str(where)], check=True)


@needs_root
async def test_a_dead_servers_quota_is_unmounted_at_start(make_client, tmp_path):
    """A quota a SIGKILLed server left mounted in the work root (its source names its pid,
    now gone) is unmounted and removed when a server starts there; a live one's stays."""
    work = tmp_path / "work"
    dead = await asyncio.to_thread(subprocess.run, ["sh", "-c", "echo $$"],
                                   capture_output=True, text=True)
    left, live = work / "t-1-dead", work / "t-1-live"
    await asyncio.to_thread(mount_tmpfs, f"remoterun-{dead.stdout.strip()}", left)
    try:
        await asyncio.to_thread(mount_tmpfs, f"remoterun-{os.getpid()}", live)
        client = await make_client(sandbox=NONE, work_dir=work)
        await still_serves(client)
        assert quota_mounts(work) == [str(live)] and not left.exists()
    finally:
        for path in quota_mounts(work):
            await asyncio.to_thread(subprocess.run, ["umount", path], check=True)


@needs_bwrap
async def test_open_files_limit_applies(make_client):
    """Descriptors past open_files fail with EMFILE; no signal marks it, so the task fails with
    its own exit code and no limit is claimed."""
    client = await make_client(sandbox=BWRAP, limits=ResourceLimits(open_files=32))
    done, out = await run(client, "openfiles.py", n=100)
    assert done["status"] == "failed" and done["exit_code"] == 4, (done, out)
    assert "Too many open files" in out and done["error"] is None


@needs_bwrap
async def test_a_scripts_limits_override_the_configs(make_client):
    """Metadata limits apply to that script only, over [limits]; 0 lifts one."""
    client = await make_client(
        sandbox=BWRAP, limits=ResourceLimits(cpu_seconds=1),
        scripts={"spin.sh": {"timeout_s": 3, "limits": {"cpu_seconds": 0}},
                 "filehog.sh": {"limits": {"file_bytes": 1000}}})
    done, _ = await run(client, "spin.sh")
    assert done["status"] == "timeout", done  # no cpu limit for it: its timeout ends it
    done, _ = await run(client, "filehog.sh", bytes=5000)
    assert done["error"] == "killed by SIGXFSZ: file_bytes limit of 1000 bytes", done


async def test_limits_unsandboxed_are_a_prlimit_wrapper(make_client, tmp_path):
    """Unsandboxed, limits put util-linux prlimit before the script; none, nothing."""
    client = await make_client(sandbox=NONE)
    sandbox = client.server.app[SCHEDULER].sandbox
    for limits, first in (({}, "/bin/true"), ({"open_files": 9}, shutil.which("prlimit"))):
        policy = sandbox.policy({}, limits, {})
        launch = await sandbox.prepare(policy, ["/bin/true"], {}, tmp_path, False, "x-1")
        try:
            assert launch.argv[0] == first and launch.argv[-1] == "/bin/true"
        finally:
            await sandbox.finish(launch, 0, None)


def test_limits_config_names_the_bad_key(tmp_path):
    """[limits] and [sandbox] values are checked, naming the key."""
    for text, key in (({"limits": {"cpu_seconds": "1"}}, "limits.cpu_seconds"),
                      ({"limits": {"cpus": 1}}, "limits.cpus"),
                      ({"sandbox": {"mode": "vm"}}, "sandbox.mode"),
                      ({"sandbox": {"network": "no"}}, "sandbox.network"),
                      ({"engine": {"env": {"A B": "x"}}}, "engine.env.A B")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse(text, tmp_path)
    settings = parse({"limits": {"cpu_seconds": 0, "processes": 5}}, tmp_path)
    assert settings.limits == ResourceLimits(processes=5)
