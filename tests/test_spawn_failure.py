"""A spawn that fails with any exception closes every descriptor it opened and ends the task
`failed` with a clear error (issue 12: a NUL byte in an argument leaked three fds per task)."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest
from conftest import TEST_SCRIPTS, submit, wait_final, wait_for

from remoterun.runner import Run, RunSpec, SpawnError

N = 40


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def nul_spec(pty: bool = False) -> RunSpec:
    """A run whose argument holds a NUL byte: exec cannot take it (ValueError, not OSError)."""
    return RunSpec(argv=[str(TEST_SCRIPTS / "hello.sh"), "--name=a\x00b"], env={},
                   cwd=Path(TEST_SCRIPTS), pty=pty)


@pytest.mark.parametrize("pty", [False, True])
async def test_nul_argument_spawn_leaks_no_descriptor(pty):
    """N failed spawns (pipes or PTY) leave the descriptor count where it was."""
    before = open_fds()
    for _ in range(N):
        with pytest.raises(SpawnError, match="cannot start"):
            await Run(nul_spec(pty), lambda stream, data: None).start()
    assert open_fds() == before


async def test_nul_param_is_refused_before_it_reaches_spawn(client):
    """A NUL byte in a param value (or key) answers 422 JSON, and nothing is queued."""
    for params in ({"name": "a\x00b"}, {"na\x00me": "x"}):
        response = await client.post("/tasks", json={"script": "hello.sh", "params": params})
        assert response.status == 422, await response.text()
        assert (await response.json())["error"] == "invalid_params"


async def test_spawn_failure_ends_the_task_failed(client, settings):
    """A script that cannot be exec'd ends `failed` with an error naming why; the server lives."""
    task = await submit(client, "noshebang.sh")
    final = await wait_final(client, task["id"])
    assert final["status"] == "failed" and "exec format error" in final["error"]
    assert (await client.get("/healthz")).status == 200


def _exhaust_descriptors() -> tuple[list[int], tuple[int, int]]:
    """Take every descriptor this process may still open (under a soft limit lowered to a few
    above those open now); the ones taken and the limit to restore."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, limits[1]))
    taken = []
    try:
        while True:
            taken.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    return taken, limits


async def test_a_spawn_out_of_descriptors_is_retried_not_failed(client):
    """A spawn that meets EMFILE puts the task back to pending with backoff (the error in its
    event), and once descriptors are free again it runs and succeeds."""
    assert (await client.get("/healthz")).status == 200  # the connection is open before
    taken, limits = _exhaust_descriptors()
    try:
        response = await client.post("/tasks", json={"script": "hello.sh"})
        task = await response.json()

        async def retried() -> bool:
            events = await (await client.get(f"/tasks/{task['id']}/events")).json()
            return any(e["new_status"] == "pending" and "Too many open files" in
                       (e["detail"] or "") for e in events["events"])

        await wait_for(retried, timeout=10, what="a retry after EMFILE")
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    final = await wait_final(client, task["id"])
    assert final["status"] == "success", final
    assert (await client.get("/healthz")).status == 200
