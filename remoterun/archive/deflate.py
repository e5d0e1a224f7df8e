"""How segments are deflated: ISA-L's igzip (the default) or zlib, each as standard gzip members.

Either writes members that end the same way, so `zcat`, Python's `gzip`, the readers and
`gzjoin` take either, and one task's segments may mix them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from isal import isal_zlib

COMPRESSORS = ("isal", "zlib")


@dataclass(frozen=True)
class Deflate:
    """How segments are compressed: the library and the level (`archive.compressor`,
    `archive.gzip_level`).

    ISA-L's igzip deflates varied log text ~3.6x as fast as zlib at level 1, at a better ratio
    (0.273 against 0.285), and releases the GIL as zlib does. Its levels are 0..3: `level`
    (zlib's 1..9) maps 1-3 to 1, 4-6 to 2, 7-9 to 3. Never 0, whose members end in a final
    block of their own rather than the sync flush and `03 00` that gzjoin relies on.
    """

    compressor: str = "isal"
    level: int = 1

    def compressobj(self, mem_level: int = 8) -> Any:
        """A gzip-member compressor (wbits 31)."""
        if self.compressor == "isal":
            return isal_zlib.compressobj((self.level + 2) // 3, zlib.DEFLATED, 31, mem_level)
        return zlib.compressobj(self.level, zlib.DEFLATED, 31, mem_level)


DEFAULT_DEFLATE = Deflate()  # the settings' defaults: ISA-L, level 1


def whole_member(data: bytes, deflate: Deflate) -> bytes:
    """`data` as one whole gzip member, in one call."""
    # Ended as MemberWriter.finish ends a member (gzjoin relies on it). memLevel 6: for the
    # at most HOLD_BYTES (writer.py) written this way it packs as well as the default 8,
    # whose larger hash table costs zlib ~8 us to set up, twice per task.
    zip_ = deflate.compressobj(6)
    member: bytes = zip_.compress(data) + zip_.flush(zlib.Z_SYNC_FLUSH) + zip_.flush(zlib.Z_FINISH)
    return member
