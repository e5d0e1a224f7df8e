"""Monitoring endpoints: /metrics, /readyz and /stats, and the middleware that counts and logs
every request.

Readiness is a registry of named checks (`Readiness.add`), so a part of the server that knows
of a new way to be unready (an archive write that failed recently, say) adds one check and
/readyz reports it beside the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from remoterun import archive
from remoterun.alerts import TAIL_BYTES, Alerts
from remoterun.api import (
    ALERTS,
    DB,
    IDENTITY,
    METRICS,
    READINESS,
    SCHEDULER,
    SETTINGS,
    identity,
    json_response,
)
from remoterun.errors import BadRequest
from remoterun.metrics import CONTENT_TYPE
from remoterun.state import TaskStatus
from remoterun.wire import rfc3339

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[], Awaitable[Mapping[str, Any] | None]]
CHECK_TIMEOUT_S = 5.0
STATS_WINDOW_S = 86400.0
# Requests logged at debug, not info: scrapers, probes and the page's static files.
QUIET_PREFIXES = ("/metrics", "/healthz", "/readyz", "/static/", "/vendor/")
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer


class NotReady(Exception):
    """A readiness check failed; the message says why, for /readyz's body."""


# Requests ----------------------------------------------------------------------------------


def route_of(request: web.Request) -> str:
    """The route's canonical path ("/tasks/{id}"), never the raw URL: a bounded label."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each request by route and status, time it, and log one line for it."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics = request.app[METRICS]
        route, method = route_of(request), request.method
        metrics.child(metrics.http_requests, route, method, str(status)).inc()
        metrics.child(metrics.http_duration, route, method).observe(elapsed)
        who = request.get(IDENTITY)
        quiet = request.path.startswith(QUIET_PREFIXES) and status < 400
        (log.debug if quiet else log.info)(
            "http_request", method=method, path=request.path, status=status,
            duration_ms=round(elapsed * 1000, 2), token=who.name if who else None)


# /metrics ------------------------------------------------------------------------------------


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; the scrape-time gauges are read first. A token with a
    script list sees only those scripts' series (public metrics show every script)."""
    app = request.app
    shows = None
    if not app[SETTINGS].metrics_public:
        who = identity(request)
        who.require("viewer")
        shows = None if who.scripts is None else who.allows
    db, registry = app[DB], app[METRICS]
    registry.set_live(await db.live_counts())
    on_disk = await db.archive_bytes()
    registry.set_archive(on_disk, await asyncio.to_thread(os.statvfs, app[SETTINGS].archive_dir))
    body = await asyncio.to_thread(registry.render, shows)  # the process collector reads /proc
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# /readyz -------------------------------------------------------------------------------------


class Readiness:
    """Named checks, each an async function that returns details or raises NotReady."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """Register (or replace) the check called `name`."""
        self.checks[name] = check

    async def run(self) -> dict[str, dict[str, Any]]:
        """Every check's result, run together: {"ok": bool, "error"?: str, ...details}."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._one(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def _one(self, name: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                details = await self.checks[name]()
        except NotReady as exc:
            return {"ok": False, "error": str(exc)}
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S} s"}
        except Exception as exc:  # a check that breaks says so, as a failed check
            log.warning("readiness_check_failed", check=name, error=str(exc))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, **(details or {})}


def write_probe(folder: Path) -> None:
    """Write, sync and remove a small file in `folder` (blocking): OSError unless the folder's
    filesystem takes a write that needs a new block."""
    fd, name = tempfile.mkstemp(prefix=".readyz-", dir=folder)
    try:
        os.write(fd, b"ready\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def probe_database_disk(path: Path) -> None:
    """NotReady unless the SQLite file's folder takes a write that needs space (blocking).

    A write transaction that is rolled back needs no room, so the database's own probe passes
    on a full disk while every commit fails (issue 25).
    """
    try:
        write_probe(path.parent)
    except OSError as exc:
        raise NotReady(f"the database cannot be written: its disk ({path.parent}) takes no "
                       f"write: {exc.strerror}") from exc


def probe_archive(root: Path, floor: int) -> dict[str, Any]:
    """Write and remove a small file in the archive, then look at the free space (blocking)."""
    try:
        write_probe(root)
    except OSError as exc:
        raise NotReady(f"the archive {root} is not writable: {exc.strerror}") from exc
    fs = os.statvfs(root)
    free = fs.f_bavail * fs.f_frsize
    if free < floor:
        raise NotReady(f"{free} bytes free in the archive's filesystem, under "
                       f"server.min_free_bytes = {floor}")
    return {"free_bytes": free}


def add_default_checks(app: web.Application) -> None:
    """The checks PROTOCOL.md names: database writable, archive writable with room, engine
    alive; and whether the server takes submissions (false while it drains)."""
    settings, checks = app[SETTINGS], app[READINESS]

    async def database() -> None:
        problem = app[DB].probe_write() or app[SCHEDULER].problems.get("database")
        if problem is not None:
            raise NotReady(f"the database cannot be written: {problem}")
        if settings.cluster is None:  # the SQLite file (PostgreSQL's disk is its own)
            await asyncio.to_thread(probe_database_disk, settings.db_path)

    async def archive() -> dict[str, Any]:
        return await asyncio.to_thread(probe_archive, settings.archive_dir,
                                       settings.min_free_bytes)

    async def engine() -> None:
        if not app[SCHEDULER].alive:
            raise NotReady("the scheduler's dispatcher loop is not running")

    async def accepting() -> None:
        if not app[SCHEDULER].accepting:
            raise NotReady("the server is shutting down and takes no new tasks")

    for name, check in (("database", database), ("archive", archive), ("engine", engine),
                        ("accepting", accepting)):
        checks.add(name, check)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 when every readiness check passes, else 503 naming the ones that failed."""
    identity(request).require("viewer")
    checks = await request.app[READINESS].run()
    ready = all(result["ok"] for result in checks.values())
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks},
                         status=200 if ready else 503)


# /stats --------------------------------------------------------------------------------------

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(raw: str | None, now: float) -> float:
    """`since` as Unix seconds: an RFC 3339 time, Unix seconds, or an age such as `6h`."""
    if not raw:
        return now - STATS_WINDOW_S
    found = _AGO.fullmatch(raw)
    if found:
        return now - float(found[1]) * _UNIT_S[found[2]]
    with contextlib.suppress(ValueError):
        return float(raw)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest("invalid query", code="invalid_request", details=[{
            "field": "since",
            "message": "an RFC 3339 time, Unix seconds, or an age such as 30m, 6h, 7d"}],
        ) from None
    if parsed.tzinfo is None:
        raise BadRequest("invalid query", code="invalid_request", details=[{
            "field": "since", "message": "an RFC 3339 time needs its offset (Z)"}])
    return parsed.timestamp()


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile, interpolated between the nearest ranks; None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[round(q * 100) - 1], 3)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per script: count, by_status, success_rate (success over success, failed and timeout;
    cancelled is a user's choice, not an outcome), duration p50/p95, queue_wait_p95."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["script"]].append(row)
    out = {}
    for script in sorted(grouped):
        tasks = grouped[script]
        by_status: dict[str, int] = defaultdict(int)
        for row in tasks:
            by_status[row["status"]] += 1
        ended = sum(by_status.get(s, 0) for s in (TaskStatus.SUCCESS, TaskStatus.FAILED,
                                                  TaskStatus.TIMEOUT))
        durations = sorted(r["duration"] for r in tasks if r["duration"] is not None)
        waits = sorted(r["wait"] for r in tasks if r["wait"] is not None)
        out[script] = {
            "count": len(tasks), "by_status": dict(sorted(by_status.items())),
            "success_rate":
                round(by_status.get(TaskStatus.SUCCESS, 0) / ended, 4) if ended else None,
            "duration_p50": _quantile(durations, 0.5), "duration_p95": _quantile(durations, 0.95),
            "queue_wait_p95": _quantile(waits, 0.95),
        }
    return out


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    """Per-script counts, success rate and percentiles over a window (default 24 h)."""
    who = identity(request)
    who.require("viewer")
    now = time.time()
    since = parse_since(request.query.get("since"), now)
    rows = await request.app[DB].stats_rows(since, request.query.get("script") or None)
    rows = [row for row in rows if who.allows(row["script"])]
    scripts = await asyncio.to_thread(summarize, rows)
    return json_response({"since": rfc3339(since), "until": rfc3339(now), "scripts": scripts})


# Alerts' lifetime and the scheduler's observer ----------------------------------------------

ALERTS_GRACE_S = 5.0  # at shutdown, how long queued alerts may still take to go out


def observer(app: web.Application) -> Callable[[dict[str, Any], TaskStatus, TaskStatus], None]:
    """What the scheduler calls after each committed transition: metrics, then alerts."""
    registry, alerts = app[METRICS], app[ALERTS]

    def on_transition(row: dict[str, Any], old: TaskStatus, new: TaskStatus) -> None:
        try:
            registry.on_transition(row, old, new)
            alerts.on_transition(row, old, new)
        except Exception:  # a bug here must not fail the transition, already committed
            log.exception("transition_observer_failed", task_id=row["id"])

    return on_transition


async def alerts_service(app: web.Application) -> AsyncIterator[None]:
    """Own the alerts' worker: started before the scheduler, stopped after it."""
    settings = app[SETTINGS]

    async def read_tail(task: dict[str, Any]) -> bytes:
        total = task["output_bytes"]
        rows = await app[DB].segments(task["id"])
        known = {r["path"]: r["raw_bytes"] for r in rows if r["closed_at"] is not None}
        parts = archive.read_raw(settings.archive_dir, task["logs_path"],
                                 max(total - TAIL_BYTES, 0), total, known)
        return await asyncio.to_thread(b"".join, parts)

    alerts = app[ALERTS] = Alerts(settings, app[METRICS], read_tail)
    worker = asyncio.create_task(alerts.run(), name="alerts")
    try:
        yield
    finally:
        await alerts.close(ALERTS_GRACE_S)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
