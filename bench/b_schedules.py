"""Schedules at scale (issue 29): a server with N `[[schedules]]` (10,000 by default).

idle:  N schedules that are never due soon (once a year): the server's CPU over `--idle-s`,
       given per idle hour, and its start-up time with N schedules.
burst: N schedules due at the same second (`every = "60s"`, overlap allow): how late each
       slot was decided (its record's `recorded_at` minus the slot) and how late its task
       started (`started_at` minus `scheduled_for`: this one waits for the workers too).

    python bench/b_schedules.py [--count 10000] [--idle-s 60] [--workers 8]

Standalone (not in run.py's table): it prints its figures and writes nothing else.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def config(folder: Path, count: int, when: str, workers: int) -> Path:
    """A config.toml with `count` schedules of true.sh, each timed by `when`."""
    scripts = folder / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    script = scripts / "true.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    tables = "".join(f'[[schedules]]\nname = "s{i}"\nscript = "true.sh"\n{when}\n'
                     f'overlap = "allow"\n' for i in range(count))
    path = folder / "config.toml"
    path.write_text(f'[paths]\nscripts = "scripts"\narchive = "archive"\ndb = "rr.db"\n'
                    f"[engine]\nworkers = {workers}\nmax_pending = {count * 2}\n"
                    f'[sandbox]\nmode = "none"\n{tables}')
    return path


def start(folder: Path, path: Path) -> tuple[subprocess.Popen[bytes], float]:
    """The server, once /healthz answers; seconds that took."""
    port = 20000 + os.getpid() % 20000
    began = time.monotonic()
    log = (folder / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "remoterun", "serve", "--config", str(path),
                             "--port", str(port)], cwd=folder, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    while time.monotonic() - began < 300:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc, time.monotonic() - began
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: see {folder}/server.log") from None
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def cpu_s(pid: int) -> float:
    """User + system seconds of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def idle(count: int, idle_s: float, workers: int) -> None:
    """Start-up with `count` schedules, then CPU while none is due."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, ready_s = start(folder, config(folder, count, 'cron = "0 0 1 1 *"', workers))
        try:
            time.sleep(2)  # let start-up's work settle before measuring
            before = cpu_s(proc.pid)
            time.sleep(idle_s)
            used = cpu_s(proc.pid) - before
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"idle: {count} schedules: ready in {ready_s:.1f} s; server CPU {used:.2f} s over "
          f"{idle_s:.0f} s = {used * 3600 / idle_s:.1f} s per idle hour")


def burst(count: int, workers: int) -> None:
    """`count` slots due at the same second: decision lag and start lag."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, _ = start(folder, config(folder, count, 'every = "60s"', workers))
        try:
            boundary = (time.time() // 60 + 1) * 60
            db = sqlite3.connect(folder / "rr.db")
            deadline = boundary + 600
            while time.time() < deadline:
                time.sleep(1)
                done = db.execute("SELECT COUNT(*) FROM tasks WHERE scheduled_for = ? AND "
                                  "started_at IS NOT NULL", (boundary,)).fetchone()[0]
                if done >= count:
                    break
            decided = [r[0] - boundary for r in db.execute(
                "SELECT recorded_at FROM schedule_slots WHERE slot = ?", (boundary,))]
            started = [r[0] - boundary for r in db.execute(
                "SELECT started_at FROM tasks WHERE scheduled_for = ? AND started_at IS NOT "
                "NULL", (boundary,))]
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"burst: {len(decided)}/{count} slots recorded; decided after p50 "
          f"{pct(decided, 50):.2f} s, p99 {pct(decided, 99):.2f} s, max {max(decided):.2f} s")
    print(f"burst: {len(started)} tasks started ({workers} workers); start lag p50 "
          f"{pct(started, 50):.2f} s, p99 {pct(started, 99):.2f} s, max {max(started):.2f} s")


def main() -> None:
    """Run both measures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    idle(args.count, args.idle_s, args.workers)
    burst(args.count, args.workers)


if __name__ == "__main__":
    main()
