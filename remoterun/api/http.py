"""REST handlers: submit, read, list, cancel, download output, scripts, health, metrics."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from aiohttp import web

from remoterun import archive
from remoterun.api import CATALOGUE, DB, METRICS, SCHEDULER, SETTINGS, identity
from remoterun.db import task_json
from remoterun.errors import BadRequest, NotFound
from remoterun.hub import sse_data
from remoterun.metrics import CONTENT_TYPE
from remoterun.state import TaskStatus

routes = web.RouteTableDef()

_SUBMIT_TYPES: dict[str, tuple[type, ...]] = {
    "script": (str,), "script_path": (str,), "params": (dict,), "priority": (int,),
    "timeout": (int, float, type(None)), "max_retries": (int,), "pty": (bool,),
    "interactive": (bool,), "stdin": (str,),
}


def parse_submit(body: Any, scripts_dir: str, max_retries_limit: int) -> dict[str, Any]:
    """Validate a submission body (REST or WebSocket); BadRequest names every bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    problems: list[dict[str, str]] = []
    for key, value in body.items():
        types = _SUBMIT_TYPES.get(key)
        if types is None:
            problems.append({"field": key, "message": "unknown field"})
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append({"field": key, "message": f"expected {expected}"})
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
    checks = [
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


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; BadRequest for anything else (413 comes from aiohttp)."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc


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
    fields = parse_submit(body, str(settings.scripts_dir.resolve()), settings.max_retries_limit)
    script = app[CATALOGUE].resolve(fields["script"])
    who = identity(request)
    who.require_script(script)
    return await app[SCHEDULER].submit(script, fields, who.name)


@routes.post("/tasks")
async def post_task(request: web.Request) -> web.Response:
    """Submit a task."""
    task = await submit(request, await read_json(request))
    return web.json_response(task, status=201, headers={"Location": f"/tasks/{task['id']}"})


@routes.get("/tasks/{id}")
async def get_task(request: web.Request) -> web.Response:
    """One task."""
    identity(request).require("viewer")
    row = await request.app[DB].get_task(task_id_of(request))
    if row is None:
        raise NotFound(f"no task {request.match_info['id']!r}")
    return web.json_response(task_json(row))


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    """Tasks, newest first, a page at a time."""
    identity(request).require("viewer")
    query = request.query
    problems = []
    status = query.get("status") or None
    if status is not None and status not in TaskStatus.__members__.values():
        problems.append({"field": "status", "message": f"one of {[s.value for s in TaskStatus]}"})
    limit = _int_arg(query.get("limit", "50"), 1, 500, "limit", problems)
    cursor = _int_arg(query["cursor"], 1, 2**62, "cursor", problems) if query.get("cursor") \
        else None
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    rows = await request.app[DB].list_tasks(status=status, script=query.get("script") or None,
                                            limit=limit + 1, before=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response({"tasks": [task_json(r) for r in rows],
                              "next_cursor": str(rows[-1]["num"]) if more else None})


def _int_arg(raw: str, low: int, high: int, name: str, problems: list[dict[str, str]]) -> int:
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
    identity(request).require("operator")
    return web.json_response(await request.app[SCHEDULER].cancel(task_id_of(request)))


@routes.get("/tasks/{id}/output")
async def get_output(request: web.Request) -> web.StreamResponse:
    """The archived output, raw bytes or jsonl, streamed from the segments."""
    identity(request).require("viewer")
    task_id = task_id_of(request)
    row = await request.app[DB].get_task(task_id)
    if row is None:
        raise NotFound(f"no task {task_id!r}")
    pick = request.query.get("stream")
    if pick is not None and pick not in archive.STREAMS:
        raise BadRequest("stream must be stdout, stderr or pty", code="invalid_request",
                         details=[{"field": "stream", "message": "stdout, stderr or pty"}])
    jsonl = request.query.get("format") == "jsonl"
    if request.query.get("format") not in (None, "text", "jsonl"):
        raise BadRequest("format must be text or jsonl", code="invalid_request",
                         details=[{"field": "format", "message": "text or jsonl"}])
    request.app[SCHEDULER].flush_archive(task_id)
    response = web.StreamResponse(headers={
        "Content-Type": "application/x-ndjson" if jsonl else "text/plain; charset=utf-8",
        "Content-Disposition": f'inline; filename="{task_id}.{"jsonl" if jsonl else "log"}"',
    })
    await response.prepare(request)
    settings = request.app[SETTINGS]
    async for batch in archive.aread_frames(settings.archive_dir, row["logs_path"]):
        frames = [f for f in batch if pick is None or f.stream == pick]
        if jsonl:
            chunk = "".join(sse_data(f) + "\n" for f in frames).encode()
        else:
            chunk = b"".join(f.data for f in frames)
        if chunk:
            await response.write(chunk)
    await response.write_eof()
    return response


@routes.get("/scripts")
async def list_scripts(request: web.Request) -> web.Response:
    """The scripts this caller may see, with their parameter schemas."""
    who = identity(request)
    who.require("viewer")
    scripts = request.app[CATALOGUE].scripts()
    return web.json_response({"scripts": [
        {**s.to_json(), "runnable": who.may_run(s)} for s in scripts]})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 when the database answers and the archive directory is writable."""
    settings = request.app[SETTINGS]
    problems = []
    try:
        await request.app[DB].ping()
    except Exception as exc:
        problems.append(f"database: {exc}")
    if not os.access(settings.archive_dir, os.W_OK):
        problems.append(f"archive directory {settings.archive_dir} is not writable")
    scheduler = request.app[SCHEDULER]
    body = {"status": "ok" if not problems else "error", "problems": problems,
            "accepting": scheduler.accepting}
    return web.json_response(body, status=200 if not problems else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    identity(request).require("viewer")
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE})
