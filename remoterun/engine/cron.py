"""Schedule maths, pure: the instants a cron or a period names in a time zone, the DST rule,
jitter and the catch-up choice after downtime (PROTOCOL.md, "Schedules").

Cron expressions are read by cronsim over *naive local* times, so each local time is produced
once; each is then placed on the time line by the contract's rule: a local time that does not
exist (spring forward) runs at the first instant after the gap, one that occurs twice (fall
back) runs once, at its first occurrence. Instants are unix seconds (floats).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
           "@annually": "0 0 1 1 *"}
_PERIOD = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
CATCH_UP = ("latest", "all", "none")
LATE_S = 2.0  # a slot whose start is later than this (a stalled loop, downtime) is "missed"


def cron_expression(text: str) -> str:
    """The expression cronsim reads (aliases expanded); ValueError saying why it is bad."""
    expr = ALIASES.get(text.strip().lower(), text.strip())
    if len(expr.split()) not in (5, 6):
        raise ValueError("expected 5 fields, 6 with seconds first, or @hourly/@daily/"
                         "@weekly/@monthly/@yearly")
    try:
        CronSim(expr, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(str(exc)) from None
    return expr


def period_s(text: str) -> int:
    """Seconds of a period such as "90s", "15m", "1h30m"; ValueError if it is not one."""
    match = _PERIOD.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError('expected a period such as "90s", "15m" or "1h30m"')
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise ValueError("a period is at least 1s")
    return total


def explain(text: str) -> str:
    """The cron expression in words (cronsim's English)."""
    return CronSim(cron_expression(text), datetime(2000, 1, 1)).explain()


@dataclass(frozen=True)
class Timing:
    """When a schedule's slots fall: a cron in a zone, or a period from the epoch (UTC)."""

    zone: ZoneInfo
    cron: str | None = None  # as cron_expression returns it
    every_s: int | None = None

    def after(self, instant: float) -> Iterator[float]:
        """Every slot strictly after `instant`, in order, without end."""
        if self.every_s is not None:
            k = math.floor(instant / self.every_s) + 1
            while True:
                yield float(k * self.every_s)
                k += 1
        assert self.cron is not None, "a timing has a cron or a period"
        start = datetime.fromtimestamp(math.floor(instant), self.zone).replace(tzinfo=None)
        # A local time repeated after `instant` (fall back) is placed at its first occurrence,
        # before `instant`: dropped here, so it never runs twice.
        last = instant
        for local in CronSim(self.cron, start):
            at = place(local, self.zone)
            if at > last:
                last = at
                yield at

    def between(self, start: float, end: float, limit: int) -> list[float]:
        """At most `limit` slots in (start, end], oldest first."""
        out: list[float] = []
        for at in self.after(start):
            if at > end or len(out) >= limit:
                break
            out.append(at)
        return out

    def next(self, instant: float, count: int) -> list[float]:
        """The next `count` slots after `instant` (fewer if the cron names no more)."""
        return list(itertools.islice(self.after(instant), count))


def place(local: datetime, zone: ZoneInfo) -> float:
    """The instant a naive local time runs at: the first instant after a gap it falls in, the
    first occurrence of a time that occurs twice."""
    first = local.replace(tzinfo=zone, fold=0)
    at = first.timestamp()
    if datetime.fromtimestamp(at, zone).replace(tzinfo=None) == local:
        return at  # it exists (fold=0: its first occurrence when it occurs twice)
    return _gap_end(local, zone)


def _gap_end(local: datetime, zone: ZoneInfo) -> float:
    """The transition that skipped `local`: the first whole second whose wall time is later."""
    low = int(local.replace(tzinfo=zone, fold=1).timestamp())  # before the gap
    high = int(math.ceil(local.replace(tzinfo=zone, fold=0).timestamp()))  # after it
    while low < high:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) > local:
            high = mid
        else:
            low = mid + 1
    return float(low)


def jitter_offset(name: str, jitter_s: float) -> float:
    """The schedule's own delay in [0, jitter_s): the same for every slot and every node."""
    if jitter_s <= 0:
        return 0.0
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter_s


@dataclass(frozen=True)
class Choice:
    """What to do with one due slot: run it, or record it `missed` (with why)."""

    slot: float
    run: bool
    reason: str | None = None


def choose(due: list[float], *, now: float, offset_s: float, up_since: float,
           catch_up: str, window_s: float) -> list[Choice]:
    """Each due slot (oldest first) run or missed: a slot that started on time runs; the
    others (due while no timer ran, or late past LATE_S) follow `catch_up` within `window_s`."""
    choices: list[Choice] = []
    late: list[float] = []
    for slot in due:
        start = slot + offset_s
        if start < up_since or now - start > LATE_S:
            late.append(slot)
        else:
            choices.append(Choice(slot, True))
    in_window = [s for s in late if now - (s + offset_s) <= window_s]
    runs = {"all": set(in_window), "latest": set(in_window[-1:]), "none": set()}[catch_up]
    for slot in late:
        if slot in runs:
            choices.append(Choice(slot, True))
        elif slot in in_window:
            choices.append(Choice(slot, False, f"server down or late; catch_up = {catch_up}"))
        else:
            choices.append(Choice(slot, False, "older than catch_up_window_s"))
    return sorted(choices, key=lambda c: c.slot)


def rfc(instant: float) -> str:
    """An instant as RFC 3339 in UTC with milliseconds."""
    text = datetime.fromtimestamp(instant, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
