"""Upkeep: one owned loop per job; a failing step is logged once and its loop goes on."""

from __future__ import annotations

import asyncio

from conftest import wait_for
from structlog.testing import capture_logs

from remoterun.engine.upkeep import Job, Upkeep


async def test_each_job_runs_in_its_own_loop_until_closed():
    """Every job steps at its own pace; close() cancels and awaits every loop."""
    counts = {"fast": 0, "slow": 0}

    def step(name: str):
        async def run() -> None:
            counts[name] += 1
        return run

    upkeep = Upkeep([Job("fast", 0.001, step("fast")), Job("slow", 0.05, step("slow"))])
    upkeep.start()
    await wait_for(lambda: counts["fast"] >= 10 and counts["slow"] >= 1, 2.0)
    assert upkeep.alive
    await upkeep.close()
    assert not upkeep.alive
    seen = dict(counts)
    await asyncio.sleep(0)  # a turn of the loop: a loop still running would step
    assert counts == seen  # nothing runs after close


async def test_a_failing_step_is_logged_once_and_its_loop_goes_on():
    """Three failures then success: one `<name>_failed` line, and the loop keeps stepping."""
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OSError("disk gone")

    upkeep = Upkeep([Job("flush", 0.001, flaky)])
    with capture_logs() as logs:
        upkeep.start()
        await wait_for(lambda: calls >= 6, 2.0)
        await upkeep.close()
    assert [e["event"] for e in logs if e["event"].endswith("_failed")] == ["flush_failed"]
