"""Processes under test: the RemoteRun server subprocess, /proc readings, py-spy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.lib import RESULTS, Context, free_port, progress


def proc_status_kb(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the server and by this (client) process over a block."""

    def __init__(self, server: Server):
        self.server = server
        self.server_s = 0.0
        self.client_s = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = (self.server.cpu_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        server, client, wall = self._start
        self.server_s += self.server.cpu_s() - server
        self.client_s += time.process_time() - client
        self.wall_s += time.perf_counter() - wall

    def describe(self, per: float, unit: str, scale: float = 1000, scale_unit: str = "ms"
                 ) -> str:
        """CPU per unit of work, and how busy the server was (1.0 = one core all the time)."""
        return (f"server CPU {self.server_s * scale / per:.2f} {scale_unit}/{unit} "
                f"(busy {self.server_s / max(self.wall_s, 1e-9):.2f} cores), client CPU "
                f"{self.client_s * scale / per:.2f} {scale_unit}/{unit}")


def children(pid: int) -> list[int]:
    """The direct children of a process (each RemoteRun task leads its own process group)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found += [int(p) for p in fh.read().split()]
    return found


# The server ------------------------------------------------------------------------------------

class Server:
    """A RemoteRun server subprocess on a free loopback port, with its own db and archive."""

    def __init__(self, ctx: Context, name: str, *, workers: int = 8,
                 client_queue_bytes: int = 8 * 1024 * 1024, db: Path | None = None,
                 extra_config: str = ""):
        self.ctx = ctx
        self.folder = ctx.work / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.db = db or self.folder / "remoterun.db"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self.hwm_kb: int | None = None
        self.config = self.folder / "config.toml"
        self.config.write_text(
            # max_connections: the guard's 1,000 (issue 12) would refuse the idle group's
            # 10,000 sockets with 503; what is measured here is the engine, not that cap.
            "[server]\nshutdown_grace_s = 1.0\nheartbeat_s = 20.0\nmax_connections = 20000\n"
            f"[engine]\nworkers = {workers}\nkill_grace_s = 1.0\n"
            f"[stream]\nclient_queue_bytes = {client_queue_bytes}\n" + extra_config)

    @property
    def url(self) -> str:
        """The HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float = 30.0) -> float:
        """Start the server and wait until /healthz answers; seconds it took."""
        self.port = free_port()
        argv = [sys.executable, "-m", "remoterun", "serve", "--config", str(self.config),
                "--port", str(self.port), "--db", str(self.db),
                "--archive", str(self.folder / "archive"), "--scripts", str(self.ctx.scripts)]
        began = time.perf_counter()
        self.proc = spawn_logged(argv, self.folder / "server.log", cwd=self.folder)
        try:
            await wait_ready(self.url + "/healthz", self.proc, timeout_s,
                             f"server {self.name} (see {self.folder}/server.log)")
        except BaseException:
            await self.stop()
            raise
        self.ready_s = time.perf_counter() - began
        if self.ctx.profile:
            self.profiler = start_profiler(self.pid, RESULTS / f"profile-{self.name}.txt")
        return self.ready_s

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        return proc_cpu_s(self.pid)

    def rss_kb(self) -> int | None:
        """The server's resident memory now."""
        return proc_status_kb(self.pid, "VmRSS")

    def peak_rss_kb(self) -> int | None:
        """The server's peak resident memory so far."""
        return proc_status_kb(self.pid, "VmHWM")

    async def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 20 s); records the peak RSS first."""
        if self.proc is None:
            return
        self.hwm_kb = self.peak_rss_kb()
        progress(f"stopping server {self.name}")
        if self.profiler is not None:
            stop_profiler(self.profiler)
            self.profiler = None
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, 20)
        if self.proc.poll() is None:
            orphans = children(self.pid)
            self.proc.kill()
            self.proc.wait()
            for pid in orphans:  # task groups a killed server could not stop
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
        self.proc = None
        progress(f"server {self.name} stopped")

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float, what: str
                     ) -> None:
    """Poll `url` until it answers 200; raise if the process dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout_s} s")
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.005)


def spawn_logged(argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process whose stdout and stderr go to a log file."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=fh, **kwargs)


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording the process as collapsed stacks, if py-spy is installed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250",
                                 "--format", "raw", "--output", str(out), "--nonblocking",
                                 "--threads"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    """Stop py-spy so that it writes its file."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
