"""WebSocket: submit on /ws, attach with ?since=, replay, stdin, and bad messages."""

from __future__ import annotations

import gc
import json
import socket
import struct

import aiohttp
from conftest import output_of, submit, wait_final, wait_for, ws_collect

from remoterun.api import SOCKETS


def _seqs(frames):
    return [f["seq"] for f in frames if f["type"] == "output"]


async def test_submit_over_ws_streams_everything(client):
    """/ws submit: task frame first, every output frame in order, status frames, exit, 1000."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "lines.py", "params": {"n": 50, "both": True}})
    frames = await ws_collect(ws)
    assert frames[0]["type"] == "task" and frames[0]["task"]["script"] == "lines.py"
    assert ws.close_code == 1000
    seqs = _seqs(frames)
    assert seqs == list(range(1, len(seqs) + 1))
    out = "".join(f"line {i}\n" for i in range(1, 51, 2))
    err = "".join(f"line {i}\n" for i in range(2, 51, 2))
    assert output_of(frames, "stdout") == out and output_of(frames, "stderr") == err
    statuses = [f["status"] for f in frames if f["type"] == "status"]
    assert statuses == ["running", "success"]
    exit_frame = frames[-1]
    assert exit_frame["type"] == "exit" and exit_frame["status"] == "success"
    assert exit_frame["exit_code"] == 0 and exit_frame["duration"] > 0
    output = next(f for f in frames if f["type"] == "output")
    assert output["ts"].endswith("Z") and output["stream"] in ("stdout", "stderr")


async def test_attach_after_end_replays_from_archive(client):
    """A client attaching after the end gets the whole output, the exit frame, then 1000."""
    task = await submit(client, "lines.py", params={"n": 30})
    await wait_final(client, task["id"])
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    assert frames[0]["type"] == "task" and frames[0]["task"]["status"] == "success"
    assert output_of(frames) == "".join(f"line {i}\n" for i in range(1, 31))
    assert frames[-1]["type"] == "exit" and _seqs(frames)[0] == 1
    tail = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?since=2"))
    assert _seqs(tail) == _seqs(frames)[2:]
    past_end = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?since=999"))
    assert [f["type"] for f in past_end] == ["task", "exit"]


async def test_attach_mid_run_with_since(client):
    """Attaching mid-run with ?since=K gives each frame after K exactly once, then live."""
    task = await submit(client, "lines.py", params={"n": 40, "delay": 0.02})
    first = await client.ws_connect(f"/tasks/{task['id']}/ws")
    seen = []
    async for msg in first:
        frame = json.loads(msg.data)
        if frame["type"] == "output":
            seen.append(frame)
            if len(seen) == 5:
                break
    await first.close()
    k = seen[-1]["seq"]
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?since={k}"))
    seqs = _seqs(frames)
    assert seqs == list(range(k + 1, k + 1 + len(seqs)))
    text = output_of(seen) + output_of(frames)
    assert text == "".join(f"line {i}\n" for i in range(1, 41))


async def test_attach_with_since_beyond_the_live_seq_skips_to_it(client):
    """Attached with ?since=K to a task not yet at K, a client gets K+1 onwards only, live
    frames included (issue 25: since=50 at seq ~10 gave 11, 12, ...)."""
    task = await submit(client, "lines.py", params={"n": 60, "delay": 0.03})
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws?since=50"))
    seqs = _seqs(frames)
    assert seqs and seqs == list(range(51, 51 + len(seqs)))
    assert frames[-1]["type"] == "exit"


async def test_many_clients_see_the_same_stream(client):
    """Several attached clients each get every frame of a running task."""
    task = await submit(client, "lines.py", params={"n": 200, "delay": 0.001})
    sockets = [await client.ws_connect(f"/tasks/{task['id']}/ws") for _ in range(5)]
    results = [await ws_collect(ws) for ws in sockets]
    expected = "".join(f"line {i}\n" for i in range(1, 201))
    for frames in results:
        assert output_of(frames) == expected


async def test_interactive_stdin_and_eof(client):
    """An interactive task gets stdin messages in order, and `eof` ends its input."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "echo_stdin.sh", "interactive": True,
                        "stdin": "first\n"})
    frames = []
    async for msg in ws:
        frame = json.loads(msg.data)
        frames.append(frame)
        if frame["type"] == "output" and "got: first" in output_of(frames):
            break
    await ws.send_json({"type": "stdin", "data": "second\nthird\n"})
    await ws.send_json({"type": "eof"})
    frames += await ws_collect(ws)
    assert output_of(frames) == "ready\ngot: first\ngot: second\ngot: third\nlines: 3\n"


async def test_request_stdin_then_eof_by_default(client):
    """Without `interactive`, the request's stdin text is sent, then end of file."""
    task = await submit(client, "echo_stdin.sh", stdin="a\nb\n")
    await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert out == "ready\ngot: a\ngot: b\nlines: 2\n"


async def test_bad_messages_get_error_frames(client):
    """Malformed JSON, unknown types, stdin to a pipe task: error frames; the socket stays open."""
    task = await submit(client, "sleep.sh")
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    assert (await ws.receive_json())["type"] == "task"

    async def reply():
        while True:
            frame = await ws.receive_json()
            if frame["type"] in ("error", "pong"):
                return frame

    await ws.send_str("{not json")
    assert (await reply())["error"] == "invalid_json"
    await ws.send_json({"type": "launch"})
    assert (await reply())["error"] == "unknown_type"
    await ws.send_json(["type", "ping"])
    assert (await reply())["error"] == "invalid_message"
    await wait_for(lambda: _running(client, task["id"]), what="running")
    await ws.send_json({"type": "stdin", "data": "x"})
    assert (await reply())["error"] == "not_interactive"
    await ws.send_json({"type": "signal", "signal": "BOGUS"})
    assert (await reply())["error"] == "bad_signal"
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    assert (await reply())["error"] == "already_bound"
    await ws.send_bytes(b"\x00\x01")
    assert (await reply())["error"] == "binary_frame"
    await ws.send_json({"type": "ping"})
    assert (await reply()) == {"type": "pong"}
    await ws.send_json({"type": "signal", "signal": "TERM"})
    frames = await ws_collect(ws)
    assert frames[-1]["type"] == "exit" and frames[-1]["exit_code"] == -15


async def _running(client, task_id):
    return (await (await client.get(f"/tasks/{task_id}")).json())["status"] == "running"


async def test_submit_errors_on_ws(client):
    """A bad submit on /ws is an error frame, and a good one after it still works."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "../etc/passwd"})
    error = await ws.receive_json()
    assert error["type"] == "error" and error["error"] == "unknown_script"
    await ws.send_json({"type": "submit", "script": "schema.sh", "params": {"name": 1}})
    error = await ws.receive_json()
    assert error["error"] == "invalid_params" and error["details"]
    await ws.send_json({"type": "stdin", "data": "x"})
    assert (await ws.receive_json())["error"] == "not_attached"
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    frames = await ws_collect(ws)
    assert output_of(frames) == "hello world\n"


async def test_cancel_over_ws(client):
    """A `cancel` message ends the task `cancelled` and the socket gets the exit frame."""
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "sleep.sh"})
    async for msg in ws:
        if json.loads(msg.data).get("status") == "running":
            break
    await ws.send_json({"type": "cancel"})
    frames = await ws_collect(ws)
    assert frames[-1]["type"] == "exit" and frames[-1]["status"] == "cancelled"


async def test_oversized_message_closes_1009(make_client):
    """A client message over max_ws_message_bytes closes the socket with 1009."""
    client = await make_client(max_ws_message_bytes=1000)
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "submit", "script": "hello.sh", "stdin": "x" * 5000})
    msg = await ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 1009


async def test_non_utf8_and_split_characters(client):
    """Invalid bytes arrive as U+FFFD, split characters stay whole, the archive keeps raw bytes."""
    task = await submit(client, "binary.py")
    await wait_final(client, task["id"])
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    text = output_of(frames)
    assert text == "bad:\ufffd\ufffd\x00:end\nsplit:é€😀\n"
    raw = await (await client.get(f"/tasks/{task['id']}/output")).read()
    assert raw == b"bad:\xff\xfe\x00:end\nsplit:" + "é€😀".encode() + b"\n"


async def test_disconnecting_client_loses_nothing(client):
    """A client that vanishes mid-stream does not disturb the task or the archive."""
    task = await submit(client, "flood.py", params={"bytes": 3_000_000})
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    await ws.receive()
    await ws.close()
    done = await wait_final(client, task["id"])
    assert done["status"] == "success"
    body = await (await client.get(f"/tasks/{task['id']}/output")).read()
    assert len(body) == 3_000_000 and done["output_bytes"] == 3_000_000


async def test_task_frame_comes_at_once_for_a_silent_task(client):
    """Attaching to a running task that prints nothing still gets the task frame at once."""
    task = await submit(client, "sleep.sh")
    await wait_for(lambda: _running(client, task["id"]), what="running")
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    first = await ws.receive_json(timeout=2)
    assert first["type"] == "task" and first["task"]["status"] == "running"
    await ws.close()
    await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])


async def test_a_closed_socket_is_not_kept_by_its_heartbeat(client):
    """A socket closed at its task's end is gone at once: no heartbeat re-armed by the client's
    answer to the close frame holds it (and its connection) for heartbeat_s."""
    task = await submit(client, "hello.sh")
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    assert frames[-1]["type"] == "exit"
    sockets = client.app[SOCKETS]

    def gone() -> bool:
        gc.collect()
        return not sockets

    await wait_for(gone, timeout=2, what="the closed socket to be freed")


async def test_a_vanished_client_is_freed_by_reference_counting(client):
    """Clients that drop the connection mid-replay (no close frame, a reset) leave no socket
    behind for the cycle collector: their protocol's data callback is let go, so the socket,
    its request and its buffers go when the handler ends (2,000 of them kept ~60 MB)."""
    task = await submit(client, "flood.py", params={"bytes": 2_000_000})
    await wait_final(client, task["id"])
    sockets = client.app[SOCKETS]
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
            await ws.receive(timeout=5)
            raw = ws._response.connection.transport.get_extra_info("socket")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws._response.connection.transport.abort()  # a reset, no close frame
        await wait_for(lambda: not sockets, timeout=15,
                       what="the vanished clients' sockets to be freed")
    finally:
        gc.enable()
