"""`remoterun serve`: the settings checked, the port bound, the app served until a signal."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog

from remoterun import config, logs
from remoterun.catalogue import Catalogue, MetadataError, Script

log = structlog.get_logger("remoterun")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT."""
    from remoterun.api.app import create_app

    logs.configure()
    path = Path(args.config) if args.config else (Path("config.toml")
                                                 if Path("config.toml").is_file() else None)
    try:
        settings, made_scripts, broken = _checked_settings(args, path)
    except (config.ConfigError, MetadataError) as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    for script in broken:  # listed with its error, refused at submit; the server runs on
        log.warning("script_metadata_invalid", script=script.name, error=script.error)
    requested = settings.host
    if not settings.auth_enabled and not _is_loopback(settings.host):
        settings = dataclasses.replace(settings, host="127.0.0.1")
    try:
        preflight(settings)
        sock = listen(settings.host, settings.port)
    except StartError as exc:
        print(f"remoterun: cannot start: {exc}", file=sys.stderr)
        return 1
    _announce(settings, requested, sock, first_run=path is None, made_scripts=made_scripts)
    with sock:
        try:
            asyncio.run(_run_server(create_app(settings), settings, sock))
        except config.ConfigError as exc:  # found as the server starts: a seccomp profile
            print(f"remoterun: config error: {exc}", file=sys.stderr)
            return 2
    log.info("server_stopped")
    return 0


def _checked_settings(args: argparse.Namespace, path: Path | None
                      ) -> tuple[config.Settings, bool, list[Script]]:
    """The settings (the config file under the flags), checked before anything is opened:
    (settings, whether a scripts folder was made, the scripts whose sidecars are broken).
    ConfigError or MetadataError for what stops the server."""
    from remoterun.cli.descriptors import fit_connections
    from remoterun.cli.firstrun import check_scripts
    from remoterun.vault import KEY_ENV, parse_key

    overrides = {"host": args.host, "port": args.port,
                 "scripts_dir": Path(args.scripts).resolve() if args.scripts else None,
                 "archive_dir": Path(args.archive).resolve() if args.archive else None,
                 "db_path": Path(args.db).resolve() if args.db else None}
    settings = config.load(path, overrides)
    if not 0 <= settings.port <= 65535:
        raise config.ConfigError(f"server.port: must be between 0 and 65535, "
                                 f"got {settings.port}")
    made_scripts = check_scripts(settings, first_run=path is None and not args.scripts)
    broken = Catalogue(settings.scripts_dir, settings.scripts, settings.sandbox,
                       settings.limits).check()
    if os.environ.get(KEY_ENV):  # a malformed key stops here, before anything is opened
        parse_key(os.environ[KEY_ENV], KEY_ENV)
    logs.configure(settings.log_level)
    from remoterun.api.listen import tls_context  # a bad certificate stops here
    tls_context(settings)
    return fit_connections(settings), made_scripts, broken  # max_connections within NOFILE


def _announce(settings: config.Settings, requested: str, sock: socket.socket, *,
              first_run: bool, made_scripts: bool) -> None:
    """Say where the server listens: in the log, and on a first run (no config file) the
    page's address and what to do next, on stderr."""
    from remoterun.cli.firstrun import message

    if requested != settings.host:
        log.warning("auth_off_loopback_only", requested_host=requested, host=settings.host)
    elif not settings.auth_enabled:
        log.info("auth_off_loopback_only", host=settings.host)
    if first_run:
        print(message(settings, _page_url(settings, sock), made_scripts), file=sys.stderr)
    log.info("server_starting", host=settings.host, port=settings.port,
             scripts=str(settings.scripts_dir), archive=str(settings.archive_dir),
             db=str(settings.db_path), workers=settings.workers)


def _page_url(settings: config.Settings, sock: socket.socket) -> str:
    """The page's address on the bound socket."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "localhost"
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{host}:{sock.getsockname()[1]}/"


class StartError(Exception):
    """Something outside the config stops the server from starting (port taken, paths)."""


def preflight(settings: config.Settings) -> None:
    """Check every path the server will use, before anything is created."""
    if not os.access(settings.scripts_dir, os.R_OK | os.X_OK):
        raise StartError(f"paths.scripts: {settings.scripts_dir} is not readable")
    for key, path in (("paths.archive", settings.archive_dir), ("paths.db", settings.db_path)):
        existing = path
        while not existing.exists():  # the nearest existing folder must let us create it
            existing = existing.parent
        wanted = os.R_OK | os.W_OK | (os.X_OK if existing.is_dir() else 0)
        if existing != path and not existing.is_dir():
            raise StartError(f"{key}: {existing} is not a directory")
        if not os.access(existing, wanted):
            raise StartError(f"{key}: {existing} is not writable")
    if settings.db_path.is_dir():
        raise StartError(f"paths.db: {settings.db_path} is a directory")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the app opens anything."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartError(f"server.host: cannot resolve {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _tune_gc() -> None:
    """Collect garbage less often: freeze what start-up made (modules, the app: never garbage,
    yet scanned by every full collection) and let the young generation grow to 20,000 objects.
    Every task allocates hundreds; at the default 700 the collector took ~5% of the event
    loop's time on trivial tasks, and ~2% after this (measured with gc.callbacks)."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


async def _run_server(app: Any, settings: config.Settings, sock: socket.socket) -> None:
    """Serve until SIGTERM/SIGINT, drain with the port still open (new submissions get 503),
    then close; a second signal during the drain kills the running tasks at once."""
    from aiohttp import web

    from remoterun.api import SCHEDULER

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    from remoterun.api.listen import GuardedSite

    site = GuardedSite(runner, settings, sock=sock)  # TLS, max_connections, header timeout
    from remoterun.cli.descriptors import AcceptFailures

    asyncio.get_running_loop().set_exception_handler(AcceptFailures())
    await site.start()
    _tune_gc()
    port = sock.getsockname()[1]
    log.info("server_ready", url=f"{site.scheme}://{settings.host}:{port}/")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutdown_requested", grace_s=settings.shutdown_grace_s)
    scheduler = app[SCHEDULER]
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, scheduler.force_stop)
    try:
        await scheduler.drain(settings.shutdown_grace_s)
    finally:
        await runner.cleanup()

