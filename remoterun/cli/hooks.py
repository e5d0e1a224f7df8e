"""`remoterun hook ls` and `remoterun hook send NAME --body FILE`: list the server's hooks, and
send one a request signed the way it expects, for trying a hook from a shell (issue 30)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from remoterun.cli.remote import Remote, RemoteError, UsageError, error_of

SECRET_ENV = "REMOTERUN_HOOK_SECRET"


async def command(remote: Remote, args: argparse.Namespace) -> int:
    """`hook ls` or `hook send`."""
    return await (send(remote, args) if args.action == "send" else ls(remote, args))


async def ls(remote: Remote, args: argparse.Namespace) -> int:
    """Each hook: name, script, signature kind, mode, and its latest delivery."""
    hooks = (await remote.json("GET", "/hooks"))["hooks"]
    if args.output == "json":
        print(json.dumps(hooks, indent=2))
        return 0
    for hook in hooks:
        last = hook["deliveries"][0] if hook["deliveries"] else None
        seen = f"{last['ts']} {last['result']}" if last else "no delivery yet"
        print(f"{hook['name']}  {hook['script']}  {hook['signature']}  {hook['mode']}  {seen}")
    return 0


def signed_headers(hook: dict[str, Any], secret: str, body: bytes, now: float
                   ) -> dict[str, str]:
    """The headers that sign `body` for a hook as `GET /hooks` describes it."""
    header = hook["signature_header"]
    if hook["signature"] == "gitlab":
        return {header: secret}
    headers: dict[str, str] = {}
    message = body
    if hook.get("timestamp_header"):
        stamp = str(int(now))
        headers[hook["timestamp_header"]] = stamp
        message = stamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    headers[header] = f"sha256={digest}" if hook["signature"] == "github" else digest
    return headers


def _extra_headers(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--header expects K=V, got {pair!r}")
        found[key] = value
    return found


async def send(remote: Remote, args: argparse.Namespace) -> int:
    """POST the body to the hook, signed with --secret or $REMOTERUN_HOOK_SECRET; print the
    answer (a `stream` hook's output as it comes)."""
    secret = args.secret or os.environ.get(SECRET_ENV)
    if not secret:
        raise UsageError(f"give the hook's secret with --secret or {SECRET_ENV}")
    hooks = {h["name"]: h for h in (await remote.json("GET", "/hooks"))["hooks"]}
    hook = hooks.get(args.name)
    if hook is None:
        raise RemoteError(f"no hook {args.name!r} (hook ls lists them)")
    try:
        body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.body}: {exc.strerror}") from None
    headers = {"Content-Type": "application/json",
               **signed_headers(hook, secret, body, time.time())}
    if hook.get("delivery_header"):
        headers[hook["delivery_header"]] = str(uuid.uuid4())
    headers.update(_extra_headers(args.header))
    return await _post(remote, f"/hooks/{args.name}", body, headers)


async def _post(remote: Remote, path: str, body: bytes, headers: dict[str, str]) -> int:
    """Send, and copy the answer to stdout as it arrives; 0 for a 2xx answer."""
    try:
        async with remote.session.post(remote.url + path, data=body,
                                       headers=headers) as response:
            if response.status >= 400:
                text = await response.text()
                try:
                    raise error_of(response.status, json.loads(text))
                except ValueError:
                    raise error_of(response.status, text) from None
            async for chunk in response.content.iter_any():
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
    except aiohttp.ClientError as exc:
        raise RemoteError(f"cannot reach {remote.url}: {exc}") from exc
    if not response.content_type.startswith("text/"):
        sys.stdout.write("\n")
    return 0
