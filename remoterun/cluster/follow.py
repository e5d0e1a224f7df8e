"""Following a task that runs on any node: its Redis stream, the archive for what it lacks.

A client's subscription reads the task's stream after id `<since>-0` (XREAD BLOCK). Frames
arrive in seq order; a frame above the next expected seq means the stream no longer holds what
lies between (trimmed to the memory window, or Redis restarted), and those frames are read from
the shared archive first: once on disk (the owner flushes every `flush_interval_s`, then records
`last_seq`), or known never to exist (seqs reserved by an attempt that ended, or that a lost
node had not flushed). So the text is seq-exact with no gap and no repeat at the boundary
between replay and live output. When the stream stays quiet the database says whether the task
ended (its owner may be gone) and how far the archive reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from remoterun.archive import aread_frames
from remoterun.cluster.relay import Relay, decode_entry
from remoterun.engine.attempt import Progress
from remoterun.engine.hub import Subscription
from remoterun.errors import Unavailable
from remoterun.state import FINAL, Task
from remoterun.wire import Event, Frame, Item, exit_event

BLOCK_MS = 1000  # a quiet stream's wait before the database is asked how the task is
GAP_WAIT_S = 15.0  # at most this long for missing frames to reach the archive


@dataclass(eq=False)
class RemoteSubscription(Subscription):
    """A subscription fed by the task's Redis stream (whichever node runs it) and the archive."""

    relay: Relay | None = None
    get_task: Callable[[str], Any] | None = None  # the database's get_task
    poll_s: float = 0.2  # how often to look again for frames not yet in the archive
    on_status: Callable[[dict[str, Any]], None] = lambda body: None
    on_close: Callable[[], None] = lambda: None
    _next: int = 0
    _closed: bool = field(default=False)

    async def batches(self) -> AsyncIterator[list[Item]]:
        """Every item after `since`, in order, in batches; ends after the exit event."""
        assert self.relay is not None and self.get_task is not None
        task_id = self.task["id"]
        self._next = self.since + 1
        after = f"{self.since}-0"
        while True:
            try:
                entries = await self.relay.read(task_id, after, BLOCK_MS)
            except Unavailable:  # Redis away: follow through the archive meanwhile
                await asyncio.sleep(BLOCK_MS / 2000)
                entries = []
            if not entries:
                row = await self.get_task(task_id)
                if row is None:
                    return
                async for batch in self._archive(row["last_seq"], row):
                    yield batch
                if row["status"] in FINAL:
                    yield [exit_event(row)]
                    return
                continue
            for entry_id, fields in entries:
                after = entry_id.decode()
                out: list[Item] = []
                for item in decode_entry(fields):
                    if isinstance(item, Frame):
                        if item.seq < self._next:
                            continue
                        if item.seq > self._next:
                            if out:
                                yield out
                                out = []
                            async for batch in self._archive(item.seq - 1, None):
                                yield batch
                        out.append(item)
                        self._next = item.seq + 1
                        continue
                    out.append(item)
                    if isinstance(item, Event) and item.kind == "status":
                        self.on_status(item.body)
                    if isinstance(item, Event) and item.final:
                        yield out
                        return
                if out:
                    yield out

    async def _archive(self, upto: int, row: dict[str, Any] | None
                       ) -> AsyncIterator[list[Item]]:
        """Frames from `self._next` to `upto` from the archive, waiting for those the owner
        has not flushed yet; those the database says are flushed (or the task ended) and the
        archive lacks never existed, and are skipped."""
        assert self.get_task is not None
        deadline = time.monotonic() + GAP_WAIT_S
        while self._next <= upto:
            settled = row is not None and (row["last_seq"] >= upto or row["status"] in FINAL)
            async with self.slots or contextlib.nullcontext(), contextlib.aclosing(  # type: ignore[type-var]
                    aread_frames(self.archive_root, self.task["logs_path"], self._next - 1,
                                 upto)) as read:
                async for frames in read:
                    self._next = frames[-1].seq + 1
                    yield list[Item](frames)
            if self._next > upto or settled or time.monotonic() > deadline:
                self._next = max(self._next, upto + 1)
                return
            await asyncio.sleep(self.poll_s)
            row = await self.get_task(self.task["id"])
            if row is None:
                return

    def close(self) -> None:
        """Stop following."""
        if not self._closed:
            self._closed = True
            self.on_close()


@dataclass(eq=False)
class RemoteControl:
    """The controls of an attempt that another node runs, as `Attempt.control` takes them."""

    row: dict[str, Any]
    send: Callable[[str, str, tuple[Any, ...]], None]

    @property
    def task(self) -> Task:
        """The task as last known here (its row, with the statuses its stream announced)."""
        return Task.from_row(self.row)

    @property
    def progress(self) -> Progress:
        """How far the attempt had got when its row was last read."""
        return Progress(self.row["output_bytes"], self.row["last_seq"], self.row["pid"])

    def control(self, method: str, *args: Any) -> None:
        """Send the control to the node that runs the task (through Redis)."""
        self.send(self.row["id"], method, args)
