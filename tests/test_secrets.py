"""Secret params: only in the environment, sealed at rest, masked in every output path."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    ServerProcess,
    make_settings,
    output_of,
    submit,
    wait_final,
    wait_for,
    ws_collect,
)
from test_api_sse import read_events

from remoterun.api import SETTINGS
from remoterun.vault import KEY_ENV, KEY_FILE_NAME, Vault, fingerprint

SECRET = "hunter2-Sup3r-S3cret"  # both halves and the whole must be absent everywhere
HALVES = (SECRET[: len(SECRET) // 2], SECRET[len(SECRET) // 2:])
SHA = hashlib.sha256(SECRET.encode()).hexdigest()


def assert_clean(text: str | bytes) -> None:
    """Neither the secret nor either half of it is in `text`."""
    raw = text.encode() if isinstance(text, str) else text
    for part in (SECRET, *HALVES):
        assert part.encode() not in raw, f"{part!r} leaked"


def archive_bytes(root: Path) -> bytes:
    """Every archive segment's output, decompressed with gzip, concatenated."""
    return b"".join(gzip.decompress(p.read_bytes()) for p in sorted(root.rglob("*.log.gz")))


def db_bytes(db_path: Path) -> bytes:
    """The database file and its -wal and -shm files, as they are on disk."""
    return b"".join(p.read_bytes() for p in (db_path, db_path.with_name(db_path.name + "-wal"),
                                             db_path.with_name(db_path.name + "-shm"))
                    if p.exists())


@pytest.mark.parametrize("pty", [False, True])
async def test_secret_split_across_reads_is_masked_everywhere(client, pty):
    """A secret written in two halves (two reads) is *** in live WS frames, SSE, /output (raw,
    per stream, jsonl) and the gzip segments on disk; the script got it in its environment."""
    task = await submit(client, "secret_split.py", params={"token": SECRET}, pty=pty)
    assert task["params"]["token"] == "***"
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    done = await wait_final(client, task["id"])
    assert done["status"] == "success", done
    live = output_of(frames)
    assert_clean(json.dumps(frames))
    assert f"sha={SHA}" in live and "whole:***" in live and "before *** after" in live
    seqs = [f["seq"] for f in frames if f["type"] == "output"]
    assert seqs == list(range(1, len(seqs) + 1))
    events = await read_events(await client.get(f"/tasks/{task['id']}/logs"))
    assert_clean(json.dumps(events))
    assert "".join(e[2]["data"] for e in events if e[1] == "output") == live
    for query in ("", "?stream=stdout", "?stream=stderr", "?format=jsonl"):
        body = await (await client.get(f"/tasks/{task['id']}/output{query}")).read()
        assert_clean(body)
    raw = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert raw == live
    if not pty:
        err = await (await client.get(f"/tasks/{task['id']}/output?stream=stderr")).text()
        assert err == "before *** after\n"
    on_disk = archive_bytes(client.server.app[SETTINGS].archive_dir)
    assert b"***" in on_disk
    assert_clean(on_disk)


async def test_secret_is_not_an_argument_and_not_in_ps(client):
    """While the task runs, its cmdline and `ps` show no secret, its argv has only the plain
    params, and its environment has RR_PARAM_TOKEN."""
    task = await submit(client, "secret_split.py", params={"token": SECRET, "sleep_s": 30})
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    text = ""
    async with asyncio.timeout(15):
        while "sha=" not in text:
            msg = json.loads((await ws.receive()).data)
            text += msg.get("data", "") if msg["type"] == "output" else ""
    assert "argv=['--label=plain', '--fail_first=false', '--sleep_s=30']" in text
    # The script's pid as this host sees it (in a sandbox it prints its PID namespace's).
    listing = await asyncio.to_thread(subprocess.run, ["ps", "-ww", "-eo", "pid,args"],
                                      capture_output=True, check=True)
    pid = next(int(line.split()[0]) for line in listing.stdout.decode().splitlines()
               if "secret_split.py --label=plain" in line and "bwrap" not in line)
    cmdline, environ_bytes = await asyncio.to_thread(
        lambda: (Path(f"/proc/{pid}/cmdline").read_bytes(),
                 Path(f"/proc/{pid}/environ").read_bytes()))
    assert b"secret_split.py" in cmdline
    assert_clean(cmdline)
    environ = environ_bytes.split(b"\0")
    assert f"RR_PARAM_TOKEN={SECRET}".encode() in environ
    listing = await asyncio.to_thread(subprocess.run, ["ps", "-ww", "-eo", "pid,args"],
                                      capture_output=True, check=True)
    assert b"secret_split.py" in listing.stdout
    assert_clean(listing.stdout)
    await client.post(f"/tasks/{task['id']}/cancel")
    await ws.close()
    assert (await wait_final(client, task["id"]))["status"] == "cancelled"


async def test_wrong_typed_secret_is_not_echoed(client):
    """A 422 for a secret of the wrong type names the field and the type, never the value
    (REST and the WebSocket's submit); a plain param's message still shows what it got."""
    for params in ({"token": 987654321}, {"token": "ok-token", "pin": "s3cr3t-pin-value"}):
        response = await client.post("/tasks", json={"script": "secret_split.py",
                                                     "params": params})
        body = await response.text()
        assert response.status == 422, body
        for value in params.values():
            assert str(value) not in body or value == "ok-token"
        assert "expected" in body
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "secret_split.py",
                        "params": {"token": 4242424242}})
    error = await ws.receive_json(timeout=10)
    assert error["type"] == "error" and error["error"] == "invalid_params"
    assert "4242424242" not in json.dumps(error)
    await ws.close()
    plain = await client.post("/tasks", json={"script": "secret_split.py",
                                              "params": {"token": "abcd", "label": 77}})
    assert "got 77" in await plain.text()
    huge = await client.post("/tasks", data=b'{"script": "secret_split.py", "params": '
                             b'{"token": "abcd", "pin": 9e999}}',
                             headers={"Content-Type": "application/json"})
    assert huge.status == 400 and "9e999" not in await huge.text()


async def test_database_holds_no_secret_in_clear(client):
    """While the task runs its row holds a sealed box (not the value) and once it ended the box
    is dropped; the database file and its -wal and -shm never contain the value."""
    settings = client.server.app[SETTINGS]
    task = await submit(client, "secret_split.py", params={"token": SECRET, "sleep_s": 30})
    row = sqlite3.connect(settings.db_path).execute(
        "SELECT secret_params FROM tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row[0].startswith("rr1:")
    assert_clean(db_bytes(settings.db_path))

    async def running() -> bool:
        return (await (await client.get(f"/tasks/{task['id']}")).json())["status"] == "running"

    await wait_for(running, what="the task to run")
    assert_clean(db_bytes(settings.db_path))
    await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])
    row = sqlite3.connect(settings.db_path).execute(
        "SELECT secret_params FROM tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row[0] == "{}"
    assert_clean(db_bytes(settings.db_path))


async def test_files_are_private(client):
    """The database and its -wal/-shm are 0600, the archive folder 0700, the key file 0600."""
    settings = client.server.app[SETTINGS]
    task = await submit(client, "hello.sh")
    await wait_final(client, task["id"])
    db = settings.db_path
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                 db.parent / KEY_FILE_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(settings.archive_dir.stat().st_mode) == 0o700


async def test_short_secret_is_not_masked(client):
    """A secret shorter than 4 characters still reaches only the environment, but is not
    masked (it would mask every such letter of the output)."""
    task = await submit(client, "secret_split.py", params={"token": "ab1"})
    await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output?stream=stdout")).text()
    assert "whole:ab1" in out


async def test_redaction_patterns_masked(make_client):
    """[redaction] patterns are *** in frames and the archive, a match split across two reads
    included; a prompt without a newline is still sent before its line ends."""
    client = await make_client(redaction_patterns=("AKIA[0-9A-Z]{16}", r"password=\S+"))
    task = await submit(client, "redact_lines.py")
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    assert (await wait_final(client, task["id"]))["status"] == "success"
    text = output_of(frames)
    assert text == "key *** end\nlogin *** ok\nprompt> \nbye\n"
    datas = [f["data"] for f in frames if f["type"] == "output"]
    assert "prompt> " in datas  # released by the line hold's time bound, alone in its frame
    on_disk = archive_bytes(client.server.app[SETTINGS].archive_dir)
    assert b"AKIA" not in on_disk and b"hunter22" not in on_disk and b"key *** end" in on_disk


async def test_secrets_survive_retries(client):
    """A retry opens the sealed secret again: attempt 2 gets the same value."""
    task = await submit(client, "secret_split.py", params={"token": SECRET, "fail_first": True},
                        max_retries=1)
    done = await wait_final(client, task["id"])
    assert done["status"] == "success" and done["attempt"] == 2, done
    out = await (await client.get(f"/tasks/{task['id']}/output?stream=stdout")).text()
    assert out.count(f"sha={SHA}") == 2
    assert_clean(out)


def _rest(server: ServerProcess, method: str, path: str, body: object = None) -> dict:
    async def call() -> dict:
        async with aiohttp.ClientSession() as http, http.request(
                method, server.url + path, json=body) as response:
            return await response.json()  # type: ignore[no-any-return]
    return asyncio.run(call())


def _wait_task(server: ServerProcess, task_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        task = _rest(server, "GET", f"/tasks/{task_id}")
        if task["status"] in statuses:
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {statuses}")


def _pending_secret_then_crash(server: ServerProcess) -> str:
    """A server with one worker, busy with a sleeper, a secret task queued; killed -9."""
    server.config.write_text(server.config.read_text().replace("[engine]\n",
                                                               "[engine]\nworkers = 1\n"))
    server.start()
    blocker = _rest(server, "POST", "/tasks", {"script": "sleep.sh", "params": {"s": 30}})
    _wait_task(server, blocker["id"], ("running",))
    task = _rest(server, "POST", "/tasks", {"script": "secret_split.py",
                                            "params": {"token": SECRET}, "max_retries": 2})
    assert task["status"] == "pending"
    server.kill(signal.SIGKILL)
    assert_clean(db_bytes(server.tmp_path / "rr.db"))
    return str(task["id"])


def test_pending_secret_runs_after_a_restart(server):
    """A pending task's sealed secret is opened by the next server (the same key file)."""
    task_id = _pending_secret_then_crash(server)
    server.start()
    done = _wait_task(server, task_id, ("success", "failed"))
    assert done["status"] == "success", done
    assert_clean(server.log.read_bytes())


def test_pending_secret_with_the_key_gone_fails_honestly(server):
    """With the key file gone (a new one is made), the pending task with secrets fails at
    its attempt with an error naming the key, is not retried, and the server serves on."""
    task_id = _pending_secret_then_crash(server)
    (server.tmp_path / KEY_FILE_NAME).unlink()
    server.start()
    done = _wait_task(server, task_id, ("success", "failed"))
    assert done["status"] == "failed" and done["attempt"] == 1, done
    assert "another secret key" in done["error"]
    hello = _rest(server, "POST", "/tasks", {"script": "hello.sh"})
    assert _wait_task(server, hello["id"], ("success", "failed"))["status"] == "success"


def test_server_log_never_holds_a_secret(server):
    """The server's structlog lines (submit, run, 422, end) never contain a secret value."""
    server.start()
    task = _rest(server, "POST", "/tasks", {"script": "secret_split.py",
                                            "params": {"token": SECRET}})
    _rest(server, "POST", "/tasks", {"script": "secret_split.py",
                                     "params": {"token": 31337, "pin": SECRET}})
    assert _wait_task(server, task["id"], ("success", "failed"))["status"] == "success"
    server.kill(signal.SIGTERM)
    log = server.log.read_bytes()
    assert b"task_finished" in log
    assert_clean(log)
    audit = sqlite3.connect(server.tmp_path / "rr.db").execute(
        "SELECT * FROM audit").fetchall()
    assert audit and SECRET not in json.dumps(audit)


async def test_key_from_the_environment(make_client, monkeypatch, tmp_path):
    """REMOTERUN_SECRET_KEY is used instead of a key file (none is made), and no task's
    environment inherits it."""
    key = os.urandom(32)
    monkeypatch.setenv(KEY_ENV, key.hex())
    client = await make_client()
    env_sh = tmp_path / "scripts" / "env.sh"
    await asyncio.to_thread(env_sh.write_text, "#!/bin/sh\nenv\n")
    await asyncio.to_thread(env_sh.chmod, 0o755)
    listed = await submit(client, "env.sh")
    await wait_final(client, listed["id"])
    env = await (await client.get(f"/tasks/{listed['id']}/output")).text()
    assert "PATH=" in env and KEY_ENV not in env and key.hex() not in env
    task = await submit(client, "secret_split.py", params={"token": SECRET, "sleep_s": 30})
    box = sqlite3.connect(tmp_path / "rr.db").execute(
        "SELECT secret_params FROM tasks WHERE id = ?", (task["id"],)).fetchone()[0]
    assert box.split(":")[1] == fingerprint(key)
    assert Vault(key).open(task["id"], box)["token"] == SECRET
    assert not (tmp_path / KEY_FILE_NAME).exists()
    await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])


async def test_clear_secrets_of_an_older_server_are_sealed(aiohttp_client, tmp_path):
    """Rows an older server wrote with secrets in clear are sealed at start (dropped for
    ended tasks), and the pending one still runs with its value."""
    from remoterun.api.app import create_app

    settings = make_settings(tmp_path, workers=1)
    first = await aiohttp_client(create_app(settings))
    old = await submit(first, "hello.sh")
    await wait_final(first, old["id"])
    await first.close()
    with sqlite3.connect(settings.db_path) as db:
        row = db.execute("SELECT * FROM tasks WHERE id = ?", (old["id"],)).fetchone()
        columns = [c[1] for c in db.execute("PRAGMA table_info(tasks)")]
        values = dict(zip(columns, row, strict=True))
        db.execute("UPDATE tasks SET secret_params = ? WHERE id = ?",
                   (json.dumps({"token": "old-clear-value"}), old["id"]))
        values.update(num=None, id="00000000-0000-4000-8000-000000000001",
                      script="secret_split.py", status="pending", attempt=1,
                      params=json.dumps({"token": "***", "label": "plain", "fail_first": False,
                                         "sleep_s": 0}),
                      secret_params=json.dumps({"token": SECRET}), exit_code=None,
                      started_at=None, finished_at=None, output_bytes=0, last_seq=0,
                      seq_reserved=0, logs_path="2026/01/01/00000000-0000-4000-8000-000000000001")
        names = [c for c in columns if c != "num"]
        db.execute(f"INSERT INTO tasks ({', '.join(names)}) VALUES "
                   f"({', '.join('?' * len(names))})", [values[c] for c in names])
    second = await aiohttp_client(create_app(settings))
    done = await wait_final(second, values["id"])
    assert done["status"] == "success", done
    out = await (await second.get(f"/tasks/{values['id']}/output")).text()
    assert f"sha={SHA}" in out
    assert_clean(out)
    raw = db_bytes(settings.db_path)
    assert b"old-clear-value" not in raw
    assert_clean(raw)


def test_a_malformed_key_in_the_environment_stops_serve(tmp_path):
    """`serve` with a REMOTERUN_SECRET_KEY that is not 32 bytes exits 2 with one line naming
    the variable, not its value."""
    server = ServerProcess(tmp_path)
    env = {**os.environ, KEY_ENV: "not-a-key-but-a-secret-value"}
    argv = [sys.executable, "-m", "remoterun", "serve", "--config", str(server.config),
            "--port", str(server.port)]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert KEY_ENV in ran.stderr and "not-a-key-but-a-secret-value" not in ran.stderr
    assert not (tmp_path / "rr.db").exists()



@pytest.mark.parametrize("malloc_chosen", [False, True])
def test_server_environment_block_holds_no_secret(tmp_path, malloc_chosen):
    """Issue 26, attack 2: with `mode = "none"`, a task reads the server's environment block
    (/proc/$PPID/environ): REMOTERUN_SECRET_KEY and the operator's cloud keys are not in it
    (before: both were), yet the server uses the key (no key file is made). With or without
    the PYTHONMALLOC re-exec the server does anyway."""
    server = ServerProcess(tmp_path, '[sandbox]\nmode = "none"\n')
    script = tmp_path / "scripts" / "parent_env.sh"
    script.write_text("#!/bin/sh\necho \"ppid=$PPID\"\ntr '\\0' '\\n' < /proc/$PPID/environ\n")
    script.chmod(0o755)
    cloud = "aws-Secret-Value-0123456789"
    env = {KEY_ENV: os.urandom(32).hex(), "AWS_SECRET_ACCESS_KEY": cloud,
           "SOME_PLAIN_SETTING": "plain-value"}
    if malloc_chosen:
        env["PYTHONMALLOC"] = "malloc"
    server.start(env)
    try:
        task = _rest(server, "POST", "/tasks", {"script": "parent_env.sh"})
        assert _wait_task(server, task["id"], ("success", "failed"))["status"] == "success"
        out = asyncio.run(_output(server, task["id"]))
    finally:
        server.stop()
    assert server.proc is not None and f"ppid={server.proc.pid}\n" in out
    assert "PATH=" in out  # the block was read
    assert env[KEY_ENV] not in out and KEY_ENV not in out
    assert cloud not in out and "plain-value" not in out
    assert not (tmp_path / KEY_FILE_NAME).exists()  # the key still reached the server


async def _output(server: ServerProcess, task_id: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.url}/tasks/{task_id}/output") as response:
        return await response.text()


def _modes(root: Path) -> dict[str, int]:
    """Every folder and file under root (root included), relative name -> permission bits."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


async def test_data_folders_are_private_whatever_existed(make_client, tmp_path):
    """Issue 26, attack 3: an archive folder that exists before the first start, 0755 with a
    0644 .gitkeep (as the repository ships it), holding a folder and segment an older server
    left 0755/0644, and a 0755 work folder: once the server has started and run a short and
    a long task, every folder of the archive is 0700 and every file 0600 (before: segments
    0644 in 0755 folders), the database's folder it made 0700, the work root 0711 (not
    listable) and the key, database and checked-copy folder private."""
    archive, work = tmp_path / "archive", tmp_path / "work"
    old = archive / "2020" / "01" / "02" / "00000000-0000-0000-0000-000000000000"
    old.mkdir(parents=True)
    work.mkdir()
    for path in (archive / ".gitkeep", old / "0000000001-0000000001.log.gz"):
        path.write_bytes(b"")
    for path in (work, archive, *archive.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    data = tmp_path / "data"
    client = await make_client(db_path=data / "rr.db", work_dir=work)
    for script, params in (("hello.sh", {}), ("lines.py", {"n": 10_000})):
        task = await submit(client, script, params=params)
        assert (await wait_final(client, task["id"]))["status"] == "success"
    modes = await asyncio.to_thread(_modes, archive)
    assert len(modes) > 12  # today's year/month/day, two task folders of segments, the old
    assert {name: mode for name, mode in modes.items()
            if mode != (0o700 if (archive / name).is_dir() else 0o600)} == {}
    data_modes = await asyncio.to_thread(_modes, data)
    assert data_modes["."] == 0o700 and data_modes["rr.db-run"] == 0o700
    assert data_modes["rr.db"] == data_modes[KEY_FILE_NAME] == 0o600
    assert stat.S_IMODE(work.stat().st_mode) == 0o711
