"""`GET /openapi.json`: the REST endpoints of PROTOCOL.md as an OpenAPI 3.1 document.

Kept true by the tests: every route the app serves is described here, and schemathesis fuzzes
the live server against this document (no 5xx, no answer that contradicts it).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from remoterun import __version__
from remoterun.api import json_response, openapi_schedules

routes = web.RouteTableDef()

JSON = "application/json"
STATUSES = ["pending", "running", "success", "failed", "timeout", "cancelled"]
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
PARAMS = {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Scalar"}}
ERROR_TEXT = {
    400: "a malformed request (bad JSON, unknown fields, wrong types, a bad query)",
    401: "no token, or an unknown one (auth on)",
    403: "the token's role or script list does not allow it; or a foreign Origin",
    404: "no such task or script",
    409: "the task already ended; at submit, integrity_failed: the script failed its "
         "sha256 pin or signature check",
    410: "the output was deleted by retention",
    413: "the body is over server.max_body_bytes",
    415: "a POST body that is not application/json",
    416: "a Range that cannot be served",
    421: "auth off and a Host that is not loopback",
    422: "params that fail the script's schema; no node could take it",
    429: "too many failed signatures from this address of late: wait (Retry-After)",
    503: "shutting down, the queue is full, or not ready",
}
COMMON = (401, 403, 421)

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a machine code"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Scalar": {"type": ["string", "number", "integer", "boolean"]},
    "Task": {
        "type": "object",
        "required": [
            "id",
            "script",
            "params",
            "status",
            "priority",
            "timeout",
            "max_retries",
            "attempt",
            "pty",
            "interactive",
            "exit_code",
            "error",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
            "submitted_by",
            "logs_path",
            "output_bytes",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "script": {"type": "string"},
            "params": PARAMS,
            "status": {"type": "string", "enum": STATUSES},
            "priority": {"type": "integer"},
            "timeout": {"type": ["number", "null"]},
            "max_retries": {"type": "integer", "minimum": 0},
            "attempt": {"type": "integer", "minimum": 1},
            "pty": {"type": "boolean"},
            "interactive": {"type": "boolean"},
            "exit_code": {
                "type": ["integer", "null"],
                "description": "negative: killed by signal -N",
            },
            "error": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "started_at": NULLABLE_TIME,
            "finished_at": NULLABLE_TIME,
            "run_after": NULLABLE_TIME,
            "submitted_by": {"type": "string"},
            "logs_path": {"type": "string"},
            "output_bytes": {"type": "integer", "minimum": 0},
            "last_seq": {"type": "integer", "minimum": 0},
            "node": {"type": ["string", "null"]},
            "queue_position": {"type": "integer", "minimum": 1},
            "schedule": {"type": ["string", "null"], "description": "the schedule that "
                                                                    "submitted it"},
            "scheduled_for": NULLABLE_TIME,
        },
    },
    "Submit": {
        "type": "object",
        "additionalProperties": False,
        "anyOf": [{"required": ["script"]}, {"required": ["script_path"]}],
        "properties": {
            "script": {"type": "string", "description": "relative to the scripts directory"},
            "script_path": {"type": "string", "description": "alias of script"},
            "params": PARAMS,
            "priority": {"type": "integer", "minimum": -1000000, "maximum": 1000000},
            "timeout": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "max_retries": {"type": "integer", "minimum": 0},
            "pty": {"type": "boolean"},
            "interactive": {"type": "boolean"},
            "stdin": {"type": "string"},
            "node": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Param": {
        "type": "object",
        "required": ["name", "type", "required"],
        "properties": {
            "name": {"type": "string"},
            "type": {"enum": ["string", "integer", "number", "boolean"]},
            "required": {"type": "boolean"},
            "secret": {"type": "boolean"},
            "default": {"$ref": "#/components/schemas/Scalar"},
            "enum": {"type": "array"},
            "pattern": {"type": "string"},
            "min": {"type": "number"},
            "max": {"type": "number"},
            "description": {"type": "string"},
        },
    },
    "Script": {
        "type": "object",
        "required": ["name", "description", "params"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "params": {
                "type": ["array", "null"],
                "items": {"$ref": "#/components/schemas/Param"},
                "description": "null: free-form params",
            },
            "timeout": {"type": ["number", "null"]},
            "max_concurrency": {"type": ["integer", "null"]},
            "roles": {"type": ["array", "null"], "items": {"type": "string"}},
            "runnable": {"type": "boolean"},
            "error": {"type": "string",
                      "description": "its metadata (sidecar) is malformed: the file, key and "
                                     "problem; it is not runnable until fixed"},
        },
    },
    "Identity": {
        "type": "object",
        "required": ["name", "role"],
        "properties": {
            "name": {"type": "string"},
            "role": {"enum": ["viewer", "operator", "admin"]},
            "auth": {"type": "boolean"},
            # /login's answer: sent beside the cookie (X-RemoteRun-Session-Key), which alone
            # never authenticates
            "session_key": {"type": "string"},
        },
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _op(
    name: str,
    summary: str,
    ok: dict[int, dict[str, Any]],
    errors: tuple[int, ...] = (),
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(code): answer for code, answer in ok.items()}
    for code in sorted(set(errors) | ({421} if public else set(COMMON))):
        responses[str(code)] = _json(_ref("Error"), ERROR_TEXT[code])
    op: dict[str, Any] = {"operationId": name, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if public:
        op["security"] = [{}]
    return op


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
SINCE = _query(
    "since", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, "after this output seq"
)
CURSOR = _query(
    "cursor",
    {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"},
    "next_cursor of the previous page",
)
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    "description": "the last output seq seen; wins over ?since=",
}
# From a submitted task to what can be asked about it (schemathesis follows these too).
TASK_LINKS = {
    name: {"operationId": name, "parameters": {"id": "$response.body#/id"}}
    for name in ("getTask", "cancelTask", "taskLogs", "taskOutput")
}
TEXT = {"text/plain": {"schema": {"type": "string"}}}
# One Server-Sent Event (the stream is a sequence of them): `data` is a JSON text, `id` an
# output seq (on `output`, and on `exit`: the last seq, for a clean resume).
SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"enum": ["task", "output", "status", "exit", "ready"]},
                "data": {"type": "string", "contentMediaType": "application/json"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "retry": {"type": "integer"},
            },
        }
    }
}
LIST = {
    "type": "object",
    "required": ["tasks", "next_cursor"],
    "properties": {
        "tasks": {"type": "array", "items": _ref("Task")},
        "next_cursor": {"type": ["string", "null"]},
    },
}
OBJECT = {"type": "object"}
TAIL = _query("tail", {"type": "integer", "minimum": 0},
              "start at the frames holding the last N lines (at most 10,000)")
SEARCH_CURSOR = r"^[0-9]{1,18}\.[1-9][0-9]{0,17}$"
SEARCH = {
    "type": "object",
    "required": ["matches", "next_cursor"],
    "properties": {
        "matches": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["line", "seq", "offset", "text"],
                "properties": {
                    "line": {"type": "integer", "minimum": 1},
                    "seq": {"type": "integer", "minimum": 1},
                    "offset": {"type": "integer", "minimum": 0},
                    "text": {"type": "string"},
                },
            },
        },
        "next_cursor": {"type": ["string", "null"]},
    },
}


def _paths() -> dict[str, Any]:
    task = _json(_ref("Task"), "the task")
    return {
        "/tasks": {
            "post": _op(
                "submitTask",
                "submit a task",
                {
                    201: {
                        **task,
                        "links": TASK_LINKS,
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    }
                },
                (400, 404, 409, 413, 415, 422, 503),
                body=_ref("Submit"),
            ),
            "get": _op(
                "listTasks",
                "tasks, newest first",
                {200: _json(LIST, "a page of tasks")},
                (400,),
                [
                    _query("status", {"enum": STATUSES}),
                    _query("script", {"type": "string"}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                    CURSOR,
                ],
            ),
        },
        "/tasks/{id}": {"get": _op("getTask", "one task", {200: task}, (404,), [TASK_ID])},
        "/tasks/{id}/cancel": {
            "post": _op(
                "cancelTask",
                "cancel a pending or running task",
                {200: task},
                (404, 409, 415),
                [TASK_ID],
            )
        },
        "/tasks/{id}/logs": {
            "get": _op(
                "taskLogs",
                "Server-Sent Events: task, output (id = seq), status, exit",
                {
                    200: {"description": "the event stream", "content": SSE},
                    204: {"description": "resumed after the end: nothing more (stops EventSource)"},
                },
                (400, 404),
                [TASK_ID, SINCE, LAST_EVENT_ID, TAIL],
            )
        },
        "/tasks/{id}/search": {
            "get": _op(
                "taskSearch",
                "the lines of the output that match, oldest first, a page at a time",
                {200: _json(SEARCH, "a page of matching lines")},
                (400, 404, 410, 422),
                [
                    TASK_ID,
                    {**_query("q", {"type": "string", "minLength": 1}, "the text or regex"),
                     "required": True},
                    _query("regex", {"enum": ["true", "false"]}, "q is a Python regex"),
                    _query("stream", {"enum": ["stdout", "stderr", "pty"]}),
                    _query("limit", {"type": "integer", "minimum": 1},
                           "matches per page: 100 by default, at most 1000 (more is cut)"),
                    _query("cursor", {"type": "string", "pattern": SEARCH_CURSOR},
                           "next_cursor of the previous page"),
                ],
            )
        },
        "/tasks/{id}/output": {
            "get": _op(
                "taskOutput",
                "the archived output: raw bytes, one stream, or jsonl per frame",
                {
                    200: {
                        "description": "the output",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    206: {"description": "a byte range of the raw text", "content": TEXT},
                },
                (400, 404, 410, 416),
                [
                    TASK_ID,
                    SINCE,
                    _query("stream", {"enum": ["stdout", "stderr", "pty"]}),
                    _query("format", {"enum": ["text", "jsonl"]}),
                ],
            )
        },
        "/scripts": {
            "get": _op(
                "listScripts",
                "the scripts one may run",
                {
                    200: _json(
                        {
                            "type": "object",
                            "required": ["scripts"],
                            "properties": {"scripts": {"type": "array", "items": _ref("Script")}},
                        },
                        "the scripts",
                    )
                },
            )
        },
        "/nodes": {
            "get": _op(
                "listNodes",
                "the nodes of the cluster",
                {
                    200: _json(
                        {
                            "type": "object",
                            "required": ["nodes"],
                            "properties": {
                                "nodes": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "labels": {"type": ["object", "array"]},
                                            "workers": {"type": "integer"},
                                            "running": {"type": "integer"},
                                            "last_seen": NULLABLE_TIME,
                                            "alive": {"type": "boolean"},
                                        },
                                    },
                                }
                            },
                        },
                        "the nodes",
                    )
                },
            )
        },
        "/healthz": {
            "get": _op(
                "healthz",
                "liveness: database and archive usable",
                {
                    200: _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "healthy",
                    ),
                    503: _json({"type": "object", "required": ["status"]}, "unhealthy"),
                },
                public=True,
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "readiness: writable database and archive, engine alive",
                {
                    200: _json(
                        {
                            "type": "object",
                            "required": ["status", "checks"],
                            "properties": {"status": {"const": "ready"}, "checks": OBJECT},
                        },
                        "ready",
                    ),
                    503: _json(
                        {
                            "type": "object",
                            "required": ["status", "checks"],
                            "properties": {"status": {"const": "not_ready"}, "checks": OBJECT},
                        },
                        "not ready",
                    ),
                },
            )
        },
        "/audit": {
            "get": _op(
                "audit",
                "the audit log (admin), newest first",
                {
                    200: _json(
                        {
                            "type": "object",
                            "required": ["events", "next_cursor"],
                            "properties": {
                                "events": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            k: {"type": ["string", "null"]}
                                            for k in (
                                                "ts",
                                                "actor",
                                                "role",
                                                "address",
                                                "action",
                                                "task_id",
                                                "script",
                                                "result",
                                                "detail",
                                            )
                                        },
                                    },
                                },
                                "next_cursor": {"type": ["string", "null"]},
                            },
                        },
                        "a page of events",
                    )
                },
                (400,),
                [
                    _query("actor", {"type": "string"}),
                    _query("action", {"type": "string"}),
                    _query("task", {"type": "string"}),
                    _query("since", {"type": "string"}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                    _query("cursor", {"type": "string"}),
                ],
            )
        },
        "/tasks/{id}/events": {
            "get": _op(
                "taskEvents",
                "the task's transitions, oldest first",
                {200: _json(OBJECT, "{\"events\": [{id, ts, old_status, new_status, attempt, "
                                    "detail, exit_code}]}")},
                (403, 404),
                [TASK_ID],
            )
        },
        "/events": {
            "get": _op(
                "events",
                "Server-Sent Events: a `task` event per transition of any task",
                {200: {"description": "the event stream", "content": SSE}},
                (400,),
                [_query("since", {"type": "string"})],
            )
        },
        "/stats": {
            "get": _op(
                "stats",
                "per script: count, by_status, success_rate, durations",
                {200: _json(OBJECT, "the statistics")},
                (400,),
                [_query("since", {"type": "string"}), _query("script", {"type": "string"})],
            )
        },
        "/metrics": {
            "get": _op(
                "metrics",
                "Prometheus text exposition",
                {200: {"description": "metrics", "content": TEXT}},
            )
        },
        "/login": {
            "post": _op(
                "login",
                "exchange a token for a session cookie",
                {200: _json(_ref("Identity"), "logged in (Set-Cookie)")},
                (400, 413, 415),
                body={
                    "type": "object",
                    "required": ["token"],
                    "properties": {"token": {"type": "string"}},
                },
                public=True,
            )
        },
        "/logout": {
            "post": _op(
                "logout",
                "revoke the session cookie",
                {200: _json(OBJECT, "logged out")},
                (415,),
                public=True,
            )
        },
        "/whoami": {
            "get": _op("whoami", "who the caller is", {200: _json(_ref("Identity"), "the caller")})
        },
        "/openapi.json": {
            "get": _op("openapi", "this document", {200: _json(OBJECT, "OpenAPI 3.1")}, public=True)
        },
        "/": {
            "get": _op(
                "page",
                "the web terminal page (`/?task={id}` opens a task)",
                {
                    200: {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                public=True,
            )
        },
    }


HOOK_NAME = {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}}
HOOK_ANSWER = {"type": "object", "required": ["triggered"], "properties": {
    "triggered": {"type": "boolean"}, "reason": {"type": "string"}, "task": _ref("Task"),
    "output": {"type": "string"}, "duplicate": {"type": "boolean"}}}


def _hook_paths() -> dict[str, Any]:
    """POST /hooks/{name} (signed, no token) and GET /hooks (issue 30)."""
    post = _op("postHook", "a signed request from another system starts the hook's script",
               {200: {"description": "not triggered (a `match` miss), a `wait` hook's ended "
                                     "task with its output, or a `stream` hook's output",
                      "content": {JSON: {"schema": HOOK_ANSWER}, **TEXT}},
                202: {**_json(HOOK_ANSWER, "the task was started (async, or a wait ran out)"),
                      "headers": {"Location": {"schema": {"type": "string"}}}}},
               (401, 403, 404, 413, 422, 429, 503), [HOOK_NAME], public=True)
    post["requestBody"] = {"required": False, "content": {
        JSON: {"schema": OBJECT}, "application/x-www-form-urlencoded": {"schema": OBJECT}}}
    hooks = {"type": "object", "required": ["hooks"], "properties": {"hooks": {
        "type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "script": {"type": "string"},
            "signature": {"enum": ["github", "gitlab", "hmac-sha256"]},
            "mode": {"enum": ["async", "wait", "stream"]},
            "deliveries": {"type": "array", "items": OBJECT}}}}}}
    listing = _op("listHooks", "the hooks (operator), without secrets, with their latest "
                  "deliveries", {200: _json(hooks, "the hooks")})
    return {"/hooks/{name}": {"post": post}, "/hooks": {"get": listing}}


def document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "RemoteRun",
            "version": __version__,
            "description": "Run scripts from a server's scripts directory, watch them "
            "live, keep every byte. The WebSocket endpoints (`/ws`, "
            "`/tasks/{id}/ws`) are described in docs/PROTOCOL.md.",
        },
        "paths": {**_paths(), **_hook_paths(), **openapi_schedules.paths()},
        "components": {
            "schemas": {**SCHEMAS, **openapi_schedules.SCHEMAS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "query": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        "security": [{"bearer": []}, {"query": []}, {}],
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of the REST API."""
    return json_response(document())
