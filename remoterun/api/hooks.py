"""`POST /hooks/{name}`: another system starts a script with a signed request; `GET /hooks`
lists the hooks and their latest deliveries (PROTOCOL.md "Hooks", issue 30).

The signature is the credential: the guard asks no token here (guard.SIGNED_PREFIXES) but still
refuses a browser's cross-site request. A wrong signature answers 401 `bad_signature` without
saying what was wrong (the reason goes to the log and to one bounded `hook_denied` audit row),
counts against the address's failure budget like a failed login, and starts nothing. A signed
request goes through the same path as `POST /tasks`: `Scheduler.submit`, with the script's
schema checking every mapped param (values are passed as the sender wrote them, never through
a shell).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncGenerator
from typing import Any, cast

import structlog
from aiohttp import web

from remoterun import errors
from remoterun.api import (
    CATALOGUE,
    DB,
    DENIALS,
    LIMITER,
    METRICS,
    SCHEDULER,
    SETTINGS,
    identity,
    json_response,
)
from remoterun.api.http import loads, parse_submit
from remoterun.engine.hub import SlowConsumer
from remoterun.hooks import MISSING, Delivery, Hook, mapped_params, unmatched, verify
from remoterun.state import FINAL
from remoterun.store import insert_audit, insert_delivery
from remoterun.wire import Frame, Item, rfc3339, task_json

log = structlog.get_logger(__name__)
Row = dict[str, Any]
routes = web.RouteTableDef()
OUTPUT_TAIL_BYTES = 64 * 1024  # what a `wait` answer carries of the output: its end
RECENT_DELIVERIES = 20  # per hook, in GET /hooks
FORM = "application/x-www-form-urlencoded"


class Hooks:
    """The configured hooks by name, and one lock per hook that makes a delivery id's lookup
    and its task's creation one step on this server (the unique index guards a cluster)."""

    def __init__(self, hooks: tuple[Hook, ...]):
        self.by_name = {hook.name: hook for hook in hooks}
        self.locks = {hook.name: asyncio.Lock() for hook in hooks}

    def get(self, name: str) -> Hook:
        """The hook of this name; NotFound `unknown_hook` (404) for none."""
        hook = self.by_name.get(name)
        if hook is None:
            raise errors.NotFound(f"no hook {name[:100]!r}", code="unknown_hook")
        return hook


HOOKS = web.AppKey("hooks", Hooks)


def setup(app: web.Application) -> None:
    """The hooks of the app's settings, and their routes."""
    app[HOOKS] = Hooks(app[SETTINGS].hooks)
    app.router.add_routes(routes)


def _count(request: web.Request, hook: Hook, result: str) -> None:
    metrics = request.app[METRICS]
    metrics.child(metrics.hook_requests, hook.name, result).inc()


@routes.post("/hooks/{name}")
async def post_hook(request: web.Request) -> web.StreamResponse:
    """Check the signature, then the delivery id, `match` and params; start the task and
    answer as the hook's mode says."""
    hook = request.app[HOOKS].get(request.match_info["name"])
    body = await request.read()  # past server.max_body_bytes: 413 (error_middleware)
    reason = verify(hook, request.headers, body, time.time())
    if reason is not None:
        return await _denied(request, hook, reason)
    delivery = Delivery(request.headers, request.query, _json_body(request, body))
    delivery_id = request.headers.get(hook.delivery_header) if hook.delivery_header else None
    delivery_id = delivery_id[:200] if delivery_id else None
    lock = request.app[HOOKS].locks[hook.name] if delivery_id else contextlib.nullcontext()
    async with lock:
        first = await _first(request, hook, delivery_id)
        if first is not None:
            return await _duplicate(request, hook, first)
        missed = unmatched(hook, delivery)
        if missed is not None:
            return await _skipped(request, hook, delivery_id, missed)
        task = await _submit(request, hook, delivery, delivery_id)
    if isinstance(task, web.StreamResponse):  # a redelivery that raced us (another node)
        return task
    _count(request, hook, "accepted")
    if hook.mode == "wait":
        return await _wait(request, hook, task)
    if hook.mode == "stream":
        return await _stream(request, task)
    return _accepted(task)


def _json_body(request: web.Request, body: bytes) -> Any:
    """The body as JSON (or a form's `payload` field, as GitHub sends it in that content
    type); MISSING for none or anything else: `match` and `params` then find nothing."""
    if request.content_type == FORM:
        found = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("payload")
        body = found[0].encode() if found else b""
    if not body:
        return MISSING
    try:
        return loads(body)
    except errors.RemoteRunError:
        return MISSING


async def _denied(request: web.Request, hook: Hook, reason: str) -> web.Response:
    """401 `bad_signature` (429 past the address's failure budget), the same answer whatever
    was wrong; the reason is logged and audited, at most one row per address a second."""
    app, address = request.app, request.remote or "-"
    wait = app[LIMITER].retry_after(address)
    if wait is not None:  # past the budget: counted, not logged one by one
        _count(request, hook, "limited")
        raise errors.TooManyRequests(f"too many failed attempts from {address}: wait",
                                     retry_after_s=wait)
    log.warning("hook_denied", hook=hook.name, reason=reason, address=address)
    app[LIMITER].record(address)
    _count(request, hook, "denied")
    if app[DENIALS].admit(address, "bad_signature"):
        entry = {"ts": time.time(), "actor": f"hook:{hook.name}", "role": None,
                 "address": address, "action": "hook_denied", "result": "bad_signature",
                 "detail": f"{hook.name}: {reason}"}
        try:
            await app[SCHEDULER].record([insert_audit(entry, script=hook.script)])
        except Exception:  # a refusal must answer even if the audit cannot be written
            log.exception("audit_write_failed", action="hook_denied")
    return json_response({"error": "bad_signature",
                          "message": "the request is not signed as this hook expects"},
                         status=401)


async def _first(request: web.Request, hook: Hook, delivery_id: str | None) -> Row | None:
    """The first answered delivery of this id, if there was one."""
    if delivery_id is None:
        return None
    return await request.app[DB].delivery(hook.name, delivery_id)


async def _duplicate(request: web.Request, hook: Hook, first: Row) -> web.Response:
    """The first answer again, marked `duplicate`: its task as it is now; nothing starts."""
    _count(request, hook, "duplicate")
    if first["result"] == "skipped":
        return json_response({"triggered": False, "reason": first["reason"],
                              "duplicate": True})
    row = request.app[SCHEDULER].live_row(first["task_id"]) or \
        await request.app[DB].get_task(first["task_id"])
    if row is None:
        raise errors.Gone(f"the task of delivery {first['delivery_id']!r} no longer exists")
    task = task_json(row)
    waiting = hook.mode == "async" or (hook.mode == "wait" and task["status"] not in FINAL)
    return _accepted(task, duplicate=True) if waiting else \
        json_response({"triggered": True, "task": task, "duplicate": True})


async def _skipped(request: web.Request, hook: Hook, delivery_id: str | None,
                   missed: str) -> web.Response:
    """200 `triggered: false` naming the `match` key that did not match; recorded."""
    _count(request, hook, "skipped")
    await request.app[SCHEDULER].record([insert_delivery(hook.name, delivery_id, "skipped",
                                                         reason=missed)])
    return json_response({"triggered": False, "reason": missed})


async def _submit(request: web.Request, hook: Hook, delivery: Delivery,
                  delivery_id: str | None) -> dict[str, Any] | web.Response:
    """The task, submitted as `POST /tasks` submits (its delivery recorded in the same
    transaction); 422 `invalid_params` when the mapped params break the script's schema."""
    app = request.app
    body: dict[str, Any] = {"script": hook.script, "params": mapped_params(hook, delivery),
                            "priority": hook.priority}
    if hook.timeout is not None:
        body["timeout"] = hook.timeout
    fields = parse_submit(body, str(app[CATALOGUE].root), app[SETTINGS].max_retries_limit)
    script = app[CATALOGUE].resolve(hook.script)
    audit = {"ts": time.time(), "actor": f"hook:{hook.name}", "role": None,
             "address": request.remote, "action": "hook", "result": "ok",
             "detail": f"{hook.name}: delivery {delivery_id or '-'}"}
    try:
        return await app[SCHEDULER].submit(
            script, fields, f"hook:{hook.name}", audit=audit,
            extra=lambda task_id: [insert_delivery(hook.name, delivery_id, "accepted",
                                                   task_id=task_id)])
    except errors.InvalidParams:
        _count(request, hook, "invalid")
        raise
    except Exception:
        # Another node took the same delivery id first (the unique index undid ours):
        # answer as a redelivery. Anything else goes on as it came.
        first = await _first(request, hook, delivery_id)
        if first is None:
            raise
        return await _duplicate(request, hook, first)


def _accepted(task: dict[str, Any], duplicate: bool = False) -> web.Response:
    """202 with the task and its Location (async, or a wait that ran out)."""
    body: dict[str, Any] = {"triggered": True, "task": task}
    if duplicate:
        body["duplicate"] = True
    return json_response(body, status=202, headers={"Location": f"/tasks/{task['id']}"})


async def _frames(request: web.Request, task_id: str) -> AsyncGenerator[list[Frame], None]:
    """The task's output frames from its first, batch by batch, until it ends."""
    sub = await request.app[SCHEDULER].subscribe(task_id, 0)
    batches = cast(AsyncGenerator[list[Item], None], sub.batches())  # a generator: closable
    try:
        async for batch in batches:
            yield [item for item in batch if isinstance(item, Frame)]
    finally:
        await batches.aclose()
        sub.close()


async def _wait(request: web.Request, hook: Hook, task: dict[str, Any]) -> web.Response:
    """200 with the final task and the end of its output once it ends; 202 as `async` if it
    has not ended after `wait_s`."""
    tail = bytearray()
    try:
        async with asyncio.timeout(hook.wait_s), \
                contextlib.aclosing(_frames(request, task["id"])) as output:
            async for frames in output:
                for frame in frames:
                    tail += frame.data
                del tail[:-OUTPUT_TAIL_BYTES]
    except (TimeoutError, SlowConsumer):
        return _accepted(task)
    row = await request.app[DB].get_task(task["id"])
    if row is None or row["status"] not in FINAL:  # ended here, not yet readable: unlikely
        return _accepted(task)
    return json_response({"triggered": True, "task": task_json(row),
                          "output": _text(bytes(tail))})


def _text(data: bytes) -> str:
    """Output bytes as text, a character cut at the front of the tail dropped."""
    start = 0
    while start < min(len(data), 3) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:].decode("utf-8", "replace")


async def _stream(request: web.Request, task: dict[str, Any]) -> web.StreamResponse:
    """200 text/plain: the output as the process writes it, ended when the task ends (or
    after server.stream_max_s; a client that takes nothing for stall_timeout_s is cut)."""
    settings = request.app[SETTINGS]
    response = web.StreamResponse(headers={
        "Content-Type": "text/plain; charset=utf-8", "X-RemoteRun-Task": task["id"],
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        async with asyncio.timeout(settings.stream_max_s), \
                contextlib.aclosing(_frames(request, task["id"])) as output:
            async for frames in output:
                if frames:
                    async with asyncio.timeout(settings.stall_timeout_s):
                        await response.write(b"".join(f.data for f in frames))
        await response.write_eof()
    except (TimeoutError, SlowConsumer, ConnectionResetError):
        if request.transport is not None:  # the task runs on; GET /tasks/{id} follows it
            request.transport.abort()
    return response


@routes.get("/hooks")
async def list_hooks(request: web.Request) -> web.Response:
    """Each hook (operator or admin) of the caller's scripts, without its secrets, with its
    latest deliveries."""
    who = identity(request)
    who.require("operator")
    db, shown = request.app[DB], []
    for hook in request.app[HOOKS].by_name.values():
        if not who.allows(hook.script):
            continue
        rows = await db.deliveries(hook.name, RECENT_DELIVERIES)
        shown.append({**hook.describe(), "deliveries": [_delivery_json(r) for r in rows]})
    return json_response({"hooks": shown})


def _delivery_json(row: Row) -> dict[str, Any]:
    return {"ts": rfc3339(row["ts"]), "delivery_id": row["delivery_id"],
            "result": row["result"], "task_id": row["task_id"], "reason": row["reason"]}
