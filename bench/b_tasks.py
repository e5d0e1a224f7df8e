"""Task throughput: trivial tasks end to end, and REST submissions accepted per second."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp

from bench import client
from bench.lib import BENCH, Context, Row, free_port, interleave, median
from bench.peer import Webhook
from bench.server import CpuMeter, Server, spawn_logged, terminate, wait_ready

CONCURRENCY = 8


async def _spread(n: int, one: Callable[[], Awaitable[None]], limit_s: float) -> float:
    """Do `one` n times from CONCURRENCY concurrent loops; completions per second."""
    async def loop(count: int) -> None:
        for _ in range(count):
            await one()

    counts = [n // CONCURRENCY + (i < n % CONCURRENCY) for i in range(CONCURRENCY)]
    began = time.perf_counter()
    async with asyncio.timeout(limit_s):
        await asyncio.gather(*(loop(c) for c in counts))
    return n / (time.perf_counter() - began)


# Trivial tasks ---------------------------------------------------------------------------------

async def remoterun_trivial(http: aiohttp.ClientSession, url: str, n: int,
                            failed: list[str] | None = None) -> float:
    """REST submit, attach over WebSocket, wait for the exit frame (sent after the commit).

    A task that does not succeed is noted in `failed` (a correctness problem to report, not
    a reason to lose the throughput figure); more than 5% failing aborts.
    """
    failed = [] if failed is None else failed

    async def one() -> None:
        task_id = await client.submit(http, url, "trivial.sh")
        seen = await client.follow(http, url, task_id)
        if seen.exit is None or seen.exit["status"] != "success" or seen.data_bytes != 3:
            failed.append(f"{task_id}: {seen.exit}")
            if len(failed) > n // 20:
                raise RuntimeError(f"{len(failed)} trivial tasks failed, e.g. {failed[0]}")

    rate = await _spread(n, one, limit_s=120)
    async with http.get(url + "/tasks?status=success&limit=1") as resp:
        if not (await resp.json())["tasks"]:
            raise RuntimeError("no task persisted as success")
    return rate


async def ws_submit_trivial(http: aiohttp.ClientSession, url: str, n: int) -> float:
    """The protocol's one-socket flow: submit over `/ws`, read to the exit frame."""
    async def one() -> None:
        seen = await client.follow_submitted(http, url, "trivial.sh")
        if seen.exit is None or seen.exit["status"] != "success" or seen.data_bytes != 3:
            raise RuntimeError(f"a /ws submission ended {seen.exit}")

    return await _spread(n, one, limit_s=120)


async def spawn_trivial(script: str, n: int) -> float:
    """Baseline, the strict way: `create_subprocess_exec(...).communicate()` of the same script.

    communicate() reads stdout and stderr to EOF and reaps the child in one call, with less
    of asyncio's per-stream machinery than reading each stream apart (~1,250/s here against
    ~1,000/s for `gather(stdout.read(), stderr.read())` and `wait()`): the harder baseline.
    """
    async def one() -> None:
        proc = await asyncio.create_subprocess_exec(
            script, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0 or out != b"hi\n":
            raise RuntimeError("baseline spawn failed")

    return await _spread(n, one, limit_s=120)


async def webhook_trivial(http: aiohttp.ClientSession, url: str, n: int) -> float:
    """Peer: webhook runs the same script per request and returns its output."""
    async def one() -> None:
        async with http.post(url) as resp:
            body = await resp.read()
            if resp.status != 200 or b"hi" not in body:
                raise RuntimeError(f"webhook answered {resp.status}: {body[:200]!r}")

    return await _spread(n, one, limit_s=120)


async def trivial(ctx: Context) -> list[Row]:
    """Trivial tasks end to end vs raw spawn+read vs webhook."""
    n = ctx.size(1000, 200)
    script = str(ctx.scripts / "trivial.sh")
    async with Server(ctx, "trivial", workers=8) as server, client.session() as http:
        await remoterun_trivial(http, server.url, 50)  # warm-up
        failed: list[str] = []
        cpu = CpuMeter(server)

        async def rr_run() -> float:
            with cpu:
                return await remoterun_trivial(http, server.url, n, failed)

        rr, raw, over_ws = await interleave(ctx.runs, rr_run, lambda: spawn_trivial(script, n),
                                            lambda: ws_submit_trivial(http, server.url, n))
    notes = (f"{n} tasks, {CONCURRENCY} concurrent clients; REST submit + WS exit frame; "
             f"{cpu.describe(n * ctx.runs, 'task')}")
    if failed:
        notes += f"; {len(failed)} of {n * ctx.runs} did not succeed, e.g. {failed[0]}"
    rows = [Row("trivial tasks e2e vs raw spawn", "tasks/s", median(rr), median(raw),
                "raw spawn, communicate()", ">= 0.5 of raw", runs=rr, baseline_runs=raw,
                notes=notes)]
    rows[0].met = rows[0].ratio is not None and rows[0].ratio >= 0.5
    rows.append(Row("  same, submitted over /ws (info)", "tasks/s", median(over_ws),
                    median(raw), "raw spawn, communicate()", "-", runs=over_ws,
                    baseline_runs=raw,
                    notes="one socket per task: submit message, frames to exit"))
    peer = Row("trivial tasks e2e vs webhook", "tasks/s", median(rr), None, "webhook",
               "faster than webhook", runs=rr)
    if not Webhook.available():
        peer.notes = "peer not available (make bench installs it: apt-get install webhook)"
    else:
        async with Webhook(ctx, {"trivial": ctx.scripts / "trivial.sh"}) as hook, \
                client.session() as http:
            await webhook_trivial(http, hook.url("trivial"), 50)
            (wh,) = await interleave(ctx.runs, lambda: webhook_trivial(http, hook.url("trivial"),
                                                                       n))
        peer.baseline, peer.baseline_runs = median(wh), wh
        peer.met = peer.ratio is not None and peer.ratio > 1.0
        peer.notes = f"{n} requests, {CONCURRENCY} concurrent, include-command-output-in-response"
    rows.append(peer)
    return rows


# Submissions -----------------------------------------------------------------------------------

async def submissions_rate(http: aiohttp.ClientSession, url: str, n: int) -> float:
    """POST /tasks of a sleeping script n times from CONCURRENCY clients; accepted per second."""
    async def one() -> None:
        async with http.post(url + "/tasks", json={"script": "sleep.sh"}) as resp:
            await resp.read()
            if resp.status != 201:
                raise RuntimeError(f"submit answered {resp.status}")

    return await _spread(n, one, limit_s=120)


async def submissions(ctx: Context) -> list[Row]:
    """Tasks queued per second (workers=1, so they stay pending) vs a bare aiohttp handler."""
    n = ctx.size(3000, 1000)
    port = free_port()
    folder = ctx.work / "bare"
    folder.mkdir(parents=True, exist_ok=True)
    bare = spawn_logged([sys.executable, str(BENCH / "bare.py"), str(port)], folder / "bare.log")
    bare_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(bare_url + "/healthz", bare, 20, "bare aiohttp server")
        async with Server(ctx, "submissions", workers=1) as server, client.session() as http:
            await submissions_rate(http, server.url, 100)
            await submissions_rate(http, bare_url, 100)
            cpu = CpuMeter(server)

            async def rr_run() -> float:
                with cpu:
                    return await submissions_rate(http, server.url, n)

            rr, floor = await interleave(ctx.runs, rr_run,
                                         lambda: submissions_rate(http, bare_url, n))
    finally:
        terminate(bare)
    row = Row("REST submissions accepted", "tasks/s", median(rr), median(floor),
              "bare aiohttp POST handler", ">= 2000/s", runs=rr, baseline_runs=floor,
              notes=f"{n} POST /tasks, {CONCURRENCY} concurrent clients, workers=1; "
                    f"{cpu.describe(n * ctx.runs, 'task')}")
    row.met = row.value is not None and row.value >= 2000
    return [row]
