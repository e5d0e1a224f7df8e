"""Shared fixtures: a real app on temporary paths, a real server process, and a poll helper."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from blockbuster import blockbuster_ctx

from remoterun.api.app import create_app
from remoterun.archive.compressor import Compressor
from remoterun.config import Settings, Token
from remoterun.state import Task, TaskStatus

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEST_SCRIPTS = HERE / "scripts"

TOKENS = (
    Token("viewer-1", "viewer-token", "viewer"),
    Token("ops", "operator-token", "operator"),
    Token("hello-only", "hello-token", "operator", ("hello.sh",)),
    Token("root", "admin-token", "admin"),
)


def a_task(**changes: Any) -> Task:
    """A pending task "t" of hello.sh whose archive folder is "t", with `changes` (pure tests)."""
    task = Task(num=1, id="t", script="hello.sh", status=TaskStatus.PENDING, params="{}",
                secret_params="{}", priority=0, timeout=None, max_retries=0, attempt=1,
                pty=False, interactive=False, stdin="", created_at=0.0, updated_at=0.0,
                submitted_by="tester", logs_path="t")
    return task.evolve(**changes)


async def wait_for(condition: Callable[[], Any], timeout: float = 10.0,
                   interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def make_settings(tmp_path: Path, **changes: Any) -> Settings:
    """Settings on a private copy of tests/scripts, archive and database under tmp_path."""
    scripts = tmp_path / "scripts"
    if not scripts.exists():
        shutil.copytree(TEST_SCRIPTS, scripts, symlinks=True)
    base = Settings(
        host="127.0.0.1", port=0, scripts_dir=scripts, archive_dir=tmp_path / "archive",
        db_path=tmp_path / "rr.db", workers=4, kill_grace_s=1.0, shutdown_grace_s=2.0,
        drain_grace_s=0.3, flush_interval_s=0.2, retry_base_s=0.05, retry_cap_s=0.2,
        heartbeat_s=5.0,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default test settings (auth off)."""
    return make_settings(tmp_path)


ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(aiohttp_client: Any, tmp_path: Path) -> ClientFactory:
    """Build a test client of the real app with settings changed as asked."""

    async def factory(**changes: Any) -> TestClient:
        return await aiohttp_client(create_app(make_settings(tmp_path, **changes)))  # type: ignore[no-any-return]

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    """A client of the real app with default test settings."""
    return await make_client()


async def submit(client: TestClient, script: str, **fields: Any) -> dict[str, Any]:
    """POST /tasks and return the created task (asserts 201)."""
    headers = fields.pop("headers", None)
    response = await client.post("/tasks", json={"script": script, **fields}, headers=headers)
    body = await response.json()
    assert response.status == 201, body
    return body  # type: ignore[no-any-return]


async def wait_final(client: TestClient, task_id: str, timeout: float = 15.0,
                     headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll GET /tasks/{id} until the task is in a final state."""

    async def final() -> dict[str, Any] | None:
        response = await client.get(f"/tasks/{task_id}", headers=headers)
        task = await response.json()
        done = task["status"] in ("success", "failed", "timeout", "cancelled")
        return task if done else None

    return await wait_for(final, timeout, what=f"task {task_id} to finish")  # type: ignore[no-any-return]


async def ws_collect(ws: aiohttp.ClientWebSocketResponse, timeout: float = 15.0
                     ) -> list[dict[str, Any]]:
    """Every JSON frame until the server closes the socket."""
    frames = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frames.append(json.loads(msg.data))
    return frames


def output_of(frames: list[dict[str, Any]], stream: str | None = None) -> str:
    """The concatenated data of output frames (of one stream, if given)."""
    return "".join(f["data"] for f in frames
                   if f["type"] == "output" and (stream is None or f["stream"] == stream))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a socket listening on `port` (not merely whether
    something answers there: in a parallel run another worker's server may have the port)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link == f"socket:[{inode}]" for link in links for inode in inodes)


class ServerProcess:
    """`python -m remoterun serve` as a real child process, on a free port."""

    def __init__(self, tmp_path: Path, config_text: str = ""):
        self.tmp_path = tmp_path
        make_settings(tmp_path)  # copies the test scripts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "config.toml"
        self.config.write_text(
            "[paths]\nscripts = \"scripts\"\narchive = \"archive\"\ndb = \"rr.db\"\n"
            "[engine]\nkill_grace_s = 1.0\n[archive]\nflush_interval_s = 0.2\n"
            "[server]\nshutdown_grace_s = 2.0\n" + config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp_path / "server.log"

    def start(self, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the server (its environment ours, with `env` added; `preexec_fn` run in the
        child before the exec, e.g. to set its limits) and wait until it listens."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "remoterun", "serve", "--config", str(self.config),
                 "--port", str(self.port)], cwd=self.tmp_path, env=env,
                stdout=log, stderr=log, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            if _listens(self.proc.pid, self.port) and self._answers():
                return
            time.sleep(0.05)
        self.stop()  # never leave a half-started server to a later test's collection
        raise AssertionError(f"server did not start: {self.log.read_text()[-2000:]}")

    def _answers(self) -> bool:
        """Whether the app answers a request (the socket may listen before the app's start-up,
        its database included, has run)."""
        tls = "tls_cert" in self.config.read_text()
        context = ssl._create_unverified_context() if tls else None  # our own test certificate
        url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return True
        except urllib.error.HTTPError:
            return True  # an answer all the same (e.g. 401 where tokens are required)
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send a signal and wait for the process to end; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Make sure the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server process (not started: call .start())."""
    proc = ServerProcess(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture
def compressor() -> Iterator[Compressor]:
    """A compressor thread of its own, stopped after the test."""
    thread = Compressor()
    yield thread
    thread.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


# Deliberate short blocks of the event loop: (where, which calls), each with why it is allowed.
_FILE_CALLS = ("os.stat", "os.access", "os.path.abspath", "os.path.exists", "os.path.isfile",
               "os.path.isdir", "os.path.islink", "os.readlink", "os.scandir", "os.mkdir",
               "os.getcwd", "os.path.getsize", "io.open", "builtins.open",
               "io.BufferedReader.read", "io.TextIOWrapper.read", "sqlite3.Connection.execute",
               "ScandirIterator.__next__", "io.BufferedWriter.write", "io.TextIOWrapper.write",
               "os.write", "os.replace", "os.unlink")
BLOCKS_ALLOWED: list[tuple[str, set[str], tuple[str, ...]]] = [
    # Start-up, once, before the server serves (the app, its database, its folders).
    ("remoterun/api/app.py", {"create_app", "services"}, _FILE_CALLS),
    ("remoterun/store/sqlite.py", {"open"}, _FILE_CALLS),
    # The database's writes commit on the loop (~40 us each, no fsync, never waiting for a
    # lock): store/sqlite.py's docstring says why a thread hop cost more.
    ("remoterun/store/sqlite.py", {"write", "probe_write"}, ("sqlite3.Connection.execute",)),
    # vfork + exec on the loop (spawn.py): the exec-error pipe is read until the child has
    # exec'd (~0.1 ms), cheaper than a hop to a thread and back (bench/README.md).
    ("remoterun/spawn.py", {"spawn"}, ("os.read",)),
    # A cluster node's watchdog process started (subprocess.Popen reads its exec-error pipe
    # the same way): once at the node's start, and again only if it died before a rejoin.
    ("remoterun/cluster/watchdog.py", {"start"}, ("os.read",)),
    # A short run's whole segment is written once at its end (~0.1 ms: archive.py docstring).
    ("remoterun/archive/writer.py", {"close"}, ("os.mkdir", "os.write", "io.open", "builtins.open")),
    # Resolving a script: a realpath walk and a few stats of the scripts folder, cached for
    # catalogue.directory.RESOLVE_CACHE_S per name.
    ("remoterun/catalogue/directory.py", {"_confine", "_metadata", "resolve"}, _FILE_CALLS),
    # Logging an exception: the console renderer reads the traceback's source lines.
    ("structlog/dev.py", {"__call__"}, _FILE_CALLS),
    # /proc files (a process's children, environ, stat): procfs reads never wait on a disk.
    ("remoterun/reaper.py", {"_children", "tend_orphans", "kill_task_processes"}, _FILE_CALLS),
    # A sandboxed run: whether bwrap's first process has forked the script yet (its procfs
    # children file), looked at only while a signal waits for it; and that process placed
    # into the task's cgroups (a cgroupfs write), once per attempt with limits set.
    ("remoterun/isolation/launch.py", {"group_ready"}, _FILE_CALLS),
    # An attempt's launch without a user or cgroups to make: the script's first 4 bytes read
    # and one mkdir in the work root, and at its end one rmdir of that folder if the task left
    # it empty (sandbox.prepare and finish say why a thread hop cost more).
    ("remoterun/isolation/sandbox.py", {"_make", "_check_exec", "finish"}, (*_FILE_CALLS, "os.rmdir")),
    ("remoterun/isolation/limits.py", {"place"}, _FILE_CALLS),
    # gVisor's Sentry among runsc's children (procfs), and whether its container runs (runsc's
    # state file, a page-cache read), looked at as it starts and while a signal waits for it.
    ("remoterun/isolation/gvisor.py", {"sandbox_pid", "running"}, _FILE_CALLS),
    # asyncpg looks for ~/.pgpass (a stat, maybe a read) as it opens a connection: once per
    # pooled connection at start and after PostgreSQL restarts, never per query (cluster mode).
    ("asyncpg/connect_utils.py", {"_read_password_file", "_read_password_from_pgpass",
                                  "_parse_connect_dsn_and_args"}, _FILE_CALLS),
]


@pytest.fixture(autouse=True)
def no_blocking_in_the_loop() -> Iterator[None]:
    """Fail any test in which our code blocks the event loop (blockbuster), except the few
    deliberate short blocks named in BLOCKS_ALLOWED."""
    with blockbuster_ctx("remoterun") as buster:
        for filename, functions, calls in BLOCKS_ALLOWED:
            for name in calls:
                function = buster.functions.get(name)
                if function is not None:
                    function.can_block_in(filename, functions)
        yield


# Cluster mode (issue 16): one PostgreSQL and one Redis for the whole session, each test on a
# database of its own and an emptied Redis. Started only by tests that ask for them.

@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A real PostgreSQL on loopback in a temporary folder (tests/engines.py)."""
    from engines import PostgresServer
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A real redis-server on loopback, without persistence."""
    from engines import RedisServer
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def engines(pg_server: Any, redis_server: Any) -> Iterator[tuple[Any, Any, str]]:
    """Both engines up (a fault test may have left one down), a fresh database, an empty
    Redis: (postgres, redis, database_url)."""
    for engine in (pg_server, redis_server):
        if engine.proc is None or engine.proc.poll() is not None:
            engine.start()
    redis_server.flush()
    yield pg_server, redis_server, pg_server.new_database()


def silent_ws(port: int, path: str) -> socket.socket:
    """A WebSocket client that upgrades and then never reads (a tiny receive buffer: it fills
    at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of tests/unit `unit`: the pure layer (no process, socket or database)
    that `pytest -m unit` or `pytest tests/unit` runs alone in seconds."""
    for item in items:
        if UNIT in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.unit)
