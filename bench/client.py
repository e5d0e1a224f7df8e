"""RemoteRun as a client sees it: submit over REST, follow a task over WebSocket."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TRY_AGAIN_LATER = 1013


def session(limit: int = 0) -> aiohttp.ClientSession:
    """A client session with no connection cap (each WebSocket holds a connection)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))


async def submit(http: aiohttp.ClientSession, url: str, script: str,
                 params: dict[str, Any] | None = None, **fields: Any) -> str:
    """POST /tasks; the new task's id."""
    body = {"script": script, **({"params": params} if params else {}), **fields}
    async with http.post(url + "/tasks", json=body) as resp:
        if resp.status != 201:
            raise RuntimeError(f"submit {script}: {resp.status} {await resp.text()}")
        return str((await resp.json())["id"])


async def cancel(http: aiohttp.ClientSession, url: str, task_id: str) -> None:
    """POST /tasks/{id}/cancel (409, already ended, is fine)."""
    async with http.post(f"{url}/tasks/{task_id}/cancel") as resp:
        if resp.status not in (200, 409):
            raise RuntimeError(f"cancel: {resp.status} {await resp.text()}")


@dataclass
class Followed:
    """What one WebSocket client saw of a task."""

    data_bytes: int = 0
    text_chars: int = 0
    frames: int = 0
    last_seq: int = 0
    reconnects: int = 0
    exit: dict[str, Any] | None = None
    gaps: int = 0
    latencies: list[float] = field(default_factory=list)


OnText = Callable[[str, Followed], None]


def decode_frame(text: str, seen: Followed) -> None:
    """Full check of an output frame: JSON-decode it and count its data bytes."""
    msg = json.loads(text)
    if msg["type"] == "output":
        seen.data_bytes += len(msg["data"].encode())
    elif msg["type"] == "exit":
        seen.exit = msg


def cheap_frame(text: str, seen: Followed) -> None:
    """Cheap check for many subscribers: count characters, read `exit`; seq is checked apart."""
    if '"exit"' in text[:32]:
        msg = json.loads(text)
        if msg.get("type") == "exit":
            seen.exit = msg


_PREFIXES = ('{"type":"output","seq":', '{"type": "output", "seq": ')  # now, and before orjson


def _seq_of(text: str) -> int | None:
    """The seq of an output frame (fast path for the server's own spacing), else None."""
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            start = len(prefix)
            return int(text[start:text.index(",", start)])
    if '"output"' in text[:64]:
        msg = json.loads(text)
        if msg.get("type") == "output":
            return int(msg["seq"])
    return None


async def follow(http: aiohttp.ClientSession, url: str, task_id: str,
                 on_text: OnText = decode_frame, seen: Followed | None = None,
                 ws: aiohttp.ClientWebSocketResponse | None = None,
                 max_reconnects: int = 100) -> Followed:
    """Attach to a task and read until its exit frame; resume with `since` after a 1013."""
    seen = seen or Followed()
    while True:
        if ws is None:
            ws = await http.ws_connect(f"{url}/tasks/{task_id}/ws?since={seen.last_seq}",
                                       max_msg_size=0, autoclose=True)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            text = msg.data
            seq = _seq_of(text)
            if seq is not None:
                if seq != seen.last_seq + 1:
                    seen.gaps += 1
                seen.last_seq = seq
                seen.frames += 1
                seen.text_chars += len(text)
            on_text(text, seen)
            if seen.exit is not None:
                await ws.close()
                return seen
        code = ws.close_code
        ws = None
        if code != TRY_AGAIN_LATER or seen.reconnects >= max_reconnects:
            raise RuntimeError(f"task {task_id}: socket closed with {code} before the exit frame")
        seen.reconnects += 1


async def follow_submitted(http: aiohttp.ClientSession, url: str, script: str) -> Followed:
    """Open `/ws`, submit the script there, read its frames to the exit frame."""
    seen = Followed()
    async with http.ws_connect(f"{url}/ws", max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"type": "submit", "script": script}))
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            decode_frame(msg.data, seen)
            if seen.exit is not None:
                break
    return seen


def latency_frame(text: str, seen: Followed) -> None:
    """For tick.py's lines: receive time minus the time each line carries."""
    now = time.time()
    msg = json.loads(text)
    if msg["type"] == "output":
        for line in msg["data"].splitlines():
            stamp, _, rest = line.partition(" tick ")
            if rest:
                seen.latencies.append(now - float(stamp))
        seen.data_bytes += len(msg["data"].encode())
    elif msg["type"] == "exit":
        seen.exit = msg
