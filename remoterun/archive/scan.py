"""A whole segment checked (`scan`: its frames, sizes, and what is wrong) and rewritten whole."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from remoterun.archive.deflate import Deflate
from remoterun.archive.segments import (
    MemberWriter,
    SegmentReader,
    index_path,
    parse_name,
    write_frame,
)


@dataclass
class Scan:
    """What reading a whole segment found."""

    path: Path
    first_seq: int
    frames: int = 0
    last_seq: int = 0
    raw_bytes: int = 0
    log_extra: int = 0  # log bytes no index record covers (their record was never flushed)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether both members are whole and agree."""
        return not self.problems

    @property
    def missing(self) -> bool:
        """Whether a file of the pair is missing."""
        return any(p.startswith("missing") for p in self.problems)


def scan(log_path: Path) -> Scan:
    """Read a whole segment: its frames, sizes, and anything wrong with either file."""
    parsed = parse_name(log_path.name)
    found = Scan(log_path, parsed[1] if parsed else 0)
    for path in (log_path, index_path(log_path)):
        if not path.is_file():
            found.problems.append(f"missing {path.name}")
    if found.problems:
        return found
    reader = SegmentReader(log_path)
    try:
        for frame in reader.frames():
            found.frames += 1
            found.last_seq = frame.seq
            found.raw_bytes += len(frame.data)
        found.log_extra = reader.rest_of_log()
        while reader.index.read():
            pass
    finally:
        reader.close()
    for name, inflater in (("log", reader.log), ("index", reader.index)):
        if inflater.problem:
            found.problems.append(f"{name} {inflater.problem}")
    if reader.problem:
        found.problems.append(reader.problem)
    if found.log_extra:
        found.problems.append(f"{found.log_extra} log bytes have no index record")
    return found


def rewrite(log_path: Path, deflate: Deflate) -> None:
    """Rewrite a segment as two whole members holding every frame that reads back."""
    tmp_log = log_path.with_name(log_path.name + ".tmp")
    tmp_index = log_path.with_name(index_path(log_path).name + ".tmp")
    log, index = MemberWriter(tmp_log, deflate), MemberWriter(tmp_index, deflate)
    reader = SegmentReader(log_path)
    try:
        try:
            for frame in reader.frames():
                write_frame(log, index, frame)
        finally:
            reader.close()
        log.finish()
        index.finish()
    except BaseException:  # a full disk: leave the segment as it was, and no temporary file
        for writer, tmp in ((log, tmp_log), (index, tmp_index)):
            with contextlib.suppress(OSError):
                writer.file.close()
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp_log, log_path)
    os.replace(tmp_index, index_path(log_path))
