"""A run's streams: output read from pipes or a PTY, cut and coalesced into frames; input buffered.

Output is read with `loop.add_reader` straight from the file descriptors (no threads, no
StreamReader copies), cut at UTF-8 character boundaries so each chunk decodes on its own, and
coalesced: a read that arrives after a quiet spell of `coalesce_s` is handed on at once (a lone
line costs no added latency), while reads that follow each other closely are gathered for up
to `coalesce_s` or `frame_bytes`, so a script printing many short lines costs a few frames, not
one per line. Both streams share one buffer in arrival order, so stdout/stderr interleaving is
kept.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from dataclasses import dataclass, field

from remoterun.runner.spec import OnOutput

READ_BUDGET = 128 * 1024  # 256 KiB: flood p99 43-47 ms in bench/; 128 KiB: 36-38 ms
MIN_READ = 2048


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split off a trailing incomplete UTF-8 sequence, to be prefixed to the next read."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else \
                4 if byte & 0xF8 == 0xF0 else 1
            if need > back:
                return data[: end - back], data[end - back :]
            break
    return data, b""


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (the foreground process group gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_size(read_chunk: int, open_runs: int) -> int:
    """One read's size: the loop's per-iteration read budget shared by the open runs.

    One loop iteration serves every ready pipe once, so its length (and with it every
    client's latency) grows with the bytes read per callback. A lone task reads full
    chunks; a hundred flooding tasks read 2 KiB each, so a quiet task's line is not
    stuck behind 100 x 64 KiB of reading and compressing."""
    share = READ_BUDGET // max(1, open_runs)
    return max(MIN_READ, min(read_chunk, share))


class InputWriter:
    """Non-blocking writes to a file descriptor, buffered while the reader is slow."""

    def __init__(self, fd: int, owns_fd: bool):
        self.fd = fd
        self.owns_fd = owns_fd
        self.buffer = bytearray()
        self.closing = False
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        """Write now what the descriptor takes; keep the rest for when it is writable."""
        if self.closed or self.closing:
            return
        self.buffer += data
        self._flush()

    def _flush(self) -> None:
        while self.buffer:
            try:
                n = os.write(self.fd, self.buffer)
            except BlockingIOError:
                self.loop.add_writer(self.fd, self._flush)
                return
            except OSError:  # the reader is gone (EPIPE, EIO): drop what is left
                self.buffer.clear()
                break
            del self.buffer[:n]
        self.loop.remove_writer(self.fd)
        if self.closing:
            self.close_now()

    def close(self) -> None:
        """Close once what is buffered is written."""
        self.closing = True
        if not self.buffer:
            self.close_now()

    def close_now(self) -> None:
        """Close at once, dropping what is buffered."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_writer(self.fd)
        if self.owns_fd:
            os.close(self.fd)


@dataclass
class OutputReader:
    """One output descriptor being read: its stream's name, an incomplete character held back,
    and whether (and when) it reached its end."""

    fd: int
    stream: str
    tail: bytes = b""
    eof: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _discard(stream: str, data: bytes) -> None:
    pass


class Coalescer:
    """Output read but not yet handed on, gathered into frames (see the module's docstring)."""

    def __init__(self, on_output: OnOutput, frame_bytes: int, coalesce_s: float):
        self.on_output = on_output
        self.frame_bytes = frame_bytes
        self.coalesce_s = coalesce_s
        # Each stream's run of reads, joined only when a frame gathers several (a read handed
        # on alone is passed as it is, not copied twice).
        self._held: list[tuple[str, list[bytes]]] = []
        self._held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0

    def hold(self, stream: str, data: bytes) -> None:
        """Take a read: hand it on now after a quiet spell or once a frame is full, else soon."""
        if self._held and self._held[-1][0] == stream:
            self._held[-1][1].append(data)
        else:
            self._held.append((stream, [data]))
        self._held_bytes += len(data)
        if self._timer is not None and self._held_bytes < self.frame_bytes:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_flush >= self.coalesce_s
        if quiet or self._held_bytes >= self.frame_bytes:
            self.flush()
        else:
            self._timer = loop.call_later(self.coalesce_s, self.flush)

    def flush(self) -> None:
        """Hand on everything held, one frame per stream's run of reads."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held, self._held_bytes = self._held, [], 0
        self._last_flush = asyncio.get_running_loop().time()
        for stream, parts in held:
            self.on_output(stream, parts[0] if len(parts) == 1 else b"".join(parts))

    def detach(self) -> None:
        """Hand nothing on from now on (the run is closed)."""
        self.on_output = _discard
