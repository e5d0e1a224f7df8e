"""Descriptors at `serve`'s start and when they run out: max_connections fitted to RLIMIT_NOFILE,
and the loop's accept failures logged at most once a second.

Every client connection holds a descriptor, and so do the database, the archive's open
segments, the log and each running task's pipes. With `server.max_connections` above what
RLIMIT_NOFILE leaves for connections, the server accepts until `accept()` fails with EMFILE:
asyncio then logs a traceback per failed accept and retries them all a second later, which
fed on itself to ~3,000 tracebacks a second with no client served (issue 25).
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import time
from typing import Any

import structlog

from remoterun.config import ConfigError, Settings

log = structlog.get_logger(__name__)

# Descriptors kept for everything but client connections: the interpreter, the log, the
# listening socket, the database (its file, WAL and shm, or a pool of connections), the
# compressor's files, Redis; and per worker, a running task's pipes, PTY, archive segment pair
# and the descriptors its sandbox launcher is handed.
RESERVED_BASE = 64
RESERVED_PER_WORKER = 16
MIN_CONNECTIONS = 16  # fewer than this is no server: refuse to start
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's own message


def reserved_descriptors(settings: Settings) -> int:
    """Descriptors kept for the server's own files and its tasks' pipes."""
    return RESERVED_BASE + RESERVED_PER_WORKER * settings.workers


def fit_connections(settings: Settings) -> Settings:
    """The settings with `max_connections` that RLIMIT_NOFILE can hold.

    The soft limit is raised as far as needed (at most the hard limit; not beyond need, since
    every task inherits it); if even that is short, max_connections is lowered with a warning,
    and a limit that leaves fewer than MIN_CONNECTIONS is a ConfigError.
    """
    reserved = reserved_descriptors(settings)
    need = settings.max_connections + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            log.info("nofile_limit_raised", soft_was=soft, soft=raised, hard=hard)
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= need:
        return settings
    room = soft - reserved
    if room < MIN_CONNECTIONS:
        raise ConfigError(
            f"server.max_connections: RLIMIT_NOFILE is {soft} (hard {hard}), which leaves "
            f"{room} descriptors for connections after the {reserved} kept for the database, "
            f"the archive and {settings.workers} workers' pipes; raise `ulimit -n` to at least "
            f"{reserved + MIN_CONNECTIONS}, or lower engine.workers")
    log.warning("max_connections_lowered", configured=settings.max_connections,
                max_connections=room, nofile_limit=soft, hard_limit=hard, reserved=reserved,
                hint="raise `ulimit -n` to serve more connections")
    return dataclasses.replace(settings, max_connections=room)


class AcceptFailures:
    """A loop exception handler: asyncio's accept failures (EMFILE, ENFILE, ENOBUFS, ENOMEM)
    logged at most once per `interval_s` with a count of the ones not logged; anything else
    goes to the loop's default handler."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Log or count one failure the loop reports."""
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return
        log.error("accept_failed", error=str(context.get("exception")),
                  suppressed=self.suppressed, interval_s=self.interval_s)
        self.last, self.suppressed = now, 0
