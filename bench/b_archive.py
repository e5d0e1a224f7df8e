"""Archiving alone: RemoteRun's TaskArchive vs plain gzip -1 of the same bytes, in-process."""

from __future__ import annotations

import asyncio
import shutil
import time
import zlib
from pathlib import Path

from bench.lib import MB, Context, Row, interleave, median
from remoterun.archive import TaskArchive, read_frames
from remoterun.archive.compressor import Compressor
from remoterun.wire import Frame

FRAME_BYTES = 64 * 1024


def _chunks(data: bytes) -> list[bytes]:
    return [data[i:i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]


def archive_rate(root: Path, chunks: list[bytes]) -> float:
    """MB/s of TaskArchive.write for 64 KiB frames, closed at the end (as a task's end does)."""
    shutil.rmtree(root, ignore_errors=True)
    compressor = Compressor()
    archive = TaskArchive(root, "bench/task", compressor,
                          segment_max_bytes=64 * 1024 * 1024)
    total = sum(map(len, chunks))
    began = time.perf_counter()
    for seq, chunk in enumerate(chunks, 1):
        archive.write(Frame(seq, "stdout", time.time(), chunk))
    archive.close().result()  # the compressor thread has written and closed every file
    elapsed = time.perf_counter() - began
    compressor.close()
    return total / elapsed / MB


def gzip_rate(path: Path, chunks: list[bytes]) -> float:
    """MB/s of zlib level 1, gzip wrapper, same chunks, written to a file."""
    total = sum(map(len, chunks))
    began = time.perf_counter()
    with open(path, "wb") as fh:
        z = zlib.compressobj(1, zlib.DEFLATED, 31)
        for chunk in chunks:
            fh.write(z.compress(chunk))
        fh.write(z.flush())
    return total / (time.perf_counter() - began) / MB


async def archive(ctx: Context) -> list[Row]:
    """TaskArchive MB/s vs gzip -1 MB/s on the same 64 KiB chunks of log text."""
    data = ctx.log_file.read_bytes()[: ctx.size(32, 16) * 1024 * 1024]
    chunks = _chunks(data)
    folder = ctx.work / "archive-alone"
    folder.mkdir(parents=True, exist_ok=True)
    archive_rate(folder / "a", chunks[:64])  # warm-up

    async def rr() -> float:
        return await asyncio.to_thread(archive_rate, folder / "a", chunks)

    async def gz() -> float:
        return await asyncio.to_thread(gzip_rate, folder / "b.gz", chunks)

    got, base = await interleave(ctx.runs, rr, gz)
    back = sum(len(f.data) for f in read_frames(folder / "a", "bench/task"))
    if back != len(data):
        raise RuntimeError(f"archive read back {back} bytes of {len(data)}")
    size = sum(p.stat().st_size for p in (folder / "a").rglob("*.gz"))
    row = Row("archiving alone (TaskArchive)", "MB/s", median(got), median(base), "gzip -1",
              ">= 0.8 of gzip -1", runs=got, baseline_runs=base,
              notes=f"{len(data) / MB:.0f} MB in 64 KiB frames, ratio {size / len(data):.2f}")
    row.met = row.ratio is not None and row.ratio >= 0.8
    return [row]
