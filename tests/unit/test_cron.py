"""Schedule maths with a fixed clock (issue 29): next instants in a zone, the DST rule over
every change of 2026-2028 in five zones, 6-field crons, @daily on Feb 29, cron's OR rule,
periods, jitter and the catch-up choice. Pure: no process, no socket, no sleep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from remoterun.engine.cron import (
    Timing,
    choose,
    cron_expression,
    explain,
    jitter_offset,
    period_s,
    place,
)
from remoterun.engine.schedule_spec import parse
from remoterun.errors import InvalidParams

ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Australia/Lord_Howe")


def utc(*parts: int) -> float:
    """Unix seconds of a UTC time."""
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def transitions(zone: ZoneInfo) -> list[tuple[float, timedelta, timedelta]]:
    """(instant, offset before, offset after) of each change of 2026-2028, found by a scan."""
    found = []
    at = datetime(2026, 1, 1, tzinfo=UTC)
    step = timedelta(minutes=15)
    before = at.astimezone(zone).utcoffset()
    while at.year < 2029:
        at += step
        after = at.astimezone(zone).utcoffset()
        if after != before:
            found.append((at.timestamp(), before, after))
        before = after
    return found


def cron_at(local: datetime) -> Timing:
    """A daily cron at `local`'s hour and minute."""
    return Timing(local.tzinfo, cron=cron_expression(f"{local.minute} {local.hour} * * *"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ZONES)
def test_every_dst_change_2026_to_2028(name):
    """Spring forward: a daily time in the gap runs once, at the first instant after it. Fall
    back: a daily time in the repeated span runs once, at its first occurrence."""
    zone = ZoneInfo(name)
    changes = transitions(zone)
    assert len(changes) == 6, changes  # two a year
    for at, before, after in changes:
        shift = after - before
        wall_before = datetime.fromtimestamp(at, UTC).replace(tzinfo=None) + before
        if shift > timedelta(0):  # the wall times [wall_before, wall_before + shift) are skipped
            local = (wall_before + shift / 2).replace(tzinfo=zone)
            first, second = cron_at(local).next(at - 6 * 3600, 2)
            assert first == at, (name, local)
            assert second - first == 86400 - shift.total_seconds() or \
                datetime.fromtimestamp(second, zone).time() == local.time()
        else:  # [wall_before + shift, wall_before) occurs twice
            local = (wall_before + shift / 2).replace(tzinfo=zone)
            first_occurrence = at - (-shift / 2).total_seconds()
            first, second = cron_at(local).next(at - 6 * 3600, 2)
            assert first == first_occurrence, (name, local)
            assert datetime.fromtimestamp(second, zone).date() > local.date()


@pytest.mark.parametrize("name", ZONES)
def test_frequent_cron_never_repeats_a_local_time(name):
    """Every 15 minutes across each change: instants strictly increase, no local time runs
    twice, and every slot outside the changed span is kept."""
    zone = ZoneInfo(name)
    timing = Timing(zone, cron=cron_expression("*/15 * * * *"))
    for at, _, _ in transitions(zone):
        instants = timing.between(at - 4 * 3600, at + 4 * 3600, 1000)
        assert instants == sorted(set(instants))
        walls = [datetime.fromtimestamp(i, zone).replace(tzinfo=None) for i in instants]
        assert len(walls) == len(set(walls))
        assert len(instants) >= 8 * 4 - 5


def test_new_york_2026_by_hand():
    """America/New_York, 2026: 02:30 on 8 March runs at 03:00 EDT; 01:30 on 1 November runs
    at 01:30 EDT only."""
    ny = ZoneInfo("America/New_York")
    spring = Timing(ny, cron=cron_expression("30 2 * * *"))
    assert spring.next(utc(2026, 3, 7, 12), 2) == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]
    fall = Timing(ny, cron=cron_expression("30 1 * * *"))
    assert fall.next(utc(2026, 10, 31, 12), 2) == [utc(2026, 11, 1, 5, 30),
                                                   utc(2026, 11, 2, 6, 30)]


def test_berlin_from_inside_the_repeated_hour():
    """Asked from the second pass of Berlin's repeated hour, a slot of the first pass is not
    run again."""
    berlin = ZoneInfo("Europe/Berlin")
    timing = Timing(berlin, cron=cron_expression("45 2 * * *"))
    second_pass = utc(2026, 10, 25, 1, 10)  # 02:10 CET, the hour's second pass
    assert timing.next(second_pass, 1) == [utc(2026, 10, 26, 1, 45)]


def test_lord_howe_half_hour_gap():
    """Lord Howe moves by 30 minutes: 02:15 on its spring-forward day runs at 02:30."""
    zone = ZoneInfo("Australia/Lord_Howe")
    timing = Timing(zone, cron=cron_expression("15 2 * * *"))
    (first,) = timing.next(utc(2026, 10, 3, 0), 1)
    assert datetime.fromtimestamp(first, zone).isoformat() == "2026-10-04T02:30:00+11:00"


def test_shanghai_has_no_dst():
    """Asia/Shanghai: 02:30 every day is 18:30 UTC the day before, all year."""
    timing = Timing(ZoneInfo("Asia/Shanghai"), cron=cron_expression("30 2 * * *"))
    instants = timing.next(utc(2026, 1, 1), 366)
    assert all(datetime.fromtimestamp(i, UTC).time().isoformat() == "18:30:00"
               for i in instants)
    assert {b - a for a, b in zip(instants, instants[1:], strict=False)} == {86400.0}


def test_six_fields_have_seconds_first():
    """"*/20 * * * * *" runs at :00, :20 and :40 of every minute."""
    timing = Timing(ZoneInfo("UTC"), cron=cron_expression("*/20 * * * * *"))
    assert timing.next(utc(2026, 5, 1, 0, 0, 5), 3) == [utc(2026, 5, 1, 0, 0, 20),
                                                        utc(2026, 5, 1, 0, 0, 40),
                                                        utc(2026, 5, 1, 0, 1)]


def test_daily_on_feb_29():
    """@daily runs on 29 February 2028, a leap day; "0 0 29 2 *" waits for it."""
    utc_zone = ZoneInfo("UTC")
    daily = Timing(utc_zone, cron=cron_expression("@daily"))
    assert daily.next(utc(2028, 2, 28, 12), 2) == [utc(2028, 2, 29), utc(2028, 3, 1)]
    leap = Timing(utc_zone, cron=cron_expression("0 0 29 2 *"))
    assert leap.next(utc(2026, 1, 1), 1) == [utc(2028, 2, 29)]


def test_day_of_month_or_day_of_week():
    """Both day fields restricted: cron's OR rule (the 13th, or any Friday)."""
    timing = Timing(ZoneInfo("UTC"), cron=cron_expression("0 0 13 * 5"))
    days = [datetime.fromtimestamp(i, UTC).date().isoformat()
            for i in timing.next(utc(2026, 2, 1), 4)]
    assert days == ["2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"]
    assert "13th" in explain("0 0 13 * 5") and "Friday" in explain("0 0 13 * 5")


def test_periods_count_from_the_epoch():
    """every = "1h30m": instants are multiples of 5400 s since the epoch, in any zone."""
    assert period_s("1h30m") == 5400 and period_s("90s") == 90 and period_s("15m") == 900
    timing = Timing(ZoneInfo("Europe/Berlin"), every_s=5400)
    assert timing.next(5400 * 10 + 1, 2) == [5400.0 * 11, 5400.0 * 12]
    for bad in ("", "0s", "soon", "1d"):
        with pytest.raises(ValueError):
            period_s(bad)


def test_bad_expressions_are_refused():
    """A cron that does not parse raises ValueError with cronsim's reason."""
    for bad in ("61 * * * *", "* * *", "@sometimes", "* * * * * * *"):
        with pytest.raises(ValueError):
            cron_expression(bad)


def test_jitter_is_stable_and_bounded():
    """A schedule's jitter is the same on every call (and node), within [0, jitter_s)."""
    offsets = {jitter_offset("nightly", 60) for _ in range(3)}
    assert len(offsets) == 1 and 0 <= offsets.pop() < 60
    assert jitter_offset("nightly", 0) == 0.0
    assert jitter_offset("a", 600) != jitter_offset("b", 600)


def test_place_exists_and_folds():
    """place(): an ordinary time as is; a skipped one at the gap's end; a repeated one at its
    first occurrence."""
    ny = ZoneInfo("America/New_York")
    assert place(datetime(2026, 6, 1, 12), ny) == utc(2026, 6, 1, 16)
    assert place(datetime(2026, 3, 8, 2, 59, 59), ny) == utc(2026, 3, 8, 7)
    assert place(datetime(2026, 11, 1, 1, 0), ny) == utc(2026, 11, 1, 5)


def test_catch_up_latest_all_none_and_window():
    """Slots due while the server was down: latest runs the newest in the window, all runs
    every one in it, none runs nothing; slots older than the window are only recorded."""
    due = [100.0, 101.0, 102.0, 103.0]
    now, up = 104.5, 104.0

    def ran(policy, window=3600.0):
        got = choose(due, now=now, offset_s=0, up_since=up, catch_up=policy, window_s=window)
        assert [c.slot for c in got] == due
        return [c.slot for c in got if c.run]

    assert ran("latest") == [103.0]
    assert ran("all") == due
    assert ran("none") == []
    assert ran("all", window=2.0) == [103.0]
    on_time = choose([104.0], now=104.3, offset_s=0, up_since=100, catch_up="none",
                     window_s=0)
    assert [c.run for c in on_time] == [True]


def test_spec_validation_names_fields():
    """A spec with a bad cron, zone, overlap and both cron and every names each field."""
    with pytest.raises(InvalidParams) as caught:
        parse({"name": "Bad Name", "script": "x.sh", "cron": "61 * * * *", "every": "1m",
               "timezone": "Nowhere/Land", "overlap": "sometimes"}, "UTC")
    fields = {d["field"] for d in caught.value.details or []}
    assert {"name", "cron", "timezone", "overlap"} <= fields
