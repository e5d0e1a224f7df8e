"""REST handlers: submit, read, list, cancel, scripts, health (a task's output: output.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from remoterun.api import CATALOGUE, DB, SCHEDULER, SETTINGS, identity, json_response, nodes
from remoterun.api.guard import audit_entry
from remoterun.catalogue import MetadataError
from remoterun.engine.scheduler import Scheduler
from remoterun.errors import BadRequest, NotFound, Unencodable
from remoterun.state import TaskStatus
from remoterun.wire import task_json, type_problems, unencodable

routes = web.RouteTableDef()

_SUBMIT_TYPES: dict[str, tuple[type, ...]] = {
    "script": (str,), "script_path": (str,), "params": (dict,), "priority": (int,),
    "timeout": (int, float, type(None)), "max_retries": (int,), "pty": (bool,),
    "interactive": (bool,), "stdin": (str,),
    "node": (str,), "labels": (list,),  # placement, in cluster mode (docs/cluster.md)
}


def parse_submit(body: Any, scripts_dir: str, max_retries_limit: int) -> dict[str, Any]:
    """Validate a submission body (REST or WebSocket); BadRequest names every bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    problems = type_problems(body, _SUBMIT_TYPES)
    if problems:
        raise BadRequest("invalid submission", code="invalid_request", details=problems)
    request = dict(body)
    alias = request.pop("script_path", None)
    if "script" not in request:
        if alias is None:
            raise BadRequest("script is required", code="invalid_request",
                             details=[{"field": "script", "message": "required"}])
        for prefix in (scripts_dir.rstrip("/") + "/", "/scripts/"):
            if alias.startswith(prefix):
                alias = alias[len(prefix):]
                break
        request["script"] = alias
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("priority", lambda v: -1_000_000 <= v <= 1_000_000, "must be within ±1000000"),
        ("timeout", lambda v: v is None or 0 < v <= 366 * 86400, "must be a positive number"),
        ("max_retries", lambda v: 0 <= v <= max_retries_limit,
         f"must be between 0 and {max_retries_limit}"),
    ]
    for key, ok, message in checks:
        if key in request and not ok(request[key]):
            problems.append({"field": key, "message": message})
    if problems:
        raise BadRequest("invalid submission", code="invalid_request", details=problems)
    return request


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999; not echoed: it may be a secret param's value
        raise ValueError("a number is out of range")
    return value


def loads(raw: str | bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no float that overflows, no integer longer than
    Python's 4300-digit limit; BadRequest (400 invalid_json) for anything else, and
    Unencodable (422) for a lone surrogate (`"\\ud800"`) anywhere in it."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError too
        raise BadRequest(f"not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    where = unencodable(value)
    if where is not None:
        raise Unencodable(f"{where} holds a lone surrogate, which is not Unicode text",
                          details=[{"field": where, "message": "not encodable as UTF-8"}])
    return value


async def read_json(request: web.Request) -> Any:
    """The request body as strict JSON (`loads`); 413 comes from aiohttp."""
    return loads(await request.read())


async def task_row(request: web.Request, role: str = "viewer", live: bool = False
                   ) -> dict[str, Any]:
    """The {id} task's row, once the caller's role and script list allow `role`'s actions on
    it: 404 for no such task, 403 for a task of a script outside the token's list.

    `live`: a task the scheduler holds gives its in-memory row (read only; fresher than the
    database's), sparing a read on aiosqlite's thread and the hop back to the loop.
    """
    who = identity(request)
    who.require(role)
    task_id = task_id_of(request)
    row = request.app[SCHEDULER].live_row(task_id) if live else None
    if row is None:
        row = await request.app[DB].get_task(task_id)
    if row is None:
        raise NotFound(f"no task {task_id!r}")
    who.require_task(row["script"], role)
    return row


def task_id_of(request: web.Request) -> str:
    """The {id} path part, checked to be a task id (404 for anything malformed)."""
    raw = request.match_info["id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise NotFound(f"no task {raw!r}") from None


async def submit(request: web.Request, body: Any) -> dict[str, Any]:
    """Validate, authorise and queue a submission; shared by REST and WebSocket."""
    app = request.app
    settings = app[SETTINGS]
    fields = parse_submit(body, str(app[CATALOGUE].root), settings.max_retries_limit)
    try:
        script = app[CATALOGUE].resolve(fields["script"])
    except NotFound:
        # In a cluster, a node whose scripts/ has it takes the submission (api/nodes.py).
        task = await nodes.pass_on_submission(request, body, fields["script"])
        if task is None:
            raise
        return task
    except MetadataError as exc:  # 422 naming the sidecar, to whoever may see the script
        identity(request).require_script(app[CATALOGUE].broken(fields["script"], exc))
        raise
    who = identity(request)
    who.require_script(script)
    return await app[SCHEDULER].submit(script, fields, who.name,
                                       audit=audit_entry(request, "submit"))


@routes.post("/tasks")
async def post_task(request: web.Request) -> web.Response:
    """Submit a task."""
    task = await submit(request, await read_json(request))
    return json_response(task, status=201, headers={"Location": f"/tasks/{task['id']}"})


@routes.get("/tasks/{id}")
async def get_task(request: web.Request) -> web.Response:
    """One task."""
    task = task_json(await task_row(request))
    return json_response((await with_queue_positions(request.app[SCHEDULER], [task]))[0])


async def with_queue_positions(scheduler: Scheduler, tasks: list[dict[str, Any]]
                               ) -> list[dict[str, Any]]:
    """The tasks, each pending one with its `queue_position` (1-based, in dispatch order):
    one look at the queue for the whole list."""
    places = await scheduler.queue_positions(
        [t["id"] for t in tasks if t["status"] == "pending"])
    for task in tasks:
        if task["id"] in places:
            task["queue_position"] = places[task["id"]]
    return tasks


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    """Tasks, newest first, a page at a time: `cursor` pages to older tasks, `after` to newer
    (only those of the token's scripts)."""
    who = identity(request)
    who.require("viewer")
    query = request.query
    problems: list[dict[str, str]] = []
    limit = int_arg(query.get("limit", "50"), 1, 500, "limit", problems)
    cursor = int_arg(query["cursor"], 1, 2**62, "cursor", problems) if query.get("cursor") \
        else None
    after = int_arg(query["after"], 0, 2**62, "after", problems) if query.get("after") \
        else None
    if cursor is not None and after is not None:
        problems.append({"field": "after", "message": "cursor (older) or after (newer), not both"})
    filters = _list_filters(query, problems)
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    filters["scripts"] = who.scripts
    db = request.app[DB]
    rows = await db.list_tasks(limit=limit + 1, before=cursor, after=after, **filters)
    more = len(rows) > limit
    rows = rows[1:] if more and after is not None else rows[:limit]  # after: the oldest newer
    older = newer = False
    if rows:
        older = more if after is None else await db.has_task(rows[-1]["num"], False, **filters)
        newer = more if after is not None else cursor is not None and await db.has_task(
            rows[0]["num"], True, **filters)
    tasks = await with_queue_positions(request.app[SCHEDULER], [task_json(r) for r in rows])
    return json_response({"tasks": tasks,
                          "next_cursor": str(rows[-1]["num"]) if older else None,
                          "prev_cursor": str(rows[0]["num"]) if newer else None})


def _list_filters(query: Mapping[str, str], problems: list[dict[str, str]]) -> dict[str, Any]:
    """status, script, submitted_by, q (a substring of the script's name), since and until
    (the creation time), as db.list_tasks takes them."""
    status = query.get("status") or None
    if status is not None and status not in TaskStatus.__members__.values():
        problems.append({"field": "status", "message": f"one of {[s.value for s in TaskStatus]}"})
    return {"status": status, "script": query.get("script") or None,
            "submitted_by": query.get("submitted_by") or None, "q": query.get("q") or None,
            "since": _time_arg(query, "since", problems),
            "until": _time_arg(query, "until", problems)}


def _time_arg(query: Mapping[str, str], name: str, problems: list[dict[str, str]]
              ) -> float | None:
    """An RFC 3339 time (or a date, or Unix seconds) as Unix seconds; None when absent."""
    raw = query.get(name)
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        return float(raw)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        problems.append({"field": name, "message": "an RFC 3339 time, e.g. 2026-12-01T10:00:00Z"})
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def int_arg(raw: str, low: int, high: int, name: str, problems: list[dict[str, str]]) -> int:
    """A whole-number query argument; a problem noted when it is not one in [low, high]."""
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        problems.append({"field": name, "message": f"an integer from {low} to {high}"})
    return value


@routes.post("/tasks/{id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    """Cancel a pending or running task."""
    row = await task_row(request, "operator")
    return json_response(await request.app[SCHEDULER].cancel(
        row["id"], audit=audit_entry(request, "cancel")))




@routes.get("/scripts")
async def list_scripts(request: web.Request) -> web.Response:
    """The scripts this caller may see, with their parameter schemas."""
    who = identity(request)
    who.require("viewer")
    scripts = await asyncio.to_thread(request.app[CATALOGUE].scripts)
    return json_response({"scripts": [
        {**s.to_json(), "runnable": who.may_run(s) and s.error is None}
        for s in scripts if who.allows(s.name)]})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 when the database answers and the archive directory is writable."""
    settings = request.app[SETTINGS]
    problems = []
    try:
        await request.app[DB].ping()
    except Exception as exc:
        problems.append(f"database: {exc}")
    if not await asyncio.to_thread(os.access, settings.archive_dir, os.W_OK):
        problems.append(f"archive directory {settings.archive_dir} is not writable")
    scheduler = request.app[SCHEDULER]
    body = {"status": "ok" if not problems else "error", "problems": problems,
            "accepting": scheduler.accepting}
    return json_response(body, status=200 if not problems else 503)
