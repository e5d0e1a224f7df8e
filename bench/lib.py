"""Shared pieces of the suite: result rows, statistics, machine facts, log text, scripts."""

from __future__ import annotations

import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MB = 1_000_000
LOG_FILE_BYTES = 32 * 1024 * 1024  # the streamed scripts `cat` this file N times


@dataclass
class Row:
    """One line of the table: RemoteRun's figure, the baseline's, their ratio and the target."""

    name: str
    unit: str
    value: float | None
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None
    higher_is_better: bool = True
    runs: list[float] = field(default_factory=list)
    baseline_runs: list[float] = field(default_factory=list)
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        """RemoteRun over the baseline."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        """The row as latest.json stores it."""
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Context:
    """What every benchmark group gets: mode, sizes, scratch folder, scripts, log file."""

    quick: bool
    runs: int
    work: Path
    scripts: Path
    log_file: Path
    profile: bool = False

    @property
    def log_bytes(self) -> int:
        """The size of the shared log-text file."""
        return self.log_file.stat().st_size

    def size(self, full: Any, quick: Any) -> Any:
        """Pick the full-mode or the quick-mode figure."""
        return quick if self.quick else full


def progress(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the suite started."""
    print(f"   [{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


_STARTED = time.monotonic()


# Statistics ------------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of the values."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def interleave(runs: int, *measures: Callable[[], Awaitable[float]]) -> list[list[float]]:
    """Run each measure `runs` times, alternating them so that noise hits all alike."""
    out: list[list[float]] = [[] for _ in measures]
    for _ in range(runs):
        for i, measure in enumerate(measures):
            out[i].append(await measure())
    return out


# Machine ---------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise the open-files soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return {"nproc": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "aiohttp": aiohttp.__version__, "commit": commit}


# Log text and scripts --------------------------------------------------------------------------

_TEMPLATES = (
    "GET /api/v1/{w}/{n} {code} {ms}ms bytes={big}",
    "POST /api/v1/{w}/{id}/{w2} {code} {ms}ms",
    "connection from 10.{a}.{b}.{c}:{port} accepted (worker {a})",
    "worker-{a} processed batch {n} ({small} items) in {ms} ms",
    "cache {w} miss for key {w2}:{id}, loading from {w3}",
    "retrying {w} request to {w2}.internal:{port} after {ms}ms (attempt {small})",
    "user {w}{a} logged in from {w2} session={id}",
    "job {id} state {w} -> {w2} queue={w3} depth={small}",
    "checkpoint written: /var/lib/{w}/{w2}-{n}.dat size={big}",
    "{w} {w2} {w3} {w} {w2} value={big} ratio={ratio}",
)


def log_text(size: int, seed: int = 7) -> bytes:
    """Varied ASCII log lines: timestamps, levels, components, templates with random fields."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(400)]
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like, as real vocabularies are
    levels = ["INFO"] * 12 + ["DEBUG"] * 5 + ["WARN"] * 2 + ["ERROR"]
    parts: list[str] = []
    total, t = 0, 1_790_000_000.0
    while total < size:
        t += rng.random() * 0.004
        secs, ms = int(t), int(t * 1000) % 1000
        w, w2, w3 = rng.choices(words, weights, k=3)
        message = rng.choice(_TEMPLATES).format(
            w=w, w2=w2, w3=w3, n=rng.randint(1, 99999), id=f"{rng.getrandbits(32):08x}",
            code=rng.choice((200, 200, 200, 201, 204, 404, 500)), ms=rng.randint(1, 999),
            big=rng.randint(1000, 9999999), a=rng.randint(0, 31), b=rng.randint(0, 255),
            c=rng.randint(1, 254), port=rng.randint(1024, 65535), small=rng.randint(1, 64),
            ratio=f"{rng.random():.3f}")
        line = (f"2026-11-29T{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
                f".{ms:03d}Z {rng.choice(levels):5} [{words[rng.randint(0, 15)]}] {message}\n")
        parts.append(line)
        total += len(line)
    return "".join(parts).encode()[:size]


def ensure_log_file(path: Path, size: int = LOG_FILE_BYTES) -> Path:
    """The shared log-text file, generated once and cached under bench/results/."""
    if not path.is_file() or path.stat().st_size != size:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # 8 MiB of unique lines, tiled: gzip's 32 KiB window cannot tell the difference
        unique = log_text(min(size, 8 * 1024 * 1024))
        tmp.write_bytes((unique * (size // len(unique) + 1))[:size])
        tmp.replace(path)
    return path


SCRIPTS = {
    "trivial.sh": "#!/bin/sh\necho hi\n",
    "sleep.sh": "#!/bin/sh\nexec sleep \"${RR_PARAM_SECONDS:-120}\"\n",
    # cat the log file TIMES times; with GATE set, first wait until that file exists
    "stream.sh": ("#!/bin/sh\nif [ -n \"$RR_PARAM_GATE\" ]; then\n"
                  "  while [ ! -e \"$RR_PARAM_GATE\" ]; do sleep 0.01; done\nfi\n"
                  "n=${RR_PARAM_TIMES:-1}\nwhile [ \"$n\" -gt 0 ]; do\n"
                  "  cat \"$RR_PARAM_FILE\" || exit 1\n  n=$((n - 1))\ndone\n"),
    # exits once its reader is gone, so that no flooder outlives a killed server
    "flood.sh": "#!/bin/sh\nwhile :; do cat \"$RR_PARAM_FILE\" || exit 1; done\n",
    "tick.py": ("#!/usr/bin/env python3\n"
                "import os, sys, time\n"
                "n = int(os.environ.get('RR_PARAM_LINES', '100'))\n"
                "period = float(os.environ.get('RR_PARAM_PERIOD', '0.02'))\n"
                "time.sleep(float(os.environ.get('RR_PARAM_DELAY', '0.5')))\n"
                "start = time.monotonic()\n"
                "for i in range(n):\n"
                "    sys.stdout.write(f'{time.time():.6f} tick {i}\\n')\n"
                "    sys.stdout.flush()\n"
                "    time.sleep(max(0.0, start + (i + 1) * period - time.monotonic()))\n"),
}


def write_scripts(folder: Path) -> Path:
    """The bench scripts directory."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in SCRIPTS.items():
        path = folder / name
        path.write_text(body)
        path.chmod(0o755)
    return folder
