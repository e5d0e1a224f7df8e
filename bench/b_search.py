"""Searching a large archived log: archive.search vs `zcat | grep -n` of the same segments.

In-process, like `archive`: the log text is archived once (64 MiB segments, as a server writes
them) with a marker line at the start of each copy, then the archive's search (no time budget,
one page) and `zcat SEGMENTS | LC_ALL=C grep -n -F` of the same files run alternately; both
must find every marker. Also (info) where the last 1,000 lines start (`?tail=1000`'s cost).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from bench.lib import MB, Context, Row, interleave, median, progress
from remoterun.archive import TaskArchive
from remoterun.archive.compressor import Compressor
from remoterun.archive.search import Cursor, Matcher, Search, search
from remoterun.archive.segments import list_segments
from remoterun.archive.tail import tail_since
from remoterun.wire import Frame

FRAME_BYTES = 64 * 1024
NEEDLE = "bench-needle"


def build(root: Path, text: bytes, total: int) -> int:
    """Archive `total` bytes of copies of `text`, each opened by a marker line; the copies."""
    shutil.rmtree(root, ignore_errors=True)
    compressor = Compressor()
    archive = TaskArchive(root, "bench/task", compressor, segment_max_bytes=64 * 1024 * 1024)
    seq, written, copies = 1, 0, 0
    while written < total:
        copy = f"{NEEDLE} {copies}\n".encode() + text
        copies += 1
        for i in range(0, len(copy), FRAME_BYTES):
            chunk = copy[i:i + FRAME_BYTES]
            archive.write(Frame(seq, "stdout", time.time(), chunk))
            seq += 1
            written += len(chunk)
    archive.close().result()
    compressor.close()
    return copies


def ours(root: Path) -> int:
    """Matches of the archive's search, one page with no time budget."""
    ask = Search(Matcher(NEEDLE, False), None, 1000, float("inf"))
    return len(search(root, "bench/task", ask, Cursor(), {}).matches)


def zcat_grep(root: Path) -> int:
    """Matches of `zcat SEGMENTS | grep -n -F` (C locale)."""
    files = " ".join(shlex.quote(str(p)) for _, _, p in list_segments(root / "bench/task"))
    out = subprocess.run(f"zcat {files} | grep -n -F {NEEDLE}", shell=True, check=True,
                         capture_output=True, env={**os.environ, "LC_ALL": "C"}).stdout
    return out.count(b"\n")


async def search_group(ctx: Context) -> list[Row]:
    """archive.search MB/s vs zcat | grep -n MB/s over the same gzip segments."""
    total = ctx.size(1024, 64) * MB
    root = ctx.work / "search-archive"
    progress(f"archiving {total // MB} MB for the search")
    copies = await asyncio.to_thread(build, root, ctx.log_file.read_bytes(), total)
    written = sum(p.stat().st_size for p in root.rglob("*.log.gz"))

    async def timed(count: object) -> float:
        began = time.perf_counter()
        found = await asyncio.to_thread(count, root)  # type: ignore[arg-type]
        if found != copies:
            raise RuntimeError(f"found {found} markers of {copies}")
        return total / (time.perf_counter() - began) / MB

    async def rr() -> float:
        return await timed(ours)

    async def grep() -> float:
        return await timed(zcat_grep)

    got, base = await interleave(ctx.runs, rr, grep)
    row = Row("search of a large log (archive.search)", "MB/s", median(got), median(base),
              "zcat | grep -n", ">= 0.3 of zcat | grep -n", runs=got, baseline_runs=base,
              notes=f"{total / MB:.0f} MB of output in {written / MB:.0f} MB of gzip, "
                    f"{copies} matches")
    row.met = row.ratio is not None and row.ratio >= 0.3
    began = time.perf_counter()
    await asyncio.to_thread(tail_since, root, "bench/task", 1000)
    tail_ms = (time.perf_counter() - began) * 1000
    shutil.rmtree(root, ignore_errors=True)
    return [row, Row("where the last 1,000 lines start (?tail=1000)", "ms", tail_ms,
                     higher_is_better=False, notes="reads the newest segment only")]
