"""The CLI's side of the API: where the server is, one HTTP session, errors, exit codes."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8080"
FINAL = ("success", "failed", "timeout", "cancelled")

# The documented exit codes of `remoterun run`, `attach` and `logs -f` (besides the script's own).
EXIT_TIMEOUT = 124
EXIT_REMOTERUN = 125  # RemoteRun itself failed: connection, a 4xx/5xx answer
EXIT_NOT_STARTED = 127
EXIT_CANCELLED = 130
EXIT_USAGE = 2


class RemoteError(Exception):
    """RemoteRun could not do what was asked (unreachable, or an error answer): exit 125."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []

    def lines(self) -> list[str]:
        """What the CLI prints on stderr: one line, then one per offending field."""
        return [f"remoterun: {self.message}", *(f"  {d}" for d in self.details)]


class UsageError(Exception):
    """The command line itself is wrong: exit 2."""


def config_path() -> Path:
    """~/.config/remoterun/config.toml (or under $XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "remoterun" / "config.toml"


def resolve_target(url: str | None, token: str | None) -> tuple[str, str | None]:
    """The server and token: flags, then REMOTERUN_URL/REMOTERUN_TOKEN, then the config file."""
    path = config_path()
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{path}: {exc}") from exc
        unknown = set(saved) - {"url", "token"}
        if unknown:
            raise UsageError(f"{path}: unknown key {sorted(unknown)[0]!r} (url, token)")
    url = url or os.environ.get("REMOTERUN_URL") or saved.get("url") or DEFAULT_URL
    token = token or os.environ.get("REMOTERUN_TOKEN") or saved.get("token")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UsageError(f"the server URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/"), token if isinstance(token, str) and token else None


def error_of(status: int, body: Any) -> RemoteError:
    """A RemoteError from an error answer of PROTOCOL.md (`error`, `message`, `details`)."""
    if not isinstance(body, dict):
        return RemoteError(f"{status}: {str(body)[:200]}")
    details = []
    for item in body.get("details") or []:
        if isinstance(item, dict):
            where = item.get("field") or item.get("param") or item.get("path") or "?"
            details.append(f"{where}: {item.get('message', '')}")
        else:
            details.append(str(item))
    return RemoteError(f"{status} {body.get('error')}: {body.get('message')}", details)


@dataclass
class Remote:
    """One server, one aiohttp session; every method raises RemoteError on failure."""

    url: str
    token: str | None
    session: aiohttp.ClientSession

    @classmethod
    def open(cls, url: str, token: str | None) -> Remote:
        """A client of this server (close it with `close()`)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        return cls(url, token, aiohttp.ClientSession(headers=headers, timeout=timeout))

    async def close(self) -> None:
        """Close the session."""
        await self.session.close()

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        """One REST call; its JSON body."""
        try:
            async with self.session.request(method, self.url + path, json=body) as response:
                text = await response.text()
                try:
                    data = json.loads(text)
                except ValueError:
                    data = text
                if response.status >= 400:
                    raise error_of(response.status, data)
                return data
        except aiohttp.ClientError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc}") from exc

    async def task_id(self, given: str) -> str:
        """A full task id from a unique prefix (a full id is taken as it is)."""
        if len(given) == 36:
            return given
        found: list[str] = []
        cursor: str | None = None
        while True:
            query = "/tasks?limit=500" + (f"&cursor={cursor}" if cursor else "")
            page = await self.json("GET", query)
            found += [t["id"] for t in page["tasks"] if t["id"].startswith(given)]
            cursor = page.get("next_cursor")
            if len(found) > 1 or not cursor:
                break
        if not found:
            raise RemoteError(f"no task id starts with {given!r}")
        if len(found) > 1:
            raise RemoteError(f"{given!r} is the start of several task ids: "
                              f"{', '.join(f[:12] for f in found[:3])}...; give more of it")
        return found[0]

    def ws_url(self, path: str) -> str:
        """The ws:// or wss:// form of a path on this server."""
        return "ws" + self.url.removeprefix("http") + path


def exit_code(task: dict[str, Any]) -> int:
    """The CLI's exit code for a task that ended (the table in README's CLI section)."""
    status, code = task.get("status"), task.get("exit_code")
    if status == "success":
        return 0
    if status == "timeout":
        return EXIT_TIMEOUT
    if status == "cancelled":
        return EXIT_CANCELLED
    if isinstance(code, int):
        return 128 - code if code < 0 else code
    error = str(task.get("error") or "")
    # A failed task without an exit code either never started (spawn failure) or was lost
    # by the server (crash, shutdown, a bug): only the first is the script's doing.
    if error.startswith(("the server", "internal error")):
        return EXIT_REMOTERUN
    return EXIT_NOT_STARTED


def say(message: str) -> None:
    """A line of the CLI's own on stderr (never mixed into the task's stdout)."""
    sys.stderr.write(f"remoterun: {message}\n")
    sys.stderr.flush()
