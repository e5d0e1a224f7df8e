#!/usr/bin/env python3
"""Writes RR_PARAM_BYTES random (incompressible) bytes to stdout, then says it is done."""
import os
import sys

total = int(os.environ.get("RR_PARAM_BYTES", "1000000"))
out = sys.stdout.buffer
while total > 0:
    chunk = os.urandom(min(total, 65536))
    out.write(chunk)
    total -= len(chunk)
out.flush()
sys.stderr.write("noise done\n")
