"""The `remoterun` client verbs as a subprocess against a real server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ServerProcess

CLI = [sys.executable, "-m", "remoterun"]


@pytest.fixture
def running_server(tmp_path):
    """A started server process."""
    server = ServerProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def cli(server, *args, stdin=None, env=None, timeout=60):
    """Run `python -m remoterun --url URL ...` to its end."""
    return subprocess.run([*CLI, "--url", server.url, *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin, env=env)


@pytest.fixture
def spawn():
    """Start `python -m remoterun ... --url URL` (the flag after the verb) in the background;
    each is killed and its pipes closed at the end of the test."""
    started = []

    def start(server, *args, **kwargs):
        proc = subprocess.Popen([*CLI, *args, "--url", server.url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def read_until(stream, text, timeout=20.0):
    """Lines of a pipe until one contains text (bounded by a deadline)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came; got {''.join(seen)!r}")


def task_of(server, task_id):
    """GET /tasks/{id} through the CLI's own `show -o json`."""
    return json.loads(cli(server, "show", task_id, "-o", "json").stdout)


def wait_status(server, task_id, status, timeout=15.0):
    """Poll until the task has this status."""
    deadline = time.monotonic() + timeout
    while (task := task_of(server, task_id))["status"] != status:
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    return task


def test_run_streams_stdout_and_stderr_apart(running_server):
    """`run` writes the task's stdout to stdout and its stderr to stderr, then exits 0."""
    ran = cli(running_server, "run", "lines.py", "-p", "n=4", "-p", "both=true")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "line 1\nline 3\n" and ran.stderr == "line 2\nline 4\n"


@pytest.mark.parametrize(("args", "code"), [
    (["exit.sh", "-p", "code=3"], 3),
    (["killself.sh", "-p", "sig=USR1"], 128 + signal.SIGUSR1),
    (["killself.sh", "-p", "sig=TERM"], 128 + signal.SIGTERM),
    (["sleep.sh", "--timeout", "0.5"], 124),
    (["noshebang.sh"], 127),
    (["../etc/passwd"], 125),
    (["hello.sh", "--retries", "-1"], 125),
    (["hello.sh", "-p", "novalue"], 2),
    (["hello.sh", "--bogus"], 2),
])
def test_exit_codes(running_server, args, code):
    """run exits with the script's code, 128+N, 124, 127, 125 or 2 as documented."""
    ran = cli(running_server, "run", *args)
    assert ran.returncode == code, (ran.stdout, ran.stderr)
    if code == 125:
        assert ran.stderr.startswith("remoterun: 4") and "Traceback" not in ran.stderr


def test_cancelled_exits_130_and_errors_are_one_line(running_server, spawn):
    """A task cancelled from elsewhere ends `run` with 130; a 422's details are field lines."""
    proc = spawn(running_server, "run", "sleep.sh")
    read_until(proc.stdout, "started")
    task_id = json.loads(cli(running_server, "ls", "-o", "json").stdout)[0]["id"]
    cancelled = cli(running_server, "cancel", task_id[:8])
    assert cancelled.returncode == 0 and cancelled.stdout.split()[0] == task_id
    assert proc.wait(timeout=30) == 130
    assert "task cancelled" in proc.stderr.read()
    bad = cli(running_server, "run", "schema.sh", "-p", "mode=zzz")
    assert bad.returncode == 125
    lines = bad.stderr.splitlines()
    assert lines[0].startswith("remoterun: 422 ") and any(
        line.startswith("  params.mode: must be one of") for line in lines[1:]), bad.stderr


def test_unreachable_server_is_125(tmp_path):
    """A server that does not answer: one line, exit 125."""
    down = subprocess.run([*CLI, "ls", "--url", "http://127.0.0.1:9"], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 125 and down.stderr.startswith("remoterun: cannot reach")
    assert len(down.stderr.splitlines()) == 1


def test_interactive_forwards_stdin_live(running_server, spawn):
    """-i sends each line as it is typed: the script answers before stdin is closed."""
    proc = spawn(running_server, "run", "echo_stdin.sh", "-i", stdin=subprocess.PIPE)
    read_until(proc.stdout, "ready")
    proc.stdin.write("first\n")
    proc.stdin.flush()
    assert "got: first" in read_until(proc.stdout, "got: first")
    proc.stdin.write("second\n")
    proc.stdin.close()
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert rest == "got: second\nlines: 2\n"


def test_interactive_reads_a_file_on_stdin(running_server, tmp_path):
    """-i with a regular file (or /dev/null) as stdin sends it whole, then end-of-file."""
    data = tmp_path / "in.txt"
    data.write_text("x\ny\nz\n")
    with data.open() as stdin:
        ran = subprocess.run([*CLI, "--url", running_server.url, "run", "-i", "echo_stdin.sh"],
                             stdin=stdin, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.endswith("got: z\nlines: 3\n")
    empty = subprocess.run([*CLI, "--url", running_server.url, "run", "-i", "echo_stdin.sh"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 0 and empty.stdout == "ready\nlines: 0\n"


def test_ctrl_c_signals_the_task_then_a_second_detaches(running_server, spawn):
    """First Ctrl-C: SIGINT to the task; two within a second: detach, the task goes on."""
    proc = spawn(running_server, "run", "trap_int.sh")
    read_until(proc.stdout, "ready")
    proc.send_signal(signal.SIGINT)
    read_until(proc.stdout, "got INT")
    time.sleep(1.2)  # past the detach window: the next Ctrl-C is a "first" again
    proc.send_signal(signal.SIGINT)
    read_until(proc.stdout, "got INT")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "detached" in err and "remoterun attach " in err
    task = json.loads(cli(running_server, "ls", "-o", "json").stdout)[0]
    assert task["status"] == "running"
    again = spawn(running_server, "attach", task["id"][:8])
    assert "ready" in read_until(again.stdout, "got INT")
    cli(running_server, "cancel", task["id"])
    assert again.wait(timeout=30) == 130


def test_logs_follow_ctrl_c_stops_watching_only(running_server, spawn):
    """Ctrl-C on `logs -f` ends it (130) without signalling the task, which runs on."""
    task_id = cli(running_server, "run", "-d", "trap_int.sh").stdout.strip()
    proc = spawn(running_server, "logs", "-f", task_id)
    read_until(proc.stdout, "ready")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "got INT" not in proc.stdout.read() and proc.stderr.read() == ""
    assert task_of(running_server, task_id)["status"] == "running"
    assert "got INT" not in cli(running_server, "logs", task_id).stdout
    cli(running_server, "cancel", task_id)


def test_detach_prints_the_id_and_logs_since(running_server):
    """--detach prints the id only; logs --since, --stream, --timestamps and -f read it back."""
    made = cli(running_server, "run", "--detach", "lines.py", "-p", "n=4", "-p", "both=true",
               "-p", "delay=0.05")
    task_id = made.stdout.strip()
    assert made.returncode == 0 and len(task_id) == 36
    followed = cli(running_server, "logs", "-f", task_id[:6])
    assert followed.returncode == 0
    assert (followed.stdout, followed.stderr) == ("line 1\nline 3\n", "line 2\nline 4\n")
    assert cli(running_server, "logs", task_id).stdout == "line 1\nline 2\nline 3\nline 4\n"
    assert cli(running_server, "logs", task_id, "--since", "2").stdout == "line 3\nline 4\n"
    assert cli(running_server, "logs", task_id, "--since", "1", "-f").stdout == \
        "line 3\n"
    assert cli(running_server, "logs", task_id, "--stream", "stderr").stdout == \
        "line 2\nline 4\n"
    stamped = cli(running_server, "logs", task_id, "--timestamps")
    lines = stamped.stdout.splitlines() + stamped.stderr.splitlines()
    assert len(lines) == 4 and all(line.split(" ", 1)[0].endswith("Z") for line in lines)
    assert lines[1].endswith(" line 3") and lines[3].endswith(" line 4")


def test_logs_grep_prints_matching_lines_with_numbers(running_server):
    """logs --grep prints each matching line as LINE:text (grep -n), -E takes a regex, and the
    exit code is grep's: 0 for a match, 1 for none."""
    made = cli(running_server, "run", "--detach", "lines.py", "-p", "n=30")
    task_id = made.stdout.strip()
    wait_status(running_server, task_id, "success")
    found = cli(running_server, "logs", task_id[:8], "--grep", "line 2")
    assert (found.returncode, found.stdout) == (0, "2:line 2\n" + "".join(
        f"{i}:line {i}\n" for i in range(20, 30)))
    regex = cli(running_server, "logs", task_id, "--grep", "^line [12]$", "-E")
    assert regex.stdout == "1:line 1\n2:line 2\n"
    assert cli(running_server, "logs", task_id, "--grep", "nothing").returncode == 1
    bad = cli(running_server, "logs", task_id, "--grep", "(", "--regex")
    assert bad.returncode == 125 and "regular expression" in bad.stderr


def test_ls_show_scripts_and_prefixes(running_server):
    """ls is a table with a header and exit codes (filters, -o json); show and scripts read."""
    ok = cli(running_server, "run", "-d", "hello.sh").stdout.strip()
    bad = cli(running_server, "run", "-d", "exit.sh", "-p", "code=4").stdout.strip()
    wait_status(running_server, ok, "success")
    wait_status(running_server, bad, "failed")
    table = cli(running_server, "ls").stdout.splitlines()
    assert table[0].split() == ["ID", "SCRIPT", "STATUS", "EXIT", "DURATION", "CREATED"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[bad[:8]][1:4] == ["exit.sh", "failed", "4"]
    assert rows[ok[:8]][1:4] == ["hello.sh", "success", "0"]
    failed = json.loads(cli(running_server, "ls", "--status", "failed", "-o", "json").stdout)
    assert [t["id"] for t in failed] == [bad]
    by_script = cli(running_server, "ls", "--script", "hello.sh").stdout.splitlines()
    assert len(by_script) == 2 and by_script[1].startswith(ok[:8])
    shown = cli(running_server, "show", ok[:5]).stdout
    assert "id:" in shown and ok in shown and "status:" in shown
    unknown = cli(running_server, "show", "zzzz")
    assert unknown.returncode == 125 and "no task id starts with" in unknown.stderr
    names = cli(running_server, "scripts", "-o", "name").stdout.split()
    assert "hello.sh" in names and "sub/nested.sh" in names
    assert cli(running_server, "scripts").stdout.splitlines()[0].split() == \
        ["NAME", "PARAMS", "DESCRIPTION"]
    ended = cli(running_server, "cancel", ok)
    assert ended.returncode == 125 and "409" in ended.stderr


def test_url_and_token_from_flags_env_or_config(running_server, tmp_path):
    """--url before or after the verb, REMOTERUN_URL, or ~/.config/remoterun/config.toml."""
    after = subprocess.run([*CLI, "scripts", "-o", "name", "--url", running_server.url],
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0 and "hello.sh" in after.stdout
    env = {**os.environ, "REMOTERUN_URL": running_server.url}
    by_env = subprocess.run([*CLI, "scripts", "-o", "name"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert by_env.returncode == 0 and "hello.sh" in by_env.stdout
    home = tmp_path / "xdg"
    (home / "remoterun").mkdir(parents=True)
    (home / "remoterun" / "config.toml").write_text(f'url = "{running_server.url}"\n')
    env = {**os.environ, "XDG_CONFIG_HOME": str(home)}
    env.pop("REMOTERUN_URL", None)
    by_file = subprocess.run([*CLI, "scripts", "-o", "name"], capture_output=True, text=True,
                             timeout=60, env=env)
    assert by_file.returncode == 0 and "hello.sh" in by_file.stdout
    (home / "remoterun" / "config.toml").write_text('urll = "x"\n')
    wrong = subprocess.run([*CLI, "scripts"], capture_output=True, text=True, timeout=60,
                           env=env)
    assert wrong.returncode == 2 and "unknown key 'urll'" in wrong.stderr


def test_version_and_completion(tmp_path):
    """--version prints the version; the bash and zsh completion scripts parse."""
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("remoterun 0.")
    for shell in ("bash", "zsh"):
        made = subprocess.run([*CLI, "completion", shell], capture_output=True, text=True,
                              timeout=60)
        assert made.returncode == 0 and "_remoterun" in made.stdout
        path = tmp_path / f"c.{shell}"
        path.write_text(made.stdout)
        assert subprocess.run(["bash", "-n", str(path)], timeout=60).returncode == 0
    words = subprocess.run(
        ["bash", "-c", f"source {tmp_path / 'c.bash'}; COMP_WORDS=(remoterun lo); COMP_CWORD=1;"
                       " _remoterun; echo ${COMPREPLY[@]}"],
        capture_output=True, text=True, timeout=60)
    assert words.stdout.split() == ["logs"]


def test_reconnects_after_the_server_drops_the_socket(tmp_path, spawn):
    """The server is killed mid-run and comes back: `run` reconnects with since and goes on."""
    server = ServerProcess(tmp_path)
    server.start()
    try:
        proc = spawn(server, "run", "lines.py", "-p", "n=40", "-p", "delay=0.1",
                     "--retries", "1")
        read_until(proc.stdout, "line 3")
        server.kill(signal.SIGKILL)
        server.start()
        out = proc.stdout.read()
        assert proc.wait(timeout=45) == 0, proc.stderr.read()
        assert out.endswith("line 40\n")
        assert "connection lost; reconnecting from seq" in proc.stderr.read()
    finally:
        server.stop()


@pytest.mark.parametrize(("level", "started", "finished"), [
    ("debug", True, True), ("info", False, True), ("warning", False, False)])
def test_log_level_picks_the_task_lines(tmp_path, level, started, finished):
    """[server] log_level: debug adds a line per start with its pid, warning drops task lines."""
    server = ServerProcess(tmp_path, f'log_level = "{level}"\n')
    server.start()
    try:
        ran = cli(server, "run", "lines.py", "-p", "n=2")
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


def test_logs_of_an_unknown_task_is_one_line(running_server):
    """`logs` of an id the server does not know: the 404 on one line, exit 125."""
    ran = cli(running_server, "logs", "00000000-0000-4000-8000-000000000000")
    assert ran.returncode == 125 and ran.stderr.startswith("remoterun: 404 ")
    assert len(ran.stderr.splitlines()) == 1


def test_token_from_flag_or_env(tmp_path):
    """With auth on: no token is a 401 on one line (125); --token or REMOTERUN_TOKEN works,
    for REST and for the streamed run alike."""
    server = ServerProcess(tmp_path, "[[tokens]]\nname = \"ops\"\n"
                           "token = \"s3cret-long-enough-token\"\n"
                                     "role = \"operator\"\n")
    server.start()
    try:
        denied = cli(server, "ls")
        assert denied.returncode == 125 and denied.stderr.startswith("remoterun: 401 ")
        assert cli(server, "--token", "s3cret-long-enough-token", "ls").returncode == 0
        env = {**os.environ, "REMOTERUN_TOKEN": "s3cret-long-enough-token"}
        ran = cli(server, "run", "lines.py", "-p", "n=2", env=env)
        assert ran.returncode == 0 and ran.stdout == "line 1\nline 2\n"
    finally:
        server.stop()
