"""Run every RemoteRun benchmark, print the table and write bench/results/latest.json."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib import (  # noqa: E402 - bench/ must be importable as a package first
    REPO,
    RESULTS,
    Context,
    Row,
    ensure_log_file,
    machine,
    raise_nofile,
    write_scripts,
)

Group = Callable[[Context], Awaitable[list[Row]]]
# group -> (module, function); imported only once --ref has chosen which remoterun to load
GROUPS: dict[str, tuple[str, str]] = {
    "trivial": ("b_tasks", "trivial"),
    "submissions": ("b_tasks", "submissions"),
    "hooks": ("b_hooks", "hooks"),
    "stream": ("b_stream", "stream"),
    "stream_masked": ("b_stream", "stream_masked"),
    "latency": ("b_stream", "latency"),
    "fanout": ("b_fanout", "fanout"),
    "idle": ("b_fanout", "idle"),
    "pending": ("b_pending", "pending"),
    "archive": ("b_archive", "archive"),
    "search": ("b_search", "search_group"),  # issue 28
    "replay": ("b_replay", "replay"),
    "soak": ("b_soak", "soak"),
    "sandbox": ("b_sandbox", "sandbox"),
    "cluster": ("b_cluster", "cluster"),  # PostgreSQL + Redis, 1 and 3 nodes (issue 16)
}


def group(name: str) -> Group:
    """The benchmark function of a group."""
    module, function = GROUPS[name]
    found: Group = getattr(importlib.import_module(f"bench.{module}"), function)
    return found


def pin_engine(ref: str, work: Path) -> str:
    """Load remoterun from a snapshot of `ref` (here and in every server); its commit id.

    Others edit remoterun/ in this working tree while benchmarks run: a pinned run measures
    one commit, not whatever the files were when each server started.
    """
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    src = work / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "remoterun"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    if "remoterun" in sys.modules:
        raise RuntimeError("remoterun was imported before it could be pinned")
    sys.path.insert(0, str(src))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src),
                                                             os.environ.get("PYTHONPATH")]))
    return commit


def fmt(value: float | None) -> str:
    """A figure for the table: 3 significant digits, thousands separated."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    head = ["benchmark", "RemoteRun", "baseline", "ratio", "target", "met?"]
    lines = [head]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        base = f"{fmt(r.baseline)} ({r.baseline_name})" if r.baseline_name else fmt(r.baseline)
        if r.baseline_name and r.baseline is None:
            base = f"{r.baseline_name}: {r.notes}" if "not available" in r.notes else base
        lines.append([r.name, f"{fmt(r.value)} {r.unit}", base,
                      fmt(r.ratio) if r.ratio is not None else "-", r.target, met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
           for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


async def run_group(name: str, ctx: Context, rows: list[Row], failures: list[str],
                    load: dict[str, float]) -> None:
    """Run one group, adding its rows (or a failure row) to `rows`."""
    t0 = time.monotonic()
    load[name] = round(os.getloadavg()[0], 2)
    print(f"== {name} (load average {load[name]}) ...", file=sys.stderr, flush=True)
    try:
        got = await group(name)(ctx)
    except Exception as exc:  # one broken group must not hide the others' figures
        traceback.print_exc()
        failures.append(f"{name}: {exc!r}")
        got = [Row(name, "", None, notes=f"FAILED: {exc!r}", met=False)]
    rows += got
    for row in got:
        print(f"   {row.name}: {fmt(row.value)} {row.unit} vs {fmt(row.baseline)}  {row.notes}",
              file=sys.stderr, flush=True)
    print(f"   ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)


async def main() -> int:
    """Parse arguments, run the groups in order, report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (< ~60 s)")
    parser.add_argument("--only", nargs="*", choices=list(GROUPS), help="run these groups")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--profile", action="store_true",
                        help="record each server with py-spy into bench/results/profile-*.txt")
    parser.add_argument("--ref", help="benchmark remoterun/ as committed at this git ref "
                        "(default: the working tree as it is)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch folder (server logs, databases, archives)")
    args = parser.parse_args()
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_file = await asyncio.to_thread(ensure_log_file, RESULTS / "logtext.txt")
    began = time.monotonic()
    rows: list[Row] = []
    failures: list[str] = []
    load: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="rrbench-"))
    engine = pin_engine(args.ref, work) if args.ref else "working tree"
    at_start = machine()
    ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3), work=work,
                  scripts=write_scripts(work / "scripts"), log_file=log_file,
                  profile=args.profile)
    try:
        for name in args.only or list(GROUPS):
            await run_group(name, ctx, rows, failures, load)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - began
    print(table(rows))
    print()
    for row in rows:
        if row.notes:
            print(f"- {row.name.strip()}: {row.notes}")
    at_end = machine()
    print(f"\n{'quick' if args.quick else 'full'} run, {ctx.runs} run(s) per figure, "
          f"{elapsed:.0f} s; engine: {engine}; {at_start}; repo at the end: "
          f"{at_end['commit']}; 1-min load average before each group: {load}")
    if args.keep:
        print(f"scratch folder kept: {work}")
    report = {"mode": "quick" if args.quick else "full", "runs": ctx.runs,
              "elapsed_s": round(elapsed, 1), "engine": engine,
              "engine_path": str(Path(importlib.import_module("remoterun").__file__ or "").parent),
              "machine": at_start,
              "repo_at_end": at_end["commit"],
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_average": load, "rows": [r.to_json() for r in rows],
              "failures": failures}
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
