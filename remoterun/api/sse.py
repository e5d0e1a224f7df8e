"""Server-Sent Events: `GET /tasks/{id}/logs`, resumable with Last-Event-ID or `?since=`."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from remoterun.api import METRICS, SCHEDULER, SETTINGS
from remoterun.api.guard import record
from remoterun.api.http import task_row
from remoterun.api.ws import parse_since
from remoterun.hub import SlowConsumer, Subscription
from remoterun.wire import Item, dumps, sse_text

routes = web.RouteTableDef()
HEARTBEAT = b": keep-alive\n\n"


@routes.get("/tasks/{id}/logs")
async def logs(request: web.Request) -> web.StreamResponse:
    """The task, its output after `since`, live output and status, then `exit`."""
    row = await task_row(request)  # 404, or 403 outside the token's script list
    task_id = row["id"]
    since = parse_since(request.headers.get("Last-Event-ID") or request.query.get("since"))
    scheduler = request.app[SCHEDULER]
    await record(request, "attach", task_id=task_id, script=row["script"], detail="sse")
    sub = await scheduler.subscribe(task_id, since)
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
        settings = request.app[SETTINGS]
        async with contextlib.aclosing(sub.batches()) as batches:
            await _pump(response, batches, settings.heartbeat_s, settings.stall_timeout_s, sub)
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


async def _write(response: web.StreamResponse, data: bytes, stall_s: float,
                 sub: Subscription) -> None:
    """Write, and wait for the client to take it; one that takes nothing for `stall_s` is
    too slow (it holds memory, and maybe a replay slot)."""
    try:
        async with asyncio.timeout(stall_s):
            await response.write(data)
    except TimeoutError:
        sub.overflowed.set()
        raise SlowConsumer from None


async def _pump(response: web.StreamResponse, batches: object, heartbeat_s: float,
                stall_s: float, sub: Subscription) -> None:
    """Write batches as they come; a comment line when idle so proxies keep the stream."""
    iterator = batches.__aiter__()  # type: ignore[attr-defined]
    following: asyncio.Future[list[Item]] | None = None
    try:
        while True:
            if following is None:
                following = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({following}, timeout=heartbeat_s)
            if not done:
                await _write(response, HEARTBEAT, stall_s, sub)
                continue
            try:
                batch = following.result()
            except StopAsyncIteration:
                return
            following = None
            await _write(response, "".join(sse_text(item) for item in batch).encode(), stall_s,
                         sub)
    finally:
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
