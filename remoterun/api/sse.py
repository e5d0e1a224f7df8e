"""Server-Sent Events: `GET /tasks/{id}/logs`, resumable with Last-Event-ID or `?since=`.

Browsers' EventSource reconnects whenever a stream ends. So the `exit` event carries an `id:` (the
last seq), and a resumed request for a task that has ended with nothing after its seq answers 204,
which stops the browser for good instead of replaying `task` and `exit` every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from remoterun.api import METRICS, SCHEDULER, SETTINGS, identity
from remoterun.api.http import task_id_of
from remoterun.api.ws import parse_since
from remoterun.hub import Event, Item, SlowConsumer, dumps, sse_text
from remoterun.state import FINAL

routes = web.RouteTableDef()
HEARTBEAT = b": keep-alive\n\n"


@routes.get("/tasks/{id}/logs")
async def logs(request: web.Request) -> web.StreamResponse:
    """The task, its output after `since`, live output and status, then `exit`."""
    identity(request).require("viewer")
    task_id = task_id_of(request)
    resumed = request.headers.get("Last-Event-ID") or request.query.get("since")
    since = parse_since(resumed)
    scheduler = request.app[SCHEDULER]
    await scheduler.require_task(task_id)
    sub = await scheduler.subscribe(task_id, since)
    if resumed is not None and _ended_before(sub.task, since):
        sub.close()
        return web.Response(status=204, headers={"Cache-Control": "no-cache"})
    current = asyncio.current_task()
    if current is not None:
        sub.on_overflow = current.cancel
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    gauge = request.app[METRICS].clients.labels("sse")
    gauge.inc()
    try:
        await response.prepare(request)
        await response.write(f"event: task\ndata: {dumps(sub.task)}\n\n".encode())
        await _pump(response, sub.batches(), request.app[SETTINGS].heartbeat_s, since)
        await response.write_eof()
    except (SlowConsumer, asyncio.CancelledError):
        if not sub.overflowed.is_set():
            raise
        if current is not None:
            current.uncancel()
        request.app[METRICS].slow_clients.inc()
        if request.transport is not None:
            request.transport.abort()  # the client resumes with Last-Event-ID
    except ConnectionResetError:
        pass
    finally:
        sub.close()
        gauge.dec()
    return response


def _ended_before(task: dict[str, object], since: int) -> bool:
    """Whether the task has ended with no output frame after `since`."""
    last = task.get("last_seq")
    return task.get("status") in FINAL and isinstance(last, int) and last <= since


def _event_text(item: Item, last_seq: int) -> str:
    if isinstance(item, Event) and item.kind == "exit":
        return f"id: {last_seq}\n{sse_text(item)}"
    return sse_text(item)


async def _pump(response: web.StreamResponse, batches: object, heartbeat_s: float,
                since: int) -> None:
    """Write batches as they come; a comment line when idle so proxies keep the stream."""
    iterator = batches.__aiter__()  # type: ignore[attr-defined]
    following: asyncio.Future[list[Item]] | None = None
    try:
        while True:
            if following is None:
                following = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({following}, timeout=heartbeat_s)
            if not done:
                await response.write(HEARTBEAT)
                continue
            try:
                batch = following.result()
            except StopAsyncIteration:
                return
            following = None
            text = []
            for item in batch:
                since = max(since, getattr(item, "seq", since))
                text.append(_event_text(item, since))
            await response.write("".join(text).encode())
    finally:
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
