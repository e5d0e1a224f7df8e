#!/usr/bin/env python3
"""Writes n numbered lines alternating stdout/stderr (or only stdout), optionally slowly."""
import os
import sys
import time

n = int(os.environ.get("RR_PARAM_N", "100"))
delay = float(os.environ.get("RR_PARAM_DELAY", "0"))
both = os.environ.get("RR_PARAM_BOTH", "false") == "true"
for i in range(1, n + 1):
    out = sys.stderr if both and i % 2 == 0 else sys.stdout
    out.write(f"line {i}\n")
    out.flush()
    if delay:
        time.sleep(delay)
