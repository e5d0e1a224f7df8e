"""Alerts, each received by a real local receiver: an aiohttp server that checks the webhook's
HMAC and DingTalk's signature, and aiosmtpd for mail; de-duplication; a hanging receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import tomllib
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiosmtpd.controller import Controller
from conftest import free_port, submit, wait_final, wait_for

from remoterun.api import METRICS
from remoterun.config import Alert, ConfigError, parse

WEBHOOK_SECRET = "webhook-secret"
DINGTALK_SECRET = "SEC0123456789abcdef"
PUBLIC_URL = "https://rr.example.org"


class Receiver:
    """An HTTP server that keeps what it was sent, checking signatures as the real ones do."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[dict[str, Any]]] = {}
        self.dingtalk: list[dict[str, Any]] = []
        self.hang = asyncio.Event()  # never set: a receiver that never answers
        self.app = web.Application()
        self.app.router.add_post("/hook/{name}", self.hook)
        self.app.router.add_post("/robot/send", self.robot)
        self.app.router.add_post("/hang", self.hanging)

    async def hook(self, request: web.Request) -> web.Response:
        """A webhook receiver: refuses a body whose HMAC does not match."""
        body = await request.read()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, "sha256").hexdigest()
        if not hmac.compare_digest(request.headers.get("X-RemoteRun-Signature", ""), expected):
            return web.json_response({"error": "bad signature"}, status=401)
        self.hooks.setdefault(request.match_info["name"], []).append(json.loads(body))
        return web.json_response({"ok": True})

    async def robot(self, request: web.Request) -> web.Response:
        """DingTalk's robot: checks access_token, timestamp (within an hour) and sign."""
        query = request.query
        timestamp = query.get("timestamp", "0")
        digest = hmac.new(DINGTALK_SECRET.encode(), f"{timestamp}\n{DINGTALK_SECRET}".encode(),
                          hashlib.sha256).digest()
        fresh = abs(time.time() * 1000 - int(timestamp)) < 3600_000
        if query.get("access_token") != "tok" or not fresh or \
                query.get("sign") != base64.b64encode(digest).decode():
            return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        self.dingtalk.append(await request.json())
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def hanging(self, request: web.Request) -> web.Response:
        """Never answers."""
        await self.hang.wait()
        return web.json_response({})


class Mailbox:
    """What aiosmtpd received."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """aiosmtpd's hook for a message."""
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Any:
    """A running Receiver and its base URL."""
    found = Receiver()
    server = await aiohttp_server(found.app)
    found.url = str(server.make_url("")).rstrip("/")
    return found


@pytest.fixture
def mailbox() -> Any:
    """An SMTP server on loopback (aiosmtpd), and what it received."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    box.port = controller.port
    yield box
    controller.stop()


def hook(receiver: Receiver, name: str, **kw: Any) -> Alert:
    """A signed webhook alert to the receiver's /hook/{name}."""
    return Alert(kind="webhook", url=f"{receiver.url}/hook/{name}", secret=WEBHOOK_SECRET, **kw)


def sample(client: Any, channel: str, result: str) -> float:
    """remoterun_alert_deliveries_total for a channel and result."""
    value = client.app[METRICS].registry.get_sample_value(
        "remoterun_alert_deliveries_total", {"channel": channel, "result": result})
    return value or 0.0


async def test_every_channel_receives_a_failure(make_client, receiver, mailbox):
    """A failed task reaches the webhook (signed), DingTalk (signed) and mail, with its tail."""
    alerts = (hook(receiver, "a"),
              Alert(kind="dingtalk", url=f"{receiver.url}/robot/send?access_token=tok",
                    secret=DINGTALK_SECRET),
              Alert(kind="email", smtp_host="127.0.0.1", smtp_port=mailbox.port,
                    from_addr="remoterun@example.org", to=("ops@example.org",)))
    client = await make_client(alerts=alerts, public_url=PUBLIC_URL)
    ok = await submit(client, "hello.sh")
    await wait_final(client, ok["id"])
    task = await submit(client, "lines.py", params={"n": 30, "both": True})
    await wait_final(client, task["id"])  # success: no alert by default
    failed = await submit(client, "exit.sh", params={"code": 3})
    done = await wait_final(client, failed["id"])
    await wait_for(lambda: receiver.hooks.get("a") and receiver.dingtalk and mailbox.messages,
                   what="every channel to receive the failure")
    # A receiver has the message a moment before the sender has its answer and counts it sent.
    await wait_for(lambda: all(sample(client, c, "sent") for c in ("webhook", "dingtalk", "email")),
                   what="every delivery counted")

    [body] = receiver.hooks["a"]
    assert body["event"] == "failed" and body["task"] == done
    assert body["link"] == f"{PUBLIC_URL}/?task={failed['id']}"
    assert body["output_tail"] == "exiting with 3" and body["folded"] == 0
    assert body["duration"] > 0

    [robot] = receiver.dingtalk
    assert robot["msgtype"] == "markdown"
    text = robot["markdown"]["text"]
    for part in ("exit.sh failed", "status: **failed**", "exit code: 3", "duration: ",
                 "exiting with 3", f"({PUBLIC_URL}/?task={failed['id']})"):
        assert part in text, part
    assert robot["markdown"]["title"].startswith("exit.sh failed, exit code 3")

    [(sender, rcpts, mail)] = mailbox.messages
    assert sender == "remoterun@example.org" and rcpts == ["ops@example.org"]
    assert mail["Subject"].startswith("[RemoteRun] exit.sh failed, exit code 3, after ")
    text = mail.get_payload(decode=True).decode().replace("\r\n", "\n")  # SMTP line ends
    assert "Last lines of output:\n\nexiting with 3\n" in text
    assert f"link:      {PUBLIC_URL}/?task={failed['id']}" in text
    for channel in ("webhook", "dingtalk", "email"):
        assert sample(client, channel, "sent") == 1 and sample(client, channel, "failed") == 0


async def test_last_lines_only(make_client, receiver):
    """The message carries the last `tail_lines` lines of the output, in order."""
    client = await make_client(alerts=(hook(receiver, "a", on=("success",), tail_lines=3),))
    task = await submit(client, "lines.py", params={"n": 500})
    await wait_final(client, task["id"])
    await wait_for(lambda: receiver.hooks.get("a"), what="the message")
    assert receiver.hooks["a"][0]["output_tail"] == "line 498\nline 499\nline 500"


async def test_dedupe_folds_repeats_into_one_message(make_client, receiver):
    """Within dedupe_s, one message per script and event; the window's end sends the count."""
    # One worker: the tasks end in the order they were submitted (four at once may not).
    client = await make_client(alerts=(hook(receiver, "a", dedupe_s=1.5),), workers=1)
    ids = [(await submit(client, "exit.sh", params={"code": 1}))["id"] for _ in range(4)]
    for task_id in ids:
        await wait_final(client, task_id)
    other = await submit(client, "exit.sh", params={"code": 2}, max_retries=0)
    await wait_final(client, other["id"])
    await wait_for(lambda: len(receiver.hooks.get("a", [])) >= 2, what="the folded message")
    first, folded = receiver.hooks["a"]
    assert first["folded"] == 0 and first["task"]["id"] == ids[0]
    assert folded["folded"] == 4 and folded["task"]["id"] == other["id"]  # the latest one
    assert sample(client, "webhook", "folded") == 4 and sample(client, "webhook", "sent") == 2


async def test_retries_exhausted_and_retry_events(make_client, receiver):
    """A task failing through its retries sends "retry" per retry and "retries_exhausted"."""
    client = await make_client(alerts=(
        hook(receiver, "retry", on=("retry",)),
        hook(receiver, "end", on=("failed", "retries_exhausted")),
    ))
    task = await submit(client, "exit.sh", params={"code": 4}, max_retries=2)
    await wait_final(client, task["id"])
    await wait_for(lambda: receiver.hooks.get("end"), what="the final message")
    assert [m["event"] for m in receiver.hooks["retry"]] == ["retry", "retry"]
    assert [m["task"]["attempt"] for m in receiver.hooks["retry"]] == [2, 3]
    [end] = receiver.hooks["end"]
    assert end["event"] == "retries_exhausted" and end["task"]["attempt"] == 3


async def test_scripts_globs(make_client, receiver):
    """An alert with `scripts` globs hears only of those scripts."""
    client = await make_client(alerts=(hook(receiver, "hello", scripts=("hel*",)),
                                       hook(receiver, "exit", scripts=("ex?t.sh",))))
    task = await submit(client, "exit.sh", params={"code": 1})
    await wait_final(client, task["id"])
    # One worker sends in order: once the second alert's message is in, the first had its turn.
    await wait_for(lambda: receiver.hooks.get("exit"), what="the exit.sh message")
    assert "hello" not in receiver.hooks


async def test_a_bad_signature_is_retried_then_dropped(make_client, receiver):
    """A receiver refusing the message: each attempt is counted and logged, then given up."""
    wrong = Alert(kind="webhook", url=f"{receiver.url}/hook/a", secret="not-the-secret",
                  retries=2, backoff_s=0.05)
    client = await make_client(alerts=(wrong,))
    with structlog.testing.capture_logs() as logs:
        task = await submit(client, "exit.sh", params={"code": 1})
        await wait_final(client, task["id"])
        await wait_for(lambda: sample(client, "webhook", "dropped") == 1, what="the give-up")
    assert sample(client, "webhook", "failed") == 3 and sample(client, "webhook", "sent") == 0
    failures = [e for e in logs if e["event"] == "alert_failed"]
    assert [(e["attempt"], e["retry"], e["error"]) for e in failures] == [
        (1, True, "HTTP 401"), (2, True, "HTTP 401"), (3, False, "HTTP 401")]
    assert "hooks" not in receiver.hooks


async def test_a_hanging_receiver_never_delays_tasks(make_client, receiver):
    """Tasks end at their usual pace while every alert sits on a receiver that never answers."""
    client = await make_client(alerts=(
        Alert(kind="webhook", url=f"{receiver.url}/hang", timeout_s=5.0, retries=0),
        Alert(kind="dingtalk", url=f"{receiver.url}/hang", timeout_s=5.0, retries=0),
    ))
    started = time.monotonic()
    ids = [(await submit(client, "exit.sh", params={"code": 1}))["id"] for _ in range(5)]
    for task_id in ids:
        await wait_final(client, task_id)
    took = time.monotonic() - started
    assert took < 4.0, took  # one delivery awaited on the task path would hold it 5 s
    assert sample(client, "webhook", "sent") == 0
    await wait_for(lambda: sample(client, "webhook", "failed") >= 1, timeout=15,
                   what="the first attempt to time out")
    assert sample(client, "webhook", "dropped") >= 1


async def test_a_dead_receiver_is_counted(make_client):
    """Nothing listening: the attempt fails at once, is counted and the task is unharmed."""
    client = await make_client(alerts=(Alert(kind="webhook", url=f"http://127.0.0.1:{free_port()}/",
                                             retries=0),))
    task = await submit(client, "exit.sh", params={"code": 1})
    assert (await wait_final(client, task["id"]))["status"] == "failed"
    await wait_for(lambda: sample(client, "webhook", "dropped") == 1, what="the give-up")
    assert sample(client, "webhook", "failed") == 1


def test_alerts_config(tmp_path: Path):
    """[[alerts]] tables parse with their defaults; a bad one names the key."""
    text = """
[server]
public_url = "https://rr.example.org/"
[[alerts]]
kind = "webhook"
url = "https://hooks.example.org/rr"
secret = "s"
[[alerts]]
kind = "email"
smtp_host = "mail.example.org"
smtp_port = 587
starttls = true
from = "rr@example.org"
to = "ops@example.org"
on = ["retries_exhausted", "timeout"]
scripts = ["backup*"]
dedupe_s = 600
"""
    settings = parse(tomllib.loads(text), tmp_path)
    assert settings.public_url == "https://rr.example.org"
    webhook, mail = settings.alerts
    assert webhook.on == ("failed", "timeout") and webhook.dedupe_s == 0
    assert mail.to == ("ops@example.org",) and mail.from_addr == "rr@example.org"
    assert mail.scripts == ("backup*",) and mail.dedupe_s == 600.0 and mail.starttls
    for bad, message in (
        ('[[alerts]]\nkind = "sms"\n', "alerts[0].kind: one of"),
        ('[[alerts]]\nkind = "dingtalk"\n', "alerts[0].url: required for kind = 'dingtalk'"),
        ('[[alerts]]\nkind = "webhook"\nurl = "u"\non = ["exploded"]\n', "alerts[0].on:"),
        ('[[alerts]]\nkind = "webhook"\nurl = "u"\ncolour = 1\n', "alerts[0].colour: unknown"),
        ('[[alerts]]\nkind = "webhook"\nurl = "u"\ntimeout_s = 0\n', "alerts[0].timeout_s"),
        ('[server]\npublic_url = "rr.example.org"\n', "server.public_url: expected an http"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse(tomllib.loads(bad), tmp_path)
