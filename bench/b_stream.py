"""Streaming: one task's 1 GB to one WebSocket client, and print-to-client latency."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import zlib
from pathlib import Path

import aiohttp

from bench import client
from bench.lib import MB, REPO, Context, Row, interleave, median, percentile, progress
from bench.peer import Webhook
from bench.server import CpuMeter, Server

READ_BYTES = 65536


# One task, one client --------------------------------------------------------------------------

async def remoterun_stream(http: aiohttp.ClientSession, url: str, file: Path, expected: int,
                           times: int, **secret: str) -> tuple[float, client.Followed]:
    """MB/s at the client: submit, attach, decode every frame until the exit frame."""
    began = time.perf_counter()
    task_id = await client.submit(http, url, "stream.sh", {"FILE": str(file), "TIMES": times,
                                                           **secret})
    async with asyncio.timeout(600):
        # A client slower than the server is closed with 1013 each time it falls the client
        # queue behind and resumes with ?since=: counted in the notes, never a failure.
        seen = await client.follow(http, url, task_id, max_reconnects=100_000)
    elapsed = time.perf_counter() - began
    if seen.data_bytes != expected or seen.gaps or seen.exit is None \
            or seen.exit["status"] != "success":
        raise RuntimeError(f"stream got {seen.data_bytes} of {expected} bytes, "
                           f"{seen.gaps} gaps, exit {seen.exit}")
    return expected / elapsed / MB, seen


async def pipe_stream(script: Path, file: Path, expected: int, times: int, compress: bool
                      ) -> float:
    """Floor: the same script's output read from a pipe (and gzip -1 compressed) in one process."""
    env = {**os.environ, "RR_PARAM_FILE": str(file), "RR_PARAM_TIMES": str(times)}
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    total = 0
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(str(script), env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(READ_BYTES):
        total += len(chunk)
        if compress:
            z.compress(chunk)
    if compress:
        z.flush()
    await proc.wait()
    if total != expected:
        raise RuntimeError(f"pipe read {total} bytes")
    return total / (time.perf_counter() - began) / MB


async def webhook_stream(ctx: Context, times: int) -> float | None:
    """Peer: webhook runs the same script and returns its whole output (it cannot stream)."""
    if not Webhook.available():
        return None
    wrapper = ctx.work / "webhook" / "stream_peer.sh"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nRR_PARAM_FILE='{ctx.log_file}' RR_PARAM_TIMES={times} "
                       f"exec '{ctx.scripts / 'stream.sh'}'\n")
    wrapper.chmod(0o755)
    expected = ctx.log_bytes * times
    async with Webhook(ctx, {"stream": wrapper}) as hook, client.session() as http:
        began = time.perf_counter()
        total = 0
        async with http.post(hook.url("stream")) as resp:
            async for chunk in resp.content.iter_any():
                total += len(chunk)
        elapsed = time.perf_counter() - began
    if total < expected:
        raise RuntimeError(f"webhook returned {total} of {expected} bytes")
    return expected / elapsed / MB


async def stream(ctx: Context) -> list[Row]:
    """1 GB (quick: 96 MiB) of log text to one WebSocket client, archive on; then the
    print-to-client latency of a tick task beside a task streaming to one client."""
    times = ctx.size(32, 3)
    expected = ctx.log_bytes * times
    script = ctx.scripts / "stream.sh"
    reconnects: list[int] = []

    async with Server(ctx, "stream", workers=8) as server, client.session() as http:
        idle_kb = server.rss_kb() or 0
        cpu = CpuMeter(server)

        async def rr() -> float:
            with cpu:
                rate, seen = await remoterun_stream(http, server.url, ctx.log_file, expected,
                                                    times)
            reconnects.append(seen.reconnects)
            return rate

        got, floor, raw = await interleave(
            ctx.runs, rr,
            lambda: pipe_stream(script, ctx.log_file, expected, times, compress=True),
            lambda: pipe_stream(script, ctx.log_file, expected, times, compress=False))
        peak_kb = server.peak_rss_kb() or 0
        beside, beside_p50, beside_rate = await latency_beside_stream(http, server.url, ctx)
    notes = (f"{expected / MB:.0f} MB per run; 1013 reconnects per run {reconnects}; "
             f"{cpu.describe(expected * ctx.runs / MB, 'MB')}")
    rows = [
        Row("1 GB to one WS client, archive on", "MB/s", median(got), median(raw),
            "pipe read only", ">= 0.3 of raw pipe", runs=got, baseline_runs=raw, notes=notes),
        Row("  same, vs the zlib floor", "MB/s", median(got), median(floor),
            "pipe read + zlib gzip -1", ">= 2.5x floor", runs=got, baseline_runs=floor),
        Row("  server peak RSS during it", "MB", peak_kb / 1024, idle_kb / 1024,
            "RSS at start", "< 150 MB", higher_is_better=False),
        Row("  latency p99 beside that stream (info)", "ms", beside, None, "", "-",
            higher_is_better=False,
            notes=f"tick.py at 50 lines/s beside one task streaming to one client "
                  f"({beside_rate:.0f} MB/s meanwhile); p50 {beside_p50:.1f} ms"),
    ]
    rows[0].met = rows[0].ratio is not None and rows[0].ratio >= 0.3
    rows[1].met = rows[1].ratio is not None and rows[1].ratio >= 2.5
    rows[2].met = peak_kb / 1024 < 150
    peer = Row("  same bytes via webhook (info)", "MB/s", median(got), None, "webhook",
               "-", notes="webhook buffers the whole output and answers at the end")
    peer_rate = await webhook_stream(ctx, times)
    if peer_rate is None:
        peer.notes = "peer not available (make bench installs it: apt-get install webhook)"
    peer.baseline = peer_rate
    rows.append(peer)
    return rows


# Masking (issue 13 B): a secret param and two [redaction] patterns, none of which the log text
# holds, so the bytes are the same and only the masking's cost differs.
MASKED_CONFIG = """
[redaction]
patterns = ["AKIA[0-9A-Z]{16}", "password=\\\\S+"]
[scripts."stream.sh".params.FILE]
type = "string"
[scripts."stream.sh".params.TIMES]
type = "integer"
[scripts."stream.sh".params.GATE]
type = "string"
[scripts."stream.sh".params.TOKEN]
type = "string"
secret = true
"""


async def stream_masked(ctx: Context) -> list[Row]:
    """The stream benchmark's task with a secret param and two patterns to mask, against the
    same task on a server with nothing to mask, alternately in one run."""
    times = ctx.size(32, 3)
    expected = ctx.log_bytes * times
    async with Server(ctx, "stream-plain", workers=8) as plain, \
            Server(ctx, "stream-masked", workers=8, extra_config=MASKED_CONFIG) as masked, \
            client.session() as http:

        cpu_on, cpu_off = CpuMeter(masked), CpuMeter(plain)

        async def on() -> float:
            with cpu_on:
                rate, _ = await remoterun_stream(http, masked.url, ctx.log_file, expected,
                                                 times, TOKEN="hunter2-Sup3r-S3cret")
            return rate

        async def off() -> float:
            with cpu_off:
                rate, _ = await remoterun_stream(http, plain.url, ctx.log_file, expected, times)
            return rate

        got, base = await interleave(ctx.runs, on, off)
    per = expected * ctx.runs / MB
    return [Row("1 GB to one WS client, a secret + 2 patterns masked (info)", "MB/s",
                median(got), median(base), "nothing to mask", "-", runs=got,
                baseline_runs=base, notes=f"{expected / MB:.0f} MB per run; masked: "
                f"{cpu_on.describe(per, 'MB')}; nothing to mask: {cpu_off.describe(per, 'MB')}")]


# A decoding follower in a process of its own: in this one its decoding would delay the tick
# client's loop too, and the p99 would measure the bench rather than the server.
_FOLLOWER = ("import asyncio, sys\nfrom bench import client\n"
             "async def main():\n"
             "    async with client.session() as http:\n"
             "        seen = await client.follow(http, sys.argv[1], sys.argv[2],\n"
             "                                   max_reconnects=100_000)\n"
             "    print(seen.data_bytes)\n"
             "asyncio.run(main())\n")


async def latency_beside_stream(http: aiohttp.ClientSession, url: str, ctx: Context
                                ) -> tuple[float, float, float]:
    """p99 and p50 ms of tick.py's lines while one task streams log text as fast as it can to
    one WebSocket client (another process; archive on), and that stream's MB/s: what the
    stream's reading, framing and the compressor thread's GIL hand-backs cost the loop."""
    lines = ctx.size(250, 50)
    p50s: list[float] = []
    flood_id = await client.submit(http, url, "flood.sh", {"FILE": str(ctx.log_file)})
    began = time.perf_counter()
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FOLLOWER, url, flood_id, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(0.5)  # the stream up to speed (and tick.py waits 0.5 s more)
        p99 = await remoterun_latency(http, url, lines, p50s)
    finally:
        await client.cancel(http, url, flood_id)
        async with asyncio.timeout(60):
            out, _ = await follower.communicate()
    rate = int(out or 0) / (time.perf_counter() - began) / MB
    return p99, p50s[0], rate


# Latency ---------------------------------------------------------------------------------------

async def remoterun_latency(http: aiohttp.ClientSession, url: str, lines: int,
                            p50s: list[float]) -> float:
    """p99 ms from tick.py's print to the client's receipt of the line (p50 into `p50s`)."""
    task_id = await client.submit(http, url, "tick.py", {"LINES": lines, "PERIOD": 0.02,
                                                         "DELAY": 0.5})
    async with asyncio.timeout(60 + lines * 0.1):
        seen = await client.follow(http, url, task_id, client.latency_frame)
    if len(seen.latencies) != lines:
        raise RuntimeError(f"latency: got {len(seen.latencies)} of {lines} lines")
    p50s.append(percentile(seen.latencies, 50) * 1000)
    return percentile(seen.latencies, 99) * 1000


async def pipe_latency(script: Path, lines: int) -> float:
    """Floor: p99 ms from tick.py's print to a line read from its pipe in this process.

    The same start delay as the RemoteRun run: on this kind of VM the first write after an
    idle spell reaches its reader late (~5 ms after 0.5 s idle, ~19 ms after 3 s) for both.
    """
    env = {**os.environ, "RR_PARAM_LINES": str(lines), "RR_PARAM_DELAY": "0.5"}
    proc = await asyncio.create_subprocess_exec(str(script), env=env,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    latencies = []
    while line := await proc.stdout.readline():
        latencies.append(time.time() - float(line.split()[0]))
    await proc.wait()
    return percentile(latencies, 99) * 1000


async def _watch_ticks(http: aiohttp.ClientSession, url: str, task_id: str, lines: int,
                       running: asyncio.Event) -> list[tuple[float, float]]:
    """(print time, latency) of each of tick.py's lines, read live from the task's socket."""
    got: list[tuple[float, float]] = []
    async with http.ws_connect(f"{url}/tasks/{task_id}/ws", max_msg_size=0) as ws:
        async for msg in ws:
            now = time.time()
            body = json.loads(msg.data)
            if (body["type"] == "status" and body["status"] == "running") or \
                    (body["type"] == "task" and body["task"]["status"] == "running"):
                running.set()
            elif body["type"] == "output":
                for line in body["data"].splitlines():
                    stamp = float(line.split(" tick ")[0])
                    got.append((stamp, now - stamp))
            if len(got) >= lines or body["type"] == "exit":
                break
    return got


async def _flood(http: aiohttp.ClientSession, url: str, file: Path, count: int) -> list[str]:
    """Submit `count` flooders; return their ids once the server lists them all as running."""
    ids = await asyncio.gather(*(client.submit(http, url, "flood.sh", {"FILE": str(file)},
                                               timeout=600) for _ in range(count)))
    while True:  # bounded by the caller's timeout
        async with http.get(url + "/tasks?status=running&script=flood.sh&limit=500") as resp:
            if len((await resp.json())["tasks"]) >= count:
                return list(ids)
        await asyncio.sleep(0.2)


async def _submit_probe(http: aiohttp.ClientSession, url: str, limit_s: float) -> float:
    """Milliseconds one POST /tasks takes to answer (limit_s * 1000 if it does not in time)."""
    began = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):
            await client.submit(http, url, "trivial.sh")
    except TimeoutError:
        return limit_s * 1000
    return (time.perf_counter() - began) * 1000


async def flooded_latency(http: aiohttp.ClientSession, url: str, file: Path, runs: int,
                          lines: int, flooders: int, p50s: list[float]
                          ) -> tuple[list[float], float, int]:
    """p99 ms of `runs` staggered tick tasks beside `flooders` tasks flooding output.

    The tick tasks are submitted (and running) before the flood, each waiting its turn to
    print, so that their own submission does not wait behind the flood; only lines printed once
    every flooder runs count. Also returns one submission's latency under the flood; the p50s
    go into `p50s`.
    """
    span = lines * 0.02
    lead = 6.0
    running = [asyncio.Event() for _ in range(runs)]
    ids = [await client.submit(http, url, "tick.py", {
        "LINES": lines, "PERIOD": 0.02, "DELAY": lead + k * (span + 1.0)}) for k in range(runs)]
    watchers = [asyncio.create_task(_watch_ticks(http, url, i, lines, ev))
                for i, ev in zip(ids, running, strict=True)]
    flood_ids: list[str] = []
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(ev.wait() for ev in running))
        async with asyncio.timeout(lead + 30):
            flood_ids = await _flood(http, url, file, flooders)
        flood_up = time.time()
        progress("flood running")
        probe = await _submit_probe(http, url, limit_s=lead)
        async with asyncio.timeout(lead + runs * (span + 1.0) + 60):
            seen = await asyncio.gather(*watchers)
        progress("tick tasks done")
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*(client.cancel(http, url, i) for i in flood_ids + ids),
                             return_exceptions=True)
    p99s = []
    for got in seen:
        live = [lat for stamp, lat in got if stamp > flood_up]
        if len(live) < lines // 2:
            raise RuntimeError(f"only {len(live)} of {lines} lines printed under the flood")
        p99s.append(percentile(live, 99) * 1000)
        p50s.append(percentile(live, 50) * 1000)
    return p99s, probe, flooders


async def latency(ctx: Context) -> list[Row]:
    """Print-to-client latency at 50 lines/s, idle and beside 100 flooding tasks."""
    lines = ctx.size(500, 100)
    flooders = 100
    script = ctx.scripts / "tick.py"
    idle_p50: list[float] = []
    flood_p50: list[float] = []
    async with Server(ctx, "latency", workers=flooders + ctx.runs + 4) as server, \
            client.session() as http:
        idle, floor = await interleave(
            ctx.runs, lambda: remoterun_latency(http, server.url, lines, idle_p50),
            lambda: pipe_latency(script, lines))
        flood, probe, _ = await flooded_latency(http, server.url, ctx.log_file, ctx.runs,
                                                lines, flooders, flood_p50)
    rows = [
        Row("latency p99, idle", "ms", median(idle), median(floor), "pipe read p99",
            "< 10 ms", higher_is_better=False, runs=idle, baseline_runs=floor,
            notes=f"{lines} lines at 50/s; p50 {median(idle_p50):.1f} ms"),
        Row(f"latency p99, {flooders} tasks flooding", "ms", median(flood), median(floor),
            "pipe read p99 (idle)", "< 50 ms", higher_is_better=False, runs=flood,
            notes=f"{lines} lines at 50/s; p50 {median(flood_p50):.1f} ms; {flooders} tasks "
                  f"cat log text, archive on"),
        Row("  POST /tasks answered, under that flood (info)", "ms", probe, None, "", "-",
            higher_is_better=False, notes="one submission, capped at 6000 ms"),
    ]
    rows[0].met = rows[0].value is not None and rows[0].value < 10
    rows[1].met = rows[1].value is not None and rows[1].value < 50
    return rows
