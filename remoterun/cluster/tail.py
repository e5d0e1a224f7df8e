"""Every node's task transitions, read from PostgreSQL in commit order, for `GET /events` here.

Event ids are given at COMMIT, under one lock held until the commit is visible (the trigger
`rr_number_event`, store.postgres), so ids become visible in id order: whoever has read id N
has read every event that will ever have an id at or below N. The tail keeps one cursor and
reads after it whenever a NOTIFY on `rr_events` says a transition was committed (anywhere),
and at least every POLL_S (a NOTIFY sent while the listener reconnects is lost), handing each
change to this node's feed, this node's own commits included. While no client follows here
it reads only the newest id, at most every POLL_S. While PostgreSQL cannot be reached the
reads fail and the tail tries again after the same cursor: once it is back, followers get
what was committed meanwhile, in order, with no gap and no repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from remoterun.feed import TaskFeed, stored_change
from remoterun.store import postgres as pg

log = structlog.get_logger(__name__)
POLL_S = 1.0  # the tail reads at least this often (a NOTIFY may be lost)
GATHER_S = 0.005  # after a NOTIFY, wait this long so one read takes a burst of commits
RETRY_S = 0.5  # PostgreSQL away: try again after this long
BATCH = 500  # events per read


class CommittedFeed(TaskFeed):
    """A node's feed in a cluster: it delivers what the tail reads, not what this node
    publishes as it commits (the tail brings those too, numbered in commit order)."""

    def publish(self, event_id: int | None, row: dict[str, Any], old_status: str | None,
                fields: dict[str, Any] | None = None) -> None:
        """Nothing: on PostgreSQL a commit does not know its event id (it is given at COMMIT;
        the id a commit returns is another row's), the tail reads it back."""


class EventTail:
    """Reads every committed transition of the cluster after a cursor, into a feed."""

    def __init__(self, db: pg.PostgresDatabase, feed: TaskFeed):
        self.db = db
        self.feed = feed
        self.cursor = 0  # the id of the last event read
        self._wake = asyncio.Event()
        self._failing = False
        self._idle_read = -POLL_S  # time.monotonic() of the last read without followers

    async def start(self) -> None:
        """Start from the newest event (before the node serves: no follower is older)."""
        self.cursor = await self.db.last_event_id()

    def notified(self) -> None:
        """A transition was committed somewhere: read soon (never blocks)."""
        self._wake.set()

    async def run(self) -> None:
        """Read after the cursor whenever woken (or every POLL_S), until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception as exc:  # PostgreSQL away, or busy: the cursor stays put
                if not self._failing:
                    log.warning("event_tail_failed", error=str(exc) or type(exc).__name__)
                self._failing = True
                await asyncio.sleep(RETRY_S)
                continue
            if self._failing:
                log.info("event_tail_resumed", cursor=self.cursor)
                self._failing = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()
            await asyncio.sleep(GATHER_S)

    async def catch_up(self) -> None:
        """Deliver every event committed after the cursor, and move it to the last one."""
        while True:
            if not self.feed.followers:
                if time.monotonic() - self._idle_read < POLL_S:
                    return  # nobody to tell: a follower that comes replays past the cursor
                self._idle_read = time.monotonic()
                newest = await self.db.last_event_id()
                # Looked at after the read: a follower that came before it replays from the
                # database past `newest` (ids are visible in order), so skipping is safe;
                # one that came during the read is served from the old cursor below.
                if not self.feed.followers:
                    self.cursor = max(self.cursor, newest)
                    return
            rows = await self.db.events_after(self.cursor, BATCH)
            for row in rows:
                self.feed.deliver(stored_change(row))
            if rows:
                self.cursor = int(rows[-1]["event_id"])
            if len(rows) < BATCH:
                return
