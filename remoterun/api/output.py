"""GET /tasks/{id}/output: a task's archived output downloaded (raw with Range or the stored
gzip, or filtered per stream, or one JSON line per frame)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from remoterun import archive
from remoterun.api import DB, SCHEDULER, SETTINGS, json_response
from remoterun.api.guard import asked, record
from remoterun.api.http import int_arg, task_row
from remoterun.errors import BadRequest, Gone
from remoterun.wire import sse_data

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


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
    since = int_arg(query.get("since") or "0", 0, 2**63 - 1, "since", problems)
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
