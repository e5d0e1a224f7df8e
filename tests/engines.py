"""Real PostgreSQL and Redis servers for the cluster tests, on loopback in temporary folders.

Debian's `postgresql` and `redis-server` packages give the binaries (the Makefile installs them);
no system service is used. Both need credentials, as docs/cluster.md deploys them: PostgreSQL a
password (scram-sha-256), Redis an ACL user `rr` limited to RemoteRun's keys and channel (the
default user is off), so a task that reaches their ports on loopback gets nothing. PostgreSQL
refuses to run as root, so as root (CI) its commands run as the `postgres` user through
`setpriv`, in a folder that user owns. Each server can be stopped and started again on the same
port, for the fault tests.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

# The nodes' Redis user (deploy/redis-acl.conf): RemoteRun's keys and channel, no admin commands.
RR_ACL = ("resetchannels", "~rr:*", "&rr:*", "+@all", "-@dangerous", "-@admin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path,
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the engine exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}: {log.read_text(errors='replace')[-2000:]}")


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


class _Engine(abc.ABC):
    """What both engines share: a restart on the same port (start and stop are each's own)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start; return once it serves."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop at once."""

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for `down_s`, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()


class PostgresServer(_Engine):
    """One PostgreSQL cluster: initdb once, then start/stop/restart on a fixed port."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        self.as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="rr-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = secrets.token_urlsafe(24)
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"])
        pwfile.unlink()

    def _argv(self, argv: list[str]) -> list[str]:
        # setpriv execs (runuser would fork and stay the parent, between us and postgres's
        # signals)
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv] \
            if self.as_root else argv

    def _run(self, argv: list[str]) -> None:
        subprocess.run(self._argv(argv), check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        """The maintenance database's URL."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server in the foreground of a child process; return once it listens."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self._argv([
                str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.folder), "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=300", "-c", "shared_buffers=64MB"]),
                stdout=log, stderr=log)
        _wait_port(self.port, self.proc, self.log)
        deadline = time.monotonic() + 30
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                              str(self.port)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop at once (fast shutdown: open connections are ended)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", "-d", "postgres", "-qc", f"CREATE DATABASE {name}"],
                       check=True, capture_output=True, timeout=60,
                       env={**os.environ, "PGPASSWORD": self.password})
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop and delete the folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisServer(_Engine):
    """One redis-server without persistence on a loopback port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.folder = Path(tempfile.mkdtemp(prefix="rr-redis-"))
        self.log = self.folder / "redis.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = secrets.token_urlsafe(24)  # the nodes' user, rr
        self.admin_password = secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        """The nodes' URL: the ACL user rr, as deploy/redis-acl.conf makes it."""
        return f"redis://rr:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it; return once it listens."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no",
                 "--user", "default", "off",
                 "--user", "admin", "on", f">{self.admin_password}", "~*", "&*", "+@all",
                 "--user", "rr", "on", f">{self.password}", *RR_ACL],
                stdout=log, stderr=log)
        _wait_port(self.port, self.proc, self.log)

    def stop(self) -> None:
        """Stop it (its data goes with it: no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        """Forget every key (between tests)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            auth = f"*3\r\n$4\r\nAUTH\r\n$5\r\nadmin\r\n${len(self.admin_password)}\r\n" \
                   f"{self.admin_password}\r\n"
            s.sendall(auth.encode() + b"*1\r\n$8\r\nFLUSHALL\r\n")
            answer = b""
            while answer.count(b"\r\n") < 2:
                answer += s.recv(64)
            assert answer == b"+OK\r\n+OK\r\n", answer

    def close(self) -> None:
        """Stop and delete the folder."""
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder)
