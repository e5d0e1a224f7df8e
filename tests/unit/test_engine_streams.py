"""Streams: a live task's hub holds the Task value it is given; readers get copies (pure)."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import a_task, make_settings

from remoterun.engine.live import TaskState, Where
from remoterun.engine.peers import Alone
from remoterun.engine.streams import Streams
from remoterun.state import TaskStatus


def streams(tmp_path, tasks, publish=None) -> Streams:
    """Streams over a bare table of live tasks (no database: these paths read none)."""
    engine = SimpleNamespace(tasks=tasks)
    return Streams(engine, make_settings(tmp_path), db=None, queue=None,  # type: ignore[arg-type]
                   peers=Alone(None, 1.0), recovery=None, publish=publish,  # type: ignore[arg-type]
                   request_wait_s=1.0)


def test_a_hub_is_made_once_numbering_after_what_was_reserved_with_the_publish_hook(tmp_path):
    """First use makes the hub (next seq past last_seq and seq_reserved); the hook subscribes."""
    hooked = []
    state = TaskState(a_task(last_seq=7, seq_reserved=4096))
    s = streams(tmp_path, {"t": state}, publish=lambda tid, hub: hooked.append(tid) or object())
    hub = s.hub(state)
    assert s.hub(state) is hub and hub.next_seq == 4097 and hub.task is state.task
    assert hooked == ["t"] and len(hub.subscribers) == 1


def test_a_new_task_value_reaches_the_hub_and_readers_never_hold_the_live_one(tmp_path):
    """record() replaces the hub's Task; live_row is a copy a handler may change freely."""
    state = TaskState(a_task())
    s = streams(tmp_path, {"t": state})
    hub = s.hub(state)
    state.record(state.task.evolve(status=TaskStatus.RUNNING, started_at=3.0))
    assert hub.task is state.task
    sub = hub.subscribe(0, tmp_path, 1 << 20)
    assert sub.task["status"] == "running" and sub.task["node"] == "local"
    row = s.live_row("t")
    assert row is not None and row["status"] == "running"
    row["status"] = "cancelled"
    assert state.task.status is TaskStatus.RUNNING and s.live_row("x") is None


def test_a_finishing_task_has_no_controls_and_alone_knows_no_other_server(tmp_path):
    """attempt(): None once the task is finishing, and None for a task held nowhere here."""
    state = TaskState(a_task(), where=Where.FINISHING)
    s = streams(tmp_path, {"t": state})
    assert s.attempt("t") is None and s.attempt("elsewhere") is None
