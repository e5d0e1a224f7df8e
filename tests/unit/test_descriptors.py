"""The loop's accept failures are logged at most once a second, with a count of the rest."""

from __future__ import annotations

import asyncio
import errno

from structlog.testing import capture_logs

from remoterun.cli.descriptors import ACCEPT_FAILED, AcceptFailures


def test_accept_failures_are_logged_once_per_interval_with_a_count():
    """1,000 accept failures in a burst give one line; the next, past the interval, names the
    999 it did not log."""
    handler = AcceptFailures(interval_s=1.0)
    loop = asyncio.new_event_loop()
    context = {"message": ACCEPT_FAILED, "exception": OSError(errno.EMFILE, "Too many open files")}
    try:
        with capture_logs() as logged:
            for _ in range(1000):
                handler(loop, context)
            handler.last -= 1.0  # as if a second had passed
            handler(loop, context)
    finally:
        loop.close()
    assert [entry["event"] for entry in logged] == ["accept_failed", "accept_failed"]
    assert logged[0]["suppressed"] == 0 and logged[1]["suppressed"] == 999
    assert "Too many open files" in logged[0]["error"]
