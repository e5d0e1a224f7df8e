"""GET /tasks/{id}/output: Range, ?since=, the stored gzip passed through, filters, 416."""

from __future__ import annotations

import gzip
import json
import zlib

from conftest import submit, wait_final, wait_for
from test_archive import flood_bytes

from remoterun.api import DB, SETTINGS

TOTAL = 100_000


async def flooded(make_client, **changes):
    """A client and a finished flood task of TOTAL bytes in several segments."""
    client = await make_client(segment_max_bytes=10_000, read_chunk_bytes=4096, **changes)
    task = await submit(client, "flood.py", params={"bytes": TOTAL})
    done = await wait_final(client, task["id"])
    assert done["status"] == "success"
    assert len(await client.app[DB].segments(task["id"])) >= 5
    return client, done


async def test_range_from_an_offset(make_client):
    """`Range: bytes=N-` answers 206 with Content-Range and exactly the bytes from N."""
    client, task = await flooded(make_client)
    expected = flood_bytes(TOTAL)
    url = f"/tasks/{task['id']}/output"
    for start in (0, 1, 9_999, 10_000, 10_001, 55_555, TOTAL - 1):
        response = await client.get(url, headers={"Range": f"bytes={start}-"})
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {start}-{TOTAL - 1}/{TOTAL}"
        assert response.headers["Accept-Ranges"] == "bytes"
        body = await response.read()
        assert body == expected[start:] and int(response.headers["Content-Length"]) == len(body)
        assert "Content-Encoding" not in response.headers


async def test_closed_and_suffix_ranges(make_client):
    """`bytes=N-M` and `bytes=-K` give those bytes; several ranges are ignored (200, all)."""
    client, task = await flooded(make_client)
    expected = flood_bytes(TOTAL)
    url = f"/tasks/{task['id']}/output"
    response = await client.get(url, headers={"Range": "bytes=12345-23456"})
    assert response.status == 206 and await response.read() == expected[12345:23457]
    assert response.headers["Content-Range"] == f"bytes 12345-23456/{TOTAL}"
    response = await client.get(url, headers={"Range": "bytes=-100"})
    assert response.status == 206 and await response.read() == expected[-100:]
    response = await client.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert response.status == 200 and await response.read() == expected


async def test_head_gives_the_length_without_a_body(make_client):
    """HEAD answers the download's headers, Content-Length included, and no body."""
    client, task = await flooded(make_client)
    response = await client.head(f"/tasks/{task['id']}/output",
                                 headers={"Accept-Encoding": "identity"})
    assert response.status == 200 and response.headers["Content-Length"] == str(TOTAL)
    assert response.headers["X-RemoteRun-Last-Seq"] == str(task["last_seq"])
    assert await response.read() == b""


async def test_range_past_the_end_is_416(make_client):
    """A range starting at or past the end answers 416 with a JSON error and the length."""
    client, task = await flooded(make_client)
    response = await client.get(f"/tasks/{task['id']}/output",
                                headers={"Range": f"bytes={TOTAL}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{TOTAL}"
    assert (await response.json())["error"] == "range_not_satisfiable"


async def test_range_on_a_filtered_or_jsonl_download_is_416(make_client):
    """Range applies to the raw text only; jsonl and ?stream= resume with ?since= instead."""
    client, task = await flooded(make_client)
    for query in ("?format=jsonl", "?stream=stdout", "?since=3"):
        response = await client.get(f"/tasks/{task['id']}/output{query}",
                                    headers={"Range": "bytes=10-"})
        assert response.status == 416, query
        assert "since" in (await response.json())["message"]


async def test_since_resumes_after_a_seq(client):
    """?since=SEQ gives the frames after SEQ, raw or jsonl, and names the last seq sent."""
    task = await submit(client, "lines.py", params={"n": 30, "delay": 0.01, "both": True})
    await wait_final(client, task["id"])
    url = f"/tasks/{task['id']}/output"
    response = await client.get(url + "?format=jsonl")
    frames = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1)) and len(frames) > 4
    assert response.headers["X-RemoteRun-Last-Seq"] == str(frames[-1]["seq"])
    cut = frames[3]["seq"]
    resumed = await client.get(f"{url}?format=jsonl&since={cut}")
    assert [json.loads(line) for line in (await resumed.text()).splitlines()] == frames[4:]
    raw = await (await client.get(f"{url}?since={cut}")).text()
    assert raw == "".join(f["data"] for f in frames[4:])
    errs = await (await client.get(f"{url}?since={cut}&stream=stderr")).text()
    assert errs == "".join(f["data"] for f in frames[4:] if f["stream"] == "stderr")
    bad = await client.get(url + "?since=-1")
    assert bad.status == 400 and (await bad.json())["details"][0]["field"] == "since"


async def test_stored_gzip_passes_through_as_one_member(make_client):
    """With gzip accepted and no filter, the stored members go out joined, not recompressed."""
    client, task = await flooded(make_client)
    response = await client.get(f"/tasks/{task['id']}/output", auto_decompress=False,
                                headers={"Accept-Encoding": "gzip"})
    assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in response.headers["Vary"]
    body = await response.read()
    assert int(response.headers["Content-Length"]) == len(body)
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(body) == flood_bytes(TOTAL)
    assert inflater.eof and not inflater.unused_data  # a single member, trailer checked
    rows = await client.app[DB].segments(task["id"])
    stored = (client.app[SETTINGS].archive_dir / rows[0]["path"]).read_bytes()
    assert body[10 : len(stored) - 10] == stored[10:-10]  # the stored deflate data itself
    decoded = await client.get(f"/tasks/{task['id']}/output")  # aiohttp decodes it
    assert await decoded.read() == gzip.decompress(body)


async def test_a_short_task_written_at_its_end_downloads_as_gzip_too(client):
    """A short task's segment (held in memory, written whole at the end) passes through."""
    task = await submit(client, "lines.py", params={"n": 5, "both": True})
    await wait_final(client, task["id"])
    response = await client.get(f"/tasks/{task['id']}/output", auto_decompress=False,
                                headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(await response.read()).decode()
    assert sorted(text.splitlines()) == sorted(f"line {i}" for i in range(1, 6))
    jsonl = await client.get(f"/tasks/{task['id']}/output?format=jsonl")
    records = [json.loads(line) for line in (await jsonl.text()).splitlines()]
    assert "".join(r["data"] for r in records) == text
    assert {r["stream"] for r in records} == {"stdout", "stderr"}


async def test_no_gzip_when_not_accepted_or_filtered(make_client):
    """Without gzip in Accept-Encoding, or with a filter, the bytes go uncompressed."""
    client, task = await flooded(make_client)
    url = f"/tasks/{task['id']}/output"
    plain = await client.get(url, auto_decompress=False, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert await plain.read() == flood_bytes(TOTAL)
    for query in ("?stream=stdout", "?format=jsonl", "?since=1"):
        response = await client.get(url + query, auto_decompress=False,
                                    headers={"Accept-Encoding": "gzip"})
        assert response.status == 200 and "Content-Encoding" not in response.headers, query


async def test_running_task_download_is_what_exists_so_far(client):
    """While a task runs, /output gives its output so far, plain, and Range says '/*'."""
    task = await submit(client, "lines.py", params={"n": 400, "delay": 0.01})
    url = f"/tasks/{task['id']}/output"

    async def some_lines():
        response = await client.get(url, auto_decompress=False,
                                    headers={"Accept-Encoding": "gzip"})
        text = await response.text()
        return (response, text) if text.count("\n") >= 5 else None

    response, text = await wait_for(some_lines, what="some output")
    assert "Content-Encoding" not in response.headers
    assert "".join(f"line {i}\n" for i in range(1, 401)).startswith(text)
    ranged = await client.get(url, headers={"Range": "bytes=3-"})
    assert ranged.status == 206 and ranged.headers["Content-Range"].endswith("/*")
    assert "".join(f"line {i}\n" for i in range(1, 401))[3:].startswith(await ranged.text())
    await client.post(f"/tasks/{task['id']}/cancel")
    await wait_final(client, task["id"])
