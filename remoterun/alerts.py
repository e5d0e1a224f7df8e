"""Notifications of task ends: webhook, DingTalk and email, delivered off the task path.

The scheduler calls `Alerts.on_transition` after each committed transition; it decides, without
awaiting anything, which channels want the event, folds repeats inside a channel's `dedupe_s`
window, and puts what remains on a bounded queue. One worker task, owned by the app, sends
each message with a per-attempt timeout, and puts a failed one back to be retried after a
backoff, so a dead or hanging receiver costs the worker at most `timeout_s` per attempt and
never a task anything. Each failed attempt is counted (`remoterun_alert_deliveries_total`)
and logged once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import heapq
import hmac
import itertools
import json
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
import structlog

from remoterun.config import Alert, Settings
from remoterun.metrics import Metrics
from remoterun.state import FINAL, TaskStatus
from remoterun.wire import rfc3339, task_json

log = structlog.get_logger(__name__)
S = TaskStatus
QUEUE_SIZE = 1000  # messages waiting to be sent; past it a new one is dropped (and counted)
TAIL_BYTES = 16 * 1024  # read from the end of the archive for the last lines of output
SIGNATURE = "X-RemoteRun-Signature"
ReadTail = Callable[[dict[str, Any]], Awaitable[bytes]]


class DeliveryFailed(Exception):
    """A receiver answered, but not with success; the message says what it answered."""


@dataclass(eq=False)
class Notice:
    """One message to send: the event, the task as REST shows it, and how many like it the
    de-duplication window folded into this one."""

    event: str
    task: dict[str, Any]
    duration: float | None
    folded: int = 0
    tail: str | None = None  # the last lines of output, read once, at the first delivery


def event_of(old: TaskStatus, new: TaskStatus) -> str | None:
    """The alert event of a transition: a final status, "retry", or None."""
    if new is S.PENDING and old is S.RUNNING:
        return "retry"
    return str(new) if new in FINAL else None


def wanted(alert: Alert, event: str, exhausted: bool, script: str) -> str | None:
    """The event `alert` sends for this end of `script`, or None. A failure that used up its
    retries is "retries_exhausted" where the channel asks for that, else its status."""
    if alert.scripts is not None and not any(fnmatch.fnmatchcase(script, p)
                                             for p in alert.scripts):
        return None
    if exhausted and "retries_exhausted" in alert.on:
        return "retries_exhausted"
    return event if event in alert.on else None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r")


def tail_lines(raw: bytes, lines: int) -> str:
    """The last `lines` lines of output as text (ANSI escapes kept out of mail and chat)."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    text = _ANSI.sub("", text)
    return "\n".join(text.rstrip("\n").split("\n")[-lines:]) if lines and text else ""


def summary(notice: Notice) -> str:
    """One line: script, event, exit code and duration."""
    task = notice.task
    parts = [f"{task['script']} {notice.event}"]
    if task["exit_code"] is not None:
        parts.append(f"exit code {task['exit_code']}")
    if notice.duration is not None:
        parts.append(f"after {notice.duration:.1f} s")
    if notice.folded:
        parts.append(f"(+{notice.folded} more like it)")
    return ", ".join(parts)


def webhook_body(notice: Notice, link: str) -> bytes:
    """The webhook's JSON body."""
    return json.dumps({"event": notice.event, "task": notice.task, "link": link,
                       "folded": notice.folded, "duration": notice.duration,
                       "output_tail": notice.tail or ""}).encode()


def sign_webhook(secret: str, body: bytes) -> str:
    """The `X-RemoteRun-Signature` value: sha256=<hex HMAC-SHA256 of the body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def dingtalk_url(url: str, secret: str, now_ms: int) -> str:
    """The robot's URL with DingTalk's `timestamp` and `sign` added (when there is a secret)."""
    if not secret:
        return url
    digest = hmac.new(secret.encode(), f"{now_ms}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"{url}{'&' if '?' in url else '?'}timestamp={now_ms}&sign={sign}"


def dingtalk_body(notice: Notice, link: str) -> bytes:
    """A DingTalk markdown message: script, status, exit code, duration, the last lines."""
    task = notice.task
    duration = "-" if notice.duration is None else f"{notice.duration:.1f} s"
    text = [f"### RemoteRun: {task['script']} {notice.event}", "",
            f"- status: **{task['status']}** (attempt {task['attempt']})",
            f"- exit code: {task['exit_code'] if task['exit_code'] is not None else '-'}",
            f"- duration: {duration}"]
    if task["error"]:
        text.append(f"- error: {task['error']}")
    if notice.folded:
        text.append(f"- {notice.folded} more like it in the de-duplication window")
    text += ["", f"[open the task]({link})"]
    if notice.tail:
        text += ["", "```", notice.tail, "```"]
    return json.dumps({"msgtype": "markdown", "markdown": {
        "title": summary(notice), "text": "\n".join(text)}}).encode()


def email_message(alert: Alert, notice: Notice, link: str) -> EmailMessage:
    """The mail: a subject line and a plain-text body with the last lines of output."""
    task = notice.task
    message = EmailMessage()
    message["Subject"] = f"[RemoteRun] {summary(notice)}"
    message["From"] = alert.from_addr
    message["To"] = ", ".join(alert.to)
    lines = [summary(notice), "", f"task:      {task['id']}", f"status:    {task['status']}",
             f"attempt:   {task['attempt']}", f"exit code: {task['exit_code']}",
             f"error:     {task['error'] or '-'}", f"link:      {link}"]
    if notice.folded:
        lines.append(f"folded:    {notice.folded} more like it in the window")
    lines += ["", "Last lines of output:", "", notice.tail or "(no output)"]
    message.set_content("\n".join(lines) + "\n")
    return message


@dataclass(eq=False)
class _Window:
    """A de-duplication window: open until `until`; what it folded and the latest of them."""

    until: float
    folded: int = 0
    latest: Notice | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(order=True)
class _Later:
    """A message waiting for its retry."""

    due: float
    order: int
    index: int = field(compare=False)
    notice: Notice = field(compare=False)
    attempt: int = field(compare=False)


class Alerts:
    """The configured channels, their de-duplication windows, the queue and its one worker."""

    def __init__(self, settings: Settings, metrics: Metrics, read_tail: ReadTail):
        self.alerts = settings.alerts
        self.metrics = metrics
        self.read_tail = read_tail
        self.base_url = settings.public_url or f"http://{settings.host}:{settings.port}"
        self.queue: asyncio.Queue[tuple[int, Notice, int]] = asyncio.Queue(QUEUE_SIZE)
        self._later: list[_Later] = []
        self._order = itertools.count()
        self._windows: dict[tuple[int, str, str], _Window] = {}
        self._session: aiohttp.ClientSession | None = None

    # On the task path: no awaiting ------------------------------------------------------------

    def on_transition(self, row: dict[str, Any], old: TaskStatus, new: TaskStatus) -> None:
        """Queue the messages the channels want for this transition."""
        event = event_of(old, new)
        if event is None or not self.alerts:
            return
        exhausted = new in (S.FAILED, S.TIMEOUT) and row["max_retries"] > 0
        duration = None
        if row["started_at"] is not None and row["finished_at"] is not None:
            duration = row["finished_at"] - row["started_at"]
        task: dict[str, Any] | None = None
        for index, alert in enumerate(self.alerts):
            name = wanted(alert, event, exhausted, row["script"])
            if name is None:
                continue
            task = task or task_json(row)
            self._offer(index, Notice(name, task, duration))

    def on_slot(self, schedule: str, script: str, slot: float, outcome: str,
                reason: str | None) -> None:
        """Queue the messages the channels want for a schedule's slot that started nothing
        (`missed`, `failed_to_submit`); de-duplicated per script and event like the rest."""
        if not self.alerts:
            return
        # No task exists: the notice's "task" names the schedule and the slot instead.
        task = {"id": None, "script": script, "status": outcome, "attempt": 0,
                "exit_code": None, "error": reason, "schedule": schedule,
                "scheduled_for": rfc3339(slot)}
        for index, alert in enumerate(self.alerts):
            name = wanted(alert, outcome, False, script)
            if name is not None:
                self._offer(index, Notice(name, dict(task), None, tail=""))

    def _offer(self, index: int, notice: Notice) -> None:
        alert = self.alerts[index]
        if alert.dedupe_s <= 0:
            self._put(index, notice, 1)
            return
        key = (index, notice.task["script"], notice.event)
        window = self._windows.get(key)
        now = time.monotonic()
        if window is not None and now < window.until:
            window.folded += 1
            window.latest = notice
            self.metrics.alert(alert.kind, "folded")
            return
        window = self._windows[key] = _Window(now + alert.dedupe_s)
        window.timer = asyncio.get_running_loop().call_later(alert.dedupe_s, self._close, key)
        self._put(index, notice, 1)

    def _close(self, key: tuple[int, str, str]) -> None:
        """At the end of a window, one message for what it folded (if anything)."""
        window = self._windows.pop(key)
        if window.latest is not None:
            window.latest.folded = window.folded
            self._put(key[0], window.latest, 1)

    def _put(self, index: int, notice: Notice, attempt: int) -> None:
        try:
            self.queue.put_nowait((index, notice, attempt))
        except asyncio.QueueFull:
            kind = self.alerts[index].kind
            self.metrics.alert(kind, "dropped")
            log.warning("alert_dropped", channel=kind, task_id=notice.task["id"],
                        reason="queue full")

    # The worker ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Send queued messages until cancelled; retries wait in a heap, not in the worker."""
        async with aiohttp.ClientSession() as self._session:
            while True:
                if self._later and self._later[0].due <= time.monotonic():
                    due = heapq.heappop(self._later)
                    await self._attempt(due.index, due.notice, due.attempt)
                    continue
                wait = self._later[0].due - time.monotonic() if self._later else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        item = await self.queue.get()
                    try:
                        await self._attempt(*item)
                    finally:
                        self.queue.task_done()

    async def _attempt(self, index: int, notice: Notice, attempt: int) -> None:
        alert = self.alerts[index]
        try:
            if notice.tail is None:
                notice.tail = tail_lines(await self.read_tail(notice.task), alert.tail_lines)
            async with asyncio.timeout(alert.timeout_s):
                await self._send(alert, notice)
        except Exception as exc:  # any failure of a receiver is counted, logged and retried
            self.metrics.alert(alert.kind, "failed")
            retry = attempt <= alert.retries
            log.warning("alert_failed", channel=alert.kind, alert=index, attempt=attempt,
                        task_id=notice.task["id"], retry=retry,
                        error=str(exc) or type(exc).__name__)
            if retry:
                due = time.monotonic() + alert.backoff_s * 2 ** (attempt - 1)
                heapq.heappush(self._later, _Later(due, next(self._order), index, notice,
                                                   attempt + 1))
            else:
                self.metrics.alert(alert.kind, "dropped")
            return
        self.metrics.alert(alert.kind, "sent")

    async def _send(self, alert: Alert, notice: Notice) -> None:
        link = f"{self.base_url}/?task={notice.task['id']}" if notice.task["id"] else \
            f"{self.base_url}/schedules/{notice.task['schedule']}/runs"
        if alert.kind == "email":
            await aiosmtplib.send(email_message(alert, notice, link), hostname=alert.smtp_host,
                                  port=alert.smtp_port, start_tls=alert.starttls,
                                  username=alert.username or None,
                                  password=alert.password or None, timeout=alert.timeout_s)
            return
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if alert.kind == "webhook":
            body, url = webhook_body(notice, link), alert.url
            headers["X-RemoteRun-Event"] = notice.event
            if alert.secret:
                headers[SIGNATURE] = sign_webhook(alert.secret, body)
        else:
            body = dingtalk_body(notice, link)
            url = dingtalk_url(alert.url, alert.secret, int(time.time() * 1000))
        async with self._session.post(url, data=body, headers=headers) as response:
            answer = await response.read()
            if response.status >= 300:
                raise DeliveryFailed(f"HTTP {response.status}")
            if alert.kind == "dingtalk":  # the robot answers 200 with an error code
                code = json.loads(answer or b"{}").get("errcode", 0)
                if code:
                    raise DeliveryFailed(f"DingTalk errcode {code}")

    async def close(self, grace_s: float) -> None:
        """Stop the windows' timers and give queued messages up to `grace_s` to go out (the
        caller then cancels the worker); retries not yet due are given up, and logged."""
        for window in self._windows.values():
            if window.timer is not None:
                window.timer.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.queue.join()
        if self._later or not self.queue.empty():
            log.warning("alerts_abandoned", retries=len(self._later), queued=self.queue.qsize())
