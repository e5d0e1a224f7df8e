"""`remoterun run -t` under a real pseudo-terminal: raw mode, resize, typing, Ctrl-C, restore."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import ServerProcess


@pytest.fixture
def running_server(tmp_path):
    """A started server process."""
    server = ServerProcess(tmp_path)
    server.start()
    yield server
    server.stop()


class Terminal:
    """A shell command on the slave side of a new PTY; the test holds the master."""

    def __init__(self, command: str, rows: int = 30, cols: int = 100):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size the terminal, then become the command
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execvp("sh", ["sh", "-c", command])
        self.seen = b""

    def read_until(self, pattern: str, timeout: float = 20.0) -> str:
        """Everything read so far once it matches pattern (a regex), or fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern.encode(), self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} never came; got {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the slave side closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{pattern!r} never came; got {self.seen!r}")
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def lflag(self) -> int:
        """The terminal's local modes as the programs on it see them."""
        return termios.tcgetattr(self.fd)[3]

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal (the kernel sends SIGWINCH to its foreground)."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> int:
        """Wait for the shell; its exit status."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.killpg(self.pid, signal.SIGKILL)  # the shell leads its own session and group
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("the shell did not end")


def type_until_size(term: Terminal, size: str) -> None:
    """Type lines into tty_size.py until one reports this size: the task's PTY may start
    before the first resize arrives, and a key typed in the same instant as a resize may
    overtake it. (Not stty.sh: bash 5.2 can choke on a WINCH trap that runs during `read`.)"""
    for attempt in range(40):
        word = f"hello{size.replace(' ', 'x')}n{attempt}"
        os.write(term.fd, f"{word}\r".encode())
        seen = term.read_until(rf"typed: {word} size \d+ \d+")
        if re.findall(rf"typed: {word} size (\d+ \d+)", seen) == [size]:
            return
    raise AssertionError(f"the size {size} never reached the task")


def test_tty_raw_mode_resize_typing_ctrl_c_and_restore(running_server):
    """-t: raw mode while attached, size and SIGWINCH forwarded, keys typed reach the PTY task,
    Ctrl-C interrupts it as a keystroke (exit 130), and the terminal is restored afterwards."""
    cli = f"{sys.executable} -m remoterun run -t tty_size.py --url {running_server.url}"
    term = Terminal(f"stty -g; {cli}; echo \"rc=$?\"; stty -g")
    try:
        term.read_until(r"size \d+ \d+")
        assert not term.lflag() & (termios.ICANON | termios.ECHO | termios.ISIG)
        type_until_size(term, "30 100")  # the local size reached the task's PTY
        term.resize(40, 120)
        type_until_size(term, "40 120")  # and so did the change
        os.write(term.fd, b"\x03")
        seen = term.read_until(r"rc=\d+\r?\n[^\r\n]+\r?\n")
    finally:
        status = term.close()
    assert status == 0
    assert "rc=130" in seen
    before, after = re.findall(r"^([0-9a-f]+(?::[0-9a-f]+){10,})\r?$", seen, re.M)
    assert before == after, "the terminal settings were not restored"


def test_tty_needs_a_terminal(running_server):
    """-t with stdin not a terminal is a usage error (2), and nothing is submitted."""
    ran = subprocess.run([sys.executable, "-m", "remoterun", "run", "-t", "stty.sh", "--url",
                          running_server.url], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 2 and "-t needs a terminal" in ran.stderr
    listed = subprocess.run([sys.executable, "-m", "remoterun", "ls", "-o", "json", "--url",
                             running_server.url], capture_output=True, text=True, timeout=60)
    assert listed.stdout.strip() == "[]"


def test_tty_ctrl_c_twice_detaches_and_restores(running_server):
    """-t: one Ctrl-C is the keystroke (the task's trap sees SIGINT); two within a second
    detach with the re-attach hint, the terminal restored and the task still running."""
    cli = f"{sys.executable} -m remoterun run -t trap_int.sh --url {running_server.url}"
    term = Terminal(f"stty -g; {cli}; echo \"rc=$?\"; stty -g")
    try:
        term.read_until(r"ready")
        os.write(term.fd, b"\x03")
        term.read_until(r"got INT")
        time.sleep(1.2)  # past the detach window
        os.write(term.fd, b"\x03")
        term.read_until(r"got INT[\s\S]*got INT")
        os.write(term.fd, b"\x03")
        seen = term.read_until(r"rc=\d+\r?\n[^\r\n]+\r?\n")
    finally:
        assert term.close() == 0
    assert "rc=0" in seen and "detached" in seen and "remoterun attach " in seen
    before, after = re.findall(r"^([0-9a-f]+(?::[0-9a-f]+){10,})\r?$", seen, re.M)
    assert before == after
    listed = subprocess.run([sys.executable, "-m", "remoterun", "ls", "--status", "running",
                             "--url", running_server.url], capture_output=True, text=True,
                            timeout=60)
    assert "trap_int.sh" in listed.stdout


def test_waiting_task_shows_its_place_on_a_terminal(tmp_path):
    """With stderr a terminal, a task waiting for a worker says so until it starts."""
    server = ServerProcess(tmp_path)
    server.config.write_text(server.config.read_text().replace(
        "[engine]\n", "[engine]\nworkers = 1\n"))
    server.start()
    try:
        blocker = subprocess.run([sys.executable, "-m", "remoterun", "run", "-d", "sleep.sh",
                                  "--url", server.url], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        term = Terminal(f"{sys.executable} -m remoterun run hello.sh --url {server.url}; "
                        "echo \"rc=$?\"")
        try:
            term.read_until(r"waiting in the queue")
            subprocess.run([sys.executable, "-m", "remoterun", "cancel", blocker, "--url",
                            server.url], check=True, capture_output=True, timeout=60)
            seen = term.read_until(r"rc=\d+")
        finally:
            term.close()
        assert "rc=0" in seen and "hello world" in seen
    finally:
        server.stop()
