"""Controls between nodes, signed: only a node holding the cluster's key may drive a task.

A control travels on `rr:ctl` as one JSON object: the task, the action (`method`), its
arguments (bytes as base64, flagged in `bytes`), the sender's clock (`ts_ms`), a random
`nonce`, and `mac`, the hex HMAC-SHA256 over `rr-ctl-v1\\n` + the other fields as sorted-key
JSON. The key is derived from the secret key every node already shares (`vault`), never
sent nor logged. A node acts on a control only if its MAC verifies (in constant time), it was
sent within `MAX_AGE_S` of the node's clock, its nonce was not seen in that window (a replay),
and its action is one of `Action` with arguments of the types that action takes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from remoterun.wire import SIGNALS

KEY_PURPOSE = b"remoterun cluster controls"  # the derived key's label (vault.derive)
MAC_PREFIX = b"rr-ctl-v1\n"
MAX_AGE_S = 30.0  # older (or this far in the future: clock skew) is refused
_SIGNUMS = frozenset(int(s) for s in SIGNALS.values())


class Action(StrEnum):
    """What one node may ask another to do to a task it runs; nothing else is called."""

    CANCEL = "cancel"
    WRITE = "write"
    CLOSE_STDIN = "close_stdin"
    RESIZE = "resize"
    SIGNAL = "signal"


_ARGS: dict[Action, tuple[type, ...]] = {
    Action.CANCEL: (), Action.WRITE: (bytes,), Action.CLOSE_STDIN: (),
    Action.RESIZE: (int, int), Action.SIGNAL: (int,)}


@dataclass(frozen=True)
class Control:
    """A verified control for one task."""

    task_id: str
    action: Action
    args: tuple[Any, ...] = ()


class ControlRefused(Exception):
    """A control that must not act; the message names the reason, never the key."""


class Controls:
    """Signs this node's controls and verifies those it receives."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time,
                 max_age_s: float = MAX_AGE_S):
        self._key = key
        self._clock = clock
        self.max_age_s = max_age_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it expires

    def _mac(self, fields: dict[str, Any]) -> str:
        body = MAC_PREFIX + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def sign(self, control: Control) -> bytes:
        """The control as published."""
        fields: dict[str, Any] = {
            "task_id": control.task_id, "method": str(control.action),
            "args": [base64.b64encode(a).decode() if isinstance(a, bytes) else a
                     for a in control.args],
            "bytes": [isinstance(a, bytes) for a in control.args],
            "ts_ms": int(self._clock() * 1000), "nonce": os.urandom(16).hex()}
        return orjson.dumps({**fields, "mac": self._mac(fields)})

    def verify(self, raw: bytes) -> Control:
        """The control a message carries; ControlRefused unless it may act."""
        try:
            fields = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ControlRefused("not JSON") from None
        if not isinstance(fields, dict):
            raise ControlRefused("not an object")
        mac = fields.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(
                mac.encode(), self._mac(fields).encode()):
            raise ControlRefused("bad or missing signature")
        now = self._clock()
        ts_ms, nonce = fields.get("ts_ms"), fields.get("nonce")
        if not isinstance(ts_ms, int) or abs(now - ts_ms / 1000) > self.max_age_s:
            raise ControlRefused("stale or from the future")
        if not isinstance(nonce, str) or not self._first_sight(nonce, now):
            raise ControlRefused("replayed")
        return _parse(fields)

    def _first_sight(self, nonce: str, now: float) -> bool:
        """Remember a nonce for the freshness window; whether it is new."""
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + 2 * self.max_age_s
        return True


def _parse(fields: dict[str, Any]) -> Control:
    """A signed message's control: an allow-listed action with arguments of its types."""
    try:
        action = Action(str(fields.get("method")))
    except ValueError:
        raise ControlRefused("not an allowed action") from None
    task_id, args, flags = fields.get("task_id"), fields.get("args"), fields.get("bytes")
    wanted = _ARGS[action]
    if not (isinstance(task_id, str) and isinstance(args, list) and isinstance(flags, list)
            and len(args) == len(flags) == len(wanted)):
        raise ControlRefused(f"bad arguments for {action}")
    values: list[Any] = []
    for value, is_bytes, kind in zip(args, flags, wanted, strict=True):
        if kind is bytes and is_bytes is True and isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise ControlRefused(f"bad arguments for {action}") from None
        if type(value) is not kind or (kind is int and is_bytes is not False):
            raise ControlRefused(f"bad arguments for {action}")
        values.append(value)
    if action is Action.SIGNAL and values[0] not in _SIGNUMS:
        raise ControlRefused("not an allowed signal")
    if action is Action.RESIZE and not all(0 < v < 65536 for v in values):
        raise ControlRefused("bad arguments for resize")
    return Control(task_id, action, tuple(values))
