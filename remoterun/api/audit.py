"""`GET /audit`: the audit trail, admin only, newest first, filtered and paged."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from remoterun.api import DB, identity, json_response
from remoterun.errors import BadRequest
from remoterun.store.sqlite import audit_json, list_audit

routes = web.RouteTableDef()
ACTIONS = ("submit", "cancel", "signal", "stdin", "attach", "download", "login", "logout",
           "denied")


def _since(raw: str | None, problems: list[dict[str, str]]) -> float | None:
    """An RFC 3339 time (or epoch seconds) as epoch seconds."""
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        problems.append({"field": "since", "message": "an RFC 3339 time"})
        return None
    if when.tzinfo is None:
        problems.append({"field": "since", "message": "an RFC 3339 time with Z or an offset"})
        return None
    return when.timestamp()


def _int(raw: str, low: int, high: int, name: str, problems: list[dict[str, str]]) -> int:
    value = int(raw) if raw.isdigit() and len(raw) <= 19 else low - 1
    if not low <= value <= high:
        problems.append({"field": name, "message": f"an integer from {low} to {high}"})
    return value


@routes.get("/audit")
async def get_audit(request: web.Request) -> web.Response:
    """Audit events, newest first: `{"events": [...], "next_cursor"}`; an admin token with a
    script list sees those scripts' rows and its own."""
    who = identity(request)
    who.require("admin")
    query = request.query
    problems: list[dict[str, str]] = []
    action = query.get("action") or None
    if action is not None and action not in ACTIONS:
        problems.append({"field": "action", "message": f"one of {list(ACTIONS)}"})
    limit = _int(query.get("limit", "50"), 1, 500, "limit", problems)
    cursor = _int(query["cursor"], 1, 2**62, "cursor", problems) if query.get("cursor") \
        else None
    since = _since(query.get("since"), problems)
    if problems:
        raise BadRequest("invalid query", code="invalid_request", details=problems)
    rows = await list_audit(request.app[DB], actor=query.get("actor") or None, action=action,
                            task_id=query.get("task") or None, since=since,
                            limit=limit + 1, before=cursor, scripts=who.scripts,
                            caller=who.name)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"events": [audit_json(r) for r in rows],
                          "next_cursor": str(rows[-1]["id"]) if more else None})
