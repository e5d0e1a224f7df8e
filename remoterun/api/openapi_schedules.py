"""The OpenAPI description of /schedules (issue 29), merged into openapi.document()."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
TIME = {"type": "string", "format": "date-time"}
ERROR = {"$ref": "#/components/schemas/Error"}
FIELDS: dict[str, Any] = {
    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,62}$"},
    "script": {"type": "string"},
    "cron": {"type": ["string", "null"], "description": "5 fields, 6 with seconds first, or "
                                                        "@hourly/@daily/@weekly/@monthly/@yearly"},
    "every": {"type": ["string", "null"], "description": 'a period: "90s", "15m", "1h30m"'},
    "timezone": {"type": "string", "description": "an IANA name"},
    "params": {"type": "object"},
    "priority": {"type": "integer"},
    "timeout": {"type": ["number", "null"]},
    "max_retries": {"type": "integer", "minimum": 0},
    "overlap": {"enum": ["forbid", "allow", "replace", "queue"]},
    "catch_up": {"enum": ["latest", "all", "none"]},
    "catch_up_window_s": {"type": "number", "minimum": 0},
    "jitter_s": {"type": "number", "minimum": 0},
    "enabled": {"type": "boolean"},
    "node": {"type": ["string", "null"]},
    "labels": {"type": ["array", "null"], "items": {"type": "string"}},
}
RUN = {
    "type": "object",
    "required": ["slot", "outcome", "task_id", "reason"],
    "properties": {
        "slot": TIME,
        "outcome": {"enum": ["started", "skipped_overlap", "queued", "replaced", "missed",
                             "failed_to_submit"]},
        "task_id": {"type": ["string", "null"]},
        "reason": {"type": ["string", "null"]},
    },
}
SCHEMAS: dict[str, Any] = {
    "Schedule": {
        "type": "object",
        "required": ["name", "script", "timezone", "source", "paused", "next_runs", "last"],
        "properties": {**FIELDS, "source": {"enum": ["config", "api"]},
                       "paused": {"type": "boolean"},
                       "next_runs": {"type": "array", "items": TIME},
                       "last": {"oneOf": [RUN, {"type": "null"}]}},
    },
    "ScheduleRun": RUN,
}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
TEXT = {400: "a malformed request", 401: "no token, or an unknown one (auth on)",
        403: "the token's role or script list does not allow it",
        404: "unknown_schedule", 409: "schedule_exists, or defined_in_config",
        421: "auth off and a Host that is not loopback",
        422: "invalid_schedule: details name each bad field",
        503: "the database is busy, or the server is shutting down"}


def _op(name: str, summary: str, ok: dict[int, Any], errors: tuple[int, ...] = (),
        body: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {str(k): v for k, v in ok.items()}
    for code in sorted({*errors, 401, 403, 421}):
        responses[str(code)] = {"description": TEXT[code], "content": {JSON: {"schema": ERROR}}}
    op: dict[str, Any] = {"operationId": name, "summary": summary, "responses": responses}
    if name != "listSchedules" and name != "createSchedule":
        op["parameters"] = [NAME]
    if body:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": {
            "type": "object", "properties": FIELDS}}}}
    return op


def _answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def paths() -> dict[str, Any]:
    """The /schedules paths."""
    one = _answer({"$ref": "#/components/schemas/Schedule"}, "the schedule")
    task = _answer({"$ref": "#/components/schemas/Task"}, "the task submitted")
    runs = _answer({"type": "object", "required": ["runs", "next_cursor"], "properties": {
        "runs": {"type": "array", "items": {"$ref": "#/components/schemas/ScheduleRun"}},
        "next_cursor": {"type": ["string", "null"]}}}, "slot records, newest first")
    listed = _answer({"type": "object", "required": ["schedules"], "properties": {
        "schedules": {"type": "array", "items": {"$ref": "#/components/schemas/Schedule"}}}},
        "the schedules")
    runs_op = _op("scheduleRuns", "a schedule's slot records", {200: runs}, (400, 404))
    runs_op["parameters"] += [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}]
    made = {**one, "links": {name: {"operationId": name,
                                    "parameters": {"name": "$response.body#/name"}}
                             for name in ("getSchedule", "scheduleRuns", "pauseSchedule",
                                          "resumeSchedule", "runSchedule")}}
    return {
        "/schedules": {
            "get": _op("listSchedules", "every schedule", {200: listed}),
            "post": _op("createSchedule", "create an API schedule", {201: made},
                        (400, 409, 422, 503), body=True)},
        "/schedules/{name}": {
            "get": _op("getSchedule", "one schedule", {200: one}, (404,)),
            "patch": _op("updateSchedule", "change an API schedule", {200: one},
                         (400, 404, 409, 422, 503), body=True),
            "delete": _op("deleteSchedule", "remove an API schedule",
                          {204: {"description": "removed"}}, (404, 409, 503))},
        "/schedules/{name}/pause": {"post": _op("pauseSchedule", "pause", {200: one},
                                                (404, 503))},
        "/schedules/{name}/resume": {"post": _op("resumeSchedule", "resume", {200: one},
                                                 (404, 503))},
        "/schedules/{name}/run": {"post": _op("runSchedule", "submit one task now",
                                              {201: task}, (404, 409, 422, 503))},
        "/schedules/{name}/runs": {"get": runs_op},
        "/cron/next": {"get": _preview()},
    }


def _preview() -> dict[str, Any]:
    """GET /cron/next: a cron's (or a period's) next instants and its words."""
    op = _op("cronNext", "the next instants of a cron or a period, and the cron in words",
             {200: _answer({"type": "object", "required": ["next_runs", "description"],
                            "properties": {"next_runs": {"type": "array", "items": TIME},
                                           "timezone": {"type": "string"},
                                           "description": {"type": "string"}}},
                           "the instants")}, (422,))
    op["parameters"] = [{"name": key, "in": "query", "required": False,
                         "schema": {"type": "string"}} for key in ("cron", "every", "timezone")]
    op["parameters"].append({"name": "n", "in": "query", "required": False,
                             "schema": {"type": "integer", "minimum": 1, "maximum": 100}})
    return op
