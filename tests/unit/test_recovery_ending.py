"""recovery.ending: how a run no live server holds is recorded (pure)."""

from __future__ import annotations

from remoterun.archive import Segment
from remoterun.engine.recovery import ending
from remoterun.state import TaskStatus as S


def _row(attempt: int, max_retries: int) -> dict:
    return {"id": "t1", "attempt": attempt, "max_retries": max_retries, "last_seq": 4}


def test_a_lost_run_with_retries_left_goes_back_to_the_queue():
    """Attempt N of N+1 allowed: pending again as attempt N+1, due now, the error kept."""
    end = ending(_row(1, 1), [], "node n2 was lost during attempt 1", now=50.0)
    assert end.status is S.PENDING
    assert end.fields["attempt"] == 2 and end.fields["run_after"] == 50.0
    assert end.fields["error"] == "node n2 was lost during attempt 1"


def test_a_lost_run_without_retries_fails_with_what_its_archive_holds():
    """No retry left: failed, finished now; counts and segment rows from the archive found."""
    found = [Segment("a/1.log.gz", 1, last_seq=9, raw_bytes=100),
             Segment("a/2.log.gz", 10, last_seq=12, raw_bytes=30)]
    end = ending(_row(1, 0), found, "the server stopped during attempt 1", now=60.0)
    assert end.status is S.FAILED and end.fields["finished_at"] == 60.0
    assert (end.fields["output_bytes"], end.fields["last_seq"]) == (130, 12)
    assert len(end.extra) == 2 and end.fields["pid"] is None


def test_the_last_seq_never_goes_back():
    """A row that recorded more than the archive kept keeps its last_seq."""
    end = ending({**_row(1, 0), "last_seq": 20}, [], "x", now=1.0)
    assert end.fields["last_seq"] == 20 and end.fields["output_bytes"] == 0
