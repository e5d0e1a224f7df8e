"""`GET /audit`: the audit trail, admin only, newest first, filtered and paged; and the bound
on how many `denied` rows a flood of refusals may write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from remoterun.api import DB, DENIALS, SCHEDULER, identity, json_response
from remoterun.errors import BadRequest
from remoterun.store import audit_json, insert_audit
from remoterun.wire import rfc3339

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()
ACTIONS = ("submit", "cancel", "signal", "stdin", "attach", "download", "login", "logout",
           "denied", "hook", "hook_denied",
           # schedules (issue 29)
           "schedule_create", "schedule_update", "schedule_delete", "schedule_pause",
           "schedule_resume", "schedule_run")


def _since(raw: str | None, problems: list[dict[str, str]]) -> float | None:
    """An RFC 3339 time (or epoch seconds) as epoch seconds."""
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        problems.append({"field": "since", "message": "an RFC 3339 time"})
        return None
    if when.tzinfo is None:
        problems.append({"field": "since", "message": "an RFC 3339 time with Z or an offset"})
        return None
    return when.timestamp()


def _int(raw: str, low: int, high: int, name: str, problems: list[dict[str, str]]) -> int:
    value = int(raw) if raw.isdigit() and len(raw) <= 19 else low - 1
    if not low <= value <= high:
        problems.append({"field": name, "message": f"an integer from {low} to {high}"})
    return value


@routes.get("/audit")
async def get_audit(request: web.Request) -> web.Response:
    """Audit events, newest first: `{"events": [...], "next_cursor"}`; an admin token with a
    script list sees those scripts' rows and its own."""
    who = identity(request)
    who.require("admin")
    query = request.query
    problems: list[dict[str, str]] = []
    action = query.get("action") or None
    if action is not None and action not in ACTIONS:
        problems.append({"field": "action", "message": f"one of {list(ACTIONS)}"})
    limit = _int(query.get("limit", "50"), 1, 500, "limit", problems)
    cursor = _int(query["cursor"], 1, 2**62, "cursor", problems) if query.get("cursor") \
        else None
    since = _since(query.get("since"), problems)
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    rows = await request.app[DB].list_audit(
        actor=query.get("actor") or None, action=action, task_id=query.get("task") or None,
        since=since, limit=limit + 1, before=cursor, scripts=who.scripts, caller=who.name)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"events": [audit_json(r) for r in rows],
                          "next_cursor": str(rows[-1]["id"]) if more else None})


@dataclass
class _Source:
    """One address and reason's refusals: when its last row was written, how many since."""

    written_at: float
    left_out: int = 0
    first_left_out: float = 0.0  # wall-clock time of the first refusal left out


class Denials:
    """Which refusals get a `denied` row of their own: at most one per address and reason per
    `interval_s`; the others are counted, and `due()` turns each count into one summary row.

    Refusals happen before any credential is checked, so without this bound anyone who can
    reach the port writes rows as fast as they can send requests (issue 26: 5,517 rows, 55 MB,
    in 10 s). At most `max_sources` are tracked; past that, new addresses share one source,
    `*`, so that a flood from many addresses is bounded too.
    """

    def __init__(self, interval_s: float = 1.0, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._max = max_sources
        self._clock = clock
        self._sources: dict[tuple[str, str], _Source] = {}

    def admit(self, address: str, reason: str) -> bool:
        """Whether this refusal gets a row of its own (else it is counted for a summary)."""
        now = self._clock()
        key = (address, reason)
        if key not in self._sources and len(self._sources) >= self._max:
            key = ("*", reason)
        source = self._sources.get(key)
        if source is None:
            self._sources[key] = _Source(now)
            return True
        if now - source.written_at >= self.interval_s and not source.left_out:
            source.written_at = now
            return True
        if not source.left_out:
            source.first_left_out = time.time()
        source.left_out += 1
        return False

    def due(self, flush: bool = False) -> list[dict[str, Any]]:
        """Summary audit entries for the sources whose interval has passed (all with `flush`),
        forgetting the sources that have gone quiet."""
        now = self._clock()
        entries = []
        for (address, reason), source in list(self._sources.items()):
            if not flush and now - source.written_at < self.interval_s:
                continue
            if not source.left_out:
                del self._sources[(address, reason)]
                continue
            entries.append({
                "ts": time.time(), "actor": "-", "role": None, "address": address,
                "action": "denied", "result": reason,
                "detail": f"summary: {source.left_out} more refused ({reason}) from {address} "
                          f"since {rfc3339(source.first_left_out)}, not recorded one by one"})
            source.written_at, source.left_out = now, 0
        return entries


async def denial_summaries(app: web.Application) -> AsyncIterator[None]:
    """Write the summaries of refusals left out, each interval, and once more at shutdown
    (a cleanup context after the scheduler's: it closes first)."""
    denials = app[DENIALS]

    async def write(flush: bool = False) -> None:
        entries = denials.due(flush)
        if entries:
            await app[SCHEDULER].record([insert_audit(e) for e in entries])

    async def loop() -> None:
        while True:
            await asyncio.sleep(denials.interval_s)
            try:
                await write()
            except Exception:  # the next interval tries again; the counts are kept
                log.exception("audit_write_failed", action="denied")

    task = asyncio.create_task(loop(), name="denial-summaries")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await write(flush=True)
        except Exception:
            log.exception("audit_write_failed", action="denied")
