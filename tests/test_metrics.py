"""/metrics after a known mix of tasks, the request middleware's series and log lines, and the
console log renderer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import structlog
from conftest import ROOT, TOKENS, submit, wait_final, wait_for
from prometheus_client.parser import text_string_to_metric_families

from remoterun.metrics import failure_reason

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return samples.get((name, frozenset(labels.items())))


async def scrape(client, **kw) -> Samples:
    """GET /metrics, parsed."""
    response = await client.get("/metrics", **kw)
    assert response.status == 200, await response.text()
    return parse(await response.text())


async def test_metric_values_after_a_known_mix(client):
    """Counters, histograms and gauges say exactly what a known set of tasks did."""
    ids = [(await submit(client, "hello.sh"))["id"] for _ in range(2)]
    ids.append((await submit(client, "exit.sh", params={"code": 3}))["id"])
    ids.append((await submit(client, "exit.sh", params={"code": 3}, max_retries=1))["id"])
    ids.append((await submit(client, "sleep.sh", params={"seconds": 30}, timeout=0.5))["id"])
    ids.append((await submit(client, "lines.py", params={"n": 10, "both": True}))["id"])
    for task_id in ids:
        await wait_final(client, task_id)
    assert (await client.get("/tasks/not-a-task")).status == 404
    response = await client.get("/metrics")
    text = await response.text()
    assert "_created" not in text
    m = parse(text)
    for script, n in (("hello.sh", 2), ("exit.sh", 2), ("sleep.sh", 1)):
        assert value(m, "remoterun_tasks_submitted_total", script=script) == n
    assert value(m, "remoterun_tasks_started_total", script="exit.sh") == 3  # one retry
    assert value(m, "remoterun_task_retries_total", script="exit.sh") == 1
    assert value(m, "remoterun_tasks_finished_total", script="hello.sh", status="success") == 2
    assert value(m, "remoterun_tasks_finished_total", script="exit.sh", status="failed") == 2
    assert value(m, "remoterun_tasks_finished_total", script="sleep.sh", status="timeout") == 1
    assert value(m, "remoterun_task_failures_total", script="exit.sh", reason="exit_code") == 3
    assert value(m, "remoterun_task_failures_total", script="sleep.sh", reason="timeout") == 1
    # An attempt's duration per attempt; the queue wait once per task (its first start).
    assert value(m, "remoterun_task_duration_seconds_count", script="exit.sh") == 3
    assert value(m, "remoterun_task_queue_wait_seconds_count", script="exit.sh") == 2
    assert value(m, "remoterun_task_duration_seconds_bucket", script="sleep.sh", le="0.25") == 0
    assert value(m, "remoterun_task_duration_seconds_bucket", script="sleep.sh", le="2.5") == 1
    assert value(m, "remoterun_task_duration_seconds_bucket", script="sleep.sh",
                 le="28800.0") == 1
    # lines.py wrote lines 2, 4, 6, 8 (7 bytes each) and 10 (8 bytes) on stderr.
    assert value(m, "remoterun_output_bytes_total", stream="stderr") == 36
    for script in ("hello.sh", "exit.sh", "sleep.sh", "lines.py"):
        assert value(m, "remoterun_tasks_running", script=script) == 0
        assert value(m, "remoterun_tasks_waiting", script=script) == 0
    assert value(m, "remoterun_http_requests_total", route="/tasks", method="POST",
                 status="201") == 6
    assert value(m, "remoterun_http_requests_total", route="/tasks/{id}", method="GET",
                 status="404") == 1
    assert value(m, "remoterun_http_request_duration_seconds_count", route="/tasks",
                 method="POST") == 6
    assert value(m, "remoterun_build_info", version="0.1.0",
                 python=sys.version.split()[0]) == 1
    assert value(m, "remoterun_db_write_seconds_count") >= 6 * 3  # a write per transition
    assert value(m, "remoterun_stream_clients", kind="websocket") == 0
    assert value(m, "remoterun_stream_clients", kind="sse") == 0
    assert value(m, "remoterun_archive_bytes") > 0
    free = value(m, "remoterun_archive_free_bytes")
    assert 0 < free <= value(m, "remoterun_archive_capacity_bytes")


async def test_running_and_waiting_gauges_per_script(make_client):
    """While one sleep.sh runs and another waits for the only worker, the gauges say 1 and 1."""
    client = await make_client(workers=1)
    first = await submit(client, "sleep.sh", params={"seconds": 30})
    second = await submit(client, "sleep.sh", params={"seconds": 30})

    async def both() -> Samples | None:
        m = await scrape(client)
        ok = value(m, "remoterun_tasks_running", script="sleep.sh") == 1 and \
            value(m, "remoterun_tasks_waiting", script="sleep.sh") == 1
        return m if ok else None

    await wait_for(both, what="one running and one waiting")
    for task in (second, first):
        await client.post(f"/tasks/{task['id']}/cancel")
        await wait_final(client, task["id"])
    m = await scrape(client)
    assert value(m, "remoterun_tasks_running", script="sleep.sh") == 0
    assert value(m, "remoterun_tasks_waiting", script="sleep.sh") == 0
    assert value(m, "remoterun_tasks_finished_total", script="sleep.sh", status="cancelled") == 2


async def test_stream_clients_gauge_counts_an_attached_socket(client):
    """A WebSocket attached to a running task shows in remoterun_stream_clients."""
    task = await submit(client, "sleep.sh", params={"seconds": 30})
    async with client.ws_connect(f"/tasks/{task['id']}/ws"):
        async def attached() -> bool:
            m = await scrape(client)
            return value(m, "remoterun_stream_clients", kind="websocket") == 1

        await wait_for(attached, what="the socket to be counted")
        await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])


async def test_metrics_needs_a_token_unless_public(make_client):
    """With tokens, /metrics is 401 without one; server.metrics_public opens it (only it)."""
    closed = await make_client(tokens=TOKENS)
    assert (await closed.get("/metrics")).status == 401
    await scrape(closed, headers={"Authorization": "Bearer viewer-token"})
    opened = await make_client(tokens=TOKENS, metrics_public=True)
    m = await scrape(opened)
    assert value(m, "remoterun_http_requests_total", route="/metrics", method="GET",
                 status="200") is None  # this very request is counted once it has answered
    assert (await opened.get("/tasks")).status == 401
    m = await scrape(opened)
    assert value(m, "remoterun_http_requests_total", route="/tasks", method="GET",
                 status="401") == 1


async def test_request_log_line(make_client):
    """Each request logs one line with method, path, status, duration and the token's name."""
    client = await make_client(tokens=TOKENS)
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/tasks?limit=1&token=operator-token")
        assert response.status == 200
        assert (await client.get("/tasks/nope", headers={
            "Authorization": "Bearer viewer-token"})).status == 404
    lines = [e for e in logs if e["event"] == "http_request"]
    assert [(e["method"], e["path"], e["status"], e["token"]) for e in lines] == [
        ("GET", "/tasks", 200, "ops"), ("GET", "/tasks/nope", 404, "viewer-1")]
    assert all(e["duration_ms"] >= 0 and e["log_level"] == "info" for e in lines)


def test_failure_reasons():
    """Each way an attempt fails maps to one of a few reason labels."""
    assert failure_reason("failed", 3, None) == "exit_code"
    assert failure_reason("timeout", -15, "killed after running past its timeout") == "timeout"
    assert failure_reason("pending", -15, "killed after running past its timeout of 1 s") \
        == "timeout"  # a timed-out attempt that is retried
    assert failure_reason("failed", None, "exec format error") == "spawn"
    assert failure_reason("failed", -15, "the server shut down during the run") \
        == "server_stopped"
    assert failure_reason("failed", None, "the server stopped during attempt 1") \
        == "server_stopped"
    assert failure_reason("failed", -15, "stopped when its output reached the cap of 10 bytes "
                                         "(max_output_bytes); ...") == "output_cap"
    assert failure_reason("failed", None, "internal error: boom") == "internal"


LOG_ONE = ("from remoterun import logs; logs.configure(); import structlog; "
           "structlog.get_logger().info('hello_event', answer=42)")


def test_console_renderer_on_a_terminal():
    """With stderr a terminal the log line is for people; otherwise it is one JSON object."""
    leader, follower = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        subprocess.run([sys.executable, "-c", LOG_ONE], stderr=follower, check=True,
                       env=env, timeout=30)
        on_tty = os.read(leader, 65536).decode()
    finally:
        os.close(follower)
        os.close(leader)
    assert "hello_event" in on_tty and "answer" in on_tty and "42" in on_tty
    assert "\x1b[" in on_tty and not on_tty.lstrip().startswith("{")
    piped = subprocess.run([sys.executable, "-c", LOG_ONE], capture_output=True, text=True,
                           check=True, env=env, timeout=30).stderr
    line = json.loads(piped)
    assert line["event"] == "hello_event" and line["answer"] == 42


async def test_http_routes_are_canonical(client):
    """Requests are labelled by their route's pattern, never the raw URL; no route: unmatched."""
    for _ in range(3):
        assert (await client.get("/tasks/00000000-0000-4000-8000-000000000000")).status == 404
    assert (await client.get("/no/such/path")).status == 404
    m = await scrape(client)
    assert value(m, "remoterun_http_requests_total", route="/tasks/{id}", method="GET",
                 status="404") == 3
    assert value(m, "remoterun_http_requests_total", route="unmatched", method="GET",
                 status="404") == 1
    routes = {dict(labels).get("route") for name, labels in m if "http_requests" in name}
    assert not any("0000" in (route or "") for route in routes)
