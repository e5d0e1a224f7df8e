"""The `remoterun` command: `serve`, `archive verify`, and the verbs that are its HTTP client."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import ipaddress
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from remoterun import config, logs
from remoterun.catalogue import Catalogue, MetadataError

if TYPE_CHECKING:
    from remoterun.retention import Report

log = structlog.get_logger("remoterun")
DEFAULT_URL = "http://127.0.0.1:8080"


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
    overrides = {"host": args.host, "port": args.port,
                 "scripts_dir": Path(args.scripts).resolve() if args.scripts else None,
                 "archive_dir": Path(args.archive).resolve() if args.archive else None,
                 "db_path": Path(args.db).resolve() if args.db else None}
    try:
        settings = config.load(path, overrides)
        if not settings.scripts_dir.is_dir():
            raise config.ConfigError(f"paths.scripts: {settings.scripts_dir} is not a directory")
        Catalogue(settings.scripts_dir, settings.scripts).check()
        from remoterun.api.listen import tls_context  # issue 12: a bad certificate stops here
        tls_context(settings)
        logs.configure(settings.log_level)
    except (config.ConfigError, MetadataError) as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    if not settings.auth_enabled and not _is_loopback(settings.host):
        log.warning("auth_off_loopback_only", requested_host=settings.host, host="127.0.0.1")
        settings = dataclasses.replace(settings, host="127.0.0.1")
    elif not settings.auth_enabled:
        log.info("auth_off_loopback_only", host=settings.host)
    log.info("server_starting", host=settings.host, port=settings.port,
             scripts=str(settings.scripts_dir), archive=str(settings.archive_dir),
             db=str(settings.db_path), workers=settings.workers)
    asyncio.run(_run_server(create_app(settings), settings))
    log.info("server_stopped")
    return 0


def _tune_gc() -> None:
    """Collect garbage less often: freeze what start-up made (modules, the app: never garbage,
    yet scanned by every full collection) and let the young generation grow to 20,000 objects.
    Every task allocates hundreds; at the default 700 the collector took ~5% of the event
    loop's time on trivial tasks, and ~2% after this (measured with gc.callbacks)."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


async def _run_server(app: Any, settings: config.Settings) -> None:
    """Serve until SIGTERM/SIGINT, drain with the port still open (new submissions get 503),
    then close; a second signal during the drain kills the running tasks at once."""
    from aiohttp import web

    from remoterun.api import SCHEDULER
    from remoterun.api.listen import GuardedSite

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = GuardedSite(runner, settings)  # issue 12: TLS, max_connections, header timeout
    await site.start()
    _tune_gc()
    log.info("server_ready", url=f"{site.scheme}://{settings.host}:{settings.port}/")
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


# Archive -------------------------------------------------------------------------------------

def archive_command(args: argparse.Namespace) -> int:
    """`archive verify [--repair]`: the database against the archive directory; 1 if wrong."""
    path = Path(args.config) if args.config else (Path("config.toml")
                                                 if Path("config.toml").is_file() else None)
    overrides = {"archive_dir": Path(args.archive).resolve() if args.archive else None,
                 "db_path": Path(args.db).resolve() if args.db else None}
    try:
        settings = config.load(path, overrides)
    except config.ConfigError as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    if not settings.db_path.is_file():
        print(f"remoterun: no database at {settings.db_path}", file=sys.stderr)
        return 2
    report = asyncio.run(_verify(settings, args.repair))
    for finding in report.findings:
        print(finding.line())
    left = sum(not f.repaired for f in report.findings)
    print(f"checked {report.segments} segment rows and {report.files} files under "
          f"{settings.archive_dir}: {len(report.findings)} problems, "
          f"{len(report.findings) - left} repaired, {left} left"
          + (" (a server is running: segments it is writing were not judged)"
             if report.live else ""))
    return 0 if report.ok else 1


async def _verify(settings: config.Settings, repair: bool) -> Report:
    from remoterun.retention import verify
    from remoterun.store import Database

    db = Database(settings.db_path)
    await db.open()
    try:
        return await verify(settings, db, repair=repair)
    finally:
        await db.close()


# Client --------------------------------------------------------------------------------------

def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.token}"} if args.token else {}


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"remoterun: -p expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        if not isinstance(params[key], str | int | float | bool):
            params[key] = value
    return params


async def _request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession(headers=_headers(args)) as session, \
            session.request(method, args.url + path, json=body) as response:
        data = await response.json(content_type=None)
        if response.status >= 400:
            print(f"remoterun: {response.status} {data.get('error')}: {data.get('message')}",
                  file=sys.stderr)
            for detail in data.get("details") or []:
                print(f"  {detail}", file=sys.stderr)
            raise SystemExit(1)
        return data


async def _follow(args: argparse.Namespace, task_id: str, since: int = 0) -> int:
    """Print a task's output as it comes; the exit code is the task's (1 if it did not run)."""
    url = f"{args.url}/tasks/{task_id}/ws?since={since}"
    exit_code = 1
    out = {"stdout": sys.stdout, "pty": sys.stdout, "stderr": sys.stderr}
    async with aiohttp.ClientSession(headers=_headers(args)) as session:
        while True:
            async with session.ws_connect(url, max_msg_size=0) as ws:
                async for msg in ws:
                    frame = json.loads(msg.data)
                    if frame["type"] == "output":
                        out[frame["stream"]].write(frame["data"])
                        out[frame["stream"]].flush()
                        since = frame["seq"]
                    elif frame["type"] == "exit":
                        code = frame.get("exit_code")
                        exit_code = code if isinstance(code, int) and code >= 0 else 1
                        if frame["status"] != "success":
                            print(f"remoterun: task {frame['status']}", file=sys.stderr)
                        return exit_code
            if ws.close_code != 1013:  # closed for being slow: resume where we were
                return exit_code
            url = f"{args.url}/tasks/{task_id}/ws?since={since}"


async def _watch(args: argparse.Namespace) -> None:
    """Print each task transition as GET /events streams it, resuming after a drop (or a
    server restart) from the last event id, until interrupted."""
    last: str | None = None
    async with aiohttp.ClientSession(headers=_headers(args),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        while True:
            headers = {"Last-Event-ID": last} if last is not None else {}
            try:
                async with session.get(f"{args.url}/events", headers=headers) as response:
                    if response.status >= 400:
                        raise SystemExit(f"remoterun: {response.status}: {await response.text()}")
                    fields: dict[str, str] = {}
                    async for raw in response.content:
                        line = raw.decode().rstrip("\n")
                        if line:
                            key, _, value = line.partition(": ")
                            fields[key] = value
                            continue
                        last = fields.get("id", last)
                        if fields.get("event") == "task":
                            t = json.loads(fields["data"])
                            if not args.status or t["status"] == args.status:
                                print(f"{t['id']}  {t['status']:<9}  {t['updated_at']}  "
                                      f"{t['script']}", flush=True)
                        fields = {}
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)  # the stream was cut (a slow client, a restart): resume


async def _client(args: argparse.Namespace) -> int:
    if args.verb == "submit":
        body = {"script": args.script, "params": _params(args.param),
                "priority": args.priority, "max_retries": args.retries}
        if args.timeout is not None:
            body["timeout"] = args.timeout
        if args.stdin:
            body["stdin"] = sys.stdin.read()
        task = await _request(args, "POST", "/tasks", body)
        if not args.follow:
            print(json.dumps(task, indent=2))
            return 0
        print(f"remoterun: task {task['id']}", file=sys.stderr)
        return await _follow(args, task["id"])
    if args.verb == "logs":
        if args.follow:
            return await _follow(args, args.id, args.since)
        async with aiohttp.ClientSession(headers=_headers(args)) as session, \
                session.get(f"{args.url}/tasks/{args.id}/output") as response:
            if response.status >= 400:
                print(f"remoterun: {response.status}: {await response.text()}", file=sys.stderr)
                return 1
            async for chunk in response.content.iter_any():
                sys.stdout.buffer.write(chunk)
        return 0
    if args.verb in ("tasks", "ls"):
        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        data = await _request(args, "GET", "/tasks" + query)
        for t in data["tasks"]:
            print(f"{t['id']}  {t['status']:<9}  {t['created_at']}  {t['script']}")
        if args.watch:
            await _watch(args)
        return 0
    if args.verb == "show":
        print(json.dumps(await _request(args, "GET", f"/tasks/{args.id}"), indent=2))
        return 0
    if args.verb == "cancel":
        print(json.dumps(await _request(args, "POST", f"/tasks/{args.id}/cancel"), indent=2))
        return 0
    if args.verb == "scripts":
        for s in (await _request(args, "GET", "/scripts"))["scripts"]:
            print(f"{s['name']:<28} {s['description']}")
        return 0
    raise AssertionError(args.verb)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="remoterun", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--config", help="config.toml (default: ./config.toml if present)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--scripts", help="the scripts directory")
    s.add_argument("--archive", help="the archive directory")
    s.add_argument("--db", help="the SQLite database file")
    a = sub.add_parser("archive", help="check the output archive against the database")
    verify = a.add_subparsers(dest="action", required=True).add_parser(
        "verify", help="every row's files exist and decompress; no file without a row")
    verify.add_argument("--repair", action="store_true",
                        help="finalize what a crash left open; fix rows; adopt strays of "
                             "known tasks; delete pruned leftovers")
    verify.add_argument("--config", help="config.toml (default: ./config.toml if present)")
    verify.add_argument("--archive", help="the archive directory")
    verify.add_argument("--db", help="the SQLite database file")
    for name, help_text in (("submit", "submit a task"), ("logs", "print a task's output"),
                            ("tasks", "list tasks"), ("show", "show one task"),
                            ("cancel", "cancel a task"), ("scripts", "list scripts")):
        c = sub.add_parser(name, help=help_text, aliases=["ls"] if name == "tasks" else [])
        c.add_argument("--url", default=os.environ.get("REMOTERUN_URL", DEFAULT_URL))
        c.add_argument("--token", default=os.environ.get("REMOTERUN_TOKEN"))
        if name == "submit":
            c.add_argument("script")
            c.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
            c.add_argument("--priority", type=int, default=0)
            c.add_argument("--timeout", type=float)
            c.add_argument("--retries", type=int, default=0)
            c.add_argument("--stdin", action="store_true", help="send this command's stdin")
            c.add_argument("-f", "--follow", action="store_true", help="stream the output")
        elif name in ("logs", "show", "cancel"):
            c.add_argument("id")
        if name == "logs":
            c.add_argument("-f", "--follow", action="store_true")
            c.add_argument("--since", type=int, default=0)
        if name == "tasks":
            c.add_argument("--status")
            c.add_argument("--limit", type=int, default=20)
            c.add_argument("-w", "--watch", action="store_true",
                           help="then print each transition as it happens (GET /events)")
    _token_parser(sub)
    return p


# Tokens (issue 12) ---------------------------------------------------------------------------

def _token_parser(sub: Any) -> None:
    t = sub.add_parser("token", help="make API tokens")
    create = t.add_subparsers(dest="action", required=True).add_parser(
        "create", help="print a new token once, and the [[tokens]] lines (with its sha256)")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=config.ROLES)
    create.add_argument("--scripts", nargs="*", metavar="NAME_OR_GLOB",
                        help="limit it to these scripts (none given: no script at all)")
    create.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h, 90m")


def token_command(args: argparse.Namespace) -> int:
    """`remoterun token create NAME --role R [--scripts ...] [--expires 30d]`."""
    from remoterun.auth import create_token, parse_duration

    try:
        expires = parse_duration(args.expires) if args.expires else None
        token, lines = create_token(args.name, args.role, args.scripts, expires)
    except ValueError as exc:
        print(f"remoterun: {exc}", file=sys.stderr)
        return 2
    print(f"token (shown once; give it to the client): {token}")
    print("\nadd to config.toml (it holds only the token's sha256):\n")
    print(lines, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `remoterun` and `python -m remoterun`."""
    args = parser().parse_args(argv)
    if args.verb == "token":
        return token_command(args)
    if args.verb == "serve":
        return serve(args)
    if args.verb == "archive":
        return archive_command(args)
    args.url = args.url.rstrip("/")
    try:
        return asyncio.run(_client(args))
    except KeyboardInterrupt:  # how `ls --watch` ends
        return 130
    except aiohttp.ClientError as exc:
        print(f"remoterun: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
