"""Server-Sent Events: `GET /tasks/{id}/logs`, resumable with Last-Event-ID or `?since=`.

Browsers' EventSource reconnects whenever a stream ends. So the `exit` event carries an `id:` (the
last seq), and a resumed request for a task that has ended with nothing after its seq answers 204,
which stops the browser for good instead of replaying `task` and `exit` every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from remoterun.api import METRICS, SCHEDULER, SETTINGS
from remoterun.api.guard import record
from remoterun.api.http import task_row
from remoterun.api.ws import parse_since, parse_tail
from remoterun.config import Settings
from remoterun.engine.hub import SlowConsumer, Subscription
from remoterun.state import FINAL
from remoterun.wire import Event, Item, dumps, sse_text

routes = web.RouteTableDef()
HEARTBEAT = b": keep-alive\n\n"


@routes.get("/tasks/{id}/logs")
async def logs(request: web.Request) -> web.StreamResponse:
    """The task, its output after `since` (or its last `tail` lines), live output and status,
    then `exit`. A resumed stream (Last-Event-ID) ignores `tail`: it continues where it was."""
    row = await task_row(request)  # 404, or 403 outside the token's script list
    task_id = row["id"]
    resumed = request.headers.get("Last-Event-ID") or request.query.get("since")
    since = parse_since(resumed)
    tail = None if "Last-Event-ID" in request.headers else parse_tail(request.query.get("tail"))
    scheduler = request.app[SCHEDULER]
    await record(request, "attach", task_id=task_id, script=row["script"], detail="sse")
    sub = await scheduler.subscribe(task_id, since)
    sub.tail = tail
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
        settings = request.app[SETTINGS]
        async with contextlib.aclosing(sub.batches()) as batches:
            await _pump(response, batches, settings, sub, since)
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


def _ended_before(task: dict[str, object], since: int) -> bool:
    """Whether the task has ended with no output frame after `since`."""
    last = task.get("last_seq")
    return task.get("status") in FINAL and isinstance(last, int) and last <= since


def _event_text(item: Item, last_seq: int) -> str:
    if isinstance(item, Event) and item.kind == "exit":
        return f"id: {last_seq}\n{sse_text(item)}"
    return sse_text(item)


async def _pump(response: web.StreamResponse, batches: object, settings: Settings,
                sub: Subscription, since: int) -> None:
    """Write batches as they come; a comment line when idle so proxies keep the stream; end
    after `stream_max_s` (EventSource resumes with Last-Event-ID, the last seq sent)."""
    iterator = batches.__aiter__()  # type: ignore[attr-defined]
    following: asyncio.Future[list[Item]] | None = None
    stall_s = settings.stall_timeout_s
    loop = asyncio.get_running_loop()
    end = loop.time() + settings.stream_max_s
    try:
        while (left := end - loop.time()) > 0:
            if following is None:
                following = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({following}, timeout=min(settings.heartbeat_s, left))
            if not done:
                if end - loop.time() > 0:
                    await _write(response, HEARTBEAT, stall_s, sub)
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
            await _write(response, "".join(text).encode(), stall_s, sub)
    finally:
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
