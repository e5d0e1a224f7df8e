"""`GET /tasks/{id}/search`: matching lines with line, offset and seq, paged by limit, cursor and
time budget, over real archives of finished and running tasks."""

from __future__ import annotations

import re

import pytest
from conftest import submit, wait_final, wait_for, ws_collect

from remoterun.config import Token


def expected(text: str, found, frames):
    """PROTOCOL.md's matches for `found(line)` over the raw text, computed independently."""
    out, offset = [], 0
    ends = []
    at = 0
    for frame in frames:
        at += len(frame["data"].encode())
        ends.append((at, frame["seq"]))
    for number, line in enumerate(text.splitlines(True), 1):
        if found(line.rstrip("\n")):
            seq = next(seq for end, seq in ends if end > offset)
            out.append({"line": number, "seq": seq, "offset": offset,
                        "text": line.rstrip("\n")})
        offset += len(line.encode())
    return out


async def _flood(client, total):
    task = await submit(client, "flood.py", params={"bytes": total})
    await wait_final(client, task["id"])
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    outputs = [f for f in frames if f["type"] == "output"]
    text = await (await client.get(f"/tasks/{task['id']}/output")).text()
    return task, text, outputs


async def _all_pages(client, task_id, query):
    """Every match, following next_cursor; and the number of pages."""
    matches, cursor, pages = [], None, 0
    while True:
        url = f"/tasks/{task_id}/search?{query}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url)
        body = await response.json()
        assert response.status == 200, body
        matches += body["matches"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return matches, pages


async def test_search_text_and_regex_over_many_segments(make_client):
    """Text and regex searches give every matching line (number, offset, seq, text), oldest
    first, the same whether in one page or followed by cursor over pages of 50."""
    client = await make_client(segment_max_bytes=30_000, read_chunk_bytes=4096)
    task, text, frames = await _flood(client, 300_000)
    want = expected(text, lambda line: "00000" + "42" in line, frames)
    body = await (await client.get(f"/tasks/{task['id']}/search?q=0000042&limit=1000")).json()
    assert body == {"matches": want, "next_cursor": None} and len(want) == 111
    paged, pages = await _all_pages(client, task["id"], "q=0000042&limit=50")
    assert paged == want and pages == 3
    rx = re.compile(r"^0000012\d\d the")
    want = expected(text, lambda line: rx.search(line) is not None, frames)
    got, _ = await _all_pages(client, task["id"], "q=%5E0000012%5Cd%5Cd%20the&regex=true")
    assert got == want and len(want) == 100
    assert (await (await client.get(f"/tasks/{task['id']}/search?q=nowhere")).json()) == \
        {"matches": [], "next_cursor": None}


async def test_search_time_budget_pages_with_a_cursor(make_client):
    """With no time budget each page searches one block and hands back a cursor; the pages
    together are exactly the whole search."""
    client = await make_client(search_budget_s=0.0, segment_max_bytes=1 << 20)
    task, text, frames = await _flood(client, 3_500_000)
    want = expected(text, lambda line: "fox" in line and line.startswith("0000"), frames)
    got, pages = await _all_pages(client, task["id"], "q=fox&limit=1000")
    assert pages > 3
    assert [m["line"] for m in got if m["text"].startswith("0000")] == [m["line"] for m in want]
    assert len(got) == len(text.splitlines())


async def test_search_stream_filter_and_long_lines(client):
    """stream= keeps that stream's lines; a line over 4 KiB is cut in `text`."""
    task = await submit(client, "lines.py", params={"n": 40, "both": True})
    await wait_final(client, task["id"])
    body = await (await client.get(f"/tasks/{task['id']}/search?q=line&stream=stderr")).json()
    assert [m["text"] for m in body["matches"]] == [f"line {i}" for i in range(2, 41, 2)]
    long = await submit(client, "echo_stdin.sh", stdin="é" * 5000 + " needle\nshort needle\n")
    await wait_final(client, long["id"])
    body = await (await client.get(f"/tasks/{long['id']}/search?q=needle")).json()
    first, second = body["matches"]
    assert first["line"] == 2 and first["text"] == "got: " + "é" * 2045  # never half a character
    assert len(first["text"].encode()) <= 4096 and first["offset"] == len("ready\n")
    assert second == {"line": 3, "seq": second["seq"], "offset": len("ready\n") + 10013,
                      "text": "got: short needle"}


async def test_search_bad_queries(client):
    """422 for a regex that does not compile; 400 for no q, a bad limit, stream or cursor;
    404 for no such task."""
    task = await submit(client, "lines.py", params={"n": 3})
    await wait_final(client, task["id"])
    response = await client.get(f"/tasks/{task['id']}/search?q=(unclosed&regex=true")
    assert response.status == 422 and (await response.json())["error"] == "invalid_regex"
    for query in ("", "q=x&limit=0", "q=x&stream=both", "q=x&cursor=zz", "q=x&regex=maybe"):
        response = await client.get(f"/tasks/{task['id']}/search?{query}")
        assert response.status == 400, query
    many = await (await client.get(f"/tasks/{task['id']}/search?q=line&limit=5000")).json()
    assert len(many["matches"]) == 3
    missing = await client.get("/tasks/00000000-0000-4000-8000-000000000000/search?q=x")
    assert missing.status == 404


async def test_search_a_running_task(client):
    """A running task's output is searched as far as it has gone."""
    task = await submit(client, "lines.py", params={"n": 300, "delay": 0.01})

    async def found():
        body = await (await client.get(f"/tasks/{task['id']}/search?q=line%2030%0A")).json()
        plain = await (await client.get(f"/tasks/{task['id']}/search?q=line 30")).json()
        return body["matches"] == [] and plain["matches"] and plain

    page = await wait_for(found, what="line 30 to be searchable")
    assert page["matches"][0]["line"] == 30 and page["matches"][0]["text"] == "line 30"
    assert (await client.get(f"/tasks/{task['id']}")).status == 200


@pytest.mark.parametrize("who", ["hello-only", "viewer-1"])
async def test_search_follows_the_token_script_list(make_client, who):
    """Like /output: a token whose script list lacks the task's script gets 403."""
    tokens = (Token("viewer-1", "viewer-token-00001", "viewer"),
              Token("hello-only", "hello-token-000001", "operator", ("hello.sh",)),
              Token("ops", "operator-token-0001", "operator"))
    client = await make_client(tokens=tokens)
    ops = {"Authorization": "Bearer operator-token-0001"}
    task = await submit(client, "lines.py", params={"n": 3}, headers=ops)
    await wait_final(client, task["id"], headers=ops)
    token = next(t for t in tokens if t.name == who)
    response = await client.get(f"/tasks/{task['id']}/search?q=line",
                                headers={"Authorization": f"Bearer {token.token}"})
    assert response.status == (403 if who == "hello-only" else 200)
    assert (await client.get(f"/tasks/{task['id']}/search?q=line")).status == 401
