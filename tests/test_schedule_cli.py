"""`remoterun schedule ...` against a real server process (issue 29)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ServerProcess

CLI = [sys.executable, "-m", "remoterun"]


@pytest.fixture
def running_server(tmp_path):
    """A started server process in UTC."""
    server = ServerProcess(tmp_path)
    server.start(env={"TZ": "UTC"})
    yield server
    server.stop()


def cli(server, *args):
    """Run `python -m remoterun --url URL ...` to its end."""
    return subprocess.run([*CLI, "--url", server.url, "--utc", *args], capture_output=True,
                          text=True, timeout=60)


def test_schedule_verbs(running_server):
    """add, ls, show, run, runs, pause, resume, rm and next each do what they say."""
    made = cli(running_server, "schedule", "add", "nightly", "hello.sh", "--cron",
               "30 2 * * *", "--tz", "Europe/Berlin", "--overlap", "allow")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["timezone"] == "Europe/Berlin"
    listed = cli(running_server, "schedule", "ls")
    assert "nightly" in listed.stdout and "30 2 * * *" in listed.stdout, listed.stdout
    ran = cli(running_server, "schedule", "run", "nightly")
    assert ran.returncode == 0 and len(ran.stdout.strip()) == 36, ran.stderr
    assert cli(running_server, "schedule", "runs", "nightly").returncode == 0
    paused = cli(running_server, "schedule", "pause", "nightly")
    assert json.loads(paused.stdout)["paused"] is True
    assert json.loads(cli(running_server, "schedule", "resume", "nightly").stdout)["paused"] \
        is False
    assert json.loads(cli(running_server, "schedule", "show", "nightly").stdout)["overlap"] \
        == "allow"
    assert cli(running_server, "schedule", "rm", "nightly").returncode == 0
    gone = cli(running_server, "schedule", "show", "nightly")
    assert gone.returncode == 125 and "nightly" in gone.stderr
    nxt = cli(running_server, "schedule", "next", "0 0 13 * 5", "--tz", "UTC", "-n", "3")
    lines = nxt.stdout.splitlines()
    assert "13th" in lines[0] and "Friday" in lines[0] and len(lines) == 4, nxt.stdout
    bad = cli(running_server, "schedule", "next", "61 * * * *")
    assert bad.returncode == 125 and "cron" in bad.stderr
