"""`remoterun schedule ...`: ls, show, runs, pause, resume, run, add, rm, next (issue 29)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote, urlencode

from remoterun.cli.clock import short
from remoterun.cli.commands import params, table
from remoterun.cli.remote import Remote


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The `schedule` verb and its actions."""
    p = sub.add_parser("schedule", help="schedules: list, show, runs, pause, resume, run, "
                                        "add, rm, next", parents=[common])
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="every schedule, its next run and last outcome",
                            parents=[common])
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table")
    for name, text in (("show", "one schedule"), ("pause", "pause a schedule"),
                       ("resume", "resume a schedule"), ("rm", "remove an API schedule"),
                       ("run", "submit one task of it now (prints the task id)")):
        actions.add_parser(name, help=text, parents=[common]).add_argument("name")
    runs = actions.add_parser("runs", help="a schedule's slots, newest first", parents=[common])
    runs.add_argument("name")
    runs.add_argument("--limit", type=int, default=20)
    add = actions.add_parser("add", help="create an API schedule", parents=[common])
    add.add_argument("name")
    add.add_argument("script")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="5 fields, 6 with seconds first, or @daily...")
    when.add_argument("--every", help='a period: "90s", "15m", "1h30m"')
    add.add_argument("--tz", help="an IANA zone (default: the server's)")
    add.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    add.add_argument("--overlap", choices=("forbid", "allow", "replace", "queue"))
    add.add_argument("--catch-up", choices=("latest", "all", "none"))
    nxt = actions.add_parser("next", help="the next instants of a cron expression",
                             parents=[common])
    nxt.add_argument("cron")
    nxt.add_argument("--tz", help="an IANA zone (default: the server's)")
    nxt.add_argument("-n", type=int, default=10)


async def command(remote: Remote, args: argparse.Namespace) -> int:
    """Carry out one `schedule` action."""
    name = quote(getattr(args, "name", "") or "", safe="")
    utc = bool(getattr(args, "utc", False))
    if args.action == "ls":
        return await _ls(remote, args.output, utc)
    if args.action in ("show", "pause", "resume"):
        method = "GET" if args.action == "show" else "POST"
        path = f"/schedules/{name}" + ("" if args.action == "show" else f"/{args.action}")
        print(json.dumps(await remote.json(method, path), indent=2))
    elif args.action == "rm":
        await remote.json("DELETE", f"/schedules/{name}")
    elif args.action == "run":
        print((await remote.json("POST", f"/schedules/{name}/run"))["id"])
    elif args.action == "runs":
        page = await remote.json("GET", f"/schedules/{name}/runs?limit={args.limit}")
        rows = [["SLOT", "OUTCOME", "TASK", "REASON"]]
        rows += [[short(r["slot"], utc), r["outcome"], (r["task_id"] or "-")[:8],
                  r["reason"] or ""] for r in page["runs"]]
        print(table(rows))
    elif args.action == "add":
        print(json.dumps(await remote.json("POST", "/schedules", _body(args)), indent=2))
    else:
        query = {"cron": args.cron, "n": args.n, **({"timezone": args.tz} if args.tz else {})}
        found = await remote.json("GET", f"/cron/next?{urlencode(query)}")
        print(f"{found['description']} ({found['timezone']})")
        print("\n".join(short(at, utc) for at in found["next_runs"]))
    return 0


async def _ls(remote: Remote, output: str, utc: bool) -> int:
    found = (await remote.json("GET", "/schedules"))["schedules"]
    if output == "json":
        print(json.dumps(found, indent=2))
        return 0
    rows = [["NAME", "SCRIPT", "WHEN", "NEXT", "LAST", "STATE"]]
    for s in found:
        last = s["last"]
        rows.append([s["name"], s["script"], s["cron"] or f"every {s['every']}",
                     short(s["next_runs"][0], utc) if s["next_runs"] else "-",
                     last["outcome"] if last else "-",
                     "paused" if s["paused"] else s["source"]])
    print(table(rows))
    return 0


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "script": args.script,
                            "params": params(args.param)}
    for key, value in (("cron", args.cron), ("every", args.every), ("timezone", args.tz),
                       ("overlap", args.overlap), ("catch_up", args.catch_up)):
        if value is not None:
            body[key] = value
    return body
