"""The `remoterun` command: `serve`, `archive verify`, and the client verbs (run, logs, ls...)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from remoterun import __version__

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
    from remoterun.cli import admin, backup

    admin.add_archive_parser(sub, _server_flags)
    backup.add_parsers(sub, _server_flags)
    _client_verbs(sub, common)
    from remoterun.cli import schedule  # issue 29

    schedule.add_parser(sub, common)
    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=("bash", "zsh"))
    admin.add_token_parser(sub)
    admin.add_sign_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `remoterun` and `python -m remoterun`."""
    if argv is None and sys.argv[1:2] == ["serve"]:
        from remoterun.cli.reexec import reexec_serve

        reexec_serve()
    from remoterun.cli import admin, commands, completion
    from remoterun.cli.remote import EXIT_REMOTERUN, EXIT_USAGE, RemoteError, UsageError, say

    p = parser()
    args = p.parse_args(argv)
    if args.verb == "serve":
        from remoterun.cli.serve import serve

        return serve(args)
    if args.verb == "archive":
        return admin.archive_command(args)
    if args.verb in ("backup", "restore"):
        from remoterun.cli import backup

        return backup.command(args)
    if args.verb == "completion":
        print(completion.script(args.shell, p))
        return 0
    if args.verb == "token":
        return admin.token_command(args)
    if args.verb == "sign":
        return admin.sign_command(args)
    try:
        if args.verb == "schedule":
            from remoterun.cli import schedule

            return asyncio.run(_client(args, schedule.command))
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
