"""Join whole gzip members into one member without recompressing them.

A deflate stream that ends with a sync flush is byte-aligned and its last block is not final,
so several such streams concatenate into one valid deflate stream; the joined member needs only
one header, one empty final block, and a trailer whose CRC-32 is combined from the members'
CRCs (zlib's `crc32_combine`, which Python's zlib does not expose). This is zlib's `gzjoin`
idea, made cheap by writing every member so that it ends `sync flush + 03 00 + trailer`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_TRAILER = struct.Struct("<II")  # CRC-32, size mod 2**32
_HEAD = b"\x1f\x8b\x08\x00"  # gzip magic, deflate, no optional fields (so a 10-byte header)
_HEADER_BYTES = 10
_SYNC_END = b"\x00\x00\xff\xff"
FINAL_BLOCK = b"\x03\x00"  # an empty final block, as zlib writes it after a sync flush
_END_BYTES = len(_SYNC_END) + len(FINAL_BLOCK) + _TRAILER.size
_READ_BYTES = 256 * 1024


def _multmodp(a: int, b: int) -> int:
    """a times b modulo the CRC-32 polynomial (bit-reflected), as zlib's crc32.c."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) modulo the polynomial, n = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A+B from crc(A), crc(B) and len(B)."""
    p, k = 1 << 31, 3  # x^0; and k = 3 because len2 counts bytes, the polynomial bits
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


@dataclass(frozen=True)
class Joined:
    """One gzip member made of several: its length, and where each part's bytes come from."""

    length: int
    header: bytes
    parts: tuple[tuple[Path, int, int], ...]  # file, first byte, end byte
    trailer: bytes

    def chunks(self) -> Iterator[bytes]:
        """The joined member, a file chunk at a time (short if a file shrank meanwhile)."""
        yield self.header
        for path, lo, hi in self.parts:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                return
            with fh:
                fh.seek(lo)
                left = hi - lo
                while left > 0:
                    chunk = fh.read(min(_READ_BYTES, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk
        yield self.trailer


def join(paths: Sequence[Path], sizes: Sequence[int]) -> Joined | None:
    """Plan one member of the members in `paths` (of `sizes` bytes uncompressed).

    None when a file is missing or does not end as a finished, sync-flushed member.
    """
    crc, total, header, parts = 0, 0, b"", []
    for path, size in zip(paths, sizes, strict=True):
        try:
            with open(path, "rb") as fh:
                head = fh.read(_HEADER_BYTES)
                length = os.fstat(fh.fileno()).st_size
                fh.seek(max(length - _END_BYTES, 0))
                end = fh.read(_END_BYTES)
        except FileNotFoundError:
            return None
        if (len(head) < _HEADER_BYTES or not head.startswith(_HEAD) or len(end) < _END_BYTES
                or not end.startswith(_SYNC_END + FINAL_BLOCK)):
            return None
        part_crc, isize = _TRAILER.unpack(end[-_TRAILER.size:])
        if isize != size % 2**32:
            return None
        crc = crc32_combine(crc, part_crc, size)
        total += size
        header = header or head
        parts.append((path, _HEADER_BYTES, length - len(FINAL_BLOCK) - _TRAILER.size))
    if not parts:
        return None
    trailer = FINAL_BLOCK + _TRAILER.pack(crc, total % 2**32)
    length = len(header) + sum(hi - lo for _, lo, hi in parts) + len(trailer)
    return Joined(length, header, tuple(parts), trailer)
