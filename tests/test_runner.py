"""One child process: UTF-8 cuts, coalescing, ordering, PTY size/keys/signals, tree kill."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TEST_SCRIPTS, wait_for
from hypothesis import given
from hypothesis import strategies as st

from remoterun.runner import Run, RunSpec, SpawnError
from remoterun.runner.streams import split_utf8


@given(st.text(), st.integers(min_value=0, max_value=400))
def test_split_utf8_never_breaks_a_character(text, cut):
    """Whatever the cut, the kept part decodes alone and kept + tail is the original."""
    data = text.encode()
    head, tail = split_utf8(data[:cut])
    head.decode("utf-8")  # raises if a character was broken
    assert head + tail == data[:cut] and len(tail) <= 3


@given(st.binary(max_size=64))
def test_split_utf8_on_arbitrary_bytes(data):
    """Arbitrary bytes: nothing is lost, and the tail is a possible character start."""
    head, tail = split_utf8(data)
    assert head + tail == data and len(tail) <= 3


class Collect:
    """An on_output callback that records (stream, bytes) chunks."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []

    def __call__(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data))

    def text(self, stream: str | None = None) -> str:
        return b"".join(d for s, d in self.chunks if stream in (None, s)).decode()


def spec(*argv: str, **kw) -> RunSpec:
    env = {**os.environ, **kw.pop("env", {})}
    return RunSpec(argv=list(argv), env=env, cwd=TEST_SCRIPTS, **kw)


async def run_to_end(run: Run, timeout: float | None = 10) -> int:
    await run.start()
    result = await run.wait(timeout, asyncio.get_running_loop().create_future())
    return result.exit_code


async def test_many_short_lines_are_coalesced():
    """Thousands of short lines printed fast arrive in far fewer chunks, in order, complete."""
    out = Collect()
    run = Run(spec(str(TEST_SCRIPTS / "lines.py"), env={"RR_PARAM_N": "5000"}), out)
    assert await run_to_end(run) == 0
    assert out.text() == "".join(f"line {i}\n" for i in range(1, 5001))
    assert len(out.chunks) < 500


async def test_interleaving_is_kept():
    """Slowly alternating stdout/stderr lines keep their written order."""
    out = Collect()
    run = Run(spec(str(TEST_SCRIPTS / "lines.py"),
                   env={"RR_PARAM_N": "20", "RR_PARAM_BOTH": "true", "RR_PARAM_DELAY": "0.01"}),
              out)
    assert await run_to_end(run) == 0
    order = [(s, line) for s, d in out.chunks for line in d.decode().splitlines()]
    assert [line for _, line in order] == [f"line {i}" for i in range(1, 21)]
    assert [s for s, _ in order] == ["stdout", "stderr"] * 10


async def test_lone_line_is_not_delayed():
    """A line printed after a quiet spell is handed on at once, not after the coalescing window."""
    seen: list[tuple[float, bytes]] = []
    code = ("import sys, time; time.sleep(0.2); sys.stdout.write(f'{time.time()}\\n');"
            " sys.stdout.flush(); time.sleep(0.1)")
    run = Run(spec(sys.executable, "-c", code), lambda s, d: seen.append((time.time(), d)),
              coalesce_s=0.1)
    assert await run_to_end(run) == 0
    assert len(seen) == 1, seen
    arrived, data = seen[0]
    assert arrived - float(data) < 0.05  # well under the 0.1 s window


async def test_exit_kills_the_rest_of_the_group():
    """When the main process exits, children left in its group are killed."""
    out = Collect()
    run = Run(spec("/bin/sh", "-c", "sleep 1000 & echo $!"), out)
    assert await run_to_end(run) == 0
    pid = int(out.text().strip())
    await wait_for(lambda: not _alive(pid), 5, what="orphan killed")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_stop_sends_term_then_kill():
    """A process that ignores SIGTERM is SIGKILLed after the grace period."""
    out = Collect()
    run = Run(spec("/bin/sh", "-c", "trap '' TERM; echo ready; sleep 1000"), out,
              kill_grace_s=0.2)
    await run.start()
    stop = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(run.wait(None, stop))
    await wait_for(lambda: "ready" in out.text(), what="ready")
    stop.set_result(None)
    result = await waiting
    assert result.stopped == "stopped" and result.exit_code == -signal.SIGKILL


async def test_spawn_errors_are_clear():
    """A missing file or one without #! raises SpawnError with a readable reason."""
    for argv, words in (([str(TEST_SCRIPTS / "missing.sh")], "not found"),
                        ([str(TEST_SCRIPTS / "noshebang.sh")], "exec format error"),
                        ([str(TEST_SCRIPTS / "notexec.sh")], "permission denied")):
        run = Run(spec(*argv), Collect())
        try:
            await run.start()
        except SpawnError as exc:
            assert words in str(exc)
        else:
            raise AssertionError(f"{argv} started")


async def test_pty_size_keys_and_ctrl_c():
    """A PTY run: stty sees the size, resize sends SIGWINCH, typed keys arrive, ^C interrupts."""
    out = Collect()
    run = Run(spec(str(TEST_SCRIPTS / "stty.sh"), pty=True, interactive=True, cols=100,
                   rows=30), out)
    await run.start()
    waiting = asyncio.create_task(run.wait(10, asyncio.get_running_loop().create_future()))
    await wait_for(lambda: "size 30 100" in out.text(), what="initial size")
    run.resize(120, 40)
    run.write(b"hello\r")  # bash runs the WINCH trap once `read` returns
    await wait_for(lambda: "typed: hello size 40 120" in out.text(), what="typed line")
    await wait_for(lambda: "winch 40 120" in out.text(), what="SIGWINCH")
    assert all(stream == "pty" for stream, _ in out.chunks)
    run.write(b"\x03")
    result = await waiting
    assert result.exit_code == -signal.SIGINT or result.exit_code == 130


async def test_pty_passes_colours_through():
    """ANSI escape sequences come out of a PTY unchanged."""
    out = Collect()
    run = Run(spec("/bin/sh", "-c", r"printf '\033[31mred\033[0m\n'", pty=True), out)
    assert await run_to_end(run) == 0
    assert "\x1b[31mred\x1b[0m\r\n" in out.text()


async def test_paused_output_blocks_the_process_until_resumed():
    """While paused, nothing is read: the pipe fills and the writer waits; resumed, all arrives."""
    out = Collect()
    total = 2_000_000
    code = f"import sys\nsys.stdout.buffer.write(b'x' * {total})\n"
    run = Run(spec(sys.executable, "-c", code), out)
    await run.start()
    run.pause()
    await asyncio.sleep(0.5)  # ample time to write 2 MB if anyone read it
    stuck = sum(len(d) for _, d in out.chunks)
    assert stuck < 200_000 and not run.exited.done()  # a pipe holds 64 KiB
    run.resume()
    result = await run.wait(10, asyncio.get_running_loop().create_future())
    assert result.exit_code == 0 and sum(len(d) for _, d in out.chunks) == total


def test_a_server_started_ignoring_sigint_gives_tasks_the_default():
    """Started as a background job (`remoterun serve &`), the server begins with SIGINT
    ignored; its children must not inherit that (seen: ^C and `signal INT` did nothing to a
    PTY task when the suite ran as `pytest &`). The shell kills itself with SIGINT: it dies by
    it only if the disposition it got was the default. The server itself stays deaf to it."""
    program = (
        "import os, signal, sys\n"
        "from remoterun.spawn import spawn, encode_env\n"
        "assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN\n"
        "pid = spawn(['/bin/sh', '-c', 'kill -INT $$; exit 7'], encode_env(os.environ), '/', 0, 1, 2)\n"
        "status = os.waitpid(pid, 0)[1]\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print(os.WIFSIGNALED(status) and os.WTERMSIG(status))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                       signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(int(signal.SIGINT)), done.stdout
