"""The engine's commits: in order behind one lock, waiting out a busy or unreachable database.

The engine's own writes (a task's end, progress) queue in order and retry until the database
is back (until shutdown), so nothing is recorded that did not happen and nothing that happened
is lost; while they wait, `problems["database"]` says why (for /readyz). A request's write
(`request`) waits at most its `within_s`, then Unavailable: in order behind the engine's on
one server, side by side on a cluster node (`Peers.commit_request`: other nodes write
too, so this node's order tells nothing).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from remoterun import store
from remoterun.engine.peers import Peers
from remoterun.errors import Unavailable

log = structlog.get_logger(__name__)
REQUEST_DB_WAIT_S = 2.0  # at most this long a request waits for a busy database, then 503


class Once:
    """Failures logged once each (per kind and task) until forgotten."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def warn(self, kind: str, task_id: str = "", **data: Any) -> None:
        """Log `kind` for the task (or the server) unless it was logged already."""
        if (kind, task_id) not in self._seen:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen.add((kind, task_id))
            log.warning(kind, task_id=task_id or None, **data)

    def forget(self, kind: str, task_id: str = "") -> None:
        """It went well again: log the next failure."""
        self._seen.discard((kind, task_id))


class Writes:
    """Commits of one engine: the order, the retries and what they report."""

    def __init__(self, db: store.Store, peers: Peers, retry_s: float,
                 problems: dict[str, str], once: Once):
        self.db = db
        self.peers = peers
        self.retry_s = retry_s  # one try of an engine write waits this long (engine.db_retry_s)
        self.problems = problems
        self.once = once
        self.lock = asyncio.Lock()
        self.closing = False  # set at close: the engine's writes stop waiting

    @property
    def request_wait_s(self) -> float:
        """How long a request's write waits for a busy database before its 503."""
        return min(self.retry_s, REQUEST_DB_WAIT_S)

    async def engine(self, statements: list[store.Statement]) -> int | None:
        """Commit in order behind every earlier commit, until it lands (or shutdown)."""
        statements = self.peers.stamp(statements)
        async with self.lock:
            unsure = None  # a try whose outcome is unknown: looked up before the next
            while True:
                try:
                    rowid = await self.db.commit(statements, self.retry_s, unsure)
                    self.problems.pop("database", None)
                    return rowid
                except store.DatabaseUnavailable as exc:
                    unsure = exc.unsure
                    self.problems["database"] = str(exc)
                    self.once.warn("database_unavailable", error=str(exc))
                    if self.closing:
                        raise

    async def request(self, statements: list[store.Statement], within_s: float
                      ) -> int | None:
        """A request's write; Unavailable once the database stayed away past `within_s`."""
        try:
            if not self.peers.requests_in_order:
                return await self.peers.commit_request(statements, within_s)
            async with asyncio.timeout(within_s), self.lock:
                return await self.db.commit(statements, within_s)
        except (TimeoutError, store.DatabaseUnavailable) as exc:
            raise Unavailable("the database is busy or cannot be written; try again",
                              code="database_unavailable", retry_after_s=1.0) from exc
