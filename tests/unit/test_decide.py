"""decide: an attempt's outcome from how its process ended and why it was stopped (pure)."""

from __future__ import annotations

from conftest import a_task

from remoterun.engine.attempt import decide
from remoterun.runner import RunResult
from remoterun.state import TaskStatus as S

TASK = a_task(attempt=1, max_retries=0)


def test_exit_zero_succeeds_and_non_zero_fails():
    """Exit 0 is success; any other code is failed, with the code kept."""
    assert decide(TASK, 10, RunResult(0), None, None, None).status is S.SUCCESS
    outcome = decide(TASK, 10, RunResult(3), None, None, None)
    assert (outcome.status, outcome.exit_code, outcome.retry) == (S.FAILED, 3, False)


def test_a_timeout_names_its_limit_and_a_cancel_is_cancelled():
    """Stopped by the timeout: timeout with the limit named; asked to cancel: cancelled."""
    outcome = decide(TASK, 10, RunResult(-9, stopped="timeout"), None, None, 2.0)
    assert outcome.status is S.TIMEOUT and "2.0 s" in (outcome.error or "")
    assert decide(TASK, 10, RunResult(-15), None, "cancel", None).status is S.CANCELLED
    assert decide(TASK, 10, None, "never started", "cancel", None).status is S.CANCELLED


def test_retries_follow_max_retries_unless_refused():
    """A failure retries while attempts remain; a refusal (not retryable) never does."""
    row = TASK.evolve(max_retries=1)
    assert decide(row, 10, RunResult(1), None, None, None).retry
    assert not decide(row.evolve(attempt=2), 10, RunResult(1), None, None, None).retry
    assert not decide(row, 10, None, "integrity", None, None, retryable=False).retry


def test_a_spawn_error_fails_with_its_reason():
    """No process: failed, the reason as the error, no exit code."""
    outcome = decide(TASK, 10, None, "no such file", None, None)
    assert (outcome.status, outcome.error, outcome.exit_code) == (S.FAILED, "no such file", None)
