"""Tokens, roles and script lists; server-side sessions; the failed-attempt limiter; new tokens.

A token is matched by its SHA-256, so the config may hold only the digest, and a session id is
kept only as its digest too: neither a copy of the config nor a dump of the server's memory
gives back something a client could present.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from remoterun.catalogue import Script
from remoterun.config import MIN_TOKEN_CHARS, ROLES, Token
from remoterun.errors import Forbidden, TooManyRequests, Unauthorized

RANK = {"viewer": 0, "operator": 1, "admin": 2}
COOKIE = "remoterun_session"
# Over TLS: a cookie only a secure page of this host, path /, could have set (not a subdomain).
SECURE_COOKIE = "__Host-" + COOKIE
Clock = Callable[[], float]


def digest(secret: str) -> str:
    """The SHA-256 hex digest tokens and session ids are kept as."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def script_allowed(patterns: tuple[str, ...] | None, name: str) -> bool:
    """Whether a token's `scripts` list (names or globs) includes the script `name`."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Identity:
    """The caller: a token's name, role and script list, or the anonymous admin (auth off)."""

    name: str
    role: str
    scripts: tuple[str, ...] | None = None

    def require(self, role: str) -> None:
        """Forbidden unless this identity's role is at least `role`."""
        if RANK[self.role] < RANK[role]:
            raise Forbidden(f"the {self.role} role may not do this (needs {role})")

    def allows(self, script_name: str) -> bool:
        """Whether this token's script list includes `script_name` (reads and actions alike)."""
        return script_allowed(self.scripts, script_name)

    def require_task(self, script_name: str, role: str = "viewer") -> None:
        """Forbidden unless the role is at least `role` and the list includes the task's script."""
        self.require(role)
        if not self.allows(script_name):
            raise Forbidden(f"token {self.name!r} may not touch tasks of {script_name!r}")

    def require_script(self, script: Script, role: str = "operator") -> None:
        """Forbidden unless this identity may run `script` (role, script list, its metadata)."""
        self.require_task(script.name, role)
        if self.role != "admin" and script.roles is not None and self.role not in script.roles:
            raise Forbidden(f"the {self.role} role may not run {script.name!r}")

    def may_run(self, script: Script) -> bool:
        """Whether require_script would pass."""
        try:
            self.require_script(script)
        except Forbidden:
            return False
        return True


ANONYMOUS = Identity("anonymous", "admin")


class Authenticator:
    """Looks a presented token up by its digest, comparing every candidate in constant time."""

    def __init__(self, tokens: tuple[Token, ...], clock: Clock = time.time):
        self.tokens = tokens
        self._digests = [(t.sha256 or digest(t.token), t) for t in tokens]
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether any token is configured."""
        return bool(self.tokens)

    def identify(self, presented: str | None) -> Identity:
        """The identity of a presented token; Unauthorized if absent, unknown or expired."""
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            raise Unauthorized("a token is required: Authorization: Bearer <token>")
        return self.identify_digest(digest(presented))

    def identify_digest(self, wanted: str) -> Identity:
        """The identity of the token with this digest (what a session holds)."""
        match = None
        for known, token in self._digests:
            if hmac.compare_digest(known, wanted):
                match = token
        if match is None:
            raise Unauthorized("unknown token")
        if match.expires_at is not None and match.expires_at <= self._clock():
            raise Unauthorized(f"token {match.name!r} has expired", code="token_expired")
        return Identity(match.name, match.role, match.scripts)


class NewSession(NamedTuple):
    """What a login hands out: the cookie's id and the key the page keeps and sends with it."""

    id: str
    key: str


class Sessions:
    """Server-side sessions: an opaque random id for the cookie and a key for the page, both
    kept here only as digests.

    A cookie alone never authenticates: cookies are not scoped by port, so any page of the
    host (another port is another origin) may receive ours, or set its own in its place. The
    key is answered once, in the login's body, which only our origin's page can read; it keeps
    it in its origin's storage and sends it with every call (issue 26).

    A session points at its token's digest, so a token removed from the config or expired
    ends its sessions too. Each token has at most PER_TOKEN sessions: a new one past that ends
    that token's oldest, never another token's (one token's logins in a loop evicted every
    session, an admin's included: issue 26). Held in memory: a restart logs every browser
    out, which fails safe.
    """

    PER_TOKEN = 100

    def __init__(self, ttl_s: float, clock: Clock = time.time):
        self.ttl_s = ttl_s
        self._clock = clock
        # session digest -> (token digest, key digest, expiry), oldest first (one ttl: also
        # the first to expire)
        self._by_digest: collections.OrderedDict[str, tuple[str, str, float]] = (
            collections.OrderedDict())
        self._of_token: dict[str, collections.OrderedDict[str, None]] = {}

    def create(self, token_digest: str) -> NewSession:
        """A new session for the token with this digest (its id and key shown once)."""
        now = self._clock()
        while self._by_digest:
            key, (_, _, expires) = next(iter(self._by_digest.items()))
            if expires > now:
                break
            self._forget(key)
        mine = self._of_token.setdefault(token_digest, collections.OrderedDict())
        while len(mine) >= self.PER_TOKEN:
            self._forget(next(iter(mine)))
        made = NewSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        key = digest(made.id)
        self._by_digest[key] = (token_digest, digest(made.key), now + self.ttl_s)
        mine[key] = None
        return made

    def _forget(self, key: str) -> bool:
        found = self._by_digest.pop(key, None)
        if found is None:
            return False
        mine = self._of_token.get(found[0])
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._of_token[found[0]]
        return True

    def token_digest(self, session_id: str, session_key: str) -> str | None:
        """The token digest of a live session whose key this is, or None (unknown, revoked,
        expired, or another key)."""
        key = digest(session_id)
        found = self._by_digest.get(key)
        if found is None or not hmac.compare_digest(found[1], digest(session_key)):
            return None
        if found[2] <= self._clock():
            self._forget(key)
            return None
        return found[0]

    def revoke(self, session_id: str, session_key: str) -> bool:
        """End a session (its key must match); whether it existed."""
        if self.token_digest(session_id, session_key) is None:
            return False
        return self._forget(digest(session_id))


class FailureLimiter:
    """Counts failed logins and 401s per address; past `limit` in `window_s` a wrong or
    missing credential from there answers 429 (a valid one is still served: guard.py)."""

    def __init__(self, limit: int, window_s: float, clock: Clock = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, address: str) -> collections.deque[float] | None:
        stamps = self._failures.get(address)
        if stamps is None:
            return None
        cutoff = self._clock() - self.window_s
        while stamps and stamps[0] <= cutoff:
            stamps.popleft()
        if not stamps:
            del self._failures[address]
            return None
        return stamps

    def retry_after(self, address: str) -> float | None:
        """Seconds this address must wait when it failed too often of late, else None."""
        stamps = self._recent(address)
        if stamps is None or len(stamps) < self.limit:
            return None
        return max(stamps[0] + self.window_s - self._clock(), 1.0)

    def check(self, address: str) -> None:
        """TooManyRequests (with the wait) if this address failed too often of late."""
        wait = self.retry_after(address)
        if wait is not None:
            raise TooManyRequests(f"too many failed attempts from {address}: wait",
                                  retry_after_s=wait)

    def record(self, address: str) -> float:
        """Count one failure from this address; its stamp, for `forgive`."""
        if len(self._failures) > 100_000:  # a flood of addresses: forget the quiet ones
            for key in list(self._failures)[:50_000]:
                self._recent(key)
        stamp = self._clock()
        self._failures.setdefault(address, collections.deque(maxlen=self.limit)).append(stamp)
        return stamp

    def forgive(self, address: str, stamp: float) -> None:
        """Take back a failure counted before it was known (a login, counted before its body
        was read, that turned out right)."""
        stamps = self._failures.get(address)
        if stamps is not None and stamp in stamps:
            stamps.remove(stamp)


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` as seconds; ValueError otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found[1]) == 0:
        raise ValueError(f"expected a duration such as 30d, 12h or 90m, got {text!r}")
    return float(int(found[1]) * _UNIT_S[found[2]])


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def create_token(name: str, role: str, scripts: Sequence[str] | None = None,
                 expires_in_s: float | None = None, now: float | None = None
                 ) -> tuple[str, str]:
    """A new random token and the `[[tokens]]` lines (with its digest, never the token)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not name:
        raise ValueError("the token needs a name")
    token = secrets.token_urlsafe(32)
    assert len(token) >= MIN_TOKEN_CHARS
    lines = ["[[tokens]]", f"name = {_toml_string(name)}", f'sha256 = "{digest(token)}"',
             f"role = {_toml_string(role)}"]
    if scripts is not None:
        lines.append("scripts = [" + ", ".join(map(_toml_string, scripts)) + "]")
    if expires_in_s is not None:
        at = datetime.fromtimestamp((now or time.time()) + expires_in_s, UTC)
        lines.append(f"expires = {at.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return token, "\n".join(lines) + "\n"
