"""The application factory: services in one cleanup context, error and auth middlewares, routes."""

from __future__ import annotations

import asyncio
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
    IDENTITY,
    METRICS,
    SCHEDULER,
    SETTINGS,
    SOCKETS,
    http,
    json_response,
    openapi,
    sse,
    ws,
)
from remoterun.auth import COOKIE, Authenticator
from remoterun.catalogue import Catalogue
from remoterun.config import Settings
from remoterun.db import Database
from remoterun.metrics import Metrics
from remoterun.retention import Sweeper
from remoterun.scheduler import Scheduler

log = structlog.get_logger(__name__)
PAGE_DIR = Path(__file__).resolve().parent.parent / "page"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS: dict[type[errors.RemoteRunError], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Gone: 410,
    errors.TooLarge: 413,
    errors.InvalidParams: 422,
    errors.Unavailable: 503,
}
# Paths any browser may load before logging in: the page is code, not data.
PUBLIC_PREFIXES = ("/healthz", "/static/", "/vendor/", "/login", "/openapi.json")


def error_response(status: int, code: str, message: str, **extra: object) -> web.Response:
    """PROTOCOL.md's error body."""
    return json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn our exceptions and aiohttp's HTTP errors into JSON error bodies."""
    try:
        return await handler(request)
    except errors.RemoteRunError as exc:
        status = STATUS.get(type(exc), 400)
        return json_response(exc.to_json(), status=status)
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


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Establish who is calling: Bearer header, `?token=`, or the page's session cookie."""
    auth = request.app[AUTH]
    if not auth.enabled:  # everyone is the loopback user: no query or cookie parsing
        request[IDENTITY] = auth.identify(None)
        return await handler(request)
    path = request.path
    public = path == "/" or path.startswith(PUBLIC_PREFIXES)
    header = request.headers.get("Authorization", "")
    presented = header[7:].strip() if header[:7].lower() == "bearer " else None
    presented = presented or request.query.get("token") or request.cookies.get(COOKIE)
    try:
        request[IDENTITY] = auth.identify(presented)
    except errors.Unauthorized:
        if not public:
            raise
        request[IDENTITY] = None
    return await handler(request)


async def index(request: web.Request) -> web.FileResponse:
    """The web terminal page."""
    return web.FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def login(request: web.Request) -> web.Response:
    """Exchange a token for an HttpOnly session cookie, so the page keeps no secret in JS."""
    body = await http.read_json(request)
    token = body.get("token") if isinstance(body, dict) else None
    who = request.app[AUTH].identify(token if isinstance(token, str) else None)
    response = json_response({"name": who.name, "role": who.role})
    if request.app[AUTH].enabled and isinstance(token, str):
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    """Who the caller is (the page asks at start whether it must log in)."""
    who = request[IDENTITY]
    if who is None:
        raise errors.Unauthorized("log in with a token")
    return json_response({"name": who.name, "role": who.role,
                          "auth": request.app[AUTH].enabled})


async def logout(request: web.Request) -> web.Response:
    """Forget the session cookie."""
    response = json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
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
    """Open the database, start the scheduler and the retention sweeper; close in reverse."""
    settings = app[SETTINGS]
    settings.archive_dir.mkdir(parents=True, exist_ok=True)
    db = app[DB] = Database(settings.db_path)
    await db.open()
    scheduler = app[SCHEDULER] = Scheduler(settings, db, app[CATALOGUE], app[METRICS])
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
        await db.close()


async def on_shutdown(app: web.Application) -> None:
    """Drain running tasks, then close the sockets still open with 'going away'."""
    await app[SCHEDULER].drain(app[SETTINGS].shutdown_grace_s)
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for sock in list(sockets):
        if not sock.closed:
            await sock.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def revalidate_page(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers revalidate the page's own files (ETag/Last-Modified make that cheap), so an
    upgraded server never runs with a stale app.js."""
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")


def create_app(settings: Settings) -> web.Application:
    """The RemoteRun aiohttp application for these settings."""
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[error_middleware, auth_middleware])
    app[SETTINGS] = settings
    app[CATALOGUE] = Catalogue(settings.scripts_dir, settings.scripts)
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(settings.tokens)
    app[SOCKETS] = weakref.WeakSet[web.WebSocketResponse]()
    app.cleanup_ctx.append(services)
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(revalidate_page)
    app.router.add_routes(http.routes)
    app.router.add_routes(ws.routes)
    app.router.add_routes(sse.routes)
    app.router.add_routes(openapi.routes)
    app.router.add_get("/", index)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/whoami", whoami)
    if PAGE_DIR.is_dir():
        app.router.add_static("/static", PAGE_DIR)
    _vendor_routes(app)
    return app

