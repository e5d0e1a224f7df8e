#!/usr/bin/env python3
"""Reports as JSON what a task sees and may do: its environment, its parent's, the paths in
RR_PARAM_SEE (colon-separated: a folder's entries, "file", or false), whether it can create a
file in each folder of RR_PARAM_WRITE ($VARIABLES expanded; true, or the error), whether it
can write each file of RR_PARAM_REWRITE (its own content back), and whether it reaches
RR_PARAM_CONNECT (host:port)."""
import json
import os
import socket


def see(path):
    if os.path.isdir(path):
        return sorted(os.listdir(path))
    return "file" if os.path.exists(path) else False


def write(folder):
    try:
        with open(os.path.join(os.path.expandvars(folder), "rr-probe-file"), "w") as fh:
            fh.write("x")
        return True
    except OSError as exc:
        return exc.strerror


def rewrite(path):
    try:
        with open(path, "r+") as fh:
            value = fh.read()
            fh.seek(0)
            fh.write(value)  # what it holds already: harmless wherever it succeeds
        return True
    except OSError as exc:
        return exc.strerror


def parent_env():
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError as exc:
        return exc.strerror


def connect(where):
    host, port = where.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError as exc:
        return exc.strerror or str(exc)


def paths(name):
    return [p for p in os.environ.get(name, "").split(":") if p]


report = {
    "env": dict(os.environ),
    "parent_env": parent_env(),
    "see": {p: see(p) for p in paths("RR_PARAM_SEE")},
    "write": {p: write(p) for p in paths("RR_PARAM_WRITE")},
    "rewrite": {p: rewrite(p) for p in paths("RR_PARAM_REWRITE")},
    "connect": connect(os.environ["RR_PARAM_CONNECT"]) if "RR_PARAM_CONNECT" in os.environ
    else None,
    "pid": os.getpid(),
    "uid": os.getuid(),
}
print(json.dumps(report))
