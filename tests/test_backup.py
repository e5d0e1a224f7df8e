"""`remoterun backup` of a running server's data, `remoterun restore` into a fresh folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, ServerProcess, wait_for


def remoterun(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `remoterun` command, run to its end in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "remoterun", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


async def _post(http, server, body):
    async with http.post(server.url + "/tasks", json=body) as response:
        assert response.status == 201, await response.text()
        return (await response.json())["id"]


async def _status(http, server, task_id):
    async with http.get(f"{server.url}/tasks/{task_id}") as response:
        return (await response.json())["status"]


async def _output(http, server, task_id):
    async with http.get(f"{server.url}/tasks/{task_id}/output") as response:
        assert response.status == 200
        return await response.read()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private(dest: Path) -> None:
    """Every folder under the backup 0700, every file 0600."""
    assert _mode(dest) == 0o700
    for path in dest.rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path


async def _finished_and_running(http, server):
    """Two finished tasks and one still running; their ids, the running one last."""
    done = [await _post(http, server, {"script": "lines.py", "params": {"n": 3000}}),
            await _post(http, server, {"script": "hello.sh"})]
    running = await _post(http, server, {"script": "sleep.sh"})
    for task_id in done:
        await wait_for(lambda t=task_id: _finished(http, server, t), timeout=30,
                       what=f"{task_id} finished")
    await wait_for(lambda: _is(http, server, running, "running"), what="running")
    return [*done, running]


async def _finished(http, server, task_id):
    return await _status(http, server, task_id) == "success"


async def _is(http, server, task_id, status):
    return await _status(http, server, task_id) == status


async def test_backup_while_running_then_restore(tmp_path, http):
    """A backup taken while a task runs restores into a fresh folder whose server lists every
    task and serves the finished ones' output byte for byte; the backup is private."""
    (tmp_path / "live").mkdir()
    (tmp_path / "fresh").mkdir()
    live, fresh = ServerProcess(tmp_path / "live"), ServerProcess(tmp_path / "fresh")
    live.start()
    try:
        ids = await _finished_and_running(http, live)
        outputs = {t: await _output(http, live, t) for t in ids[:2]}
        backed = remoterun(live.tmp_path, "backup", str(tmp_path / "bk"),
                           "--config", str(live.config))
        assert backed.returncode == 0, backed.stderr
        assert await _status(http, live, ids[2]) == "running"  # the server ran on
    finally:
        live.stop()
    _assert_private(tmp_path / "bk")
    restored = remoterun(fresh.tmp_path, "restore", str(tmp_path / "bk"),
                         "--config", str(fresh.config))
    assert restored.returncode == 0, restored.stderr
    assert ((fresh.tmp_path / "remoterun-secret.key").read_bytes()
            == (live.tmp_path / "remoterun-secret.key").read_bytes())
    fresh.start()
    try:
        async with http.get(fresh.url + "/tasks?limit=10") as response:
            listed = [t["id"] for t in (await response.json())["tasks"]]
        assert sorted(listed) == sorted(ids)
        assert await _status(http, fresh, ids[2]) == "failed"  # cut off: said so, not running
        for task_id, data in outputs.items():
            assert await _output(http, fresh, task_id) == data
    finally:
        fresh.stop()


def test_restore_refuses_a_live_data_folder(server, tmp_path):
    """Restoring over a folder that has a database refuses, names it, and changes nothing."""
    server.start()
    server.stop()
    backup = remoterun(tmp_path, "backup", str(tmp_path / "bk"), "--config", str(server.config))
    assert backup.returncode == 0, backup.stderr
    before = (tmp_path / "rr.db").read_bytes()
    ran = remoterun(tmp_path, "restore", str(tmp_path / "bk"), "--config", str(server.config))
    assert ran.returncode == 1
    assert f"{tmp_path / 'rr.db'} already exists" in ran.stderr
    assert (tmp_path / "rr.db").read_bytes() == before


def test_backup_refuses_a_folder_with_files(server, tmp_path):
    """A backup never mixes with other files: DEST must be new or empty."""
    server.start()
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "other").write_text("x")
    ran = remoterun(tmp_path, "backup", str(tmp_path / "bk"), "--config", str(server.config))
    assert ran.returncode == 1
    assert "is not empty" in ran.stderr


def test_cluster_backup_says_pg_dump_and_copies_the_archive(tmp_path):
    """In cluster mode the database is PostgreSQL's: backup prints the pg_dump command (no
    password in it) and copies the shared archive and the key."""
    (tmp_path / "archive" / "2026").mkdir(parents=True)
    (tmp_path / "archive" / "2026" / "a.log.gz").write_bytes(b"\x1f\x8b data")
    (tmp_path / "remoterun-secret.key").write_text("k")
    (tmp_path / "config.toml").write_text(
        '[paths]\narchive = "archive"\ndb = "remoterun.db"\n'
        '[cluster]\ndatabase_url = "postgresql://rr:hunter2@db:5432/rr"\n'
        'redis_url = "redis://cache:6379/0"\n')
    ran = remoterun(tmp_path, "backup", str(tmp_path / "bk"), "--config",
                    str(tmp_path / "config.toml"))
    assert ran.returncode == 0, ran.stderr
    assert "pg_dump" in ran.stdout and "postgresql://rr@db:5432/rr" in ran.stdout
    assert "hunter2" not in ran.stdout
    assert (tmp_path / "bk/archive/2026/a.log.gz").read_bytes() == b"\x1f\x8b data"
    assert (tmp_path / "bk/remoterun-secret.key").read_text() == "k"
    _assert_private(tmp_path / "bk")
