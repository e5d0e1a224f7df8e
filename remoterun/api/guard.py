"""Browser safety and access control in front of every handler: Host, Origin, body type,
credentials (token, `?token=`, session cookie with its key), the failed-attempt limiter,
security headers, and the audit entries handlers record.

The checks run in this order, each before any handler reads the body: a header that is not
UTF-8 (422), a rebinding Host (421), a foreign Origin (403 `bad_origin`), a body that is not
JSON (415), then who is calling: a valid credential is served, a wrong or missing one answers
401, or 429 once its address is over the failure budget. A request refused here never reaches
the engine.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from yarl import URL

from remoterun import errors
from remoterun.api import AUTH, DENIALS, IDENTITY, LIMITER, SCHEDULER, SESSIONS, SETTINGS
from remoterun.auth import COOKIE, SECURE_COOKIE, Identity
from remoterun.store import insert_audit
from remoterun.wire import unencodable

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
# Paths any browser may load before logging in: the page is code, not data.
PUBLIC_PREFIXES = ("/healthz", "/static/", "/vendor/", "/login", "/openapi.json")
# Paths whose own handler authenticates the request by its signature (api/hooks.py): no token
# is asked and any body type is taken (the signature covers the raw bytes); Host and Origin
# are checked as everywhere, so a browser's cross-site request is still refused.
SIGNED_PREFIXES = ("/hooks/",)
JSON = "application/json"
SESSION_KEY = "X-RemoteRun-Session-Key"
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
# connect-src 'self' covers ws:// and wss:// of the page's own origin (CSP Level 3).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin"}


def _origin_key(url: URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in, for comparison."""
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


def own_origin(request: web.Request) -> tuple[str, str, int | None]:
    """The origin the request was sent to: its scheme and its Host header."""
    return _origin_key(URL.build(scheme=request.scheme, authority=request.host))


def check_origin(request: web.Request) -> None:
    """BadOrigin for a request sent by a page of any origin but ours or a configured one.

    The page itself (`GET /`, `/?task=<id>`) is the exception: a link to a task in an alert
    (chat, mail) is a cross-site navigation, and the page is code that reads and changes
    nothing until its own scripts call the API, from our origin (framing stays refused).
    """
    if request.path == "/" and request.method in ("GET", "HEAD"):
        return
    origin = request.headers.get("Origin")
    if origin is None:
        # Browsers send Origin on every cross-origin POST, fetch and WebSocket; a cross-site
        # request without one (an old browser, a stripped header) still says so here.
        if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            raise errors.BadOrigin("a cross-site request without an Origin header")
        return
    try:
        theirs = _origin_key(URL(origin))
        ours = own_origin(request)
    except ValueError:
        theirs, ours = ("", "", None), ("-", "-", None)
    if theirs[1] and theirs == ours:
        return
    allowed = request.app[SETTINGS].allowed_origins
    if theirs[1] and any(_origin_key(URL(o)) == theirs for o in allowed):
        return
    raise errors.BadOrigin(f"requests from {origin[:200]!r} are not accepted "
                           "(server.allowed_origins)")


def check_headers(request: web.Request) -> None:
    """Unencodable (422) for a header that is not UTF-8 text: aiohttp hands its bytes on as
    lone surrogates, which no answer, log line or audit row that repeats them can encode."""
    for name, value in request.headers.items():
        if not value.isascii() and unencodable(value) is not None:
            raise errors.Unencodable(f"the {name} header is not UTF-8 text",
                                     details=[{"field": f"header:{name}",
                                               "message": "not encodable as UTF-8"}])


def check_host(request: web.Request) -> None:
    """Without tokens, only loopback names (and server.allowed_hosts) are answered: a page of
    another site whose name was rebound to 127.0.0.1 sends its own name as Host."""
    raw = request.headers.get("Host", "")
    try:
        host = (URL.build(scheme="http", authority=raw).raw_host or "").lower()
    except ValueError:
        host = ""
    if not host:
        raise errors.MisdirectedRequest("a Host header is required")
    if ":" in host:
        host = f"[{host}]"
    allowed = request.app[SETTINGS].allowed_hosts
    if host in LOOPBACK_HOSTS or host in allowed or raw.lower() in allowed:
        return
    raise errors.MisdirectedRequest(
        f"this server answers to loopback names only without tokens, not {raw[:200]!r} "
        "(server.allowed_hosts)")


def check_body_type(request: web.Request) -> None:
    """A POST with a body must be JSON (`/login` also takes a form; a signed path, any)."""
    if request.method != "POST":
        return
    if not request.body_exists or request.content_length == 0:
        return  # nothing to parse (curl -X POST .../cancel); a browser's is refused by Origin
    if request.path.startswith(SIGNED_PREFIXES):
        return
    kind = request.content_type
    if kind == JSON or (request.path == "/login" and kind in FORM_TYPES):
        return
    raise errors.UnsupportedMediaType(f"POST bodies must be {JSON}, not {kind!r}")


def presented_token(request: web.Request) -> tuple[str | None, str | None]:
    """(token, session id) as presented: Bearer header, else `?token=`, else the cookie."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    token = token or request.query.get("token") or None
    return token, (None if token else next(iter(session_ids(request)), None))


def cookie_name(request: web.Request) -> str:
    """The session cookie's name: `__Host-` prefixed over TLS."""
    return SECURE_COOKIE if request.secure else COOKIE


def session_ids(request: web.Request) -> list[str]:
    """Every session id the request's cookies hold: a page of another port may have set one
    beside ours (cookies are not scoped by port), so none is trusted for being first."""
    name = cookie_name(request)
    found = []
    for header in request.headers.getall("Cookie", []):
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name and value:
                found.append(value.strip('"'))
    return found


def session_key(request: web.Request) -> str | None:
    """The page's session key: its header, or `?session_key=` (a WebSocket, an EventSource or
    a download link cannot set a header)."""
    return request.headers.get(SESSION_KEY) or request.query.get("session_key") or None


def authenticate(request: web.Request) -> Identity:
    """Who is calling; Unauthorized for no, an unknown or an expired credential, and for a
    session cookie without its key."""
    auth = request.app[AUTH]
    token, _ = presented_token(request)
    ids = session_ids(request) if token is None and auth.enabled else []
    if not ids:
        return auth.identify(token)
    key = session_key(request)
    if key is None:
        raise errors.Unauthorized(f"a session cookie alone does not authenticate: send the "
                                  f"session key the login answered ({SESSION_KEY})",
                                  code="session_key_required")
    for session_id in ids:
        token_digest = request.app[SESSIONS].token_digest(session_id, key)
        if token_digest is not None:
            return auth.identify_digest(token_digest)
    raise errors.Unauthorized("the session has expired or was logged out; log in again",
                              code="session_expired")


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, Origin, the failure budget, the body's type, then the caller, for every request."""
    auth = request.app[AUTH]
    check_headers(request)
    if not auth.enabled:
        check_host(request)
    check_origin(request)
    check_body_type(request)
    if not auth.enabled:
        request[IDENTITY] = auth.identify(None)
        return await handler(request)
    path = request.path
    public = path == "/" or path.startswith(PUBLIC_PREFIXES) or (
        path == "/metrics" and request.app[SETTINGS].metrics_public) or (
        path.startswith(SIGNED_PREFIXES) and request.method == "POST")
    try:
        request[IDENTITY] = authenticate(request)
    except errors.Unauthorized:
        if not public:
            # Past the budget a wrong credential learns nothing (429); a valid one was
            # served above, whoever else failed from its address.
            address = request.remote or "-"
            request.app[LIMITER].check(address)
            request.app[LIMITER].record(address)
            raise
        request[IDENTITY] = None
    return await handler(request)


def asked(request: web.Request) -> str:
    """The request's path and query for the audit, without a `?token=` or `?session_key=`
    (never stored)."""
    query = request.rel_url.query
    return str(request.rel_url.with_query(
        [(k, v) for k, v in query.items() if k not in ("token", "session_key")]))


def audit_entry(request: web.Request, action: str, result: str = "ok",
                detail: str | None = None, who: Identity | None = None) -> dict[str, Any]:
    """An audit event of this request, for db.insert_audit (the task's fields added there)."""
    if who is None:
        who = request.get(IDENTITY)
    return {"ts": time.time(), "actor": who.name if who else "-",
            "role": who.role if who else None, "address": request.remote,
            "action": action, "result": result, "detail": detail}


async def record(request: web.Request, action: str, *, task_id: str | None = None,
                 script: str | None = None, result: str = "ok", detail: str | None = None,
                 who: Identity | None = None) -> None:
    """Write one audit event now (for actions that write nothing else)."""
    entry = audit_entry(request, action, result, detail, who)
    await request.app[SCHEDULER].record([insert_audit(entry, task_id=task_id, script=script)])


async def record_denied(request: web.Request, exc: errors.RemoteRunError) -> None:
    """The audit row of a 401 or 403: who asked for what, and why it was refused; at most one
    per address and reason a second, the rest counted in a summary row (audit.Denials)."""
    if not request.app[DENIALS].admit(request.remote or "-", exc.code):
        return
    task_id = request.match_info.get("id")
    detail = f"{request.method} {asked(request)[:300]}: {exc.message}"[:1000]
    try:
        await record(request, "denied", task_id=task_id, result=exc.code, detail=detail)
    except Exception:  # a denial must answer even if the audit cannot be written
        log.exception("audit_write_failed", action="denied")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CSP, nosniff and no framing on every response; the page's files are revalidated."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")
