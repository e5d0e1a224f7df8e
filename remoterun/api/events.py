"""`GET /events`: every task transition the caller may see, as Server-Sent Events; and
`GET /tasks/{id}/events`, one task's transitions as JSON.

A stream first replays from the database the transitions after `since` (or `Last-Event-ID`,
which wins; without either, from the newest event now), then goes live from the scheduler's
feed. The follower is registered before the database is read, and each event carries its
`task_events` row id, so the seam neither skips nor repeats one: live events at or below the
last id replayed are dropped. Ids come from the database, so they go on across restarts, and a
client dropped for being slow (or by a restart) resumes after the last id it saw. In a cluster
the feed has a frontier (`cluster/events.py`): the replay stops there, and the feed brings
every event above it, in id order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

from aiohttp import web

from remoterun.api import DB, METRICS, SCHEDULER, SETTINGS, identity, json_response
from remoterun.api.http import task_id_of
from remoterun.api.ws import parse_since
from remoterun.auth import Identity
from remoterun.engine.feed import Dropped, Follower, TaskChange, event_json, stored_change
from remoterun.errors import Forbidden, NotFound
from remoterun.store import Store
from remoterun.wire import dumps

routes = web.RouteTableDef()
REPLAY_BATCH = 500
HEARTBEAT = b": keep-alive\n\n"


def setup(app: web.Application) -> None:
    """Add the routes, and end every `/events` stream when the server shuts down (after the
    drain, whose last transitions they still deliver)."""
    app.router.add_routes(routes)
    app.on_shutdown.append(_close_feed)


async def _close_feed(app: web.Application) -> None:
    app[SCHEDULER].feed.close()


def sees(who: Identity) -> Callable[[str], bool]:
    """Whether the caller may see tasks of a script: its token's `scripts` (names or glob
    patterns) when it has a list, whatever its role (an admin's too); else every script."""
    if who.scripts is None:
        return lambda script: True
    return who.allows


def _sse(change: TaskChange) -> bytes:
    """The change as one SSE event, encoded once for every follower."""
    if change.encoded is None:
        body = dumps({**change.task, "event": change.event})
        change.encoded = f"id: {change.event_id}\nevent: task\ndata: {body}\n\n".encode()
    return change.encoded


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Transitions after `since`, then live ones, until the client leaves or the server stops."""
    who = identity(request)
    who.require("viewer")
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    db = request.app[DB]
    feed = request.app[SCHEDULER].feed
    if raw not in (None, ""):
        since = parse_since(raw)
    elif feed.frontier is not None:
        since = feed.frontier
    else:
        since = await db.last_event_id()
    follower = feed.follow()  # before the replay reads: what commits meanwhile is queued
    upto = feed.frontier  # with the follow (no await between): the feed brings what is above
    follower.on_drop = functools.partial(_cut, request)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    gauge = request.app[METRICS].clients.labels("events")
    gauge.inc()
    try:
        await response.prepare(request)
        visible = sees(who)
        last = await _replay(response, db, since, visible, upto)
        ready = dumps({"last_event_id": last})
        await response.write(f"id: {last}\nevent: ready\ndata: {ready}\n\n".encode())
        settings = request.app[SETTINGS]
        await _live(response, follower, last, visible, settings.heartbeat_s,
                    settings.stream_max_s)
        await response.write_eof()
    except (Dropped, ConnectionResetError):
        pass  # cut by _cut, or the client left
    finally:
        feed.leave(follower)
        gauge.dec()
    return response


def _cut(request: web.Request) -> None:
    """Drop a follower that fell behind: close its connection now (it resumes with
    Last-Event-ID), even while a write to it waits for a client that stopped reading."""
    request.app[METRICS].slow_clients.inc()
    if request.transport is not None:
        request.transport.abort()


async def _replay(response: web.StreamResponse, db: Store, since: int,
                  visible: Callable[[str], bool], upto: int | None) -> int:
    """Write every stored transition after `since` (up to the feed's frontier `upto`: above
    it ids are not final yet, and the feed brings them); the id to resume after."""
    last = since
    while upto is None or last < upto:
        rows = await db.events_after(last, REPLAY_BATCH, upto)
        if rows:
            last = int(rows[-1]["event_id"])
            body = b"".join(_sse(stored_change(row)) for row in rows if visible(row["script"]))
            if body:
                await response.write(body)
        if len(rows) < REPLAY_BATCH:
            break
    return last if upto is None else max(last, upto)


async def _live(response: web.StreamResponse, follower: Follower, last: int,
                visible: Callable[[str], bool], heartbeat_s: float, max_s: float) -> None:
    """Write the feed's changes as they come, a comment line when idle; return when the feed
    ends or the stream has lasted `max_s` (the client resumes after the last id it saw)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + max_s
    while (left := end - loop.time()) > 0:
        batch: list[TaskChange] | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(heartbeat_s, left)):
                batch = await follower.take()
        if batch is None:
            if end - loop.time() > 0:
                await response.write(HEARTBEAT)
            continue
        if not batch:
            return  # the feed closed: the server is shutting down
        body = b"".join(_sse(change) for change in batch
                        if change.event_id > last and visible(change.task["script"]))
        last = max(last, batch[-1].event_id)
        if body:
            await response.write(body)


@routes.get("/tasks/{id}/events")
async def task_events(request: web.Request) -> web.Response:
    """One task's transitions, oldest first: `{"events": [{id, ts, old_status, new_status,
    attempt, detail, exit_code}]}` (exit_code: of the attempt the transition ended)."""
    who = identity(request)
    who.require("viewer")
    task_id = task_id_of(request)
    db = request.app[DB]
    row = await db.get_task(task_id)
    if row is None:
        raise NotFound(f"no task {task_id!r}")
    if not sees(who)(row["script"]):
        raise Forbidden(f"token {who.name!r} may not see tasks of {row['script']!r}")
    return json_response({"events": [event_json(e) for e in await db.events(task_id)]})
