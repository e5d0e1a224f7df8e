"""Signed controls between nodes (remoterun/cluster/control.py), without a process or socket:
what verifies, and each way a message is refused."""

from __future__ import annotations

import os
import signal

import orjson
import pytest

from remoterun.cluster.control import Action, Control, ControlRefused, Controls

KEY = os.urandom(32)


class Clock:
    """A settable wall clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_signed_control_verifies_once():
    """A node's own control verifies to the same control; the same bytes again are a replay."""
    controls = Controls(KEY)
    sent = Control("t1", Action.WRITE, (b"hi\n",))
    raw = controls.sign(sent)
    assert controls.verify(raw) == sent
    with pytest.raises(ControlRefused, match="replayed"):
        controls.verify(raw)


@pytest.mark.parametrize("control", [
    Control("t", Action.CANCEL), Control("t", Action.CLOSE_STDIN),
    Control("t", Action.RESIZE, (80, 24)), Control("t", Action.SIGNAL, (int(signal.SIGINT),)),
])
def test_each_allowed_action_round_trips(control):
    """Every allow-listed action, with its arguments, verifies as it was signed."""
    controls = Controls(KEY)
    assert controls.verify(controls.sign(control)) == control


def test_another_key_or_no_mac_is_refused():
    """A control signed with another key, or whose mac was removed or altered, is refused."""
    raw = Controls(os.urandom(32)).sign(Control("t", Action.CANCEL))
    with pytest.raises(ControlRefused, match="signature"):
        Controls(KEY).verify(raw)
    fields = orjson.loads(Controls(KEY).sign(Control("t", Action.CANCEL)))
    tampered = {**fields, "task_id": "other"}
    del fields["mac"]
    for message in (fields, tampered):
        with pytest.raises(ControlRefused, match="signature"):
            Controls(KEY).verify(orjson.dumps(message))


def test_a_stale_or_future_control_is_refused():
    """Sent more than MAX_AGE_S before (or after) the receiver's clock: refused."""
    sender_clock, receiver_clock = Clock(), Clock()
    raw = Controls(KEY, sender_clock).sign(Control("t", Action.CANCEL))
    receiver = Controls(KEY, receiver_clock)
    receiver_clock.now += receiver.max_age_s + 1
    with pytest.raises(ControlRefused, match="stale"):
        receiver.verify(raw)
    receiver_clock.now -= 2 * (receiver.max_age_s + 1)
    with pytest.raises(ControlRefused, match="stale"):
        receiver.verify(raw)


def test_nonces_are_forgotten_only_after_the_window():
    """The replay memory holds a nonce as long as its control could still be fresh."""
    clock = Clock()
    controls = Controls(KEY, clock)
    controls.verify(controls.sign(Control("t", Action.CANCEL)))
    clock.now += 3 * controls.max_age_s
    controls.verify(controls.sign(Control("t", Action.CANCEL)))
    assert len(controls._seen) == 1


def signed_fields(**fields):
    """A message signed with KEY whose fields are given (bypassing Control's types)."""
    controls = Controls(KEY)
    base = orjson.loads(controls.sign(Control("t", Action.CANCEL)))
    del base["mac"]
    base.update(fields)
    return orjson.dumps({**base, "mac": controls._mac(base)})


@pytest.mark.parametrize(("fields", "reason"), [
    ({"method": "pause"}, "not an allowed action"),
    ({"method": "__init__"}, "not an allowed action"),
    ({"method": "write", "args": ["text"], "bytes": [False]}, "bad arguments"),
    ({"method": "write", "args": ["!!"], "bytes": [True]}, "bad arguments"),
    ({"method": "signal", "args": [int(signal.SIGSTOP)], "bytes": [False]}, "signal"),
    ({"method": "signal", "args": [True], "bytes": [False]}, "bad arguments"),
    ({"method": "resize", "args": [80], "bytes": [False]}, "bad arguments"),
    ({"method": "resize", "args": [0, -1], "bytes": [False, False]}, "resize"),
    ({"method": "cancel", "args": [1], "bytes": [False]}, "bad arguments"),
])
def test_a_signed_control_outside_the_allow_list_is_refused(fields, reason):
    """A valid signature does not make any method callable, nor any argument acceptable."""
    with pytest.raises(ControlRefused, match=reason):
        Controls(KEY).verify(signed_fields(**fields))
