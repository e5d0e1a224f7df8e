"""The output archive: per-task gzip segments written by a compressor thread, read back by seq or byte.

`writer` (TaskArchive, rotation, finalizing after a crash), `reader` (frames, raw bytes, the
stored gzip joined), `segments` (the files), `deflate` (isal or zlib), `scan` (a segment checked
and rewritten whole), `private` (0700/0600), `gzjoin` (members joined without recompressing),
`compressor` (the thread). The names below are the archive's public face for the engine and the API.
"""

from remoterun.archive.deflate import Deflate
from remoterun.archive.reader import aread_frames, in_thread, joined_gzip, read_frames, read_raw
from remoterun.archive.segments import STREAMS
from remoterun.archive.writer import (
    HOLD_BYTES,
    Segment,
    TaskArchive,
    Writer,
    deflate_of,
    finalize,
    logs_path_for,
    next_number,
    recover,
    settle,
)
from remoterun.wire import Frame

__all__ = ["HOLD_BYTES", "STREAMS", "Deflate", "Frame", "Segment", "TaskArchive", "Writer",
           "aread_frames", "deflate_of", "finalize", "in_thread", "joined_gzip", "logs_path_for",
           "next_number", "read_frames", "read_raw", "recover", "settle"]
