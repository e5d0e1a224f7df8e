#!/usr/bin/env python3
"""Writes RR_PARAM_BYTES bytes of numbered text to stdout as fast as it can (after the line
RR_PARAM_FIRST, if given)."""
import os
import sys

total = int(os.environ.get("RR_PARAM_BYTES", "1000000"))
out = sys.stdout.buffer
if os.environ.get("RR_PARAM_FIRST"):
    out.write(os.environ["RR_PARAM_FIRST"].encode() + b"\n")
written, i = 0, 0
while written < total:
    line = f"{i:09d} the quick brown fox jumps over the lazy dog\n".encode()[: total - written]
    out.write(line)
    written += len(line)
    i += 1
out.flush()
