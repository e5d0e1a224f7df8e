"""The `remoterun` client verbs against a real server process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import ServerProcess


@pytest.fixture
def running_server(tmp_path):
    """A started server process."""
    server = ServerProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def cli(server, *args, stdin=None):
    """Run `python -m remoterun` with --url of the server."""
    verb, *rest = args
    return subprocess.run([sys.executable, "-m", "remoterun", verb, "--url", server.url, *rest],
                          capture_output=True, text=True, timeout=60, input=stdin)


def test_submit_follow_prints_output_and_returns_the_exit_code(running_server):
    """`submit --follow` streams stdout/stderr to the same streams and exits with the code."""
    ok = cli(running_server, "submit", "lines.py", "-p", "n=3", "-p", "both=true", "--follow")
    assert ok.returncode == 0
    assert ok.stdout == "line 1\nline 3\n" and "line 2\n" in ok.stderr
    failed = cli(running_server, "submit", "exit.sh", "-p", "code=3", "--follow")
    assert failed.returncode == 3 and "task failed" in failed.stderr


def test_submit_list_show_logs(running_server):
    """submit prints the task; tasks lists it; show and logs read it back."""
    made = cli(running_server, "submit", "echo_stdin.sh", "--stdin", stdin="a\nb\n")
    task = json.loads(made.stdout)
    follow = cli(running_server, "logs", task["id"], "--follow")
    assert follow.stdout == "ready\ngot: a\ngot: b\nlines: 2\n"
    assert task["id"] in cli(running_server, "tasks").stdout
    assert json.loads(cli(running_server, "show", task["id"]).stdout)["status"] == "success"
    assert cli(running_server, "logs", task["id"]).stdout == follow.stdout


def test_errors_are_one_clear_line(running_server):
    """A refused submission prints the error code and message and exits 1."""
    bad = cli(running_server, "submit", "../etc/passwd")
    assert bad.returncode == 1 and "404 unknown_script" in bad.stderr
    down = subprocess.run([sys.executable, "-m", "remoterun", "tasks", "--url",
                           "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "cannot reach" in down.stderr


@pytest.mark.parametrize(("level", "started", "finished"), [
    ("debug", True, True), ("info", False, True), ("warning", False, False)])
def test_log_level_picks_the_task_lines(tmp_path, level, started, finished):
    """[server] log_level: debug adds a line per start with its pid, warning drops task lines."""
    server = ServerProcess(tmp_path, f'log_level = "{level}"\n')
    server.start()
    try:
        ran = cli(server, "submit", "lines.py", "-p", "n=2", "--follow")
        assert ran.returncode == 0
    finally:
        server.kill(signal.SIGTERM)
    events = [json.loads(line) for line in server.log.read_text().splitlines()
              if line.startswith("{")]
    by_name = {e["event"]: e for e in events}
    assert ("task_started" in by_name) is started
    assert ("task_finished" in by_name) is finished
    if started:
        assert by_name["task_started"]["pid"] > 0 and by_name["task_started"]["level"] == "debug"
    if finished:
        done = by_name["task_finished"]
        assert (done["status"], done["script"], done["output_bytes"]) == \
            ("success", "lines.py", len("line 1\nline 2\n"))
