"""The CLI's client verbs: run, attach, logs, ls, show, cancel, scripts (each an async function)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp

from remoterun.cli.attach import Output, follow
from remoterun.cli.clock import short, task_times
from remoterun.cli.hooks import command as hook
from remoterun.cli.remote import Remote, RemoteError, UsageError, error_of, say


def params(pairs: list[str]) -> dict[str, Any]:
    """`-p key=value` pairs; a value that reads as a JSON scalar (3, 2.5, true) is one."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p expects KEY=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        found[key] = parsed if isinstance(parsed, str | int | float | bool) else value
    return found


async def run(remote: Remote, args: argparse.Namespace) -> int:
    """`run SCRIPT`: submit, then stream until it ends (or print the id with --detach)."""
    if args.tty and not sys.stdin.isatty():
        raise UsageError("-t needs a terminal on stdin (drop -t, or keep -i for a pipe)")
    body: dict[str, Any] = {"script": args.script, "params": params(args.param),
                            "priority": args.priority, "max_retries": args.retries}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.tty:
        body["pty"] = True
    if args.interactive or args.tty:
        body["interactive"] = True
    task = await remote.json("POST", "/tasks", body)
    if args.detach:
        print(task["id"])
        return 0
    return await follow(remote, task["id"], stdin=args.interactive or args.tty,
                        tty_mode=args.tty)


async def attach(remote: Remote, args: argparse.Namespace) -> int:
    """`attach ID`: the task's output from the start, then live; stdin to it if it reads one."""
    task = await remote.json("GET", f"/tasks/{await remote.task_id(args.id)}")
    reads = bool(task["interactive"] or task["pty"]) and task["status"] in ("pending", "running")
    tty_mode = bool(task["pty"]) and reads and sys.stdin.isatty() and not args.no_stdin
    return await follow(remote, task["id"], since=args.since,
                        stdin=reads and not args.no_stdin, tty_mode=tty_mode)


async def logs(remote: Remote, args: argparse.Namespace) -> int:
    """`logs ID`: the archived output (after --since); with -f, live until the end."""
    task_id = await remote.task_id(args.id)
    if args.grep is not None:
        return await grep(remote, task_id, args)
    if args.follow:
        return await follow(remote, task_id, since=args.since, forward_interrupt=False,
                            output=Output(args.stream, args.timestamps, _utc(args)))
    query = {"since": args.since} if args.since else {}
    if args.stream:
        query["stream"] = args.stream
    if args.timestamps:
        query["format"] = "jsonl"
    url = f"{remote.url}/tasks/{task_id}/output?{urlencode(query)}"
    output = Output(args.stream, args.timestamps, _utc(args))
    try:
        async with remote.session.get(url, auto_decompress=True) as response:
            if response.status >= 400:
                text = await response.text()
                try:
                    raise error_of(response.status, json.loads(text))
                except json.JSONDecodeError:
                    raise error_of(response.status, text) from None
            if args.timestamps:
                async for line in response.content:
                    output.write(json.loads(line))
            else:
                async for chunk in response.content.iter_any():
                    sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except aiohttp.ClientError as exc:
        raise RemoteError(f"cannot reach {remote.url}: {exc}") from exc
    return 0


async def grep(remote: Remote, task_id: str, args: argparse.Namespace) -> int:
    """`logs ID --grep PATTERN`: each matching line as `LINE:text`, as `grep -n` prints it,
    every page of the server's search; 0 if a line matched, 1 if none (grep's codes)."""
    query: dict[str, str] = {"q": args.grep, "limit": "1000"}
    if args.regex:
        query["regex"] = "true"
    if args.stream:
        query["stream"] = args.stream
    found = False
    while True:
        page = await remote.json("GET", f"/tasks/{task_id}/search?{urlencode(query)}")
        for match in page["matches"]:
            sys.stdout.write(f"{match['line']}:{match['text']}\n")
            found = True
        sys.stdout.flush()
        if page["next_cursor"] is None:
            return 0 if found else 1
        query["cursor"] = page["next_cursor"]


def _utc(args: argparse.Namespace) -> bool:
    """Whether --utc was given (before or after the verb)."""
    return bool(getattr(args, "utc", False))


def _duration(task: dict[str, Any]) -> str:
    start = task.get("started_at")
    if not start:
        return "-"
    end = task.get("finished_at")
    began = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    finished = (datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() if end
                else time.time())
    seconds = max(0.0, finished - began)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, the first row being the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)
                               ).rstrip() for row in rows)


async def ls(remote: Remote, args: argparse.Namespace) -> int:
    """`ls`: tasks, newest first, as a table (or `-o json`)."""
    query: dict[str, Any] = {"limit": args.limit}
    if args.status:
        query["status"] = args.status
    if args.script:
        query["script"] = args.script
    page = await remote.json("GET", f"/tasks?{urlencode(query)}")
    if args.output == "json":
        print(json.dumps(page["tasks"], indent=2))
        return 0
    rows = [["ID", "SCRIPT", "STATUS", "EXIT", "DURATION", "CREATED"]]
    for t in page["tasks"]:
        code = t.get("exit_code")
        rows.append([t["id"][:8], t["script"], t["status"], "-" if code is None else str(code),
                     _duration(t), short(t["created_at"], _utc(args))])
    print(table(rows))
    if args.watch:
        await _watch(remote, args.status, _utc(args))
    return 0


async def _watch(remote: Remote, status: str | None, utc: bool) -> None:
    """Print each task transition as GET /events streams it, resuming after a drop (or a
    server restart) from the last event id, until interrupted (Ctrl-C: exit 130)."""
    last: str | None = None
    sys.stdout.flush()
    while True:
        headers = {"Last-Event-ID": last} if last is not None else {}
        try:
            async with remote.session.get(f"{remote.url}/events", headers=headers) as response:
                if response.status >= 400:
                    raise RemoteError(f"{response.status}: {await response.text()}")
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
                        if not status or t["status"] == status:
                            print(f"{t['id']}  {t['status']:<9}  "
                                  f"{short(t['updated_at'], utc)}  "
                                  f"{t['script']}", flush=True)
                    fields = {}
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)  # the stream was cut (a slow client, a restart): resume


async def show(remote: Remote, args: argparse.Namespace) -> int:
    """`show ID`: one task, as `key: value` lines (or `-o json`)."""
    task = await remote.json("GET", f"/tasks/{await remote.task_id(args.id)}")
    if args.output == "json":
        print(json.dumps(task, indent=2))
        return 0
    width = max(map(len, task))
    for key, value in task_times(task, _utc(args)).items():
        shown = json.dumps(value) if isinstance(value, dict | list | bool) or value is None \
            else value
        print(f"{key + ':':<{width + 1}} {shown}")
    return 0


async def cancel(remote: Remote, args: argparse.Namespace) -> int:
    """`cancel ID...`: cancel each task; its id and status as it stands."""
    for given in args.ids:
        task = await remote.json("POST", f"/tasks/{await remote.task_id(given)}/cancel")
        print(f"{task['id']}  {task['status']}")
    return 0


async def scripts(remote: Remote, args: argparse.Namespace) -> int:
    """`scripts`: what may be run, with each parameter (or `-o json`, `-o name`)."""
    found = (await remote.json("GET", "/scripts"))["scripts"]
    if args.output == "json":
        print(json.dumps(found, indent=2))
    elif args.output == "name":
        print("\n".join(s["name"] for s in found))
    else:
        rows = [["NAME", "PARAMS", "DESCRIPTION"]]
        for s in found:
            declared = s.get("params")
            names = "(free-form)" if declared is None else ",".join(
                p["name"] + ("" if p.get("required") else "?") for p in declared)
            about = f"ERROR: {s['error']}" if s.get("error") else s.get("description") or ""
            rows.append([s["name"], names or "-", about])
        print(table(rows))
    return 0


VERBS = {"run": run, "attach": attach, "logs": logs, "ls": ls, "show": show, "cancel": cancel,
         "scripts": scripts, "hook": hook}


def report(exc: RemoteError) -> None:
    """A RemoteError on stderr."""
    say(exc.lines()[0].removeprefix("remoterun: "))
    for line in exc.lines()[1:]:
        sys.stderr.write(line + "\n")
