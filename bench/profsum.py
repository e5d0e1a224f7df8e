"""Summarise a py-spy raw (collapsed stacks) profile: top functions by own and total time."""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    """`func (path/to/file.py:12)` as `file.py:func`, without the line number."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    parts = match["file"].split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
    return f"{short}:{match['func']}"


def summarise(path: Path, top: int = 25, thread: str | None = None) -> str:
    """The top-`top` functions by own samples and by inclusive samples, as text."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if thread is not None and not (frames and thread in frames[0]):
            continue
        n = int(count)
        samples += n
        names = [_name(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not names:
            continue
        own[names[-1]] += n
        for name in set(names):
            total[name] += n
    out = [f"{path.name}: {samples} samples"]
    for title, counter in (("own", own), ("inclusive", total)):
        out.append(f"-- top by {title} time")
        out += [f"{100 * c / max(samples, 1):5.1f}%  {name}"
                for name, c in counter.most_common(top)]
    return "\n".join(out)


def main() -> None:
    """Print the summary of the profiles named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only stacks whose first frame contains this")
    args = parser.parse_args()
    for file in args.files:
        print(summarise(file, args.top, args.thread))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
