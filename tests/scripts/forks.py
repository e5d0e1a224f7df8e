#!/usr/bin/env python3
"""Forks RR_PARAM_N children that sleep (a bounded fork storm); exits 3 when a fork is refused."""
import os
import sys
import time

n = int(os.environ.get("RR_PARAM_N", "50"))
for i in range(n):
    try:
        pid = os.fork()
    except OSError as exc:
        print(f"fork {i} refused: {exc.strerror}", flush=True)
        sys.exit(3)
    if pid == 0:
        time.sleep(30)
        os._exit(0)
print(f"forked {n}", flush=True)
