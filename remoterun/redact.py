"""Masking output: a task's secret values and the server's `[redaction] patterns` become `***`.

The output is masked where its bytes become frames, before the hub numbers them and the archive
keeps them, so live frames, SSE, replays, downloads and the archive on disk all hold the same
masked bytes. Each stream (stdout, stderr; a PTY's one) is masked on its own, and what a later
read could still turn into a match is held back:

- A secret: the end of a read that is the start of a secret value (at most its length less one
  byte) waits for the stream's next read, or the end of the run, whichever comes first; nothing
  else waits. A value split across two reads is masked whatever the pause between them. A match
  that reaches a read's end waits too when a secret overlaps itself ("abcabc" in "abcabcabc"),
  up to SPAN_HOLD_BYTES, so however the reads cut the output it is masked as a whole would be.
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
SPAN_HOLD_BYTES = 65536


class Redactor:
    """The server's compiled `[redaction] patterns`; makes each attempt's Masker."""

    def __init__(self, patterns: Sequence[str] = ()):
        # Matched against the bytes (so \w and \d are ASCII; literal non-ASCII text matches),
        # one after the other: an alternation of them all loses re's literal-prefix scan (~15x
        # slower on log text for two patterns).
        self.patterns = tuple(re.compile(p.encode()) for p in patterns)

    def masker(self, values: Iterable[str]) -> Masker | None:
        """A Masker for one attempt whose secret values are `values`; None if nothing to mask."""
        secrets = sorted({v.encode() for v in values if len(v) >= MIN_SECRET_CHARS},
                         key=len, reverse=True)
        if not secrets and not self.patterns:
            return None
        return Masker(secrets, self.patterns)


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


def _replace(buf: bytes, spans: Sequence[tuple[int, int]], end: int) -> bytes:
    """`buf[:end]` with each span replaced by MASK."""
    parts: list[bytes] = []
    at = 0
    for start, stop in spans:
        parts += (buf[at:start], MASK)
        at = stop
    parts.append(buf[at:end])
    return b"".join(parts)


class Masker:
    """One attempt's masking, per stream, with what is held back between reads."""

    def __init__(self, secrets: Sequence[bytes], patterns: Sequence[re.Pattern[bytes]] = ()):
        self.secrets = tuple(secrets)
        self.patterns = tuple(patterns)
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
        if self.patterns:
            data = self._mask_lines(stream, data)
        return data

    def _sub(self, data: bytes) -> bytes:
        for pattern in self.patterns:
            data = pattern.sub(MASK, data)
        return data

    def release_lines(self, now: float) -> list[tuple[str, bytes]]:
        """Each incomplete line that has waited LINE_HOLD_S, masked as it stands."""
        out = []
        for stream, since in list(self._line_since.items()):
            if now - since >= LINE_HOLD_S:
                del self._line_since[stream]
                data = self._line_tail.pop(stream)
                out.append((stream, self._sub(data)))
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """Everything still held, masked: the run has ended."""
        out = []
        self._line_since.clear()
        for stream in [*self._line_tail, *(s for s in self._secret_tail
                                           if s not in self._line_tail)]:
            data = self._line_tail.pop(stream, b"") + self._masked(
                self._secret_tail.pop(stream, b""))
            data = self._sub(data)
            if data:
                out.append((stream, data))
        return out

    def _mask_secrets(self, stream: str, data: bytes) -> bytes:
        held = self._secret_tail.pop(stream, None)
        buf = held + data if held else data
        spans = _spans(buf, self.secrets)
        keep = self._start_of_secret(buf, len(buf) - self._longest + 1)
        # A match that reaches the held end may still grow into the next read (a secret that
        # overlaps itself, "abcabc" in "abcabcabc"): it is held with it, so the two reads mask
        # as one would. Past SPAN_HOLD_BYTES (a long run of such repeats) it goes as it is.
        last = len(spans)
        while last and spans[last - 1][1] >= keep:
            last -= 1
            keep = min(keep, spans[last][0])
        if len(buf) - keep > SPAN_HOLD_BYTES:
            last = len(spans)
            keep = self._start_of_secret(buf, max(spans[-1][1], len(buf) - self._longest + 1))
        if keep < len(buf):
            self._secret_tail[stream] = buf[keep:]
        if not last:
            return buf[:keep] if keep < len(buf) else buf
        return _replace(buf, spans[:last], keep)

    def _masked(self, buf: bytes) -> bytes:
        """Every secret in `buf` masked, nothing held (the end of the run)."""
        return _replace(buf, _spans(buf, self.secrets), len(buf)) if buf else buf

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
        return self._sub(buf) if buf else buf
