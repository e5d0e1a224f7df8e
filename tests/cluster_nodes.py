"""Cluster nodes as real server processes (`python -m remoterun serve`) sharing one archive."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from conftest import ServerProcess, make_settings


class Node(ServerProcess):
    """One node: its own scripts/ copy, the shared archive, PostgreSQL and Redis."""

    def __init__(self, folder: Path, name: str, archive: Path, database_url: str,
                 redis_url: str, labels: tuple[str, ...] = (), workers: int = 4,
                 node_timeout_s: float = 3.0, extra: str = "", sandbox: str = "none"):
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        self.name = name
        labels_toml = ", ".join(f'"{label}"' for label in labels)
        self.config.write_text(
            f'[paths]\nscripts = "scripts"\narchive = "{archive}"\ndb = "unused.db"\n'
            f'secret_key = "{shared_key(archive.parent)}"\n'
            f"[engine]\nkill_grace_s = 1.0\nworkers = {workers}\nretry_base_s = 0.05\n"
            f"retry_cap_s = 0.2\n[archive]\nflush_interval_s = 0.2\n"
            f"[server]\nshutdown_grace_s = 2.0\n"
            # The test scripts leave marks in the test's folder, which a sandbox's /tmp hides.
            f'[sandbox]\nmode = "{sandbox}"\n'
            f'[cluster]\ndatabase_url = "{database_url}"\nredis_url = "{redis_url}"\n'
            f'node = "{name}"\nlabels = [{labels_toml}]\nnode_timeout_s = {node_timeout_s}\n'
            + extra)

    def start(self) -> None:
        """Start and wait until /healthz answers 200 (joined the cluster); a minute at most,
        for a loaded machine."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "remoterun", "serve", "--config", str(self.config),
                 "--port", str(self.port)], cwd=self.tmp_path, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited: {self.log.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"node {self.name} never became healthy: {self.log.read_text()}")

    def pause(self) -> None:
        """SIGSTOP: the node stops answering and beating (a frozen or cut-off host)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def shared_key(folder: Path) -> Path:
    """The cluster's secret key, one for every node (made once: nodes starting together must
    not race to create it)."""
    path = folder / "cluster-secret.key"
    if not path.exists():
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o600)
    return path


def make_nodes(tmp_path: Path, engines: tuple[Any, Any, str], count: int = 3,
               **options: Any) -> list[Node]:
    """`count` nodes named n1.. (not started), each with the test scripts."""
    _, redis_server, url = engines
    archive = tmp_path / "shared-archive"
    archive.mkdir(exist_ok=True)
    nodes = []
    for i in range(1, count + 1):
        per = options.get(f"n{i}", {})
        common = {k: v for k, v in options.items() if not k[1:].isdigit()}  # n1, n2...: per node
        nodes.append(Node(tmp_path / f"n{i}", f"n{i}", archive, url, redis_server.url,
                          **{**common, **per}))
        make_settings(tmp_path / f"n{i}")
    return nodes


async def start_all(nodes: list[Node]) -> None:
    """Start the nodes side by side (if one fails, stop them all)."""
    try:
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes))
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def task_processes(task_ids: list[str]) -> list[int]:
    """The pids of processes of these tasks (found by RR_TASK_ID), on this host."""
    wanted = {f"RR_TASK_ID={t}".encode() for t in task_ids}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
            with open(f"/proc/{entry.name}/stat") as fh:
                zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if env & wanted and not zombie:
            found.append(int(entry.name))
    return found


def kill_task_leftovers(task_ids: list[str]) -> None:
    """SIGKILL processes a SIGKILLed node's tasks left running (found by RR_TASK_ID)."""
    for pid in task_processes(task_ids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    """GET a JSON body (any status)."""
    async with http.get(url) as response:
        return await response.json()


STARTUP = 196608  # protocol 3.0


class _Frontend:
    """What one client connection sends, message by message (PostgreSQL's protocol 3): which
    of its transactions wrote a task event (a Parse of SQL naming task_events, or a Bind of
    a statement so parsed: asyncpg sends a prepared statement's text only once)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.started = False
        self.event_statements: set[bytes] = set()
        self.wrote_event = False

    def feed(self, data: bytes) -> int | None:
        """Take bytes; the end offset (in `data`) of a COMMIT of a transaction that wrote an
        event, if they hold one."""
        base = len(self.buffer)
        self.buffer += data
        offset = 0
        found = None
        while True:
            if not self.started:
                if len(self.buffer) - offset < 8:
                    break
                length = int.from_bytes(self.buffer[offset:offset + 4], "big")
                code = int.from_bytes(self.buffer[offset + 4:offset + 8], "big")
                if len(self.buffer) - offset < length:
                    break
                self.started = code == STARTUP  # else an SSL or GSS request, answered
                offset += length
                continue
            if len(self.buffer) - offset < 5:
                break
            kind = self.buffer[offset:offset + 1]
            length = int.from_bytes(self.buffer[offset + 1:offset + 5], "big")
            if len(self.buffer) - offset < 1 + length:
                break
            body = self.buffer[offset + 5:offset + 1 + length]
            offset += 1 + length
            if kind == b"P":
                name, rest = body.split(b"\0", 1)
                if b"task_events" in rest.split(b"\0", 1)[0]:
                    self.event_statements.add(name)
            elif kind == b"B":
                statement = body.split(b"\0", 2)[1]
                self.wrote_event = self.wrote_event or statement in self.event_statements
            elif kind == b"Q":
                if body.startswith(b"COMMIT") and self.wrote_event and found is None:
                    found = offset - base
                if body.startswith((b"COMMIT", b"ROLLBACK")):
                    self.wrote_event = False
        self.buffer = self.buffer[offset:]
        return found


class CommitCutter:
    """A TCP relay in front of PostgreSQL that, while `cuts` > 0, lets the COMMIT of a
    transaction that wrote a task event reach the server and then breaks the client's
    connection before the server's answer gets back: a write whose outcome the node cannot
    know (the network or PostgreSQL failing around a COMMIT, as seen in CI)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.cuts = 0
        self.cut = 0  # COMMITs cut so far
        self.server: asyncio.Server | None = None
        self.port = 0
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> CommitCutter:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in list(self._transports):
                transport.abort()
            await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:  # PostgreSQL is down: so is the way to it
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}
        cutting = asyncio.Event()
        frontend = _Frontend()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                end = frontend.feed(data)
                if end is not None and self.cuts > 0:
                    self.cuts -= 1
                    self.cut += 1
                    cutting.set()  # the answer is not relayed
                    up_writer.write(data[:end])
                    await up_writer.drain()
                    await asyncio.sleep(0.3)  # the server commits
                    return
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if cutting.is_set():
                    return
                writer.write(data)
                await writer.drain()

        sides = [asyncio.ensure_future(side()) for side in (client_to_server, server_to_client)]
        try:
            await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for side in sides:
                side.cancel()
            await asyncio.gather(*sides, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._transports -= {writer.transport, up_writer.transport}
