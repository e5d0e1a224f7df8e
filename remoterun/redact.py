"""Masking output: a task's secret values and the server's `[redaction] patterns` become `***`.

The output is masked where its bytes become frames, before the hub numbers them and the archive
keeps them, so live frames, SSE, replays, downloads and the archive on disk all hold the same
masked bytes. Each stream (stdout, stderr; a PTY's one) is masked on its own, and what a later
read could still turn into a match is held back:

- A secret: the end of a read that is the start of a secret value (at most its length less one
  byte) waits for the stream's next read, or the end of the run, whichever comes first; nothing
  else waits. A value split across two reads is masked whatever the pause between them.
- A pattern: patterns match within a line, so the incomplete last line of a read waits for its
  end, at most LINE_HOLD_BYTES (past that, what is there is matched and sent) and LINE_HOLD_S
  (then it is matched and sent as it stands: a match split by a longer pause is missed). A
  task's whole lines are not delayed at all.

Values shorter than MIN_SECRET_CHARS characters are not masked: a one-letter secret would mask
every such letter of the output. A task with no secret to mask and no pattern gets no Masker
at all: its output path does not change (bench stream).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

MASK = b"***"
MIN_SECRET_CHARS = 4
LINE_HOLD_BYTES = 4096
LINE_HOLD_S = 0.1


class Redactor:
    """The server's compiled `[redaction] patterns`; makes each attempt's Masker."""

    def __init__(self, patterns: Sequence[str] = ()):
        # Matched against the bytes (so \w and \d are ASCII; literal non-ASCII text matches).
        self.pattern = re.compile(b"|".join(b"(?:" + p.encode() + b")" for p in patterns)) \
            if patterns else None

    def masker(self, values: Iterable[str]) -> Masker | None:
        """A Masker for one attempt whose secret values are `values`; None if nothing to mask."""
        secrets = sorted({v.encode() for v in values if len(v) >= MIN_SECRET_CHARS},
                         key=len, reverse=True)
        if not secrets and self.pattern is None:
            return None
        return Masker(secrets, self.pattern)


def _spans(buf: bytes, secrets: Sequence[bytes]) -> list[tuple[int, int]]:
    """Every occurrence of every secret, overlapping ones merged, in order."""
    found = []
    for secret in secrets:
        at = buf.find(secret)
        while at != -1:
            found.append((at, at + len(secret)))
            at = buf.find(secret, at + 1)
    found.sort()
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class Masker:
    """One attempt's masking, per stream, with what is held back between reads."""

    def __init__(self, secrets: Sequence[bytes], pattern: re.Pattern[bytes] | None):
        self.secrets = tuple(secrets)
        self.pattern = pattern
        self._longest = max((len(s) for s in self.secrets), default=0)
        self._secret_tail: dict[str, bytes] = {}  # stream -> the start of a secret, maybe
        self._line_tail: dict[str, bytes] = {}  # stream -> an incomplete line (patterns)
        self._line_since: dict[str, float] = {}  # stream -> when that line began waiting

    @property
    def holding_lines(self) -> bool:
        """Whether an incomplete line waits (for its end or LINE_HOLD_S)."""
        return bool(self._line_tail)

    def next_release(self, now: float) -> float | None:
        """Seconds until the longest-waiting incomplete line is due (None: none waits)."""
        if not self._line_since:
            return None
        return max(0.0, min(self._line_since.values()) + LINE_HOLD_S - now)

    def feed(self, stream: str, data: bytes) -> bytes:
        """The bytes of `stream` that can be sent now, masked; the rest is held."""
        if self.secrets:
            data = self._mask_secrets(stream, data)
        if self.pattern is not None:
            data = self._mask_lines(stream, data)
        return data

    def release_lines(self, now: float) -> list[tuple[str, bytes]]:
        """Each incomplete line that has waited LINE_HOLD_S, masked as it stands."""
        out = []
        for stream, since in list(self._line_since.items()):
            if now - since >= LINE_HOLD_S:
                del self._line_since[stream]
                data = self._line_tail.pop(stream)
                out.append((stream, self.pattern.sub(MASK, data) if self.pattern else data))
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """Everything still held, masked: the run has ended."""
        out = []
        self._line_since.clear()
        for stream in [*self._line_tail, *(s for s in self._secret_tail
                                           if s not in self._line_tail)]:
            data = self._line_tail.pop(stream, b"") + self._secret_tail.pop(stream, b"")
            if self.pattern is not None:
                data = self.pattern.sub(MASK, data)
            if data:
                out.append((stream, data))
        return out

    def _mask_secrets(self, stream: str, data: bytes) -> bytes:
        held = self._secret_tail.pop(stream, None)
        buf = held + data if held else data
        spans = _spans(buf, self.secrets)
        done = spans[-1][1] if spans else 0
        keep = self._start_of_secret(buf, max(done, len(buf) - self._longest + 1))
        if keep < len(buf):
            self._secret_tail[stream] = buf[keep:]
        if not spans:
            return buf[:keep] if keep < len(buf) else buf
        parts, at = [], 0
        for start, end in spans:
            parts += (buf[at:start], MASK)
            at = end
        parts.append(buf[at:keep])
        return b"".join(parts)

    def _start_of_secret(self, buf: bytes, window: int) -> int:
        """Where the end of `buf` that is the start of some secret begins (len(buf): none)."""
        keep = len(buf)
        window = max(window, 0)
        for secret in self.secrets:
            first = secret[:1]
            at = buf.find(first, window, keep)
            while at != -1:
                if secret.startswith(buf[at:]):
                    keep = at
                    break
                at = buf.find(first, at + 1, keep)
        return keep

    def _mask_lines(self, stream: str, data: bytes) -> bytes:
        assert self.pattern is not None
        held = self._line_tail.pop(stream, None)
        since = self._line_since.pop(stream, None)
        buf = held + data if held else data
        cut = buf.rfind(b"\n") + 1
        if len(buf) - cut > LINE_HOLD_BYTES:
            cut = len(buf)
        if cut < len(buf):
            self._line_tail[stream] = buf[cut:]
            # A line that only grew keeps its start time; a new one starts its wait now.
            self._line_since[stream] = since if since is not None and cut == 0 \
                else time.monotonic()
            buf = buf[:cut]
        return self.pattern.sub(MASK, buf) if buf else buf
