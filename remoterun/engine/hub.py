"""Per-task fan-out: numbered frames to any number of subscribers, replay by seq, bounded queues.

Publishing never awaits: each subscriber has its own queue, bounded in bytes; a subscriber that
falls behind is marked overflowed (its client is closed and may resume with `since`), so one slow
client never slows the process or the others. Replay for `since=K` takes frames older than the
in-memory window from the archive, then the window, then live frames; the window and the live
registration are taken in one synchronous step, so there is no gap and no repeat at the seam.
The archive is written on a thread, so replay first waits for the flush of what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoterun.archive import aread_frames, tail
from remoterun.state import Task
from remoterun.wire import Event, Frame, Item, exit_event, item_size


class SlowConsumer(Exception):
    """The subscriber's queue overflowed; its client must be closed and may resume later."""


@dataclass(eq=False)
class Subscription:
    """One client's view of a task: archive replay, then the memory window, then live items."""

    task: dict[str, Any]
    since: int
    archive_root: Path
    limit_bytes: int
    archive_until: int | None = None  # replay (since, archive_until] from disk first; None: all
    from_archive: bool = True
    snapshot: list[Item] = field(default_factory=list)
    queue: deque[Item] = field(default_factory=deque)
    queued_bytes: int = 0
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    hub: TaskHub | None = None
    on_overflow: Callable[[], object] | None = None
    # Server-wide: at most this many subscriptions read the archive at once, each holding its
    # slot until its archive part is sent, so readers (and their inflaters) stay bounded
    # however many clients replay; the others wait for a slot holding nothing.
    slots: asyncio.Semaphore | None = None
    tail: int | None = None  # start at the frames holding the last `tail` lines (?tail=N)

    def push(self, item: Item) -> None:
        """Queue a live item (called by the hub; never blocks); frames at or before `since`
        are not the client's (it attached asking for what comes after)."""
        if self.overflowed.is_set() or (isinstance(item, Frame) and item.seq <= self.since):
            return
        self.queue.append(item)
        self.queued_bytes += item_size(item)
        if self.queued_bytes > self.limit_bytes:
            self.overflowed.set()
            self.queue.clear()
            if self.on_overflow is not None:
                self.on_overflow()
        self.wake.set()

    async def batches(self) -> AsyncIterator[list[Item]]:
        """Every item after `since`, in order, in batches; ends after the exit event."""
        if self.tail is not None:
            await self._skip_to_tail(self.tail)
        if self.from_archive and (self.archive_until is None or self.archive_until > self.since):
            async with self.slots or contextlib.nullcontext():
                flushed = self.hub.flush_archive() if self.hub is not None else None
                if flushed is not None:
                    await asyncio.wrap_future(flushed)  # the frames up to archive_until: on disk
                logs_path = self.task["logs_path"]
                async with contextlib.aclosing(aread_frames(
                        self.archive_root, logs_path, self.since, self.archive_until)) as read:
                    async for frames in read:
                        yield list[Item](frames)
        if self.snapshot:
            batch, self.snapshot = self.snapshot, []
            yield batch
            if isinstance(batch[-1], Event) and batch[-1].final:
                return
        while True:
            if self.overflowed.is_set():
                raise SlowConsumer
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list[Item](self.queue)
            self.queue.clear()
            self.queued_bytes = 0
            yield batch
            if isinstance(batch[-1], Event) and batch[-1].final:
                return

    async def _skip_to_tail(self, lines: int) -> None:
        """Move `since` up to the frames that hold the last `lines` lines: the memory window's
        newest frames first, then the archive's, read backwards off the event loop."""
        count = tail.TailCount(lines)
        window = [tail.frame_lines(i.seq, i.data) for i in self.snapshot if isinstance(i, Frame)]
        if not count.feed_all(reversed(window)) and self.from_archive:
            async with self.slots or contextlib.nullcontext():
                flushed = self.hub.flush_archive() if self.hub is not None else None
                if flushed is not None:
                    await asyncio.wrap_future(flushed)
                await asyncio.to_thread(tail.count_archive, self.archive_root,
                                        self.task["logs_path"], count, self.archive_until)
        self.since = max(self.since, count.since or 0)
        self.snapshot = [i for i in self.snapshot
                         if not isinstance(i, Frame) or i.seq > self.since]

    def close(self) -> None:
        """Stop receiving live items."""
        if self.hub is not None:
            self.hub.subscribers.discard(self)


class TaskHub:
    """Fan-out for one task that has not finished: numbering, memory window, subscribers."""

    def __init__(self, task: Task, *, memory_bytes: int, next_seq: int = 1,
                 flush_archive: Callable[[], Future[None] | None] = lambda: None):
        self.task = task  # as its scheduler last published it (replaced, never changed)
        self.memory_bytes = memory_bytes
        self.next_seq = next_seq
        self.flush_archive = flush_archive  # starts a flush; its future: done once on disk
        self.window: deque[Frame] = deque()
        self.window_bytes = 0
        self.subscribers: set[Subscription] = set()
        self.finished = False

    def frame(self, stream: str, data: bytes, ts: float) -> Frame:
        """Number a chunk of output as the task's next frame."""
        frame = Frame(self.next_seq, stream, ts, data)
        self.next_seq += 1
        return frame

    def publish(self, item: Item) -> None:
        """Keep a frame in the window and hand the item to every subscriber."""
        if isinstance(item, Frame):
            self.window.append(item)
            self.window_bytes += len(item.data)
            while self.window_bytes > self.memory_bytes and len(self.window) > 1:
                self.window_bytes -= len(self.window.popleft().data)
        elif item.kind == "exit":
            self.finished = True
        for sub in list(self.subscribers):
            sub.push(item)
        if self.finished:
            self.subscribers.clear()

    def subscribe(self, since: int, archive_root: Path, limit_bytes: int,
                  slots: asyncio.Semaphore | None = None) -> Subscription:
        """A subscription for every frame after `since`; taken atomically with the window."""
        first_in_memory = self.window[0].seq if self.window else self.next_seq
        sub = Subscription(task=self.task.to_json(), since=since, archive_root=archive_root,
                           limit_bytes=limit_bytes, hub=self, slots=slots)
        sub.from_archive = since + 1 < first_in_memory
        sub.archive_until = first_in_memory - 1
        snapshot: list[Item] = [f for f in self.window if f.seq > since]
        sub.snapshot = snapshot
        self.subscribers.add(sub)
        return sub


def replay_finished(row: dict[str, Any], task: dict[str, Any], since: int, archive_root: Path,
                    limit_bytes: int, slots: asyncio.Semaphore | None = None) -> Subscription:
    """A subscription to a task that has ended: its archive, then its exit event."""
    sub = Subscription(task=task, since=since, archive_root=archive_root,
                       limit_bytes=limit_bytes, slots=slots)
    sub.snapshot = [exit_event(row)]
    return sub
