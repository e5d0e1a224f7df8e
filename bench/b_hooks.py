"""Hooks (issue 30): trivial tasks started by signed webhooks, `wait`-style (the answer carries
the output), against adnanh/webhook running the same script the same way."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import aiohttp

from bench import client
from bench.b_tasks import CONCURRENCY, _spread, webhook_trivial
from bench.lib import Context, Row, interleave, median
from bench.peer import Webhook
from bench.server import CpuMeter, Server

SECRET = "bench-hook-secret"
HOOK = f"""
[[hooks]]
name = "trivial"
script = "trivial.sh"
signature = "github"
secrets = ["{SECRET}"]
delivery_header = "X-GitHub-Delivery"
mode = "wait"
"""
BODY = b'{"ref": "refs/heads/main"}'
SIGNATURE = "sha256=" + hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()


async def hooked_trivial(http: aiohttp.ClientSession, url: str, n: int) -> float:
    """POST a GitHub-signed body (a new delivery id each) and read the answer, which holds the
    ended task and its output; completions per second."""
    async def one() -> None:
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": SIGNATURE,
                   "X-GitHub-Delivery": str(uuid.uuid4())}
        async with http.post(url + "/hooks/trivial", data=BODY, headers=headers) as resp:
            body = await resp.json()
            if resp.status != 200 or body.get("output") != "hi\n":
                raise RuntimeError(f"the hook answered {resp.status}: {str(body)[:200]}")

    return await _spread(n, one, limit_s=120)


async def hooks(ctx: Context) -> list[Row]:
    """Hooked trivial tasks per second vs webhook (both answer with the output)."""
    n = ctx.size(1000, 200)
    async with Server(ctx, "hooks", workers=8, extra_config=HOOK) as server, \
            client.session() as http:
        await hooked_trivial(http, server.url, 50)  # warm-up
        cpu = CpuMeter(server)

        async def rr_run() -> float:
            with cpu:
                return await hooked_trivial(http, server.url, n)

        (rr,) = await interleave(ctx.runs, rr_run)
    row = Row("hooked trivial tasks (wait) vs webhook", "tasks/s", median(rr), None, "webhook",
              "faster than webhook", runs=rr,
              notes=f"{n} signed POST /hooks, {CONCURRENCY} concurrent, wait mode; "
                    f"{cpu.describe(n * ctx.runs, 'task')}")
    if not Webhook.available():
        row.notes += "; peer not available (make bench installs it: apt-get install webhook)"
        return [row]
    async with Webhook(ctx, {"trivial": ctx.scripts / "trivial.sh"}) as peer, \
            client.session() as http:
        await webhook_trivial(http, peer.url("trivial"), 50)
        (wh,) = await interleave(ctx.runs, lambda: webhook_trivial(http, peer.url("trivial"), n))
    row.baseline, row.baseline_runs = median(wh), wh
    row.met = row.ratio is not None and row.ratio > 1.0
    return [row]
