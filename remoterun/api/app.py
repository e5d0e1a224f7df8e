"""The application factory: services in one cleanup context, error and auth middlewares, routes."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import WSCloseCode, web

from remoterun import errors
from remoterun.api import (
    AUTH,
    CATALOGUE,
    DB,
    DENIALS,
    IDENTITY,
    LIMITER,
    METRICS,
    READINESS,
    SCHEDULER,
    SESSIONS,
    SETTINGS,
    SOCKETS,
    audit,
    events,
    guard,
    hooks,
    http,
    json_response,
    listen,
    monitor,
    nodes,
    openapi,
    output,
    schedules,
    search,
    sse,
    ws,
)
from remoterun.archive.compressor import Compressor
from remoterun.archive.private import make_private
from remoterun.auth import Authenticator, FailureLimiter, Sessions, digest
from remoterun.catalogue import Catalogue, MetadataError
from remoterun.config import Settings
from remoterun.engine.peers import Alone
from remoterun.engine.protect import Protection
from remoterun.engine.queue import LocalQueue, QueuePolicy
from remoterun.engine.scheduler import Scheduler
from remoterun.isolation.sandbox import Sandbox
from remoterun.metrics import Metrics
from remoterun.retention import Sweeper
from remoterun.spawn import Children
from remoterun.store import Database, Store

log = structlog.get_logger(__name__)
PAGE_DIR = Path(__file__).resolve().parent.parent / "page"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Each of our exception classes, and the HTTP status it answers with (a subclass not listed
# takes its nearest listed base's).
STATUS: dict[type[errors.RemoteRunError], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.BadOrigin: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Gone: 410,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.MisdirectedRequest: 421,
    errors.InvalidParams: 422,
    errors.BadMetadata: 422,
    errors.Unencodable: 422,
    errors.TooManyRequests: 429,
    errors.Unavailable: 503,
    errors.QueueFull: 503,
}


def status_of(exc: errors.RemoteRunError) -> int:
    """The HTTP status of one of our exceptions."""
    if isinstance(exc, errors.Relayed):
        return exc.status
    return next((STATUS[k] for k in type(exc).__mro__ if k in STATUS), 400)


def error_response(status: int, code: str, message: str, **extra: object) -> web.Response:
    """PROTOCOL.md's error body."""
    return json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn our exceptions, aiohttp's HTTP errors and anything unforeseen into JSON bodies."""
    try:
        return await handler(request)
    except errors.RemoteRunError as exc:
        status = status_of(exc)
        if status in (401, 403):
            await guard.record_denied(request, exc)
        headers = None
        if exc.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return json_response(exc.to_json(), status=status, headers=headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(413, "too_large", f"the body is over the limit of {limit} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        if "Allow" in exc.headers:  # a 405 names the methods that are allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:  # the request's boundary: a bug of ours still answers JSON, and is logged
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "the server met an unexpected error; "
                                               "it is logged")


async def index(request: web.Request) -> web.FileResponse:
    """The web terminal page."""
    return web.FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _login_token(request: web.Request) -> str | None:
    """The token of a login body: JSON `{"token"}` or a form field `token`."""
    if request.content_type == "application/json":
        body = await http.read_json(request)
        token = body.get("token") if isinstance(body, dict) else None
    else:
        try:
            token = (await request.post()).get("token")
        except (ValueError, AssertionError) as exc:  # a form without its boundary, say
            raise errors.BadRequest(f"the form cannot be read: {exc}", code="invalid_form") \
                from exc
    return token if isinstance(token, str) else None


async def login(request: web.Request) -> web.Response:
    """Exchange a token for a server-side session: the cookie holds an opaque id, never the
    token; the body's `session_key` is what the page sends with it (a cookie alone never
    authenticates: auth.Sessions); POST /logout revokes it."""
    app = request.app
    limiter, address = app[LIMITER], request.remote or "-"
    wait = limiter.retry_after(address) if app[AUTH].enabled else None
    # Counted as failed before the body is read, so that logins sent at once cannot all be
    # checked before the first is counted; forgiven if the token is right.
    stamp = limiter.record(address) if app[AUTH].enabled and wait is None else None
    token = await _login_token(request)
    try:
        who = app[AUTH].identify(token)
    except errors.Unauthorized:
        if wait is not None:  # over the budget: a wrong token learns nothing
            raise errors.TooManyRequests(f"too many failed attempts from {address}: wait",
                                         retry_after_s=wait) from None
        raise
    if stamp is not None:
        limiter.forgive(address, stamp)
    body: dict[str, str] = {"name": who.name, "role": who.role}
    session = None
    if app[AUTH].enabled and token is not None:
        session = app[SESSIONS].create(digest(token))
        body["session_key"] = session.key  # read only by a page of our origin: the answer
    response = json_response(body)
    if session is not None:
        response.set_cookie(guard.cookie_name(request), session.id, httponly=True,
                            samesite="Strict", path="/", secure=request.secure,
                            max_age=math.ceil(app[SESSIONS].ttl_s))
    await guard.record(request, "login", who=who)
    return response


async def whoami(request: web.Request) -> web.Response:
    """Who the caller is (the page asks at start whether it must log in)."""
    who = request[IDENTITY]
    if who is None:
        raise errors.Unauthorized("log in with a token")
    return json_response({"name": who.name, "role": who.role,
                          "auth": request.app[AUTH].enabled})


async def logout(request: web.Request) -> web.Response:
    """Revoke the session on the server and drop its cookie."""
    key = guard.session_key(request)
    sessions = request.app[SESSIONS]
    revoked = key is not None and any(
        sessions.revoke(session_id, key) for session_id in guard.session_ids(request))
    response = json_response({"ok": True, "revoked": revoked})
    response.del_cookie(guard.cookie_name(request), path="/", secure=request.secure)
    await guard.record(request, "logout", result="ok" if revoked else "no_session")
    return response


def node_modules_dir() -> Path:
    """Where npm installed the page's packages (REMOTERUN_NODE_MODULES overrides)."""
    override = os.environ.get("REMOTERUN_NODE_MODULES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "node_modules"


# served prefix -> (the folder a build put inside the package, the npm package name)
VENDOR = {"/vendor/xterm": ("xterm", "@xterm/xterm"),
          "/vendor/xterm-addon-fit": ("xterm-addon-fit", "@xterm/addon-fit")}


def vendor_dirs() -> dict[str, Path | None]:
    """Each browser package's folder: inside the package (a wheel, `make vendor`) first, then
    the checkout's node_modules; None when neither has it."""
    found: dict[str, Path | None] = {}
    for prefix, (inside, package) in VENDOR.items():
        candidates = (PAGE_DIR / "vendor" / inside, node_modules_dir() / package)
        found[prefix] = next((c for c in candidates if (c / "package.json").is_file()), None)
    return found


def _vendor_routes(app: web.Application) -> None:
    for prefix, folder in vendor_dirs().items():
        if folder is None:
            log.warning("page_vendor_missing", path=prefix, looked_in=[
                str(PAGE_DIR / "vendor"), str(node_modules_dir())],
                        hint="the page has no terminal: run `npm ci` (or `make vendor`)")
        else:
            app.router.add_static(prefix, folder)


async def services(app: web.Application) -> AsyncIterator[None]:
    """Open the database, the compressor thread, the scheduler and the retention sweeper;
    close them in reverse."""
    settings = app[SETTINGS]
    # The server's alone, even where it existed before (the repository ships archive/).
    await asyncio.to_thread(make_private, settings.archive_dir)
    compressor = Compressor()
    db, scheduler = await _engine(app, compressor)
    app[DB], app[SCHEDULER] = db, scheduler
    scheduler.on_transition = monitor.observer(app)
    try:
        await scheduler.start()
        sweeper = asyncio.create_task(Sweeper(settings, db).run(), name="retention-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
    finally:
        await scheduler.close()
        await asyncio.to_thread(compressor.close)
        await db.close()


async def _engine(app: web.Application, compressor: Compressor) -> tuple[Store, Scheduler]:
    """The composition root of the engine: one `Scheduler`, built on one server with the
    SQLite store, its local queue and no peers (Alone), and on a cluster node with PostgreSQL,
    the claim queue, the node (its peers) and the relay's publish hook (issue 24)."""
    settings, catalogue, metrics = app[SETTINGS], app[CATALOGUE], app[METRICS]
    children = Children()
    # Made first: it takes REMOTERUN_SECRET_KEY out of the server's environment before the
    # sandbox reads its allow-list from it.
    protection = Protection(settings)
    sandbox = Sandbox(settings, children, (protection.key_path,))
    if settings.cluster is None:
        db = Database(settings.db_path, observe_write=metrics.db_write.observe)
        await db.open()
        policy = QueuePolicy(settings.aging_s, functools.partial(_limit_of, catalogue))
        return db, Scheduler(settings, db, catalogue, metrics, compressor, children,
                             queue=LocalQueue(policy, db, settings.max_pending),
                             peers=Alone(db, settings.reaper_interval_s),
                             protection=protection, sandbox=sandbox)
    from remoterun import cluster  # issue 16: PostgreSQL and Redis, imported only here
    pg, queue, node, publish = await cluster.open_node(settings, catalogue, metrics, children)
    return pg, Scheduler(settings, pg, catalogue, metrics, compressor, children, queue=queue,
                         peers=node, publish=publish, protection=protection,
                         sandbox=sandbox, feed=node.feed)


def _limit_of(catalogue: Catalogue, script: str) -> int | None:
    """A script's max_concurrency (None: unlimited, or no longer in the catalogue)."""
    try:
        return catalogue.resolve(script).max_concurrency
    except (errors.NotFound, MetadataError):
        return None


async def on_shutdown(app: web.Application) -> None:
    """Drain running tasks, then close the sockets still open with 'going away'."""
    await app[SCHEDULER].drain(app[SETTINGS].shutdown_grace_s)
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for sock in list(sockets):
        if not sock.closed:
            await sock.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def create_app(settings: Settings) -> web.Application:
    """The RemoteRun aiohttp application for these settings."""
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[listen.deadline_middleware, monitor.observe_middleware,
                                       error_middleware, guard.guard_middleware])
    app[SETTINGS] = settings
    app[CATALOGUE] = Catalogue(settings.scripts_dir, settings.scripts, settings.sandbox,
                               settings.limits)
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(settings.tokens)
    app[SESSIONS] = Sessions(settings.session_ttl_s)
    app[LIMITER] = FailureLimiter(settings.auth_fail_limit, settings.auth_fail_window_s)
    app[SOCKETS] = weakref.WeakSet[web.WebSocketResponse]()
    app[READINESS] = monitor.Readiness()
    app[DENIALS] = audit.Denials()
    monitor.add_default_checks(app)
    app.cleanup_ctx.append(monitor.alerts_service)  # before the scheduler, closed after it
    app.cleanup_ctx.append(services)
    app.cleanup_ctx.append(audit.denial_summaries)  # needs the scheduler; closed before it
    app.cleanup_ctx.append(schedules.service)  # the timer (issue 29): closed before the engine
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(guard.security_headers)
    app.router.add_routes(http.routes)
    app.router.add_routes(output.routes)  # GET /tasks/{id}/output
    app.router.add_routes(audit.routes)
    app.router.add_routes(ws.routes)
    app.router.add_routes(sse.routes)
    app.router.add_routes(search.routes)  # GET /tasks/{id}/search (issue 28)
    events.setup(app)  # GET /events, GET /tasks/{id}/events (issue 18)
    app.router.add_routes(nodes.routes)  # GET /nodes (issue 16)
    app.router.add_routes(schedules.routes)  # /schedules (issue 29)
    if settings.cluster is not None:
        nodes.setup_cluster(app)  # the redis readiness check
    hooks.setup(app)  # POST /hooks/{name}, GET /hooks (issue 30)
    app.router.add_routes(monitor.routes)
    app.router.add_routes(openapi.routes)
    app.router.add_get("/", index)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/whoami", whoami)
    if PAGE_DIR.is_dir():
        app.router.add_static("/static", PAGE_DIR)
    _vendor_routes(app)
    return app

