"""The sandbox's cost: trivial tasks/s and stream MB/s with mode none, bwrap (its seccomp filter
on, and off: `bwrap-noseccomp`), docker and gvisor, side by side in one run (one server per
mode, measured in turn); gVisor's trivial tasks beside raw `runsc --network=none do true` at
the same concurrency."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable

from bench import client
from bench.b_stream import remoterun_stream
from bench.b_tasks import remoterun_trivial
from bench.lib import BENCH, MB, Context, Row, interleave, median, progress
from bench.server import CpuMeter, Server

# BENCH_SANDBOX_MODES="none bwrap" leaves Docker out (its image takes minutes to build).
MODES = tuple(os.environ.get("BENCH_SANDBOX_MODES",
                            "none bwrap bwrap-noseccomp docker gvisor").split())
CONCURRENCY = 8
OFF = "bwrap-noseccomp"  # bwrap with `seccomp = "off"`: the filter's cost is bwrap's over it


def sandbox_config(mode: str, image: str | None) -> str:
    """The `[sandbox]` table of a mode's server."""
    if mode == OFF:
        return '[sandbox]\nmode = "bwrap"\nseccomp = "off"\n'
    return f"[sandbox]\nmode = \"{mode}\"\nimage = \"{image or ''}\"\n"


def docker_image() -> str | None:
    """The test suite's locally built Debian image, with dockerd running; None if not here."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    try:
        from debian_image import ensure_dockerd, imported

        return imported(ensure_dockerd())
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        progress(f"sandbox: no docker image ({exc}); the docker rows are skipped")
        return None
    finally:
        sys.path.pop(0)


async def sandbox(ctx: Context) -> list[Row]:
    """Trivial tasks and one task's stream through each sandbox mode."""
    image = await asyncio.to_thread(docker_image)
    modes = [m for m in MODES if (not m.startswith("bwrap") or shutil.which("bwrap"))
             and (m != "docker" or image)
             and (m != "gvisor" or (shutil.which("runsc") and os.geteuid() == 0))]
    # The text streamed must be inside the scripts folder: the one a container mounts.
    log_file = ctx.scripts / "sandbox-logtext.txt"
    await asyncio.to_thread(shutil.copyfile, ctx.log_file, log_file)
    times = ctx.size(3, 1)
    expected = ctx.log_bytes * times
    counts = {"none": ctx.size(600, 150), "bwrap": ctx.size(600, 150),
              OFF: ctx.size(600, 150), "docker": ctx.size(40, 16),
              "gvisor": ctx.size(80, 24)}
    servers = {m: Server(ctx, f"sandbox-{m}", workers=8, extra_config=sandbox_config(m, image))
               for m in modes}
    for server in servers.values():
        await server.start()
    cpu = {m: CpuMeter(s) for m, s in servers.items()}
    try:
        async with client.session() as http:
            for server in servers.values():
                await remoterun_trivial(http, server.url, 8)  # warm-up

            def trivial(mode: str) -> Callable[[], Awaitable[float]]:
                async def measure() -> float:
                    with cpu[mode]:
                        return await remoterun_trivial(http, servers[mode].url, counts[mode])
                return measure

            def stream(mode: str) -> Callable[[], Awaitable[float]]:
                async def measure() -> float:
                    rate, _ = await remoterun_stream(http, servers[mode].url, log_file,
                                                     expected, times)
                    return rate
                return measure

            def raw_runsc() -> Awaitable[float]:
                return raw_runsc_do(counts["gvisor"])

            gvisor = ["gvisor"] if "gvisor" in modes else []
            rates = await interleave(ctx.runs, *(trivial(m) for m in modes),
                                     *([raw_runsc] if gvisor else []))
            streams = await interleave(ctx.runs, *(stream(m) for m in modes))
    finally:
        for server in servers.values():
            await server.stop()
    tasks = dict(zip([*modes, *(["raw runsc"] if gvisor else [])], rates, strict=True))
    mbs = dict(zip(modes, streams, strict=True))
    rows = []
    for mode in modes:
        base = ("raw runsc" if mode == "gvisor" else
                "none" if mode != "none" and "none" in modes else None)
        note = (f"{counts[mode]} tasks, 8 concurrent clients, workers = 8; "
                f"{cpu[mode].describe(counts[mode] * ctx.runs, 'task')}")
        rows.append(Row(f"trivial tasks, sandbox {mode}", "tasks/s", median(tasks[mode]),
                        median(tasks[base]) if base else None,
                        ("raw `runsc --network=none do true`" if base == "raw runsc"
                         else f"sandbox {base}") if base else "",
                        "-", runs=tasks[mode], baseline_runs=tasks[base] if base else [],
                        notes=note))
    for mode in modes:
        base = "none" if mode != "none" and "none" in modes else None
        rows.append(Row(f"one task's stream, sandbox {mode}", "MB/s", median(mbs[mode]),
                        median(mbs[base]) if base else None, f"sandbox {base}" if base else "",
                        "-", runs=mbs[mode], baseline_runs=mbs[base] if base else [],
                        notes=f"{expected / MB:.0f} MB of log text to one WS client"))
    if "bwrap" in modes and OFF in modes:  # the seccomp filter's cost (target: within 5%)
        for what, unit, figures in (("trivial tasks", "tasks/s", tasks), ("one task's stream",
                                                                         "MB/s", mbs)):
            on, off = median(figures["bwrap"]), median(figures[OFF])
            rows.append(Row(f"{what}, bwrap seccomp on vs off", unit, on, off, "seccomp off",
                            ">= 0.95", met=bool(on and off and on / off >= 0.95),
                            runs=figures["bwrap"], baseline_runs=figures[OFF],
                            notes="the same server settings but [sandbox] seccomp"))
    return rows


async def raw_runsc_do(count: int) -> float:
    """`runsc --network=none do true` runs per second, CONCURRENCY at a time."""
    runsc = shutil.which("runsc")
    assert runsc is not None
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            proc = await asyncio.create_subprocess_exec(
                runsc, "--network=none", "do", "true", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await proc.wait()

    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (loop.time() - start)
