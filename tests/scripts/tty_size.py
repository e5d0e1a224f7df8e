#!/usr/bin/env python3
"""Reports its terminal's size at start and with every line typed (no signal handler: each
line reads the size as it is then)."""
import os
import sys


def size() -> str:
    rows_cols = os.get_terminal_size(sys.stdout.fileno())
    return f"{rows_cols.lines} {rows_cols.columns}"


print(f"size {size()}", flush=True)
for line in sys.stdin:
    print(f"typed: {line.rstrip()} size {size()}", flush=True)
