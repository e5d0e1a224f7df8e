"""`?tail=N` on the WebSocket and SSE attach: the frames holding the last N lines, then live."""

from __future__ import annotations

import json

import pytest
from conftest import output_of, submit, wait_final, wait_for, ws_collect
from test_api_sse import read_events


def _outputs(frames):
    return [f for f in frames if f["type"] == "output"]


def expected_first_seq(frames, lines):
    """The seq of the frame holding the start of the last `lines` lines of the frames' text."""
    text = output_of(frames)
    start = len(text.encode()) - sum(len(x.encode()) for x in text.splitlines(True)[-lines:])
    at = 0
    for frame in _outputs(frames):
        at += len(frame["data"].encode())
        if at > start:
            return frame["seq"]
    raise AssertionError("no frame holds the start")


async def _finished_flood(make_client, total):
    client = await make_client(segment_max_bytes=30_000, read_chunk_bytes=4096)
    task = await submit(client, "flood.py", params={"bytes": total})
    await wait_final(client, task["id"])
    full = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    return client, task, full


@pytest.mark.parametrize("total", [400_000, 399_978])  # ends inside a line; ends with "\n"
async def test_ws_tail_of_a_finished_task_starts_at_the_frame_holding_line_n(make_client, total):
    """?tail=N on a finished, many-segment task sends exactly the frames from the one holding
    the start of the N-th last line, then exit."""
    client, task, full = await _finished_flood(make_client, total)
    last = _outputs(full)[-1]["seq"]
    for lines in (1, 10, 500):
        frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?tail={lines}"))
        seqs = [f["seq"] for f in _outputs(frames)]
        assert seqs == list(range(expected_first_seq(full, lines), last + 1)), lines
        assert output_of(full).endswith(output_of(frames))
        assert frames[0]["type"] == "task" and frames[-1]["type"] == "exit"


async def test_ws_tail_larger_than_the_log_replays_it_all_and_zero_replays_nothing(make_client):
    """A tail longer than the output gives all of it; tail=0 none; a bad tail is a 400."""
    client, task, full = await _finished_flood(make_client, 50_000)
    everything = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?tail=10000"))
    assert output_of(everything) == output_of(full)
    nothing = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?tail=0"))
    assert [f["type"] for f in nothing] == ["task", "exit"]
    for bad in ("-1", "x", "1.5"):
        response = await client.get(f"/tasks/{task['id']}/ws?tail={bad}")
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"


async def test_sse_tail_of_a_finished_task(make_client):
    """SSE ?tail=N sends the same frames as the WebSocket, with their ids, then exit."""
    client, task, full = await _finished_flood(make_client, 200_000)
    events = await read_events(await client.get(f"/tasks/{task['id']}/logs?tail=25"))
    outputs = [e for e in events if e[1] == "output"]
    first = expected_first_seq(full, 25)
    assert [e[2]["seq"] for e in outputs] == list(range(first, _outputs(full)[-1]["seq"] + 1))
    assert [int(e[0]) for e in outputs] == [e[2]["seq"] for e in outputs]
    assert events[0][1] == "task" and events[-1][1] == "exit"


async def _running_lines(make_client, **changes):
    client = await make_client(**changes)
    task = await submit(client, "lines.py", params={"n": 200, "delay": 0.01})

    async def lines_so_far():
        row = await (await client.get(f"/tasks/{task['id']}")).json()
        return row["last_seq"] if row["status"] == "running" and row["last_seq"] >= 60 else 0

    return client, task, await wait_for(lines_so_far, what="60 lines of output")


def _first_line_number(text):
    return int(text.splitlines()[0].split()[1])


@pytest.mark.parametrize("window", [1 << 20, 64])  # the tail in memory; in the archive
async def test_ws_tail_of_a_running_task_then_live(make_client, window):
    """Attached mid-run with ?tail=20, a client gets about the last 20 lines (from the
    memory window or the archive), then every later line once, to the exit."""
    client, task, seen = await _running_lines(make_client, replay_memory_bytes=window)
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?tail=20"))
    seqs = [f["seq"] for f in _outputs(frames)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    text = output_of(frames)
    assert _first_line_number(text) >= seen - 19 > 1
    assert text == "".join(f"line {i}\n" for i in range(_first_line_number(text), 201))
    assert frames[-1]["type"] == "exit"


async def test_sse_tail_of_a_running_task_then_live(make_client):
    """SSE ?tail=5 mid-run: the last lines from the archive, then live to the exit."""
    client, task, seen = await _running_lines(make_client, replay_memory_bytes=64)
    events = await read_events(await client.get(f"/tasks/{task['id']}/logs?tail=5"))
    text = "".join(e[2]["data"] for e in events if e[1] == "output")
    assert _first_line_number(text) >= seen - 4
    assert text == "".join(f"line {i}\n" for i in range(_first_line_number(text), 201))
    assert json.dumps(events[-1][2]) and events[-1][1] == "exit"
