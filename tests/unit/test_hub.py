"""One task's fan-out: numbering, the memory window, replay from `since` and live items."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import a_task

from remoterun.engine.hub import TaskHub
from remoterun.wire import Event, Frame


def hub(memory_bytes: int = 1 << 20) -> TaskHub:
    """A hub for a task with no archive read (replays come from memory)."""
    return TaskHub(a_task(), memory_bytes=memory_bytes)


async def collect(sub, until_exit: bool = True) -> list[int | str]:
    """Seqs of frames (and 'exit') from a subscription's batches until its exit event."""
    seen: list[int | str] = []
    async with asyncio.timeout(5):
        async for batch in sub.batches():
            seen += [i.seq if isinstance(i, Frame) else i.kind for i in batch]
    return seen


def test_frames_are_numbered_from_one_and_the_window_is_bounded():
    """Seqs go 1, 2, 3...; the window keeps at most memory_bytes (and always the last frame)."""
    h = hub(memory_bytes=10)
    frames = [h.frame("stdout", b"12345", 0.0) for _ in range(4)]
    assert [f.seq for f in frames] == [1, 2, 3, 4]
    for f in frames:
        h.publish(f)
    assert [f.seq for f in h.window] == [3, 4] and h.window_bytes == 10


async def test_subscribe_replays_the_window_after_since_then_live_until_exit(tmp_path: Path):
    """since=1: frames 2..3 from memory, then live 4, then exit; nothing twice, no gap."""
    h = hub()
    for _ in range(3):
        h.publish(h.frame("stdout", b"x", 0.0))
    sub = h.subscribe(1, tmp_path, 1 << 20)
    h.publish(h.frame("stderr", b"y", 0.0))
    h.publish(Event("exit", {"status": "success"}))
    assert await collect(sub) == [2, 3, 4, "exit"]


async def test_live_frames_honour_a_since_beyond_the_current_seq(tmp_path: Path):
    """Attached with since=5 to a task at seq 2, a client gets 6, 7 (not 3, 4, 5): `since`
    filters live frames, not only the snapshot (issue 25: it got 3, 4, ...)."""
    h = hub()
    for _ in range(2):
        h.publish(h.frame("stdout", b"x", 0.0))
    sub = h.subscribe(5, tmp_path, 1 << 20)
    for _ in range(5):
        h.publish(h.frame("stdout", b"x", 0.0))
    h.publish(Event("exit", {"status": "success"}))
    assert await collect(sub) == [6, 7, "exit"]


def test_a_slow_subscriber_overflows_alone(tmp_path: Path):
    """Past its byte bound a subscriber is marked overflowed and its queue freed; the hub
    and the other subscriber go on."""
    h = hub()
    slow, other = h.subscribe(0, tmp_path, 200), h.subscribe(0, tmp_path, 1 << 20)
    called: list[bool] = []
    slow.on_overflow = lambda: called.append(True)
    for _ in range(5):
        h.publish(h.frame("stdout", b"z" * 100, 0.0))
    assert slow.overflowed.is_set() and not slow.queue and called == [True]
    assert not other.overflowed.is_set() and len(other.queue) == 5
