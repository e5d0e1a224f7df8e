"""A script's parameters: the declared schema, and a submission's params checked against it."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from remoterun.errors import BadRequest, InvalidParams

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # \Z: "$" would let "k\n" through
PARAM_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Param:
    """One declared parameter of a script."""

    name: str
    type: str = "string"
    required: bool = False
    default: Scalar | None = None
    enum: tuple[Scalar, ...] | None = None
    pattern: str | None = None
    secret: bool = False
    description: str = ""
    min: float | None = None
    max: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The schema entry as GET /scripts shows it."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        for key in ("default", "enum", "pattern", "description", "min", "max"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = list(value) if key == "enum" else value
        if self.secret:
            out["secret"] = True
            out.pop("default", None)
        return out



def check_params(schema: tuple[Param, ...] | None, params: Any) -> dict[str, Scalar]:
    """Check params against a script's schema (None: free-form); return them complete, in the
    order to pass them. BadRequest or InvalidParams, naming each bad field."""
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object", details=[
            {"field": "params", "message": "expected an object"}])
    if schema is None:
        return _free_form(params)
    problems = case_collisions(params)
    known = {p.name: p for p in schema}
    for key in params:
        if key not in known:
            problems.append({"field": f"params.{key}", "message": "unknown parameter"})
    out: dict[str, Scalar] = {}
    for p in schema:
        if p.name in params:
            message = check_value(p, params[p.name])
            if message:
                problems.append({"field": f"params.{p.name}", "message": message})
            else:
                out[p.name] = params[p.name]
        elif p.default is not None:
            out[p.name] = p.default
        elif p.required:
            problems.append({"field": f"params.{p.name}", "message": "required"})
    if problems:
        raise InvalidParams("params do not match the script's schema", details=problems)
    return out


def _scalar_problem(value: Any) -> str | None:
    """Why a param value cannot reach a script's argv and environment, if it cannot."""
    if isinstance(value, str) and "\x00" in value:
        return "must not contain a NUL byte"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


def case_collisions(keys: Any) -> list[dict[str, str]]:
    """Keys that differ only in case would set the same RR_PARAM_ variable."""
    seen: dict[str, str] = {}
    problems = []
    for key in keys:
        other = seen.setdefault(str(key).upper(), key)
        if other != key:
            problems.append({"field": f"params.{key}",
                             "message": f"differs from {other!r} only in case"})
    return problems


def _free_form(params: dict[str, Any]) -> dict[str, Scalar]:
    problems = case_collisions(params)
    for key, value in params.items():
        if not KEY_RE.match(key):
            problems.append({"field": f"params.{key}", "message": "key must match "
                             + KEY_RE.pattern})
        elif value is None or not isinstance(value, str | int | float | bool):
            problems.append({"field": f"params.{key}",
                             "message": "value must be a string, number or boolean"})
        elif (problem := _scalar_problem(value)) is not None:
            problems.append({"field": f"params.{key}", "message": problem})
    if problems:
        raise InvalidParams("params must be flat scalars with simple keys", details=problems)
    return {key: params[key] for key in sorted(params)}


def check_value(p: Param, value: Any) -> str | None:
    """Why a value does not fit a declared parameter, if it does not."""
    if p.type == "boolean":
        ok = isinstance(value, bool)
    elif p.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif p.type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:  # a secret's value is never shown back, not even a wrong one
        return f"expected {p.type}" if p.secret else f"expected {p.type}, got {json.dumps(value)}"
    problem = _scalar_problem(value)
    if problem is not None:
        return problem
    if p.enum is not None and value not in p.enum:
        return f"must be one of {list(p.enum)}"
    if p.pattern is not None and not re.fullmatch(p.pattern, value):
        return f"must match {p.pattern}"
    if p.min is not None and value < p.min:
        return f"must be >= {p.min}"
    if p.max is not None and value > p.max:
        return f"must be <= {p.max}"
    return None


def param_value(value: Scalar) -> str:
    """A param as PROTOCOL.md passes it: strings as they are, other scalars as JSON writes them."""
    return value if isinstance(value, str) else json.dumps(value)
