"""Task: the stored fields as one value; its wire form is the row's, byte for byte (pure)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import a_task

from remoterun.state import Task, TaskStatus
from remoterun.wire import dumps, task_json


def test_its_json_is_the_rows_byte_for_byte_on_one_server_and_on_a_cluster():
    """to_json() of a stored row's Task is task_json(row): "local" alone, the owner in a cluster."""
    row = {**a_task(started_at=5.0, status=TaskStatus.RUNNING).to_row(), "params": '{"n": 2}'}
    assert dumps(Task.from_row(row).to_json()) == dumps(task_json(row))
    assert Task.from_row(row).to_json()["node"] == "local"
    clustered = {**row, "owner": "web-2", "node": None, "labels": ["eu"]}
    assert dumps(Task.from_row(clustered).to_json()) == dumps(task_json(clustered))
    assert Task.from_row(clustered).to_json()["node"] == "web-2"
    unowned = {**clustered, "owner": None}  # pending again after a retry: no node
    assert Task.from_row(unowned).to_json()["node"] is None


def test_evolve_makes_a_new_value_and_refuses_an_unknown_field():
    """evolve() leaves the original as it was; a misspelt field is a TypeError, not a new key."""
    task = a_task()
    done = task.evolve(status=TaskStatus.SUCCESS, exit_code=0)
    assert (task.status, task.exit_code) == (TaskStatus.PENDING, None)
    assert (done.status, done.exit_code) == (TaskStatus.SUCCESS, 0)
    with pytest.raises(TypeError):
        task.evolve(exit_cod=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.status = TaskStatus.FAILED  # type: ignore[misc]
    assert not hasattr(task, "__dict__")  # slotted


def test_a_row_round_trips_and_each_copy_is_the_callers():
    """from_row(to_row()) is the same Task; changing a row handed out changes no Task."""
    task = a_task(pid=42, seq_reserved=4096)
    row = task.to_row()
    assert Task.from_row(row) == task and "owner" not in row
    row["status"] = "failed"
    assert task.status is TaskStatus.PENDING and task.to_row()["status"] == "pending"
