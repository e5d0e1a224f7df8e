"""spawn: the direct fork_exec path gives the child exactly what Popen would, errors included."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from remoterun.spawn import FAST, encode_env, spawn

VIEW = """
import json, os, sys
open_fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                  "sid_is_pid": os.getsid(0) == os.getpid(), "fds": open_fds,
                  "stdin": sys.stdin.read()}))
"""
# The direct path exists on CPython 3.11 only; elsewhere spawn is Popen, tested as such.
PATHS = [pytest.param(True, id="fork_exec")] * FAST + [pytest.param(False, id="popen")]


def _run(tmp_path: Path, fast: bool, argv: list[str], env: dict[str, str],
         cwd: Path) -> dict[str, object]:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    leaked = os.open(os.devnull, os.O_RDONLY)  # inheritable: must still not reach the child
    os.set_inheritable(leaked, True)
    try:
        pid = spawn(argv, encode_env(env), str(cwd), in_r, out_w, out_w, fast=fast)
    finally:
        for fd in (in_r, out_w, leaked):
            os.close(fd)
    os.write(in_w, b"typed")
    os.close(in_w)
    with os.fdopen(out_r, "rb") as out:
        seen = json.loads(out.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return seen  # type: ignore[no-any-return]


@pytest.mark.parametrize("fast", PATHS)
def test_the_child_gets_argv_env_cwd_stdio_and_a_session(tmp_path, fast):
    """argv as given, exactly env, the cwd, a session of its own, fds 0-2 only."""
    env = {"PATH": os.environ["PATH"], "RR_PARAM_NAME": "naïve ✓", "EMPTY": ""}
    seen = _run(tmp_path, fast, [sys.executable, "-c", VIEW, "--x=1", "two words"], env,
                tmp_path)
    assert seen["argv"] == ["--x=1", "two words"]
    assert {k: v for k, v in seen["env"].items() if k != "LC_CTYPE"} == env  # type: ignore[union-attr]
    assert seen["cwd"] == str(tmp_path)
    assert seen["sid_is_pid"] is True
    assert seen["stdin"] == "typed"
    assert seen["fds"] == [0, 1, 2, 3]  # 3: the listdir's own


@pytest.mark.parametrize("fast", PATHS)
def test_signals_the_server_ignores_are_reset(tmp_path, fast):
    """The server ignores SIGPIPE and SIGXFSZ (Python does); its tasks start with neither."""
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = spawn(["/bin/cat", "/proc/self/status"], [], str(tmp_path), null, w, w, fast=fast)
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r, "rb") as out:
        status = out.read().decode()
    os.waitpid(pid, 0)
    line = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
    ignored = int(line.split()[1], 16)
    for number in (signal.SIGPIPE, signal.SIGXFSZ):  # what Python ignores and restores
        assert not ignored & (1 << (number - 1)), signal.Signals(number).name


@pytest.mark.parametrize("fast", PATHS)
def test_exec_failures_raise_what_popen_raises(tmp_path, fast):
    """Missing file, no permission, no #! line, missing cwd: the same OSErrors as Popen."""
    plain = tmp_path / "plain.txt"
    plain.write_text("echo hi\n")
    no_shebang = tmp_path / "noshebang"
    no_shebang.write_bytes(b"\x00\x01binary")
    no_shebang.chmod(0o755)
    env = encode_env({"PATH": os.environ["PATH"]})
    cases = [(str(tmp_path / "missing"), tmp_path, FileNotFoundError, errno.ENOENT),
             (str(plain), tmp_path, PermissionError, errno.EACCES),
             (str(no_shebang), tmp_path, OSError, errno.ENOEXEC),
             (sys.executable, tmp_path / "gone", FileNotFoundError, errno.ENOENT)]
    for path, cwd, kind, number in cases:
        r, w = os.pipe()
        try:
            with pytest.raises(kind) as raised:
                spawn([path], env, str(cwd), r, w, w, fast=fast)
        finally:
            os.close(r)
            os.close(w)
        assert raised.value.errno == number
        assert raised.value.filename == (str(cwd) if cwd.name == "gone" else path)
