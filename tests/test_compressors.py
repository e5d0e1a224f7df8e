"""Both archive compressors (ISA-L, zlib) write standard gzip members every reader takes."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import time
import zlib

import pytest
from conftest import submit, wait_final
from test_archive import flood_bytes
from test_retention import _rows, verify

from remoterun import archive
from remoterun.api import DB, SETTINGS
from remoterun.archive import deflate, gzjoin, segments
from remoterun.archive.deflate import Deflate
from remoterun.archive.scan import scan
from remoterun.config import COMPRESSORS, ConfigError, parse
from remoterun.wire import Frame

TOTAL = 100_000
BOTH = pytest.mark.parametrize("compressor", ["isal", "zlib"])


async def flooded(make_client, compressor: str):
    """A client and a finished flood task of TOTAL bytes in several segments."""
    client = await make_client(archive_compressor=compressor, segment_max_bytes=10_000,
                               read_chunk_bytes=4096)
    done = await wait_final(client, (await submit(client, "flood.py",
                                                  params={"bytes": TOTAL}))["id"])
    assert done["status"] == "success" and done["output_bytes"] == TOTAL
    return client, done


def zcat(path) -> bytes:
    """What the system's zcat makes of a file (it checks the CRC and length)."""
    result = subprocess.run(["zcat", str(path)], capture_output=True, timeout=30, check=True)
    return result.stdout


@BOTH
async def test_segments_read_with_zcat_and_python_gzip(make_client, compressor):
    """Every stored log and index is a gzip member that zcat and Python's gzip read whole."""
    client, done = await flooded(make_client, compressor)
    root = client.app[SETTINGS].archive_dir
    rows = await client.app[DB].segments(done["id"])
    assert len(rows) >= 5
    logs = await asyncio.to_thread(lambda: [zcat(root / row["path"]) for row in rows])
    assert b"".join(logs) == flood_bytes(TOTAL)
    for row, log in zip(rows, logs, strict=True):
        index = segments.index_path(root / row["path"])
        assert gzip.decompress((root / row["path"]).read_bytes()) == log
        records = gzip.decompress(index.read_bytes())
        assert len(records) == (row["last_seq"] - row["first_seq"] + 1) * segments.RECORD.size
        assert (await asyncio.to_thread(scan, root / row["path"])).complete


@BOTH
async def test_a_short_task_held_in_memory_reads_with_zcat(make_client, compressor):
    """A short task's segment, compressed whole at its end, is a member zcat reads."""
    client = await make_client(archive_compressor=compressor)
    done = await wait_final(client, (await submit(client, "hello.sh"))["id"])
    rows = await client.app[DB].segments(done["id"])
    path = client.app[SETTINGS].archive_dir / rows[0]["path"]
    assert await asyncio.to_thread(zcat, path) == await (
        await client.get(f"/tasks/{done['id']}/output")).read()
    assert rows[0]["raw_bytes"] > 0 and (await asyncio.to_thread(scan, path)).complete


@BOTH
async def test_output_passes_the_stored_members_through_as_one(make_client, compressor):
    """/output with gzip accepted joins the stored members into one, not recompressed."""
    client, done = await flooded(make_client, compressor)
    response = await client.get(f"/tasks/{done['id']}/output", auto_decompress=False,
                                headers={"Accept-Encoding": "gzip"})
    assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    body = await response.read()
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(body) == flood_bytes(TOTAL)
    assert inflater.eof and not inflater.unused_data  # one member, its trailer checked
    rows = await client.app[DB].segments(done["id"])
    stored = (client.app[SETTINGS].archive_dir / rows[0]["path"]).read_bytes()
    assert body[10 : len(stored) - 10] == stored[10:-10]


@BOTH
async def test_archive_verify_passes_and_repairs(make_client, tmp_path, compressor):
    """`archive verify` finds the segments whole; a truncated one is repaired and then passes."""
    client, done = await flooded(make_client, compressor)
    await client.close()
    clean = await verify(tmp_path)
    assert clean.returncode == 0 and "0 problems" in clean.stdout, clean.stdout
    rows = await _rows(tmp_path, done["id"])
    log_path = tmp_path / "archive" / rows[-1]["path"]
    cut = log_path.read_bytes()
    log_path.write_bytes(cut[: len(cut) // 2])
    assert (await verify(tmp_path)).returncode == 1
    repaired = await verify(tmp_path, "--repair")
    assert repaired.returncode == 0 and "[repaired]" in repaired.stdout, repaired.stdout
    assert (await asyncio.to_thread(scan, log_path)).complete
    assert (await verify(tmp_path)).returncode == 0


@pytest.mark.parametrize("level", range(1, 10))
def test_every_level_of_either_ends_as_gzjoin_needs(tmp_path, level):
    """At every gzip_level, an ISA-L segment and a zlib one join into one member."""
    frames = [Frame(1, "stdout", time.time(), flood_bytes(50_000))]
    paths = []
    for compressor in COMPRESSORS:
        path = tmp_path / f"{compressor}.1{segments.LOG_SUFFIX}"
        segments.write_whole(path, frames, Deflate(compressor, level))
        assert gzip.decompress(path.read_bytes()) == frames[0].data
        paths.append(path)
    joined = gzjoin.join(paths, [50_000, 50_000])
    assert joined is not None
    assert gzip.decompress(b"".join(joined.chunks())) == frames[0].data * 2


def test_a_segment_streamed_through_the_thread_is_whole(tmp_path, compressor):
    """Frames written through the compressor thread with each library read back exactly."""
    data = [flood_bytes(300_000)[i:i + 7000] for i in range(0, 300_000, 7000)]
    for name in COMPRESSORS:
        writer = archive.TaskArchive(tmp_path, name, compressor, fresh=True,
                                     deflate=Deflate(name))
        for seq, chunk in enumerate(data, 1):
            writer.write(Frame(seq, "stdout", time.time(), chunk))
        writer.flush().result()
        writer.close().result()
        back = list(archive.read_frames(tmp_path, name))
        assert [f.data for f in back] == data
        path = tmp_path / writer.segments[0].path
        assert zcat(path) == b"".join(data) and scan(path).complete


@pytest.mark.parametrize("value", ["lz4", 1, ""])
def test_a_bad_compressor_names_the_key(tmp_path, value):
    """archive.compressor other than isal or zlib is a ConfigError naming key and value."""
    with pytest.raises(ConfigError) as error:
        parse({"archive": {"compressor": value}}, tmp_path)
    assert str(error.value) == f"archive.compressor: one of ['isal', 'zlib'], got {value!r}"


def test_isal_is_the_default_and_zlib_can_be_chosen(tmp_path):
    """The default compressor is ISA-L; `compressor = "zlib"` picks zlib; both are known."""
    assert archive.deflate_of(parse({}, tmp_path)) == Deflate("isal", 1)
    chosen = parse({"archive": {"compressor": "zlib", "gzip_level": 6}}, tmp_path)
    assert archive.deflate_of(chosen) == Deflate("zlib", 6)
    assert COMPRESSORS == deflate.COMPRESSORS
