"""`GET /tasks/{id}/search`: the lines of a task's output that match, a page at a time."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from remoterun import archive
from remoterun.api import DB, SCHEDULER, SETTINGS, json_response
from remoterun.api.http import task_row
from remoterun.archive.search import BadCursor, Cursor, Matcher, Search, search
from remoterun.errors import BadRequest, Gone, InvalidParams

routes = web.RouteTableDef()
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


@dataclass(frozen=True)
class _Ask:
    """A search request's query, checked."""

    matcher: Matcher
    stream: str | None
    limit: int
    cursor: Cursor


def _parse(query: Mapping[str, str]) -> _Ask:
    """The query, or 400 naming each bad field; 422 for a regex that does not compile."""
    problems: list[dict[str, str]] = []
    if not query.get("q"):
        problems.append({"field": "q", "message": "the text or regular expression to find"})
    if query.get("regex", "false") not in ("true", "false", "1", "0"):
        problems.append({"field": "regex", "message": "true or false"})
    stream = query.get("stream")
    if stream is not None and stream not in archive.STREAMS:
        problems.append({"field": "stream", "message": "stdout, stderr or pty"})
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    if not raw_limit.isdigit() or int(raw_limit) < 1:
        problems.append({"field": "limit", "message": f"an integer from 1 (at most {MAX_LIMIT})"})
    try:
        cursor = Cursor.parse(query["cursor"]) if query.get("cursor") else Cursor()
    except BadCursor:
        problems.append({"field": "cursor", "message": "a next_cursor this search returned"})
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    regex = query.get("regex") in ("true", "1")
    try:
        matcher = Matcher(query["q"], regex)
    except re.error as exc:
        raise InvalidParams(f"the regular expression does not compile: {exc}",
                            code="invalid_regex",
                            details=[{"field": "q", "message": str(exc)}]) from None
    return _Ask(matcher, stream, min(int(raw_limit), MAX_LIMIT), cursor)


@routes.get("/tasks/{id}/search")
async def search_output(request: web.Request) -> web.Response:
    """A page of matching lines, oldest first, with `next_cursor` to go on (null: the end)."""
    row = await task_row(request)  # 404, or 403 outside the token's script list
    ask = _parse(request.query)
    app = request.app
    task_id = row["id"]
    if await app[DB].output_pruned(task_id):
        raise Gone(f"the output of task {task_id} was deleted by the retention policy")
    scheduler = app[SCHEDULER]
    await scheduler.flush_archive(task_id)  # what the task wrote so far, on disk
    rows = await app[DB].segments(task_id)
    known = {r["path"]: r["raw_bytes"] for r in rows if r["closed_at"] is not None}
    settings = app[SETTINGS]
    async with scheduler.replay_slots:  # archive readers, server-wide, stay bounded
        job = Search(ask.matcher, ask.stream, ask.limit,
                     time.monotonic() + settings.search_budget_s)
        page = await asyncio.to_thread(search, settings.archive_dir, row["logs_path"], job,
                                       ask.cursor, known)
    cursor = None if page.next_cursor is None else str(page.next_cursor)
    return json_response({"matches": [m.to_json() for m in page.matches],
                          "next_cursor": cursor})
