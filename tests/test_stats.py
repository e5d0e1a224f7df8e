"""GET /stats: per-script counts, success rate and percentiles over a window."""

from __future__ import annotations

from conftest import TOKENS, submit, wait_final

from remoterun.api.monitor import parse_since, summarize


async def test_stats_of_a_known_mix(client):
    """Counts by status, success rate over ended tasks, p50/p95 of duration and queue wait."""
    for _ in range(3):
        await wait_final(client, (await submit(client, "hello.sh"))["id"])
    await wait_final(client, (await submit(client, "exit.sh", params={"code": 2}))["id"])
    await wait_final(client, (await submit(client, "exit.sh", params={"code": 0}))["id"])
    slow = await submit(client, "sleep.sh", params={"seconds": 30})
    await client.post(f"/tasks/{slow['id']}/cancel")
    await wait_final(client, slow["id"])
    response = await client.get("/stats")
    assert response.status == 200
    body = await response.json()
    assert body["since"] < body["until"]
    hello, exits, sleeps = (body["scripts"][s] for s in ("hello.sh", "exit.sh", "sleep.sh"))
    assert hello["count"] == 3 and hello["by_status"] == {"success": 3}
    assert hello["success_rate"] == 1.0
    assert 0 < hello["duration_p50"] <= hello["duration_p95"] < 10
    assert 0 <= hello["queue_wait_p95"] < 10
    assert exits["by_status"] == {"failed": 1, "success": 1} and exits["success_rate"] == 0.5
    assert sleeps["by_status"] == {"cancelled": 1} and sleeps["success_rate"] is None
    only = await (await client.get("/stats?script=exit.sh")).json()
    assert list(only["scripts"]) == ["exit.sh"]
    later = await (await client.get("/stats?since=2999-01-01T00:00:00Z")).json()
    assert later["scripts"] == {}
    recent = await (await client.get("/stats?since=1h")).json()
    assert recent["scripts"]["hello.sh"]["count"] == 3


async def test_stats_bad_since(client):
    """A `since` that is neither a time nor an age is a 400 naming the field."""
    response = await client.get("/stats?since=yesterday")
    body = await response.json()
    assert response.status == 400 and body["details"][0]["field"] == "since"
    response = await client.get("/stats?since=2026-01-01T00:00:00")
    assert response.status == 400  # no offset: ambiguous


async def test_stats_bounded_by_the_token(make_client):
    """A token limited to some scripts sees only those in /stats."""
    client = await make_client(tokens=TOKENS)
    ops = {"Authorization": "Bearer operator-token"}
    for script in ("hello.sh", "exit.sh"):
        task = await submit(client, script, headers=ops)
        await wait_final(client, task["id"], headers=ops)
    everything = await (await client.get("/stats", headers=ops)).json()
    assert set(everything["scripts"]) == {"hello.sh", "exit.sh"}
    limited = await (await client.get("/stats", headers={
        "Authorization": "Bearer hello-token"})).json()
    assert set(limited["scripts"]) == {"hello.sh"}


def test_summarize_percentiles():
    """Percentiles interpolate between ranks; a script without durations has None."""
    rows = [{"script": "a", "status": "success", "duration": float(d), "wait": 1.0}
            for d in range(1, 101)]
    rows.append({"script": "b", "status": "pending", "duration": None, "wait": None})
    out = summarize(rows)
    assert out["a"]["duration_p50"] == 50.5 and out["a"]["duration_p95"] == 95.05
    assert out["a"]["queue_wait_p95"] == 1.0
    assert out["b"] == {"count": 1, "by_status": {"pending": 1}, "success_rate": None,
                        "duration_p50": None, "duration_p95": None, "queue_wait_p95": None}


def test_parse_since():
    """since: an age, Unix seconds or an RFC 3339 time; nothing means the last 24 hours."""
    now = 1_000_000.0
    assert parse_since(None, now) == now - 86400
    assert parse_since("30m", now) == now - 1800
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("12345.5", now) == 12345.5
    assert parse_since("1970-01-02T00:00:00Z", now) == 86400
