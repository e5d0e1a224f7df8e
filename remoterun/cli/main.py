"""The `remoterun` command: `serve`, `archive verify`, and the client verbs (run, logs, ls...)."""

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
from typing import TYPE_CHECKING, Any

import structlog

from remoterun import __version__, config, logs
from remoterun.catalogue import Catalogue, MetadataError

if TYPE_CHECKING:
    from remoterun.retention import Report

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
    from remoterun.cli.firstrun import check_scripts, message
    from remoterun.vault import KEY_ENV, parse_key

    logs.configure()
    path = Path(args.config) if args.config else (Path("config.toml")
                                                 if Path("config.toml").is_file() else None)
    overrides = {"host": args.host, "port": args.port,
                 "scripts_dir": Path(args.scripts).resolve() if args.scripts else None,
                 "archive_dir": Path(args.archive).resolve() if args.archive else None,
                 "db_path": Path(args.db).resolve() if args.db else None}
    try:
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
        from remoterun.cli.descriptors import fit_connections
        settings = fit_connections(settings)  # max_connections within RLIMIT_NOFILE
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
    if requested != settings.host:
        log.warning("auth_off_loopback_only", requested_host=requested, host=settings.host)
    elif not settings.auth_enabled:
        log.info("auth_off_loopback_only", host=settings.host)
    if path is None:
        print(message(settings, _page_url(settings, sock), made_scripts), file=sys.stderr)
    log.info("server_starting", host=settings.host, port=settings.port,
             scripts=str(settings.scripts_dir), archive=str(settings.archive_dir),
             db=str(settings.db_path), workers=settings.workers)
    with sock:
        try:
            asyncio.run(_run_server(create_app(settings), settings, sock))
        except config.ConfigError as exc:  # found as the server starts: a seccomp profile
            print(f"remoterun: config error: {exc}", file=sys.stderr)
            return 2
    log.info("server_stopped")
    return 0


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


# Archive -------------------------------------------------------------------------------------

def archive_command(args: argparse.Namespace) -> int:
    """`archive verify [--repair]`: the database against the archive directory; 1 if wrong."""
    from remoterun.cli.backup import settings_from

    try:
        settings = settings_from(args)
    except config.ConfigError as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    if settings.cluster is None and not settings.db_path.is_file():
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
    from remoterun.store import Database, Store

    db: Store = Database(settings.db_path)
    if settings.cluster is not None:  # the cluster's rows against the shared archive
        from remoterun.store.postgres import PostgresDatabase
        db = PostgresDatabase(settings.cluster.database_url)
    await db.open()
    try:
        return await verify(settings, db, repair=repair)
    finally:
        await db.close()


# The command line ------------------------------------------------------------------------------

EPILOG = """exit codes of run, attach and logs -f: the script's own; 128+N killed by signal N;
124 timeout; 130 cancelled; 127 failed to start; 125 RemoteRun failed (unreachable, 4xx/5xx);
2 usage. Server and token: --url/--token, REMOTERUN_URL/REMOTERUN_TOKEN, or
~/.config/remoterun/config.toml (url = "...", token = "...")."""


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.toml (default: ./config.toml if present)")
    p.add_argument("--archive", help="the archive directory")
    p.add_argument("--db", help="the SQLite database file")


def _client_verbs(sub: Any, common: argparse.ArgumentParser) -> None:
    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common], description=help_text)  # type: ignore[no-any-return]

    r = verb("run", "submit a task and stream its output (like docker run)")
    r.add_argument("script")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--priority", type=int, default=0)
    r.add_argument("--timeout", type=float, metavar="SECONDS")
    r.add_argument("--retries", type=int, default=0)
    r.add_argument("-i", "--interactive", action="store_true", help="forward stdin, live")
    r.add_argument("-t", "--tty", action="store_true",
                   help="run in a PTY, this terminal in raw mode")
    r.add_argument("-d", "--detach", action="store_true", help="print the task id only")
    a = verb("attach", "re-join a task: its output, then live; stdin if it reads one")
    a.add_argument("id")
    a.add_argument("--since", type=int, default=0, metavar="SEQ")
    a.add_argument("--no-stdin", action="store_true")
    lg = verb("logs", "print a task's output")
    lg.add_argument("id")
    lg.add_argument("-f", "--follow", action="store_true", help="go on until the task ends")
    lg.add_argument("--since", type=int, default=0, metavar="SEQ", help="after this frame")
    lg.add_argument("--stream", choices=("stdout", "stderr", "pty"))
    lg.add_argument("--timestamps", action="store_true", help="each line's time first")
    lg.add_argument("--grep", metavar="PATTERN",
                    help="only the lines holding PATTERN, as LINE:text (the server searches)")
    lg.add_argument("-E", "--regex", action="store_true", help="--grep PATTERN is a regex")
    ls = verb("ls", "list tasks, newest first")
    ls.add_argument("--status", choices=("pending", "running", "success", "failed", "timeout",
                                         "cancelled"))
    ls.add_argument("--script")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table")
    ls.add_argument("-w", "--watch", action="store_true",
                    help="then print each transition as it happens (GET /events)")
    sh = verb("show", "show one task")
    sh.add_argument("id")
    sh.add_argument("-o", "--output", choices=("text", "json"), default="text")
    c = verb("cancel", "cancel tasks")
    c.add_argument("ids", nargs="+", metavar="ID")
    sc = verb("scripts", "list the scripts one may run")
    sc.add_argument("-o", "--output", choices=("table", "json", "name"), default="table")
    hk = verb("hook", "list the server's hooks, or send one a signed request (a test)")
    actions = hk.add_subparsers(dest="action", required=True)
    hl = actions.add_parser("ls", help="the hooks and their latest delivery", parents=[common])
    hl.add_argument("-o", "--output", choices=("table", "json"), default="table")
    hs = actions.add_parser("send", help="POST a body to a hook, signed as it expects",
                            parents=[common])
    hs.add_argument("name")
    hs.add_argument("--body", required=True, metavar="FILE", help="the body ('-': stdin)")
    hs.add_argument("--header", action="append", default=[], metavar="K=V")
    hs.add_argument("--secret", help="the hook's secret (default: $REMOTERUN_HOOK_SECRET)")


def parser() -> argparse.ArgumentParser:
    """The command line; --url and --token are accepted before or after the verb."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the server (default: $REMOTERUN_URL, the config file, "
                             "http://127.0.0.1:8080)")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="a bearer token (default: $REMOTERUN_TOKEN, the config file)")
    common.add_argument("--utc", action="store_true", default=argparse.SUPPRESS,
                        help="print times in UTC (Z) instead of local time with its offset")
    p = argparse.ArgumentParser(prog="remoterun", parents=[common], epilog=EPILOG,
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"remoterun {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the server")
    _server_flags(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--scripts", help="the scripts directory")
    a = sub.add_parser("archive", help="check the output archive against the database")
    verify = a.add_subparsers(dest="action", required=True).add_parser(
        "verify", help="every row's files exist and decompress; no file without a row")
    verify.add_argument("--repair", action="store_true",
                        help="finalize what a crash left open; fix rows; adopt strays of "
                             "known tasks; delete pruned leftovers")
    _server_flags(verify)
    from remoterun.cli import backup

    backup.add_parsers(sub, _server_flags)
    _client_verbs(sub, common)
    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=("bash", "zsh"))
    _token_parser(sub)
    _sign_parser(sub)
    return p


def _sign_parser(sub: Any) -> None:
    g = sub.add_parser("sign", help="sign scripts for [integrity] public_keys (Ed25519)")
    g.add_argument("scripts", nargs="*", metavar="SCRIPT",
                   help="write SCRIPT.sig beside each (covering SCRIPT.toml too, if present)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--key", metavar="PRIVATE_KEY", help="the PEM private key to sign with")
    mode.add_argument("--new-key", metavar="PRIVATE_KEY",
                      help="make a new private key file (0600) and print its public key")


def sign_command(args: argparse.Namespace) -> int:
    """`remoterun sign --new-key KEY` / `remoterun sign --key KEY SCRIPT...`."""
    from remoterun.integrity import new_key, sign

    try:
        if args.new_key:
            public = new_key(Path(args.new_key))
            print(f"private key written to {args.new_key} (keep it off the server)")
            print(f'\nadd to config.toml:\n\n[integrity]\npublic_keys = ["{public}"]')
            for script in args.scripts:
                _say_signed(*sign(Path(args.new_key), Path(script)))
            return 0
        if not args.scripts:
            print("remoterun: sign: name the scripts to sign", file=sys.stderr)
            return 2
        for script in args.scripts:
            _say_signed(*sign(Path(args.key), Path(script)))
    except (OSError, ValueError, TypeError) as exc:
        print(f"remoterun: sign: {exc}", file=sys.stderr)
        return 1
    return 0


def _say_signed(sig: Path, public: str, sidecar: Path | None) -> None:
    """One line per signed script: its signature, and the sidecar it covers."""
    print(f"signed {sig}" + (f" (with its metadata {sidecar})" if sidecar else ""))


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


# What `serve`'s re-exec keeps in its environment block: what the interpreter and the C library
# read as the new image starts (or that is no secret anyway). Everything else is carried out of
# the block and put back in os.environ only, so that /proc/<server>/environ, readable by any
# process of the server's user (a task under `mode = "none"`), holds no secret (issue 26).
BLOCK_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME", "SHELL",
             "PWD", "TMPDIR", "GLIBC_TUNABLES")
BLOCK_ENV_PREFIXES = ("LC_", "PYTHON", "LD_", "MALLOC_")
CARRIED_FD_ENV = "REMOTERUN_CARRIED_ENV_FD"  # the descriptor the carried variables are read from


def _in_block(name: bytes) -> bool:
    text = os.fsdecode(name)
    return text in BLOCK_ENV or text.startswith(BLOCK_ENV_PREFIXES)


def _reexec_serve() -> None:
    """Start `serve` again (same PID, same arguments) with a clean environment block, on
    glibc's malloc unless the caller chose an allocator; or, in the image so started, put the
    carried variables back. A no-op when nothing needs either.

    The kernel keeps a process's initial environment in /proc/<pid>/environ for its life:
    os.environ.pop changes only the C library's copy. So the variables outside BLOCK_ENV
    (REMOTERUN_SECRET_KEY, tokens, cloud keys) travel to the new image in an anonymous
    memory file (memfd) it reads and closes first thing; they never touch its block.

    On malloc: pymalloc frees a 1 MiB arena only when every block in it is free: after 2,000
    replaying clients left, ~5,000 small survivors (parser strings, log lines) kept 55 arenas
    with 31 MB of empty pools resident (idle +46 MB, bench replay). glibc's malloc_trim, which
    the server runs every 10 s, returns any free page: +22 MB.
    """
    if CARRIED_FD_ENV in os.environ:
        _restore_carried(os.environ.pop(CARRIED_FD_ENV))
        return
    if not hasattr(os, "execve") or not hasattr(os, "memfd_create"):
        return
    env = {k: v for k, v in os.environb.items() if _in_block(k)}
    carried = b"".join(k + b"=" + v + b"\0" for k, v in os.environb.items()
                       if not _in_block(k))
    if b"PYTHONMALLOC" not in env:
        env[b"PYTHONMALLOC"] = b"malloc"
    elif not carried:
        return
    if carried:
        fd = os.memfd_create("remoterun-env")  # close-on-exec until we say otherwise
        os.write(fd, carried)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        env[CARRIED_FD_ENV.encode()] = str(fd).encode()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _restore_carried(fd_text: str) -> None:
    """Read the variables the re-exec carried (NUL-separated `KEY=value`) into os.environ."""
    try:
        fd = int(fd_text)
        with open(fd, "rb") as fh:
            data = fh.read()
    except (ValueError, OSError) as exc:
        raise SystemExit(f"remoterun: {CARRIED_FD_ENV} is the server's own; "
                         f"unset it ({exc})") from None
    for item in data.split(b"\0"):
        if item:
            key, _, value = item.partition(b"=")
            os.environb[key] = value


def main(argv: list[str] | None = None) -> int:
    """Entry point of `remoterun` and `python -m remoterun`."""
    if argv is None and sys.argv[1:2] == ["serve"]:
        _reexec_serve()
    from remoterun.cli import commands, completion
    from remoterun.cli.remote import EXIT_REMOTERUN, EXIT_USAGE, RemoteError, UsageError, say

    p = parser()
    args = p.parse_args(argv)
    if args.verb == "serve":
        return serve(args)
    if args.verb == "archive":
        return archive_command(args)
    if args.verb in ("backup", "restore"):
        from remoterun.cli import backup

        return backup.command(args)
    if args.verb == "completion":
        print(completion.script(args.shell, p))
        return 0
    if args.verb == "token":
        return token_command(args)
    if args.verb == "sign":
        return sign_command(args)
    try:
        return asyncio.run(_client(args, commands.VERBS[args.verb]))
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
    except RemoteError as exc:
        commands.report(exc)
        return EXIT_REMOTERUN
    except KeyboardInterrupt:  # Ctrl-C outside an attachment (a listing, a download)
        return 130
    except BrokenPipeError:  # `remoterun logs ID | head`
        sys.stderr.close()
        return 0


async def _client(args: argparse.Namespace, verb: Any) -> int:
    from remoterun.cli.remote import Remote, resolve_target

    url, token = resolve_target(getattr(args, "url", None), getattr(args, "token", None))
    remote = Remote.open(url, token)
    try:
        return int(await verb(remote, args))
    finally:
        await remote.close()
