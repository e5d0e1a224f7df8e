"""Tokens and roles: who is calling, and whether their role and script list allow the action."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from remoterun.catalogue import Script
from remoterun.config import Token
from remoterun.errors import Forbidden, Unauthorized

RANK = {"viewer": 0, "operator": 1, "admin": 2}
COOKIE = "remoterun_session"


@dataclass(frozen=True)
class Identity:
    """The caller: a token's name and role, or the anonymous admin when auth is off."""

    name: str
    role: str
    scripts: tuple[str, ...] | None = None

    def require(self, role: str) -> None:
        """Forbidden unless this identity's role is at least `role`."""
        if RANK[self.role] < RANK[role]:
            raise Forbidden(f"the {self.role} role may not do this (needs {role})")

    def require_script(self, script: Script, role: str = "operator") -> None:
        """Forbidden unless this identity may run `script`."""
        self.require(role)
        if self.role == "admin":
            return
        if self.scripts is not None and script.name not in self.scripts:
            raise Forbidden(f"token {self.name!r} may not run {script.name!r}")
        if script.roles is not None and self.role not in script.roles:
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
    """Looks tokens up in constant time per candidate."""

    def __init__(self, tokens: tuple[Token, ...]):
        self.tokens = tokens

    @property
    def enabled(self) -> bool:
        """Whether any token is configured."""
        return bool(self.tokens)

    def identify(self, presented: str | None) -> Identity:
        """The identity of a presented token; Unauthorized if absent or unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            raise Unauthorized("a token is required: Authorization: Bearer <token>")
        match = None
        for token in self.tokens:
            if hmac.compare_digest(token.token.encode(), presented.encode()):
                match = token
        if match is None:
            raise Unauthorized("unknown token")
        return Identity(match.name, match.role, match.scripts)
