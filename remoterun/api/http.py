"""REST handlers: submit, read, list, cancel, download output, scripts, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from remoterun import archive
from remoterun.api import CATALOGUE, DB, SCHEDULER, SETTINGS, identity, json_response, nodes
from remoterun.api.guard import asked, audit_entry, record
from remoterun.catalogue import MetadataError
from remoterun.engine.scheduler import Scheduler
from remoterun.errors import BadRequest, Gone, NotFound, Unencodable
from remoterun.state import TaskStatus
from remoterun.wire import sse_data, task_json, unencodable

log = structlog.get_logger(__name__)
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
    limit = _int_arg(query.get("limit", "50"), 1, 500, "limit", problems)
    cursor = _int_arg(query["cursor"], 1, 2**62, "cursor", problems) if query.get("cursor") \
        else None
    after = _int_arg(query["after"], 0, 2**62, "after", problems) if query.get("after") \
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
    row = await task_row(request, "operator")
    return json_response(await request.app[SCHEDULER].cancel(
        row["id"], audit=audit_entry(request, "cancel")))


@routes.get("/tasks/{id}/output")
async def get_output(request: web.Request) -> web.StreamResponse:
    """The archived output, streamed: raw bytes (Range, stored gzip) or per frame (jsonl).

    The body covers every frame up to the seq in `X-RemoteRun-Last-Seq` (for a running task,
    what existed when the request came). `Range: bytes=` applies to the raw text only, whose
    bytes never change once written; a filtered or jsonl download resumes with `?since=SEQ`
    instead, and a Range on it is refused with 416. Pruned by retention: 410.
    """
    row = await task_row(request)
    task_id = row["id"]
    app = request.app
    ask = _output_query(request.query)
    await record(request, "download", task_id=task_id, script=row["script"],
                 detail=asked(request)[:300])
    if await app[DB].output_pruned(task_id):
        raise Gone(f"the output of task {task_id} was deleted by the retention policy")
    scheduler = app[SCHEDULER]
    active = scheduler.attempt(task_id)
    total, last_seq = (row["output_bytes"], row["last_seq"]) if active is None else \
        (active.progress.output_bytes, active.progress.last_seq)
    await scheduler.flush_archive(task_id)  # frames up to last_seq on disk (a compressor thread)
    span = _byte_range(request.headers.get("Range"), total)
    if span is not None and not ask.raw:
        return _unsatisfiable(total, "Range applies to the raw text only: resume a filtered or "
                                     "jsonl download with ?since=SEQ")
    if span == (0, 0):
        return _unsatisfiable(total, f"the output has {total} bytes")
    root, logs_path = app[SETTINGS].archive_dir, row["logs_path"]
    headers = {"Content-Type": "application/x-ndjson" if ask.jsonl else "text/plain; charset=utf-8",
               "Content-Disposition": f'inline; filename="{task_id}.{ask.extension}"'}
    if not ask.raw:
        headers["X-RemoteRun-Last-Seq"] = str(last_seq)
        frames = archive.read_frames(root, logs_path, ask.since, last_seq)
        return await _send(request, web.StreamResponse(headers=headers),
                           archive.in_thread(_encoded(frames, ask)))
    headers.update({"Accept-Ranges": "bytes", "Vary": "Accept-Encoding"})
    if span is not None:
        start, end = span
        rows = await app[DB].segments(task_id)
        known = {r["path"]: r["raw_bytes"] for r in rows if r["closed_at"] is not None}
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{'*' if active else total}"
        if end == total:
            headers["X-RemoteRun-Last-Seq"] = str(last_seq)
        return await _send(request, web.StreamResponse(status=206, headers=headers),
                           archive.in_thread(archive.read_raw(root, logs_path, start, end, known)),
                           end - start)
    headers["X-RemoteRun-Last-Seq"] = str(last_seq)
    if active is None and _accepts_gzip(request.headers.get("Accept-Encoding", "")):
        rows = await app[DB].segments(task_id)
        joined = await asyncio.to_thread(archive.joined_gzip, root, logs_path, rows)
        if joined is not None:
            headers["Content-Encoding"] = "gzip"
            return await _send(request, web.StreamResponse(headers=headers),
                               archive.in_thread(joined.chunks()), joined.length)
    return await _send(request, web.StreamResponse(headers=headers),
                       archive.in_thread(archive.read_raw(root, logs_path, 0, total)), total)


@dataclass(frozen=True)
class _OutputQuery:
    """What a download asked for besides the task."""

    stream: str | None
    jsonl: bool
    since: int

    @property
    def raw(self) -> bool:
        """Whether it is the whole raw text, which Range and the stored gzip apply to."""
        return self.stream is None and not self.jsonl and self.since == 0

    @property
    def extension(self) -> str:
        """The download's file name extension."""
        return "jsonl" if self.jsonl else "log"


def _output_query(query: Mapping[str, str]) -> _OutputQuery:
    problems: list[dict[str, str]] = []
    stream = query.get("stream")
    if stream is not None and stream not in archive.STREAMS:
        problems.append({"field": "stream", "message": "stdout, stderr or pty"})
    if query.get("format") not in (None, "text", "jsonl"):
        problems.append({"field": "format", "message": "text or jsonl"})
    since = _int_arg(query.get("since") or "0", 0, 2**63 - 1, "since", problems)
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    return _OutputQuery(stream, query.get("format") == "jsonl", since)


def _encoded(frames: Iterator[archive.Frame], ask: _OutputQuery,
             batch_bytes: int = 256 * 1024) -> Iterator[bytes]:
    """The frames as the download's body, in chunks (run off the event loop)."""
    parts: list[bytes] = []
    size = 0
    for frame in frames:
        if ask.stream is not None and frame.stream != ask.stream:
            continue
        part = (sse_data(frame) + "\n").encode() if ask.jsonl else frame.data
        parts.append(part)
        size += len(part)
        if size >= batch_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """[start, end) of a single `Range: bytes=` of `total` bytes; (0, 0) if unsatisfiable.

    None (send it all, 200) for no Range, or one this server ignores as RFC 9110 allows:
    another unit, several ranges, or a malformed one.
    """
    found = _RANGE.fullmatch(header.strip()) if header else None
    if found is None or found[1] == found[2] == "":
        return None
    if found[1] == "":  # the last N bytes
        start, end = max(total - int(found[2]), 0), total if int(found[2]) else 0
    else:
        start = int(found[1])
        end = total if found[2] == "" else min(int(found[2]) + 1, total)
        if found[2] != "" and int(found[2]) < start:
            return None
    return (start, end) if start < end else (0, 0)


def _unsatisfiable(total: int, message: str) -> web.Response:
    return json_response({"error": "range_not_satisfiable", "message": message},
                         status=416, headers={"Content-Range": f"bytes */{total}"})


def _accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header takes gzip."""
    for part in header.lower().split(","):
        name, _, params = part.partition(";")
        if name.strip() in ("gzip", "x-gzip", "*"):
            weight = params.strip().removeprefix("q=")
            try:
                return not params.strip() or float(weight) > 0
            except ValueError:
                return False
    return False


async def _send(request: web.Request, response: web.StreamResponse,
                chunks: AsyncIterator[bytes], length: int | None = None) -> web.StreamResponse:
    """Stream the chunks; if fewer than a promised `length` come, cut the connection."""
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    if request.method == "HEAD":  # the headers say it all; do not read the archive for nothing
        await response.write_eof()
        return response
    sent = 0
    try:
        async for chunk in chunks:
            await response.write(chunk)
            sent += len(chunk)
    except ConnectionResetError:  # the client went away: nothing to finish
        return response
    if length is not None and sent != length and request.transport is not None:
        # Pruned or damaged under us: a client must not wait for bytes that will not come.
        log.warning("output_short", path=request.path, promised=length, sent=sent)
        request.transport.abort()
        return response
    await response.write_eof()
    return response


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
