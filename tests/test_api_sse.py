"""Server-Sent Events: the task, output with ids, status, exit; resume with Last-Event-ID."""

from __future__ import annotations

import json

from conftest import submit, wait_final


async def read_events(response):
    """Parse an SSE body into (id, event, data) tuples until the stream ends."""
    events, fields = [], {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "event" in fields:
                events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value
    return events


async def test_sse_live_stream(client):
    """A live SSE client gets task, every output event with its id, status and exit."""
    task = await submit(client, "lines.py", params={"n": 20, "delay": 0.01, "both": True})
    response = await client.get(f"/tasks/{task['id']}/logs")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = await read_events(response)
    assert events[0][1] == "task" and events[0][2]["id"] == task["id"]
    outputs = [e for e in events if e[1] == "output"]
    assert [int(e[0]) for e in outputs] == [e[2]["seq"] for e in outputs]
    assert [e[2]["seq"] for e in outputs] == list(range(1, len(outputs) + 1))
    text = "".join(e[2]["data"] for e in outputs)
    assert sorted(text.splitlines(), key=lambda s: int(s.split()[1])) == \
        [f"line {i}" for i in range(1, 21)]
    assert events[-1][1] == "exit" and events[-1][2]["status"] == "success"
    # Running either before the client attached (the task event says so) or after.
    statuses = [e[2]["status"] for e in events if e[1] == "status"]
    assert events[0][2]["status"] == "running" or "running" in statuses
    assert statuses[-1] == "success"


async def test_sse_resume_last_event_id_wins(client):
    """Last-Event-ID resumes after that seq, and wins over ?since=."""
    task = await submit(client, "lines.py", params={"n": 10, "delay": 0.02})
    await wait_final(client, task["id"])
    full = await read_events(await client.get(f"/tasks/{task['id']}/logs"))
    seqs = [e[2]["seq"] for e in full if e[1] == "output"]
    assert len(seqs) >= 5
    resumed = await read_events(await client.get(
        f"/tasks/{task['id']}/logs?since=1", headers={"Last-Event-ID": str(seqs[2])}))
    assert [e[2]["seq"] for e in resumed if e[1] == "output"] == seqs[3:]
    by_query = await read_events(await client.get(f"/tasks/{task['id']}/logs?since=1"))
    assert [e[2]["seq"] for e in by_query if e[1] == "output"] == seqs[1:]
    assert resumed[-1][1] == "exit"


async def test_sse_bad_since(client):
    """A malformed since is a 400 JSON error."""
    task = await submit(client, "hello.sh")
    response = await client.get(f"/tasks/{task['id']}/logs?since=abc")
    assert response.status == 400 and (await response.json())["error"] == "invalid_request"


async def test_sse_resume_after_the_end_is_204(client):
    """The exit event has an id (the last seq); resuming an ended task after it answers 204."""
    task = await submit(client, "lines.py", params={"n": 3})
    await wait_final(client, task["id"])
    full = await read_events(await client.get(f"/tasks/{task['id']}/logs"))
    last = max(e[2]["seq"] for e in full if e[1] == "output")
    assert full[-1][:2] == (str(last), "exit")
    for headers, query in (({"Last-Event-ID": str(last)}, ""), ({}, f"?since={last}")):
        response = await client.get(f"/tasks/{task['id']}/logs{query}", headers=headers)
        assert response.status == 204 and await response.read() == b""
    earlier = await client.get(f"/tasks/{task['id']}/logs",
                               headers={"Last-Event-ID": str(last - 1)})
    events = await read_events(earlier)
    assert earlier.status == 200 and [e[1] for e in events] == ["task", "output", "exit"]


async def test_sse_resume_without_output_and_while_running(client):
    """A task with no output ends with `id: 0`; resuming a running task streams on."""
    quiet = await submit(client, "quiet.sh")
    await wait_final(client, quiet["id"])
    events = await read_events(await client.get(f"/tasks/{quiet['id']}/logs"))
    assert [(e[0], e[1]) for e in events] == [(None, "task"), ("0", "exit")]
    again = await client.get(f"/tasks/{quiet['id']}/logs", headers={"Last-Event-ID": "0"})
    assert again.status == 204
    running = await submit(client, "sleep.sh", params={"seconds": 30})
    response = await client.get(f"/tasks/{running['id']}/logs",
                                headers={"Last-Event-ID": "0"})
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"event: task")
    response.close()
    await client.post(f"/tasks/{running['id']}/cancel")


async def test_sse_stream_ends_after_stream_max_s_and_resumes_without_a_gap(make_client):
    """With `server.stream_max_s` short, a live stream ends before the task does; resuming
    with Last-Event-ID each time yields every seq once, in order, then `exit`."""
    client = await make_client(stream_max_s=0.5)
    task = await submit(client, "lines.py", params={"n": 30, "delay": 0.05})
    seqs: list[int] = []
    text: list[str] = []
    last, streams, ended = None, 0, False
    while not ended:
        streams += 1
        assert streams < 40, "the stream never reached exit"
        headers = {} if last is None else {"Last-Event-ID": last}
        response = await client.get(f"/tasks/{task['id']}/logs", headers=headers)
        if response.status == 204:
            break
        for event_id, kind, data in await read_events(response):
            if kind == "output":
                seqs.append(data["seq"])
                text.append(data["data"])
                last = event_id
            ended = ended or kind == "exit"
    assert streams >= 2, "a 0.5 s stream of a 1.5 s task ended only once"
    assert seqs == list(range(1, len(seqs) + 1))  # frames: several lines may share one
    assert "".join(text) == "".join(f"line {i}\n" for i in range(1, 31))
