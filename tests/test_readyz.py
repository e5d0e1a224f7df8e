"""/readyz: each named check, on a real tmpfs that the test fills up or remounts read-only."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TOKENS

from remoterun.api import READINESS, SCHEDULER
from remoterun.api.monitor import NotReady

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of its own (root, as CI is, ignores permissions: a mount does not)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


async def sh(*argv: str) -> None:
    """Run a command without blocking the loop; fail if it fails."""
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv


async def readyz(client) -> tuple[int, dict]:
    """GET /readyz: the status and the body."""
    response = await client.get("/readyz")
    return response.status, await response.json()


async def test_ready(client):
    """A fresh server is ready, and says which checks it ran."""
    status, body = await readyz(client)
    assert status == 200 and body["status"] == "ready"
    assert set(body["checks"]) == {"database", "archive", "engine", "accepting"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["archive"]["free_bytes"] > 0


async def test_archive_read_only(make_client, tmpfs: Path):
    """An archive whose filesystem turned read-only makes /readyz 503, naming the archive.

    The server holds a lock file open in its archive, so Linux refuses to remount that tmpfs
    read-only ("busy"); a read-only tmpfs mounted over the archive's path does the same to
    every new write."""
    client = await make_client(archive_dir=tmpfs, min_free_bytes=MiB)
    assert (await readyz(client))[0] == 200
    await sh("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmpfs))
    try:
        status, body = await readyz(client)
    finally:
        await sh("umount", str(tmpfs))
    assert status == 503 and body["status"] == "not_ready"
    assert body["checks"]["archive"]["ok"] is False
    assert "not writable" in body["checks"]["archive"]["error"]
    assert body["checks"]["database"]["ok"] and body["checks"]["engine"]["ok"]
    assert (await readyz(client))[0] == 200


async def test_archive_under_the_floor_and_full(make_client, tmpfs: Path):
    """Less free than server.min_free_bytes is not ready; a full disk is not writable."""
    client = await make_client(archive_dir=tmpfs, min_free_bytes=3 * MiB)
    filler = tmpfs / "filler"
    filler.write_bytes(b"x" * 6 * MiB)  # 2 MiB left of 8
    status, body = await readyz(client)
    assert status == 503
    assert "under server.min_free_bytes = 3145728" in body["checks"]["archive"]["error"]
    with filler.open("ab") as fh, pytest.raises(OSError):
        while True:
            fh.write(b"x" * 65536)
            fh.flush()
    status, body = await readyz(client)
    assert status == 503 and "not writable" in body["checks"]["archive"]["error"]
    filler.unlink()
    assert (await readyz(client))[0] == 200


async def test_database_locked(client, settings):
    """A database another writer holds locked past the busy timeout is not ready."""
    other = sqlite3.connect(settings.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        status, body = await readyz(client)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert status == 503 and body["checks"]["database"]["ok"] is False
    assert "locked" in body["checks"]["database"]["error"]
    assert (await readyz(client))[0] == 200


async def test_engine_dead(client):
    """A dispatcher loop that has ended (here: cancelled, as a bug would end it) is not ready."""
    dispatcher = client.app[SCHEDULER]._dispatcher
    assert dispatcher is not None
    dispatcher.cancel()
    status, body = await readyz(client)
    assert status == 503 and body["checks"]["engine"]["ok"] is False
    assert "dispatcher" in body["checks"]["engine"]["error"]


async def test_a_check_added_later(client):
    """A check registered by another part of the server shows beside the others."""
    failing = True

    async def archive_writes() -> dict:
        if failing:
            raise NotReady("an archive write failed 3 s ago")
        return {"last_failure": None}

    client.app[READINESS].add("archive_writes", archive_writes)
    status, body = await readyz(client)
    assert status == 503
    assert body["checks"]["archive_writes"] == {"ok": False,
                                                "error": "an archive write failed 3 s ago"}
    failing = False
    status, body = await readyz(client)
    assert status == 200 and body["checks"]["archive_writes"] == {"ok": True,
                                                                  "last_failure": None}


async def test_readyz_needs_a_token(make_client):
    """With tokens configured, /readyz (unlike /healthz) needs one."""
    client = await make_client(tokens=TOKENS)
    assert (await client.get("/readyz")).status == 401
    response = await client.get("/readyz", headers={"Authorization": "Bearer viewer-token"})
    assert response.status == 200
