"""`GET /events` on a cluster node: every node's transitions, in id order, each once.

An event's id comes from a plain sequence when its row is inserted, so with several nodes
committing side by side id 101 may be visible while 100 is still in flight; a client that saw
101 and resumes after it would never get 100. Nothing is added to the commits to prevent it.
Instead each node's tail delivers ids only up to a *frontier*, below which every id is final
(committed, or never will be): it reads `rr_event_frontier()`, the highest id drawn so far and,
after it, a transaction id of its own (`xmax`). A writer's transaction has its id before it
draws an event id (the store's first round trip asks `txid_current()`), so every transaction
that may still commit an id up to `drawn` has an id below `xmax`; once the oldest transaction
still running is at or past that `xmax`, all of them have ended and `drawn` is the new
frontier. The
tail then reads the rows up to it, in id order, and hands them to the node's feed; a new
client replays from the database up to the frontier and takes the feed from there. See
docs/cluster.md, "GET /events".

Wake-ups: a node's own commit wakes its tail and, through Redis (`rr:events`, one message per
burst), every other node's; the tail also reads the frontier every `POLL_S` while a client
follows or a mark waits (every `IDLE_POLL_S` otherwise), so a lost message costs latency only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from redis.exceptions import RedisError

from remoterun.cluster.relay import Relay
from remoterun.engine.feed import TaskFeed, stored_change
from remoterun.errors import Unavailable
from remoterun.store import postgres as pg

log = structlog.get_logger(__name__)
EVENTS_CHANNEL = "rr:events"  # Redis: "a node committed transitions", to wake the others
POLL_S = 0.2  # the frontier is read at least this often while a client follows
IDLE_POLL_S = 1.0  # and this often while none does (only the frontier moves then)
RETRY_S = 0.5  # PostgreSQL or Redis away: try again after this long
BATCH = 500  # events per read
EVENTS_FAILED = "events_tail_failed"  # log events (`part`: which loop)
EVENTS_RESUMED = "events_tail_resumed"
EXPECTED = (RedisError, OSError, Unavailable, *pg.CONNECTION_ERRORS)  # an engine away
MARKS = 64  # unresolved marks kept; beyond, the oldest is dropped (the next covers its ids)


class ClusterFeed(TaskFeed):
    """A node's feed in a cluster: it delivers what the tail reads back in id order, never
    what this node publishes as it commits (its id may lie above one still in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.frontier: int = 0  # moved by the tail (its start finds the first)
        self.on_commit: Callable[[], None] = lambda: None

    def publish(self, event_id: int | None, row: dict[str, Any], old_status: str | None,
                fields: dict[str, Any] | None = None) -> None:
        """A transition committed here: wake the tails (this node's and the others')."""
        self.on_commit()


class EventTail:
    """Moves a feed's frontier and delivers every event below it, in id order."""

    def __init__(self, db: pg.PostgresDatabase, feed: ClusterFeed, relay: Relay):
        self.db, self.feed, self.relay = db, feed, relay
        self._marks: deque[tuple[int, int]] = deque()  # (drawn, xmax) not yet final
        self._wake = asyncio.Event()
        self._announce = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()
        feed.on_commit = self.committed

    def committed(self) -> None:
        """This node committed a transition: read soon, and tell the other nodes."""
        self._wake.set()
        self._announce.set()

    async def start(self) -> None:
        """Find the first frontier (before the node serves: no client replays past it), then
        tail on loops of its own."""
        while not await self._step():  # a transaction in flight: wait for it to end
            await self._nap(POLL_S / 4)
        self._loops = [self._spawn(self._tail_loop(), "events-tail"),
                       self._spawn(self._listen_loop(), "events-listen"),
                       self._spawn(self._announce_loop(), "events-announce")]

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=name)

    async def close(self) -> None:
        """Stop the loops."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def _step(self) -> bool:
        """Read the frontier and deliver what became final; whether no mark waits."""
        drawn, xmax, xmin = await self.db.event_frontier()
        self._mark(drawn, xmax)
        safe = self.feed.frontier
        while self._marks and self._marks[0][1] <= xmin:
            safe = max(safe, self._marks.popleft()[0])
        await self._deliver(safe)
        return not self._marks

    def _mark(self, drawn: int, xmax: int) -> None:
        if self._marks and self._marks[-1][1] == xmax:
            self._marks.pop()  # the same transactions to wait for: the newer drawn covers it
        self._marks.append((drawn, xmax))
        if len(self._marks) > MARKS:  # the next mark covers its ids (drawn only grows), later
            self._marks.popleft()

    async def _deliver(self, safe: int) -> None:
        """Hand the feed every event above its frontier up to `safe`, moving the frontier
        with each batch (no await between: a client that comes meanwhile replays up to it)."""
        while self.feed.frontier < safe:
            if not self.feed.followers:
                self.feed.frontier = safe  # nobody to tell: a client that comes replays
                return
            rows = await self.db.events_after(self.feed.frontier, BATCH, safe)
            for row in rows:
                self.feed.deliver(stored_change(row))
            self.feed.frontier = int(rows[-1]["event_id"]) if len(rows) == BATCH else safe

    async def _tail_loop(self) -> None:
        while True:
            self._wake.clear()
            ok = await self._guarded("events_tail", self._step())
            busy = self.feed.followers or self._marks or not ok
            await self._nap(POLL_S if busy else IDLE_POLL_S)

    async def _nap(self, most_s: float) -> None:
        """Wait for a wake-up, at most `most_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(most_s):
                await self._wake.wait()

    async def _listen_loop(self) -> None:
        while True:
            await self._guarded("events_listen", self._listen())
            await asyncio.sleep(RETRY_S)

    async def _listen(self) -> None:
        async with self.relay.redis.pubsub() as pubsub:
            await pubsub.subscribe(EVENTS_CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._wake.set()

    async def _announce_loop(self) -> None:
        while True:
            await self._announce.wait()
            self._announce.clear()  # one message for a burst of commits
            if not await self._guarded("events_announce", self._tell()):
                await asyncio.sleep(RETRY_S)

    async def _tell(self) -> None:
        await self.relay.redis.publish(EVENTS_CHANNEL, b"")

    async def _guarded(self, kind: str, step: Coroutine[Any, Any, Any]) -> bool:
        """Run a step of a loop; log its failure once (until it succeeds again)."""
        try:
            await step
        except Exception as exc:  # a loop's boundary: PostgreSQL or Redis away, or a bug
            if kind not in self._failing:
                log.warning(EVENTS_FAILED, part=kind, error=str(exc) or type(exc).__name__,
                            exc_info=not isinstance(exc, EXPECTED))
            self._failing.add(kind)
            return False
        if kind in self._failing:
            log.info(EVENTS_RESUMED, part=kind, frontier=self.feed.frontier)
            self._failing.discard(kind)
        return True
