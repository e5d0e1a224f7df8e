"""The CLI prints times in the user's zone with its offset; `--utc` prints UTC, marked Z."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from conftest import ROOT, wait_for

PLUS_8 = timezone(timedelta(hours=8))


def cli(server, *args: str, tz: str = "XYZ-8") -> str:
    """`remoterun ARGS --url SERVER` with TZ set (POSIX `XYZ-8` is UTC+8, no tzdata needed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TZ": tz}
    ran = subprocess.run([sys.executable, "-m", "remoterun", *args, "--url", server.url],
                         env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


@pytest.fixture
async def finished(server, http):
    """A server with one finished hello.sh task; the task's JSON."""
    server.start()
    async with http.post(server.url + "/tasks", json={"script": "hello.sh"}) as response:
        task_id = (await response.json())["id"]

    async def done():
        async with http.get(f"{server.url}/tasks/{task_id}") as response:
            task = await response.json()
        return task if task["status"] == "success" else None

    return await wait_for(done, what="hello.sh finished")


def _at(iso: str, zone: timezone = PLUS_8) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(zone)


async def test_ls_prints_local_time_with_offset(server, finished):
    """`ls` in UTC+8: the created time is the local one, ending in +08:00."""
    want = _at(finished["created_at"]).strftime("%Y-%m-%d %H:%M:%S+08:00")
    assert want in cli(server, "ls")


async def test_ls_utc_switch(server, finished):
    """`ls --utc`: the created time in UTC, marked Z, whatever TZ says."""
    want = _at(finished["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    assert want in cli(server, "ls", "--utc")


async def test_show_and_log_timestamps_are_local(server, finished):
    """`show` and `logs --timestamps` give local times with the offset; `-o json` stays as the
    API sends it (UTC, Z)."""
    shown = cli(server, "show", finished["id"])
    created = _at(finished["created_at"]).isoformat(timespec="milliseconds")
    assert re.search(rf"^created_at: +{re.escape(created)}$", shown, re.M), shown
    stamped = cli(server, "logs", "--timestamps", finished["id"])
    assert stamped.split(" ", 1)[0].endswith("+08:00"), stamped
    raw = json.loads(cli(server, "show", "-o", "json", finished["id"]))
    assert raw["created_at"] == finished["created_at"]
