"""REST for schedules (PROTOCOL.md, "Schedules"): list, create, read, change, delete, pause,
resume, run now, and the slot records; and the timer's place in the app's lifetime."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from remoterun import errors, store
from remoterun.api import (
    ALERTS,
    CATALOGUE,
    DB,
    METRICS,
    SCHEDULER,
    SETTINGS,
    identity,
    json_response,
)
from remoterun.api.guard import audit_entry
from remoterun.api.http import read_json
from remoterun.auth import Identity
from remoterun.catalogue import MetadataError
from remoterun.engine.cron import explain, rfc
from remoterun.engine.schedule_spec import Spec, parse
from remoterun.engine.schedules import Entry, Schedules, new_row, timing_of
from remoterun.store import statements
from remoterun.wire import rfc3339

SCHEDULES = web.AppKey("schedules", Schedules)
routes = web.RouteTableDef()
NEXT_RUNS = 5


async def service(app: web.Application) -> AsyncIterator[None]:
    """Start the timer once the scheduler runs; stop it before the scheduler closes."""
    scheduler = app[SCHEDULER]
    timer = app[SCHEDULES] = Schedules(app[SETTINGS], app[DB], scheduler, app[CATALOGUE],
                                       app[METRICS])
    observe = scheduler.on_transition

    def on_transition(row: dict[str, Any], old: Any, new: Any) -> None:
        observe(row, old, new)
        timer.on_transition(row, new)

    scheduler.on_transition = on_transition
    timer.on_unstarted = app[ALERTS].on_slot
    await timer.start()
    try:
        yield
    finally:
        await timer.close()


def schedule_json(entry: Entry, now: float) -> dict[str, Any]:
    """A schedule as the API shows it."""
    spec = entry.spec
    upcoming = spec.timing.next(max(entry.cursor, now - spec.offset_s), NEXT_RUNS) \
        if spec.enabled else []
    return {**spec.fields(), "source": spec.source, "paused": entry.paused,
            "next_runs": [rfc(at + spec.offset_s) for at in upcoming],
            "last": None if entry.last is None else slot_json(entry.last)}


def slot_json(row: dict[str, Any]) -> dict[str, Any]:
    """A slot record as `GET /schedules/{name}/runs` shows it."""
    return {"slot": rfc3339(row["slot"]), "outcome": row["outcome"],
            "task_id": row["task_id"], "reason": row["reason"]}


def _entry(request: web.Request, role: str = "viewer") -> Entry:
    """The {name} schedule, once the caller may act on its script with `role`."""
    name = request.match_info["name"]
    entry = request.app[SCHEDULES].entries.get(name)
    if entry is None:
        raise errors.NotFound(f"no schedule {name!r}", code="unknown_schedule")
    identity(request).require_task(entry.spec.script, role)
    return entry


def _api_only(entry: Entry) -> None:
    if entry.spec.source == "config":
        raise errors.Conflict(f"schedule {entry.spec.name!r} is defined in config.toml",
                              code="defined_in_config")


async def _checked(request: web.Request, body: Any) -> Spec:
    """A schedule from a body, its script known, runnable by the caller, its params passing
    the script's schema (422 `invalid_schedule` otherwise)."""
    app = request.app
    spec = await asyncio.to_thread(parse, body, app[SCHEDULES].zone)  # reads the zone's file
    try:
        script = app[CATALOGUE].resolve(spec.script)
    except (errors.NotFound, MetadataError) as exc:
        raise _invalid("script", getattr(exc, "message", str(exc))) from None
    identity(request).require_script(script)
    try:
        script.validate(spec.params)
    except errors.RemoteRunError as exc:
        raise _invalid("params", exc.message, exc.details) from None
    return spec


def _invalid(field: str, message: str, more: list[Any] | None = None) -> errors.InvalidParams:
    details = [{"field": field, "message": message}, *(more or [])]
    return errors.InvalidParams(f"invalid schedule: {field}: {message}",
                                code="invalid_schedule", details=details)


async def _write(request: web.Request, action: str, name: str, script: str,
                 change: store.Statement) -> None:
    """Commit a schedule's change with its audit row, then have the timer read it."""
    audit = statements.insert_audit(audit_entry(request, action, detail=name), script=script)
    await request.app[SCHEDULER].record([change, audit])
    await request.app[SCHEDULES].load()


def _shown(request: web.Request, name: str) -> web.Response:
    timer = request.app[SCHEDULES]
    return json_response(schedule_json(timer.entries[name], timer.clock()))


@routes.get("/schedules")
async def list_schedules(request: web.Request) -> web.Response:
    """Every schedule of a script the caller may read."""
    who: Identity = identity(request)
    who.require("viewer")
    timer = request.app[SCHEDULES]
    now = timer.clock()
    return json_response({"schedules": [schedule_json(e, now) for e in timer.entries.values()
                                        if who.allows(e.spec.script)]})


@routes.post("/schedules")
async def create_schedule(request: web.Request) -> web.Response:
    """Create an API schedule."""
    identity(request).require("operator")
    spec = await _checked(request, await read_json(request))
    if spec.name in request.app[SCHEDULES].entries:
        raise errors.Conflict(f"a schedule {spec.name!r} exists", code="schedule_exists")
    try:
        await _write(request, "schedule_create", spec.name, spec.script,
                     statements.save_schedule(new_row(spec, time.time())))
    except store.StaleWrite:
        raise errors.Conflict(f"a schedule {spec.name!r} exists", code="schedule_exists") \
            from None
    response = _shown(request, spec.name)
    response.set_status(201)
    response.headers["Location"] = f"/schedules/{spec.name}"
    return response


@routes.get("/schedules/{name}")
async def get_schedule(request: web.Request) -> web.Response:
    """One schedule."""
    entry = _entry(request)
    return json_response(schedule_json(entry, request.app[SCHEDULES].clock()))


@routes.patch("/schedules/{name}")
async def patch_schedule(request: web.Request) -> web.Response:
    """Change fields of an API schedule; its recorded slots keep their outcome."""
    entry = _entry(request, "operator")
    _api_only(entry)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _invalid("", "expected an object")
    if body.get("name", entry.spec.name) != entry.spec.name:
        raise _invalid("name", "a schedule's name cannot change")
    merged = {k: v for k, v in entry.spec.fields().items() if v is not None}
    if "cron" in body or "every" in body:
        merged.pop("cron", None)
        merged.pop("every", None)
    spec = await _checked(request, {**merged, **body})
    stored = {k: v for k, v in spec.fields().items() if k != "name"}
    values: dict[str, Any] = {"spec": json.dumps(stored), "updated_at": time.time()}
    if timing_of(spec) != timing_of(entry.spec):  # its slots are the new timing's from now
        values["since"] = values["updated_at"]
    await _write(request, "schedule_update", spec.name, spec.script,
                 statements.change_schedule(spec.name, values))
    return _shown(request, spec.name)


@routes.delete("/schedules/{name}")
async def delete_schedule(request: web.Request) -> web.Response:
    """Remove an API schedule; its tasks and slot records stay."""
    entry = _entry(request, "operator")
    _api_only(entry)
    await _write(request, "schedule_delete", entry.spec.name, entry.spec.script,
                 statements.delete_schedule(entry.spec.name))
    return web.Response(status=204)


@routes.post("/schedules/{name}/pause")
async def pause_schedule(request: web.Request) -> web.Response:
    """No slot of it starts (nor is recorded) until it is resumed."""
    entry = _entry(request, "operator")
    await _write(request, "schedule_pause", entry.spec.name, entry.spec.script,
                 statements.change_schedule(entry.spec.name, {
                     "paused": True, "updated_at": time.time()}))
    return _shown(request, entry.spec.name)


@routes.post("/schedules/{name}/resume")
async def resume_schedule(request: web.Request) -> web.Response:
    """Its slots start again, from now on."""
    entry = _entry(request, "operator")
    now = time.time()
    values: dict[str, Any] = {"paused": False, "updated_at": now}
    if entry.paused:
        values["since"] = now  # the slots that passed while paused are not recorded
    await _write(request, "schedule_resume", entry.spec.name, entry.spec.script,
                 statements.change_schedule(entry.spec.name, values))
    return _shown(request, entry.spec.name)


@routes.post("/schedules/{name}/run")
async def run_schedule(request: web.Request) -> web.Response:
    """Submit one task of it now, outside its slots."""
    entry = _entry(request, "operator")
    timer = request.app[SCHEDULES]
    identity(request).require_script(request.app[CATALOGUE].resolve(entry.spec.script))
    task = await timer.submit(entry, None, "started",
                              audit=audit_entry(request, "schedule_run",
                                                detail=entry.spec.name))
    assert task is not None, "a run now has no slot to lose"
    return json_response(task, status=201, headers={"Location": f"/tasks/{task['id']}"})


@routes.get("/schedules/{name}/runs")
async def schedule_runs(request: web.Request) -> web.Response:
    """The slot records, newest first, a page at a time."""
    entry = _entry(request)
    query = request.query
    try:
        limit = int(query.get("limit", "50"))
        before = float(query["cursor"]) if query.get("cursor") else None
    except ValueError:
        raise errors.BadRequest("limit is an integer and cursor a next_cursor",
                                code="invalid_request") from None
    if not 1 <= limit <= 500:
        raise errors.BadRequest("limit must be between 1 and 500", code="invalid_request",
                                details=[{"field": "limit", "message": "1 to 500"}])
    rows = await request.app[DB].slots(entry.spec.name, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"runs": [slot_json(r) for r in rows],
                          "next_cursor": repr(rows[-1]["slot"]) if more else None})


@routes.get("/cron/next")
async def cron_next(request: web.Request) -> web.Response:
    """The next instants of a cron expression or a period in a zone, and the cron in words:
    what the page shows as one types, and `remoterun schedule next`."""
    identity(request).require("viewer")
    query = request.query
    body: dict[str, Any] = {"name": "preview", "script": "-"}
    for key in ("cron", "every", "timezone"):
        if query.get(key):
            body[key] = query[key]
    try:
        count = int(query.get("n", str(NEXT_RUNS)))
    except ValueError:
        count = 0
    if not 1 <= count <= 100:
        raise _invalid("n", "an integer from 1 to 100")
    spec = await asyncio.to_thread(parse, body, request.app[SCHEDULES].zone)
    upcoming = spec.timing.next(time.time(), count)
    return json_response({"next_runs": [rfc(at) for at in upcoming],
                          "timezone": spec.timezone,
                          "description": explain(spec.cron) if spec.cron else
                          f"every {spec.every}, counted from the epoch (UTC)"})
