"""The aiohttp face of RemoteRun; the typed keys under which the app keeps its services."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from aiohttp import web

from remoterun.alerts import Alerts
from remoterun.auth import Authenticator, FailureLimiter, Identity, Sessions
from remoterun.catalogue import Catalogue
from remoterun.config import Settings
from remoterun.engine.scheduler import Scheduler
from remoterun.metrics import Metrics
from remoterun.store import Store
from remoterun.wire import dumps

if TYPE_CHECKING:
    from remoterun.api.audit import Denials
    from remoterun.api.monitor import Readiness

SETTINGS = web.AppKey("settings", Settings)
DB: web.AppKey[Store] = web.AppKey("db")
CATALOGUE = web.AppKey("catalogue", Catalogue)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
ALERTS = web.AppKey("alerts", Alerts)
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
DENIALS: web.AppKey[Denials] = web.AppKey("denials")
SESSIONS = web.AppKey("sessions", Sessions)
LIMITER = web.AppKey("limiter", FailureLimiter)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")

IDENTITY: web.RequestKey[Identity | None] = web.RequestKey("identity")  # by guard_middleware


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response, encoded as the WebSocket frames are (orjson, compact)."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def identity(request: web.Request) -> Identity:
    """The caller, as the auth middleware established it."""
    found = request[IDENTITY]
    assert found is not None, "a public route asked for the caller"
    return found
