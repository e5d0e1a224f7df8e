"""writes.Once: a failure is logged once per kind and task until forgotten."""

from __future__ import annotations

from structlog.testing import capture_logs

from remoterun.engine.writes import Once


def test_a_failure_is_logged_once_until_it_is_forgotten():
    """Repeats are quiet; another task's is logged; after forget() the next one is."""
    once = Once()
    with capture_logs() as logs:
        for _ in range(3):
            once.warn("database_unavailable", error="locked")
        once.warn("archive_write_failed", "t1", error="ENOSPC")
        once.warn("archive_write_failed", "t2", error="ENOSPC")
        once.forget("database_unavailable")
        once.warn("database_unavailable", error="locked")
    assert [(e["event"], e["task_id"]) for e in logs] == [
        ("database_unavailable", None), ("archive_write_failed", "t1"),
        ("archive_write_failed", "t2"), ("database_unavailable", None)]
